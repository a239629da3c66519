"""AutoencoderKL: parity with a tiny random diffusers AutoencoderKL, loader tree, presets, helpers."""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.convert.common import CheckpointError
from t2i.convert.vae import load_diffusers_vae
from t2i.models import vae as vae_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def _randomize(model, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * noise)
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


CONFIGS = {
    "sd_like": dict(block_out_channels=(32, 64), norm_num_groups=8, latent_channels=4),
    "flux_like": dict(block_out_channels=(32, 64), norm_num_groups=32, latent_channels=16, use_quant_conv=False,
                      use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1159,
                      scaling_factor=0.3611),
}


_CACHE = {}


def _reference(name, tmp_path_factory):
  """(torch model, save_pretrained folder) for CONFIGS[name], built once per session."""
  if name not in _CACHE:
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, **CONFIGS[name])
    _randomize(ref.eval(), seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder, safe_serialization=True)
    _CACHE[name] = ref, folder
  return _CACHE[name]


@pytest.fixture(params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  return _reference(request.param, tmp_path_factory)


def test_parity_encode_decode(reference):
  ref, folder = reference
  vae, params = load_diffusers_vae(folder)
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = rng.normal(size=(2, 16, 16, vae.latent_channels)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    want_mean = dist.mean.permute(0, 2, 3, 1).numpy()
    want_logvar = dist.logvar.permute(0, 2, 3, 1).numpy()
    want_dec = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
  with jax.default_matmul_precision("highest"):
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))(params, x)
    dec = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))(params, z)
  assert mean.shape == (2, 16, 16, vae.latent_channels)
  assert _rel(mean, want_mean) <= 1e-5
  assert _rel(logvar, want_logvar) <= 1e-5
  assert _rel(dec, want_dec) <= 1e-5


def test_loaded_tree_matches_init(reference):
  _, folder = reference
  vae, params = load_diffusers_vae(folder)
  x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
  want = flax.core.meta.unbox(jax.eval_shape(vae.init, jax.random.key(0), x)["params"])
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(params)
  for w, p in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(params)):
    assert (w.shape, w.dtype) == (p.shape, p.dtype)


def test_every_param_has_logical_axes():
  vae = vae_lib.AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=8,
                              down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
  boxed = jax.eval_shape(vae.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, flax.core.meta.Partitioned))
  assert leaves and all(isinstance(v, flax.core.meta.Partitioned) for v in leaves)
  assert all(len(v.names) == v.value.ndim for v in leaves)


def test_call_sampling_remat_and_dtype(tmp_path_factory):
  _, folder = _reference("sd_like", tmp_path_factory)
  vae, params = load_diffusers_vae(folder)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  remat = vae.clone(remat=True)

  shifted = jax.tree_util.tree_map(lambda v: v, params)  # logvar channels pushed far out of range
  shifted["quant_conv"]["conv"]["bias"] = params["quant_conv"]["conv"]["bias"] + jnp.asarray([0.] * 4 + [1e3] * 4)

  @jax.jit
  def run(p, x, r):
    return (vae.apply(p, x), vae.apply(p, x, sample_posterior=True, rngs={"latent": r})[0],
            remat.apply(p, x)[0], vae.apply({"params": shifted}, x, method=vae.encode))

  (rec, mean, _), rec_s, rec_r, (mean_hi, logvar_hi) = run({"params": params}, x, jax.random.key(1))
  np.testing.assert_allclose(mean_hi, mean, rtol=1e-5, atol=1e-6)
  assert float(logvar_hi.min()) == float(logvar_hi.max()) == 20.0  # clipped like DiagonalGaussianDistribution
  assert rec.shape == x.shape and mean.shape == (1, 8, 8, 4)
  assert not np.allclose(rec, rec_s, atol=1e-3)  # sampled latents differ from the mean
  np.testing.assert_allclose(rec_r, rec, rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception, match="latent"):
    jax.eval_shape(lambda p: vae.apply(p, x, sample_posterior=True), {"params": params})  # no rng given
  out = jax.eval_shape(vae.clone(dtype=jnp.bfloat16).apply, {"params": params}, x)
  assert out[0].dtype == jnp.bfloat16 and out[1].dtype == jnp.float32
  boxed = jax.eval_shape(vae.clone(param_dtype=jnp.bfloat16).init, jax.random.key(0), x)["params"]
  assert {v.dtype for v in jax.tree_util.tree_leaves(flax.core.meta.unbox(boxed))} == {jnp.dtype(jnp.bfloat16)}


def test_latent_helpers():
  mean = jnp.full((2, 4, 4, 16), 0.5)
  z = vae_lib.latents_from_moments(mean, jnp.log(jnp.full_like(mean, 4.0)), jax.random.key(0))
  assert abs(float(z.std()) - 2.0) < 0.3
  cfg = vae_lib.VAE_PRESETS["flux"]
  zl = vae_lib.to_latent(z, cfg)
  np.testing.assert_allclose(zl, (z - 0.1159) * 0.3611, rtol=1e-6)
  np.testing.assert_allclose(vae_lib.from_latent(zl, vae_lib.AutoencoderKL(**cfg)), z, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(vae_lib.to_latent(z, vae_lib.VAE_PRESETS["sd"]), z * 0.18215, rtol=1e-6)
  assert vae_lib.VAE_PRESETS["sdxl"]["scaling_factor"] == 0.13025
  assert float(vae_lib.kl_divergence(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))[0]) == 0.0


def test_presets_shapes():
  for name, cfg in vae_lib.VAE_PRESETS.items():
    vae = vae_lib.AutoencoderKL(**cfg)
    out = jax.eval_shape(lambda: vae.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))[0])
    assert out[1].shape == (1, 8, 8, cfg["latent_channels"]), name
    assert out[0].shape == (1, 64, 64, 3), name


def test_bad_input_errors(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    load_diffusers_vae(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL",
                                                    "down_block_types": ["DownBlock2D"]}))
  with pytest.raises(CheckpointError, match="down_block_types"):
    load_diffusers_vae(tmp_path)
  vae = vae_lib.AutoencoderKL(act_fn="tanhh")
  with pytest.raises(ValueError, match="act_fn"):
    vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  vae = vae_lib.AutoencoderKL()
  with pytest.raises(ValueError, match="3 channels"):
    vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))


def test_sharded_decode_matches(tmp_path_factory):
  import flax.linen as nn

  from experiments.common import AXIS_RULES
  from jax.sharding import PartitionSpec as P

  from t2i.parallel import flax_rules, logical_shardings, make_mesh
  _, folder = _reference("sd_like", tmp_path_factory)
  vae, params = load_diffusers_vae(folder)
  z = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 4)), jnp.float32)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(vae.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  sharded = jax.device_put(params, logical_shardings(boxed, mesh, AXIS_RULES))
  assert sharded["decoder"]["conv_in"]["conv"]["kernel"].sharding.spec == P(None, None, "fsdp", "tensor")
  decode = lambda p, z: vae.apply({"params": p}, z, method=vae.decode)
  with jax.default_matmul_precision("highest"):
    want = jax.jit(decode)(params, z)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(AXIS_RULES)):
      got = jax.jit(decode)(sharded, z)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
