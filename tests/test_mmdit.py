"""FLUX-style MMDiT: parity with diffusers' FluxTransformer2DModel, loader, RoPE, packing and hooks."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.models.mmdit import (MMDIT_PRESETS, FluxTransformer, JointAttention, dummy_inputs, image_ids,
                              pack_latents, text_ids, unpack_latents)
from t2i.nn.rope import apply_rope, rope_frequencies

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
GRID, TXT, BATCH = 8, 7, 2


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _torch_model(seed: int, **overrides):
  torch.manual_seed(seed)
  model = diffusers.FluxTransformer2DModel(**{**TINY, **overrides}).eval()
  with torch.no_grad():  # randomise every parameter (norm scales around 1)
    for name, p in model.named_parameters():
      noise = 0.2 * torch.randn_like(p)
      p.copy_(1.0 + noise if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name
              else p + noise)
  return model


def _inputs(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  out = dict(hidden_states=rng.standard_normal((BATCH, GRID * GRID, cfg["in_channels"])),
             encoder_hidden_states=rng.standard_normal((BATCH, TXT, cfg["joint_attention_dim"])),
             pooled_projections=rng.standard_normal((BATCH, cfg["pooled_projection_dim"])),
             timestep=np.array([0.3, 0.85]), img_ids=image_ids(GRID, GRID), txt_ids=text_ids(TXT))
  out = {k: np.asarray(v, np.float32) for k, v in out.items()}
  if cfg.get("guidance_embeds"):
    out["guidance"] = np.array([3.5, 1.0], np.float32)
  return out


@pytest.mark.parametrize("overrides,scan", [(dict(guidance_embeds=True), False),
                                            (dict(guidance_embeds=False, patch_size=2, out_channels=4), False),
                                            (dict(guidance_embeds=True), True)],
                         ids=["guidance", "no_guidance_patch2", "guidance_scan_layers"])
def test_parity_with_diffusers(tmp_path, overrides, scan):
  from t2i.convert.flux import abstract_params, load_diffusers_flux

  ref = _torch_model(0, **overrides)
  ref.save_pretrained(tmp_path)
  module, params = load_diffusers_flux(tmp_path, scan_layers=scan)
  assert module.guidance_embeds == overrides["guidance_embeds"] and module.scan_layers == scan
  if scan:
    assert "transformer_blocks_stack" in params and "transformer_blocks_0" not in params
    assert params["single_transformer_blocks_stack"]["linear1"]["dense"]["kernel"].shape[0] == TINY["num_single_layers"]

  # Loaded tree == eval_shape(init) tree, leaf by leaf.
  shapes = flax.traverse_util.flatten_dict(abstract_params(module))
  loaded = flax.traverse_util.flatten_dict(params)
  assert set(shapes) == set(loaded)
  for k, v in shapes.items():
    assert loaded[k].shape == v.shape and loaded[k].dtype == v.dtype, k
  assert sum(v.size for v in loaded.values()) == sum(p.numel() for p in ref.parameters())

  x = _inputs({**TINY, **overrides})
  with torch.no_grad():
    want = ref(**{k: torch.from_numpy(v) for k, v in x.items()}, return_dict=False)[0].numpy()
  with jax.default_matmul_precision("highest"):
    got = jax.jit(module.apply)({"params": params}, **x)
  assert got.shape == want.shape == (BATCH, GRID * GRID, module.patch_size ** 2 * (module.out_channels or 16))
  err = _rel(got, want)
  print(f"flux parity {overrides}: rel err {err:.2e}, max|ref| {np.abs(want).max():.3f}")
  assert err <= 1e-5


def test_flux1_dev_param_count():
  module = FluxTransformer(**MMDIT_PRESETS["flux1_dev"])
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(module)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)["params"]))
  print(f"flux1_dev params: {n}")
  assert abs(n - 11.9e9) / 11.9e9 < 0.01
  assert n == 11_901_408_320  # black-forest-labs/FLUX.1-dev transformer


def test_rope_properties_and_diffusers_convention():
  from diffusers.models.embeddings import apply_rotary_emb
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed

  axes = (4, 6, 6)
  rng = np.random.default_rng(0)
  ids = np.concatenate([text_ids(3), image_ids(4, 5)]).astype(np.float32)
  x = rng.standard_normal((2, len(ids), 3, sum(axes))).astype(np.float32)
  freqs = rope_frequencies(ids, axes)
  y = np.asarray(apply_rope(jnp.asarray(x), freqs))
  np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[:, :3], x[:, :3], atol=1e-6)  # zero ids: identity

  cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(torch.from_numpy(ids))
  want = apply_rotary_emb(torch.from_numpy(x), (cos, sin), sequence_dim=1).numpy()
  assert _rel(y, want) <= 1e-6

  # <rope(q, i), rope(k, j)> depends only on i - j, separately for each axis.
  q, k = rng.standard_normal((2, 1, 1, 1, sum(axes))).astype(np.float32)
  def dot(pi, pj):
    fi, fj = rope_frequencies(np.array([pi], np.float32), axes), rope_frequencies(np.array([pj], np.float32), axes)
    return float(jnp.sum(apply_rope(jnp.asarray(q), fi) * apply_rope(jnp.asarray(k), fj)))
  for axis in range(3):
    shift = np.eye(3, dtype=np.float32)[axis]
    base_i, base_j = np.array([1.0, 2.0, 3.0]), np.array([4.0, 0.0, 7.0])
    d0 = dot(base_i, base_j)
    for s in (1.0, 5.0, 11.0):
      assert abs(dot(base_i + s * shift, base_j + s * shift) - d0) < 1e-4
    assert abs(dot(base_i + 3 * shift, base_j) - d0) > 1e-3  # but it does depend on the offset

  batched = rope_frequencies(np.stack([ids, ids + 1]), axes)
  np.testing.assert_allclose(batched[0][0], freqs[0], atol=1e-7)


def test_pack_unpack_and_ids_match_pipeline():
  from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

  z = np.random.default_rng(0).standard_normal((2, 6, 10, 4)).astype(np.float32)  # NHWC
  tokens = pack_latents(jnp.asarray(z))
  assert tokens.shape == (2, 15, 16)
  want = FluxPipeline._pack_latents(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()), 2, 4, 6, 10).numpy()
  np.testing.assert_array_equal(np.asarray(tokens), want)
  np.testing.assert_array_equal(np.asarray(unpack_latents(tokens, 6, 10)), z)
  np.testing.assert_array_equal(image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu",
                                                                                         torch.float32).numpy())


@pytest.fixture(scope="module")
def tiny():
  """Tiny preset with random host-built params (no init compile) and a shared jitted apply."""
  module = FluxTransformer(**MMDIT_PRESETS["tiny"])
  x = _inputs(MMDIT_PRESETS["tiny"], seed=1)
  x["timestep"] = np.array([0.25, 0.75], np.float32)  # exact in bf16 (see the bf16 check)
  shapes = flax.traverse_util.flatten_dict(
      nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), **x)))["params"])
  rng = np.random.default_rng(0)
  params = {}
  for path, s in shapes.items():
    noise = rng.standard_normal(s.shape).astype(np.float32)
    params[path] = (noise / np.sqrt(s.shape[0]) if path[-1] == "kernel"
                    else 1 + 0.1 * noise if path[-1] == "scale" else 0.1 * noise)
  params = flax.traverse_util.unflatten_dict(params)
  apply = jax.jit(module.apply)
  return module, params, x, apply, apply({"params": params}, **x)


def test_intercept_context_kv_and_sow_attn_probs(tiny):
  module, params, x, apply, base = tiny
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, JointAttention) and context.method_name == "project_context_kv":
      k, v = next_fun(*args, **kwargs)
      calls.append(k.shape)
      return k, jnp.zeros_like(v)
    return next_fun(*args, **kwargs)

  @jax.jit
  def intercepted(p, x):
    with nn.intercept_methods(interceptor):
      return module.apply({"params": p}, **x)

  zeroed = intercepted(params, x)
  cfg = MMDIT_PRESETS["tiny"]
  assert calls == [(BATCH, TXT, cfg["num_attention_heads"], cfg["attention_head_dim"])] * cfg["num_layers"]
  assert _rel(zeroed, base) > 1e-3

  out, state = jax.jit(lambda p, x: module.apply({"params": p}, **x, mutable=["intermediates"]))(params, x)
  np.testing.assert_allclose(out, base, atol=1e-5)
  probs = jax.tree_util.tree_leaves(state["intermediates"])
  n = TXT + GRID * GRID
  assert len(probs) == cfg["num_layers"] + cfg["num_single_layers"]
  for p in probs:
    assert p.shape == (BATCH, cfg["num_attention_heads"], n, n)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  assert "transformer_blocks_0" in state["intermediates"]
  assert "single_transformer_blocks_1" in state["intermediates"]
  _, state = jax.eval_shape(lambda: module.apply({"params": params}, **x, mutable=["params"]))
  assert "intermediates" not in state  # not mutable -> nothing sown


def test_remat_batched_ids_bf16_and_grad(tiny):
  module, params, x, apply, base = tiny
  batched = dict(x, img_ids=np.broadcast_to(x["img_ids"], (BATCH,) + x["img_ids"].shape),
                 txt_ids=np.broadcast_to(x["txt_ids"], (BATCH,) + x["txt_ids"].shape))
  np.testing.assert_allclose(apply({"params": params}, **batched), base, atol=1e-6)

  # bf16 compute (as diffusers, the timestep is cast to bf16 before * 1000; the fixture's are bf16-exact).
  out = jax.jit(module.clone(dtype=jnp.bfloat16).apply)({"params": params}, **x)
  err = _rel(out.astype(jnp.float32), base)
  print(f"tiny bf16 vs f32 rel err {err:.3f}")
  assert out.dtype == jnp.bfloat16 and err < 0.1

  # remat: same forward, finite non-zero gradients (one block of each kind, to keep compile time low).
  remat = module.clone(remat=True, num_layers=1, num_single_layers=1)
  small = {k: v for k, v in params.items() if not k.endswith("blocks_1")}
  ref = jax.jit(module.clone(num_layers=1, num_single_layers=1).apply)({"params": small}, **x)
  loss, g = jax.jit(jax.value_and_grad(lambda p: jnp.mean(remat.apply({"params": p}, **x) ** 2)))(small)
  np.testing.assert_allclose(loss, jnp.mean(ref ** 2), rtol=1e-5)
  norms = [float(jnp.abs(v).max()) for v in jax.tree_util.tree_leaves(g)]
  assert all(np.isfinite(norms)) and min(norms) > 0  # every parameter gets a gradient

  with pytest.raises(ValueError, match="guidance"):
    jax.eval_shape(lambda: module.apply({"params": params}, **{k: v for k, v in x.items() if k != "guidance"}))


def test_loader_errors(tmp_path):
  from safetensors.numpy import load_file, save_file

  from t2i.convert.common import CheckpointError
  from t2i.convert.flux import load_diffusers_flux

  _torch_model(1, guidance_embeds=False).save_pretrained(tmp_path)
  f = tmp_path / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(f))
  tensors["extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, str(f))
  with pytest.raises(CheckpointError, match="unexpected tensors"):
    load_diffusers_flux(tmp_path)
  del tensors["extra.weight"], tensors["single_transformer_blocks.1.proj_mlp.bias"]
  save_file(tensors, str(f))
  with pytest.raises(CheckpointError, match="proj_mlp.bias"):
    load_diffusers_flux(tmp_path)


def test_sharded_apply_matches(tiny):
  """Params laid out by their logical axes on a (data 2, fsdp 2, tensor 2) mesh; activations constrained."""
  from experiments.common import AXIS_RULES
  from t2i import parallel
  from t2i.parallel.sharding import flax_rules, logical_shardings

  module, params, x, _, base = tiny
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **x))["params"]
  shardings = logical_shardings(boxed, mesh, AXIS_RULES)
  sharded = jax.device_put(params, shardings)
  assert any(len(s.spec) and s.spec[0] is not None for s in jax.tree_util.tree_leaves(shardings))
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(AXIS_RULES)):
    out = jax.jit(module.apply)({"params": sharded}, **x)
  np.testing.assert_allclose(out, base, atol=2e-5 * float(jnp.abs(base).max()))


def test_scan_layers_matches_unrolled(tiny):
  """scan_layers=True (blocks in nn.scan, params stacked) gives the unrolled model's output and gradients, with and
  without remat; stack_layers / unstack_layers are inverse; weight decay and shardings see per-layer shapes."""
  from jax.sharding import PartitionSpec as P

  from experiments import common
  from t2i import parallel
  from t2i.models.mmdit import BLOCK_KINDS
  from t2i.nn.scan import stack_layers, unstack_layers
  from t2i.parallel import sharding
  from t2i.train.optimizer import decay_mask

  module, params, x, _, _ = tiny
  stacked = stack_layers(params, BLOCK_KINDS)
  assert sorted(k for k in stacked if "blocks" in k) == ["single_transformer_blocks_stack", "transformer_blocks_stack"]
  flat = flax.traverse_util.flatten_dict
  assert flat(unstack_layers(stacked)).keys() == flat(params).keys()
  for k, v in flat(unstack_layers(stacked)).items():
    np.testing.assert_array_equal(v, flat(params)[k])

  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, **x) ** 2)
  with jax.default_matmul_precision("highest"):
    want, g_want = jax.jit(jax.value_and_grad(loss(module)))(params)
    for remat in (False, True):
      scanned = module.clone(scan_layers=True, remat=remat)
      got, g_got = jax.jit(jax.value_and_grad(loss(scanned)))(stacked)
      assert _rel(got, want) < 1e-6, remat
      g_got = flat(unstack_layers(jax.tree.map(np.asarray, g_got)))
      for k, v in flat(g_want).items():
        assert _rel(g_got[k], v) < 1e-5, (remat, k)

  # The init of a scanned module has exactly this layout, the stack axis is named "layers", the rules replicate it.
  boxed = jax.eval_shape(lambda: module.clone(scan_layers=True).init(jax.random.key(0), **x))["params"]
  assert jax.tree.map(lambda b: b.shape, nn.meta.unbox(boxed)) == jax.tree.map(lambda a: a.shape, stacked)
  kernel = boxed["transformer_blocks_stack"]["ff"]["fc1"]["dense"]["kernel"]
  assert kernel.names == ("layers", "embed", "mlp")
  mesh = parallel.make_mesh(common.mesh_config(data=2, fsdp=2, tensor=2))
  specs = sharding.logical_shardings(boxed, mesh, common.AXIS_RULES)
  assert specs["transformer_blocks_stack"]["ff"]["fc1"]["dense"]["kernel"].spec == P(None, "fsdp", "tensor")

  # Weight decay: kernels decayed, biases and norm scales not, whether stacked or not.
  mask = lambda p: flat(decay_mask("ndim>=2")(p))
  m_unrolled, m_stacked = mask(params), mask(stacked)
  assert any(m_unrolled.values()) and not all(m_unrolled.values())
  for k, v in m_stacked.items():
    assert v == m_unrolled[(k[0].replace("_stack", "_0"),) + k[1:]], k
