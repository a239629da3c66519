"""U-Net: parity with diffusers (tiny random models), preset sizes, hooks, remat/bf16 smoke."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.convert.common import CheckpointError
from t2i.convert.unet import abstract_params, load_diffusers_unet
from t2i.models.unet import UNET_PRESETS, UNet2DConditionModel, dummy_inputs

TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)

TINY_CONFIGS = {
    "sd_conv_proj": dict(TINY, use_linear_projection=False),
    "sd_linear_proj": dict(TINY, use_linear_projection=True, layers_per_block=2, norm_num_groups=32,
                           attention_head_dim=(2, 4), freq_shift=1, flip_sin_to_cos=False),
    "sdxl_like": dict(
        TINY, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24 + 6 * 8),
}


def _save_random_diffusers_unet(config, folder, seed=0):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**{k: list(v) if isinstance(v, tuple) else v
                                            for k, v in config.items()})
  with torch.no_grad():  # diffusers zero-inits some layers; randomise everything.
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(folder, safe_serialization=True)
  return model


@pytest.mark.parametrize("name,scan", [(n, False) for n in TINY_CONFIGS] + [("sdxl_like", True)],
                         ids=list(TINY_CONFIGS) + ["sdxl_like_scan_layers"])
def test_parity_with_diffusers(name, scan, tmp_path):
  torch = pytest.importorskip("torch")
  config = TINY_CONFIGS[name]
  ref = _save_random_diffusers_unet(config, tmp_path)
  module, params = load_diffusers_unet(tmp_path, scan_layers=scan)
  if scan:  # the depth-2 transformer of level 2 is one stacked subtree (t2i.nn.scan)
    stack = params["down_blocks_1_attentions_0"]["transformer_blocks_stack"]
    assert stack["attn1"]["to_q"]["dense"]["kernel"].shape[0] == 2
    assert "transformer_blocks_0" not in params["down_blocks_1_attentions_0"]

  # Converted params match the module's own init exactly (structure, shapes, float32).
  abstract = abstract_params(module)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(abstract), jax.tree.leaves(params)):
    assert a.shape == p.shape and p.dtype == np.float32

  rng = np.random.default_rng(1)
  b, s = 2, config["sample_size"]
  x = rng.standard_normal((b, 4, s, s)).astype(np.float32)
  t = np.array([3.0, 871.0], np.float32)
  ctx = rng.standard_normal((b, 7, 32)).astype(np.float32)
  kwargs, tkwargs = {}, {}
  if config.get("addition_embed_type") == "text_time":
    text_embeds = rng.standard_normal((b, 24)).astype(np.float32)
    time_ids = rng.uniform(0, 1024, (b, 6)).astype(np.float32)
    kwargs = dict(text_embeds=text_embeds, time_ids=time_ids)
    tkwargs = dict(added_cond_kwargs={"text_embeds": torch.tensor(text_embeds),
                                      "time_ids": torch.tensor(time_ids)})
  with torch.no_grad():
    want = ref(torch.tensor(x), torch.tensor(t), torch.tensor(ctx), **tkwargs).sample.numpy()
  with jax.default_matmul_precision("highest"):
    got = module.apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx, **kwargs)
  got = np.asarray(got).transpose(0, 3, 1, 2)
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= 1e-5, err


def test_loader_errors(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    load_diffusers_unet(tmp_path)
  _save_random_diffusers_unet(TINY_CONFIGS["sd_conv_proj"], tmp_path)
  cfg = (tmp_path / "config.json").read_text()
  (tmp_path / "config.json").write_text(cfg.replace('"resnet_time_scale_shift": "default"',
                                                    '"resnet_time_scale_shift": "scale_shift"'))
  with pytest.raises(CheckpointError, match="resnet_time_scale_shift"):
    load_diffusers_unet(tmp_path)
  (tmp_path / "config.json").write_text(cfg)
  load_diffusers_unet(tmp_path)
  from safetensors.numpy import save_file
  save_file({"extra.weight": np.zeros((2,), np.float32)}, str(tmp_path / "extra.safetensors"))
  with pytest.raises(CheckpointError, match="unexpected tensors"):
    load_diffusers_unet(tmp_path)


def test_from_config_ignores_unknown_and_rejects_unsupported():
  m = UNet2DConditionModel.from_config(dict(TINY, _class_name="UNet2DConditionModel", foo=1))
  assert m.block_out_channels == (32, 64)
  with pytest.raises(ValueError, match="down_block_types"):
    UNet2DConditionModel.from_config(dict(TINY, down_block_types=["SimpleCrossAttnDownBlock2D",
                                                                    "DownBlock2D"]))
  with pytest.raises(ValueError, match="transformer_layers_per_block"):
    bad = UNet2DConditionModel(**dict(TINY, transformer_layers_per_block=(1, 2, 3)))
    jax.eval_shape(lambda: bad.init(jax.random.key(0), **dummy_inputs(bad)))
  with pytest.raises(ValueError, match="only_cross_attention"):
    UNet2DConditionModel.from_config(dict(TINY, only_cross_attention=True))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("preset,expected", [("sdxl", 2_567_463_684), ("sd15", 859_520_964)])
def test_preset_param_counts(preset, expected):
  module = UNet2DConditionModel(**UNET_PRESETS[preset])
  n = _count(abstract_params(module))
  assert abs(n - expected) / expected < 0.005, n


def test_logical_axis_names_on_all_params():
  module = UNet2DConditionModel(**TINY_CONFIGS["sdxl_like"])
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(module)))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  specs = nn.get_partition_spec(boxed)
  assert all(len(s) == v.value.ndim for s, v in zip(
      jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)), leaves))


HOOKS_CONFIG = dict(TINY_CONFIGS["sdxl_like"], layers_per_block=1)


@pytest.fixture(scope="module")
def tiny():
  module = UNet2DConditionModel(**HOOKS_CONFIG)
  inputs = dummy_inputs(module, batch=2, text_len=5)
  rng = np.random.default_rng(0)
  inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in inputs.items()}
  # Random params straight from the abstract tree (compiling `init` is slow on CPU).
  params = jax.tree.map(lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), jnp.float32),
                        abstract_params(module))
  return module, params, inputs, module.apply({"params": params}, **inputs)


def test_cross_attention_probs_sown(tiny):
  module, params, inputs, out_plain = tiny
  out, state = module.apply({"params": params}, **inputs, mutable=["intermediates"])
  assert "intermediates" in state
  np.testing.assert_allclose(out, out_plain, rtol=1e-4, atol=1e-4)
  flat = flax.traverse_util.flatten_dict(state["intermediates"])
  probs = {k: v for k, v in flat.items() if k[-1] == "cross_attn_probs"}
  # Block 1 (down: 1 layer x depth 2) + mid (depth 2) + up block 0 (2 layers x depth 2), all at 8x8.
  assert len(probs) == 1 * 2 + 2 + 2 * 2
  for path, (p,) in probs.items():
    assert "attn2" in path
    assert p.shape == (2, 4, 8 * 8, 5), (path, p.shape)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, rtol=1e-5)
  # Without the mutable collection nothing is sown.
  assert not isinstance(out_plain, tuple)


def test_project_kv_interception(tiny):
  module, params, inputs, ref = tiny
  calls = []

  def zero_values(next_fun, args, kwargs, context):
    if context.method_name != "project_kv":
      return next_fun(*args, **kwargs)
    calls.append(context.module.name)
    k, v = next_fun(*args, **kwargs)
    return k, jnp.zeros_like(v)

  with nn.intercept_methods(zero_values):
    out = module.apply({"params": params}, **inputs)
  assert calls and set(calls) == {"attn2"} and len(calls) == 8
  assert float(jnp.abs(out - ref).max()) > 1e-3

  # Identity interception reproduces the output exactly.
  with nn.intercept_methods(lambda f, a, kw, c: f(*a, **kw)):
    same = module.apply({"params": params}, **inputs)
  np.testing.assert_array_equal(same, ref)


def test_remat(tiny):
  module, params, inputs, _ = tiny
  remat = module.clone(remat=True)
  # Every resnet and transformer block of the U-Net is wrapped in a checkpoint.
  jaxpr = jax.make_jaxpr(lambda p: remat.apply({"params": p}, **inputs))(params)
  n_ckpt = str(jaxpr).count("remat2[") + str(jaxpr).count("checkpoint[")
  n_resnets = 2 * 1 + 2 + 2 * 2  # down (1 layer each), mid (2), up (2 layers each)
  n_blocks = 1 * 2 + 2 + 2 * 2  # transformer depth 2 in down block 1, mid, up block 0
  assert n_ckpt == n_resnets + n_blocks, n_ckpt

  # Gradients through a remat'ed transformer stack equal the plain ones.
  from t2i.models.unet import SpatialTransformer
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 4, 4, 32)), jnp.float32)
  ctx = inputs["encoder_hidden_states"]
  st = SpatialTransformer(heads=4, depth=2, norm_num_groups=8, use_linear_projection=True)
  p = jax.eval_shape(lambda: nn.meta.unbox(st.init(jax.random.key(0), x, ctx)["params"]))
  p = jax.tree.map(lambda a: jnp.asarray(0.2 * np.random.default_rng(3).standard_normal(a.shape), a.dtype), p)

  def loss(p, m):
    return jnp.mean(m.apply({"params": p}, x, ctx) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  with jax.default_matmul_precision("highest"):
    g0 = grad(p, st)
    g1 = grad(p, st.clone(remat=True))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_smoke(tiny):
  module, params, inputs, ref = tiny
  bf16 = module.clone(dtype=jnp.bfloat16)
  out = jax.jit(bf16.apply)({"params": params}, **inputs)
  assert out.dtype == jnp.bfloat16 and out.shape == ref.shape
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  rel = float(jnp.abs(out.astype(jnp.float32) - ref).max() / jnp.abs(ref).max())
  assert rel < 0.1, rel


def test_coordinate_embedding(tiny):
  # coord_octaves: zero-initialised, so the output equals the plain U-Net's with the same other params; a nonzero
  # projection adds a different vector at every pixel; the features are the pixel centres and their octaves.
  from t2i.models.unet import coordinate_features
  module, params, inputs, plain_out = tiny
  coord = module.clone(coord_octaves=2)
  init = jax.eval_shape(lambda: nn.meta.unbox(coord.init(jax.random.key(0), **inputs)["params"]))
  assert init["coord_embedding"]["dense"]["kernel"].shape == (2 + 4 * 2, 32)
  zero = coord.init(jax.random.key(0), **inputs)["params"]["coord_embedding"]
  assert all(not np.any(np.asarray(nn.meta.unbox(v))) for v in jax.tree.leaves(zero))
  with_coord = {**params, "coord_embedding": nn.meta.unbox(zero)}
  np.testing.assert_array_equal(coord.apply({"params": with_coord}, **inputs), plain_out)
  kernel = jnp.asarray(np.random.default_rng(4).standard_normal((10, 32)), jnp.float32)
  with_coord["coord_embedding"] = {"dense": {"kernel": kernel, "bias": jnp.zeros((32,))}}
  const = {**inputs, "sample": jnp.zeros_like(inputs["sample"])}
  out = np.asarray(coord.apply({"params": with_coord}, **const))
  assert not np.allclose(out[:, 5, 5], out[:, 5, 10], atol=1e-3)  # same (zero) input, different place
  f = np.asarray(coordinate_features(4, 2, 1))
  np.testing.assert_allclose(f[:, 0, 0], [-0.75, -0.25, 0.25, 0.75], atol=1e-7)  # y of the pixel centres
  np.testing.assert_allclose(f[0, :, 1], [-0.5, 0.5], atol=1e-7)  # x
  np.testing.assert_allclose(f[0, 1, 3], np.sin(np.pi * 0.5), atol=1e-6)  # sin(pi x) at x = 0.5
  np.testing.assert_allclose(f[0, 1, 5], np.cos(np.pi * 0.5), atol=1e-6)  # cos(pi x)


def test_layout_splat(tiny):
  """layout_splat_channels: zero-initialised, so the output equals the plain U-Net's with the same other params;
  with a nonzero projection each token's state lands as a Gaussian at the place its two context channels name,
  so moving a token's place moves its effect (the U-Net spreads it, but it is largest there); the Gaussian is
  right at known points."""
  from t2i.models.unet import splat_weights
  module, params, inputs, plain_out = tiny
  splat = module.clone(layout_splat_channels=(0, 1), layout_splat_sigma=0.2)
  init = splat.init(jax.random.key(0), **inputs)["params"]
  extra = {k: nn.meta.unbox(init[k]) for k in ("layout_gate", "layout_value")}
  d = inputs["encoder_hidden_states"].shape[-1]
  assert extra["layout_value"]["dense"]["kernel"].shape == (d, 32) and not np.any(extra["layout_value"]["dense"]["kernel"])
  with_splat = {**params, **extra}
  np.testing.assert_array_equal(splat.apply({"params": with_splat}, **inputs), plain_out)
  with_splat["layout_value"] = {"dense": {"kernel": jnp.ones((d, 32)), "bias": jnp.zeros((32,))}}
  const = {k: v for k, v in inputs.items() if k != "encoder_hidden_states"}
  const["sample"] = jnp.zeros_like(inputs["sample"])
  ctx = np.zeros(inputs["encoder_hidden_states"].shape, np.float32)
  ctx[:, :, 2] = 1.0  # every token carries the same value
  ctx[:, :, :2] = [-0.8, -0.8]  # all at the top left
  left = np.asarray(splat.apply({"params": with_splat}, **const, encoder_hidden_states=jnp.asarray(ctx)))
  ctx[:, :, :2] = [0.8, 0.8]  # all at the bottom right
  right = np.asarray(splat.apply({"params": with_splat}, **const, encoder_hidden_states=jnp.asarray(ctx)))
  base = np.asarray(module.apply({"params": params}, **const, encoder_hidden_states=jnp.asarray(ctx)))
  assert np.abs(left - base)[:, :2, :2].mean() > 1.5 * np.abs(left - base)[:, -2:, -2:].mean()  # 0.24 vs 0.13
  assert np.abs(right - base)[:, -2:, -2:].mean() > 1.5 * np.abs(right - base)[:, :2, :2].mean()  # 1.11 vs 0.15
  g = np.asarray(splat_weights(jnp.asarray([[[-0.75, 0.25]]]), 4, 4, 0.5))[0, 0]  # (x, y) = a pixel centre
  assert g[2, 0] == 1.0 and abs(g[2, 1] - np.exp(-0.5 ** 2 / (2 * 0.25))) < 1e-6 and g[2, 0] > g[1, 0] > g[0, 0]
  with pytest.raises(ValueError, match="2 context channels"):
    module.clone(layout_splat_channels=(0,)).apply({"params": with_splat}, **inputs)


def test_layout_splat_value_slice_and_object_gate(tiny):
  """layout_splat_value_channels: the gate and value read only that slice of the context (changing the other
  channels, places and object logit aside, leaves the splat as it is); layout_splat_object_channel: the gate is
  multiplied by sigmoid(that channel), so a token whose object logit is very negative is not painted."""
  module, params, inputs, _ = tiny
  d = inputs["encoder_hidden_states"].shape[-1]
  split = d // 2
  splat = module.clone(layout_splat_channels=(0, 1), layout_splat_value_channels=(split, d),
                       layout_splat_object_channel=2)
  init = splat.init(jax.random.key(0), **inputs)["params"]
  extra = {k: nn.meta.unbox(init[k]) for k in ("layout_gate", "layout_value")}
  assert extra["layout_value"]["dense"]["kernel"].shape == (d - split, 32)
  extra["layout_value"] = {"dense": {"kernel": jnp.ones((d - split, 32)), "bias": jnp.zeros((32,))}}
  p = {**params, **extra}
  apply = jax.jit(lambda m, p, ctx: m.apply({"params": p}, **{**inputs, "encoder_hidden_states": ctx}),
                  static_argnums=0)
  ctx = np.array(inputs["encoder_hidden_states"])
  ctx[:, :, :2], ctx[:, :, 2] = 0.5, 20.0  # placed, and marked as object words
  out = apply(splat, p, jnp.asarray(ctx))
  plain = apply(module, params, jnp.asarray(ctx))  # the U-Net without the splat
  assert float(jnp.abs(out - plain).mean()) > 1e-2
  other = ctx.copy()
  other[:, :, 3:split] += 1.0  # outside the value slice: cross-attention sees it, the splat's gate and value do not

  def splat_parts(c):
    _, state = splat.apply({"params": p}, **{**inputs, "encoder_hidden_states": jnp.asarray(c)},
                           capture_intermediates=lambda mdl, _: mdl.name in ("layout_gate", "layout_value"),
                           mutable=["intermediates"])
    return {k: state["intermediates"][k] for k in ("layout_gate", "layout_value")}
  a, b = splat_parts(ctx), splat_parts(other)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert float(jnp.abs(apply(splat, p, jnp.asarray(other)) - out).max()) > 1e-3
  off = ctx.copy()
  off[:, :, 2] = -40.0  # not object words: nothing painted
  np.testing.assert_allclose(apply(splat, p, jnp.asarray(off)), apply(module, params, jnp.asarray(off)),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="outside the context"):
    module.clone(layout_splat_channels=(0, 1), layout_splat_value_channels=(split, d + 1)).apply({"params": p}, **inputs)


def test_layout_splat_spread_channel(tiny):
  """layout_splat_spread_channel: each token's Gaussian has std exp(that channel), clipped to [0.05, 1]; at the
  reference std (layout_splat_sigma) the U-Net's output is the fixed-std splat's (to 1e-6); a wider footprint
  keeps the reference footprint's mass (height (reference / std)^2), a narrower one has height 1."""
  from t2i.models.unet import splat_weights
  module, params, inputs, _ = tiny
  d = inputs["encoder_hidden_states"].shape[-1]
  fixed = module.clone(layout_splat_channels=(0, 1), layout_splat_sigma=0.3)
  spread = fixed.clone(layout_splat_spread_channel=3)
  init = nn.meta.unbox(fixed.init(jax.random.key(0), **inputs)["params"])
  init["layout_value"] = {"dense": {"kernel": jnp.ones((d, 32)) * 0.1, "bias": jnp.zeros((32,))}}
  p = {**params, "layout_gate": init["layout_gate"], "layout_value": init["layout_value"]}
  apply = jax.jit(lambda m, ctx: m.apply({"params": p}, **{**inputs, "encoder_hidden_states": ctx}), static_argnums=0)
  ctx = np.array(inputs["encoder_hidden_states"])
  ctx[:, :, :2] = -0.5
  ctx[:, :, 3] = np.log(0.3)
  np.testing.assert_allclose(apply(spread, jnp.asarray(ctx)), apply(fixed, jnp.asarray(ctx)), rtol=1e-6, atol=1e-6)
  ctx[:, :, 3] = np.log(0.6)
  assert float(jnp.abs(apply(spread, jnp.asarray(ctx)) - apply(fixed, jnp.asarray(ctx))).max()) > 1e-3
  places = jnp.asarray([[[-0.75, 0.25], [-0.75, 0.25], [-0.75, 0.25]]])  # (x, y) = the centre of pixel (2, 0)
  g = np.asarray(splat_weights(places, 4, 4, jnp.asarray([[0.2, 0.3, 0.6]]), reference=0.3))[0]
  assert g[0, 2, 0] == g[1, 2, 0] == 1.0 and abs(g[2, 2, 0] - 0.25) < 1e-6
  assert abs(g[2, 2, 1] - 0.25 * np.exp(-0.5 ** 2 / (2 * 0.36))) < 1e-6
  assert abs(g[0, 2, 1] - np.exp(-0.5 ** 2 / (2 * 0.04))) < 1e-6
  mass = g.sum((1, 2))
  assert mass[0] < mass[1] and abs(mass[2] / mass[1] - 1) < 0.35  # 4x4 grid: the wide one is cut at the edges


def test_token_order_keys(tiny):
  """TENOR: without it cross-attention cannot tell the text tokens' order (permuting them leaves the output
  unchanged); with it the output depends on the order (also with scanned blocks); it adds no parameters, and the
  keys it feeds are to_k(context + sinusoidal encoding of the token index)."""
  from t2i.models.unet import BLOCK_KINDS, Attention, token_order_encoding
  from t2i.nn.scan import stack_layers
  module, params, inputs, plain_out = tiny
  tenor = module.clone(token_order_keys=True)
  assert jax.tree.structure(abstract_params(tenor)) == jax.tree.structure(abstract_params(module))
  perm = {**inputs, "encoder_hidden_states": inputs["encoder_hidden_states"][:, ::-1]}
  apply = jax.jit(lambda m, p, x: m.apply({"params": p}, **x), static_argnums=0)
  np.testing.assert_allclose(apply(module, params, perm), plain_out, rtol=1e-4, atol=1e-5)
  out = apply(tenor, params, inputs)
  assert float(jnp.abs(out - plain_out).max()) > 1e-3
  assert float(jnp.abs(apply(tenor, params, perm) - out).max()) > 1e-3
  scan_out = apply(tenor.clone(scan_layers=True), stack_layers(params, BLOCK_KINDS), inputs)
  np.testing.assert_allclose(scan_out, out, rtol=1e-4, atol=1e-5)

  ctx = inputs["encoder_hidden_states"]
  attn = Attention(heads=2, head_dim=4, out_features=8, token_order_keys=True)
  p = nn.meta.unbox(attn.init(jax.random.key(0), jnp.zeros((2, 3, 8)), ctx)["params"])
  k, v = attn.apply({"params": p}, ctx, method="project_kv")
  pe = token_order_encoding(ctx.shape[1], ctx.shape[2])
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(k, (ctx + pe) @ p["to_k"]["dense"]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, ctx @ p["to_v"]["dense"]["kernel"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pe[0, :], [0.0] * (ctx.shape[2] // 2) + [1.0] * (ctx.shape[2] // 2))  # index 0
