"""Rectified-flow MMDiT of the FLUX.1 family (double-stream + single-stream blocks), flax.linen.

Fields are named as the keys of diffusers' `FluxTransformer2DModel` config, so a `config.json` maps onto
the module (`FluxTransformer.from_config`); `t2i.convert.flux` loads the weights. The call takes diffusers'
forward keyword arguments and returns the packed velocity prediction:

  module.apply({"params": p}, hidden_states=[B, L_img, in_channels], encoder_hidden_states=[B, L_txt, joint],
               pooled_projections=[B, pooled], timestep=[B] in [0, 1], img_ids=[L_img, 3] (or [B, L_img, 3]),
               txt_ids=[L_txt, 3], guidance=[B] or None) -> [B, L_img, patch_size**2 * out_channels]

As in diffusers, `timestep` and `guidance` are cast to `dtype` and multiplied by 1000 before the 256-channel
(cos, sin) sinusoidal embedding. Latents are packed outside the model (`pack_latents`, 2x2 patches).

Architecture: vec = MLP(sin(1000 t)) [+ MLP(sin(1000 g))] + MLP(pooled); image/text tokens are embedded by
linear layers; double-stream blocks keep separate weights per stream (AdaLN-Zero modulation from SiLU(vec),
6 vectors per stream; QKV with bias and per-head RMSNorm; joint attention over [txt; img] with 3-axis RoPE;
GELU-tanh MLP x4; gated residuals); single-stream blocks run on [txt; img] with one modulation (shift, scale,
gate), a fused `linear1` -> (q, k, v, mlp) and `linear2` on [attention, gelu(mlp)]; output AdaLN
(scale, shift) + linear on the image tokens.

Hooks for methods built on top:
  * the text keys/values of every double-stream joint attention come from
    `JointAttention.project_context_kv(context)` -> (k, v) [batch, L_txt, heads, head_dim] (k after its
    RMSNorm, before RoPE), which a caller can replace with `flax.linen.intercept_methods` (same shapes);
  * with `mutable=["intermediates"]`, every block sows its attention probabilities
    [batch, heads, L_txt + L_img, L_txt + L_img] (keys/queries ordered [txt; img]) as "attn_probs".

`scan_layers=True` runs each block kind in a `jax.lax.scan` (`nn.scan`): params of the N blocks are stacked
under `transformer_blocks_stack` / `single_transformer_blocks_stack` with a leading "layers" axis
(`t2i.nn.scan.stack_layers(params, BLOCK_KINDS)` / `unstack_layers` convert to and from the per-block layout
diffusers' names map onto). One
compiled body instead of 57, and under FSDP only one block's gathered weights and full-size gradients are live
at a time (docs/results.md: the flux1_dev step's per-device temp memory).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i.nn.attention import attention_weights, dot_product_attention
from t2i.nn.embeddings import TimestepMLP
from t2i.nn.layers import Dense, RMSNorm, TOKEN_AXES, constrain
from t2i.nn.rope import apply_rope, rope_frequencies
from t2i.nn.scan import STACK_SUFFIX, scanned

Dtype = Any
Freqs = tuple[jax.Array, jax.Array]
TOKENS = TOKEN_AXES
HIDDEN = ("batch", "length", "mlp")
HEADS = ("batch", "length", "heads", "kv")


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Non-affine LayerNorm over the last axis, statistics in float32, result in x.dtype."""
  xf = x.astype(jnp.float32)
  mean = xf.mean(-1, keepdims=True)
  var = jnp.square(xf - mean).mean(-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """LayerNorm(x) * (1 + scale) + shift with per-sample [B, D] shift/scale."""
  return _layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


def time_sinusoid(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """[cos | sin](t * f_i), f_i = exp(-ln(max_period) i / (dim/2)), i < dim/2: float32 [n, dim] of t [n].

  Same values as diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`. The frequency
  table is a host constant: float32 exponents, exponential rounded once to float32. FLUX feeds arguments up
  to ~1e4 (1000 * guidance), where one ulp in a frequency moves the angle by ~1e-4, so an on-device
  `exp` (1-2 ulp) visibly changes the embedding.
  """
  half = dim // 2
  expo = np.float32(-np.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = np.exp(expo.astype(np.float64)).astype(np.float32)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _gelu_tanh(x: jax.Array) -> jax.Array:
  return nn.gelu(x, approximate=True)


class Modulation(nn.Module):
  """Linear(SiLU(vec)) split into `n` vectors [B, dim] (diffusers' AdaLayerNorm* `.linear`)."""
  n: int
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, vec: jax.Array) -> tuple[jax.Array, ...]:
    out = Dense(self.n * self.dim, axes=("embed", "mlp"), name="linear", dtype=self.dtype,
                param_dtype=self.param_dtype)(nn.silu(vec))
    # Batch-sharded, features replicated. Without this constraint XLA's SPMD partitioner (jax 0.10.2, CPU)
    # miscompiles `x + gate * (y @ W)` when x is batch-sharded over ("data", "fsdp") and W over "fsdp"
    # (wrong values for some batch shards); see tests/test_mmdit.py::test_sharded_apply_matches.
    out = constrain(out, ("batch", None))
    return tuple(jnp.split(out, self.n, axis=-1))


def _attend(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Attention [B, L, H, D] -> [B, L, H*D]; sows the probabilities if `intermediates` is mutable."""
  b, n, h, d = q.shape
  if module.is_mutable_collection("intermediates"):
    probs = attention_weights(q, k)
    module.sow("intermediates", "attn_probs", probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
  else:
    out = dot_product_attention(q, k, v)
  return constrain(out.reshape(b, n, h * d), ("batch", "length", "heads"))


class JointAttention(nn.Module):
  """Double-stream attention: separate projections per stream, one softmax over [txt; img]."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    proj = lambda: Dense(inner, axes=("embed", "heads"), **kw)
    self.to_q, self.to_k, self.to_v = proj(), proj(), proj()
    self.add_q_proj, self.add_k_proj, self.add_v_proj = proj(), proj(), proj()
    self.norm_q, self.norm_k = RMSNorm(**kw), RMSNorm(**kw)
    self.norm_added_q, self.norm_added_k = RMSNorm(**kw), RMSNorm(**kw)
    self.to_out = Dense(inner, axes=("heads", "embed"), **kw)
    self.to_add_out = Dense(inner, axes=("heads", "embed"), **kw)

  def _split(self, t: jax.Array) -> jax.Array:
    return constrain(t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim), HEADS)

  def project_context_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Text keys (RMS-normed, before RoPE) and values, each [batch, L_txt, heads, head_dim]."""
    return self.norm_added_k(self._split(self.add_k_proj(context))), self._split(self.add_v_proj(context))

  def __call__(self, x: jax.Array, context: jax.Array, freqs: Freqs) -> tuple[jax.Array, jax.Array]:
    """x: image tokens [B, Li, dim]; context: text tokens [B, Lt, dim]; freqs for [txt; img].

    Returns (image output [B, Li, dim], text output [B, Lt, dim]).
    """
    lt = context.shape[1]
    q = self.norm_q(self._split(self.to_q(x)))
    k = self.norm_k(self._split(self.to_k(x)))
    v = self._split(self.to_v(x))
    cq = self.norm_added_q(self._split(self.add_q_proj(context)))
    ck, cv = self.project_context_kv(context)
    q = apply_rope(jnp.concatenate([cq, q], axis=1), freqs)
    k = apply_rope(jnp.concatenate([ck, k], axis=1), freqs)
    v = jnp.concatenate([cv, v], axis=1)
    out = _attend(self, q, k, v)
    return self.to_out(out[:, lt:]), self.to_add_out(out[:, :lt])


class FeedForward(nn.Module):
  """Dense(mult * dim) -> GELU(tanh) -> Dense(dim)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.mult * x.shape[-1], axes=("embed", "mlp"), name="fc1", **kw)(x)
    h = constrain(_gelu_tanh(h), HIDDEN)
    return Dense(x.shape[-1], axes=("mlp", "embed"), name="fc2", **kw)(h)


class DoubleStreamBlock(nn.Module):
  """MMDiT block with separate image/text weights and joint attention (diffusers' FluxTransformerBlock)."""
  heads: int
  head_dim: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array, freqs: Freqs
               ) -> tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = self.heads * self.head_dim
    i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = Modulation(6, dim, name="norm1", **kw)(vec)
    t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = Modulation(6, dim, name="norm1_context", **kw)(vec)

    img_attn, txt_attn = JointAttention(self.heads, self.head_dim, name="attn", **kw)(
        _modulate(img, i_shift, i_scale), _modulate(txt, t_shift, t_scale), freqs)

    img = constrain(img + i_gate[:, None] * img_attn, TOKENS)
    ff = FeedForward(self.mlp_ratio, name="ff", **kw)(_modulate(img, i_shift2, i_scale2))
    img = constrain(img + i_gate2[:, None] * ff, TOKENS)

    txt = constrain(txt + t_gate[:, None] * txt_attn, TOKENS)
    ff = FeedForward(self.mlp_ratio, name="ff_context", **kw)(_modulate(txt, t_shift2, t_scale2))
    txt = constrain(txt + t_gate2[:, None] * ff, TOKENS)
    return img, txt


class SingleStreamBlock(nn.Module):
  """Parallel attention + MLP block on [txt; img] (diffusers' FluxSingleTransformerBlock)."""
  heads: int
  head_dim: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, vec: jax.Array, freqs: Freqs) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, n, dim = x.shape
    inner = self.heads * self.head_dim
    mlp = self.mlp_ratio * dim
    shift, scale, gate = Modulation(3, dim, name="norm", **kw)(vec)
    h = Dense(3 * inner + mlp, axes=("embed", "mlp"), name="linear1", **kw)(_modulate(x, shift, scale))
    q, k, v, m = jnp.split(h, [inner, 2 * inner, 3 * inner], axis=-1)
    split = lambda t: constrain(t.reshape(b, n, self.heads, self.head_dim), HEADS)
    q = apply_rope(RMSNorm(name="norm_q", **kw)(split(q)), freqs)
    k = apply_rope(RMSNorm(name="norm_k", **kw)(split(k)), freqs)
    attn = _attend(self, q, k, split(v))
    m = constrain(_gelu_tanh(m), HIDDEN)
    out = Dense(dim, axes=("mlp", "embed"), name="linear2", **kw)(jnp.concatenate([attn, m], axis=-1))
    return constrain(x + gate[:, None] * out, TOKENS)


class TimeTextEmbed(nn.Module):
  """vec = MLP(sin256(t)) [+ MLP(sin256(g))] + MLP(pooled) (t, g already multiplied by 1000)."""
  dim: int
  guidance_embeds: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array, pooled: jax.Array, g: jax.Array | None) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sin = lambda s: time_sinusoid(s, 256).astype(self.dtype)
    vec = TimestepMLP(self.dim, name="timestep_embedder", **kw)(sin(t))
    if self.guidance_embeds:
      vec = vec + TimestepMLP(self.dim, name="guidance_embedder", **kw)(sin(g))
    return vec + TimestepMLP(self.dim, name="text_embedder", **kw)(pooled.astype(self.dtype))


class FluxTransformer(nn.Module):
  """FLUX.1 transformer (diffusers `FluxTransformer2DModel` config keys); see the module docstring."""
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: Sequence[int] = (16, 56, 56)
  rope_theta: float = 10000.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @classmethod
  def from_config(cls, config: dict[str, Any], **overrides) -> "FluxTransformer":
    """Builds the module from a diffusers config dict (unknown keys such as `_class_name` are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in names}
    fields.update(overrides)
    return cls(**fields)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def _check(self) -> None:
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f"FluxTransformer: sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal "
                       f"attention_head_dim={self.attention_head_dim}")

  @nn.compact
  def __call__(self, hidden_states: jax.Array, encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
               timestep: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
               guidance: jax.Array | None = None) -> jax.Array:
    self._check()
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim, heads, head_dim = self.inner_dim, self.num_attention_heads, self.attention_head_dim
    b = hidden_states.shape[0]
    if self.guidance_embeds and guidance is None:
      raise ValueError("FluxTransformer: guidance_embeds=True needs `guidance` [batch]")
    if not self.guidance_embeds and guidance is not None:
      raise ValueError("FluxTransformer: `guidance` given but guidance_embeds=False")

    to_batch = lambda s: jnp.broadcast_to(jnp.asarray(s).astype(self.dtype).reshape(-1), (b,)) * 1000
    t = to_batch(timestep)
    g = to_batch(guidance) if guidance is not None else None
    vec = TimeTextEmbed(dim, self.guidance_embeds, name="time_text_embed", **kw)(t, pooled_projections, g)

    img = constrain(Dense(dim, axes=(None, "embed"), name="x_embedder", **kw)(
        hidden_states.astype(self.dtype)), TOKENS)
    txt = constrain(Dense(dim, axes=(None, "embed"), name="context_embedder", **kw)(
        encoder_hidden_states.astype(self.dtype)), TOKENS)
    lt = txt.shape[1]

    txt_ids, img_ids = jnp.asarray(txt_ids), jnp.asarray(img_ids)
    if txt_ids.ndim == 3 or img_ids.ndim == 3:  # per-sample ids
      txt_ids = jnp.broadcast_to(txt_ids, (b,) + txt_ids.shape[-2:])
      img_ids = jnp.broadcast_to(img_ids, (b,) + img_ids.shape[-2:])
    freqs = rope_frequencies(jnp.concatenate([txt_ids, img_ids], axis=-2), self.axes_dims_rope,
                             self.rope_theta)

    if self.scan_layers:
      img, txt = scanned(DoubleStreamBlock, self.num_layers, self.remat, 2)(
          heads, head_dim, name="transformer_blocks" + STACK_SUFFIX, **kw)((img, txt), vec, freqs)[0]
      x = jnp.concatenate([txt, img], axis=1)
      x = scanned(SingleStreamBlock, self.num_single_layers, self.remat, 2)(
          heads, head_dim, name="single_transformer_blocks" + STACK_SUFFIX, **kw)(x, vec, freqs)[0]
    else:
      double = nn.remat(DoubleStreamBlock) if self.remat else DoubleStreamBlock
      single = nn.remat(SingleStreamBlock) if self.remat else SingleStreamBlock
      for i in range(self.num_layers):
        img, txt = double(heads, head_dim, name=f"transformer_blocks_{i}", **kw)(img, txt, vec, freqs)
      x = jnp.concatenate([txt, img], axis=1)
      for i in range(self.num_single_layers):
        x = single(heads, head_dim, name=f"single_transformer_blocks_{i}", **kw)(x, vec, freqs)
    img = x[:, lt:]

    scale, shift = Modulation(2, dim, name="norm_out", **kw)(vec)
    img = _modulate(img, shift, scale)
    out_ch = self.patch_size * self.patch_size * (self.out_channels or self.in_channels)
    return Dense(out_ch, axes=("embed", None), name="proj_out", **kw)(img)


BLOCK_KINDS = ("transformer_blocks", "single_transformer_blocks")  # the scanned kinds (t2i.nn.scan.stack_layers)


# ----------------------------------------------------------------------------------------------------------
# Latent packing (diffusers FluxPipeline convention) and position ids.


def pack_latents(z: jax.Array, patch: int = 2) -> jax.Array:
  """NHWC latents [B, H, W, C] -> tokens [B, (H/p)(W/p), C*p*p].

  Tokens are in row-major order of the (H/p, W/p) grid; the channels of a token are ordered (c, dy, dx),
  exactly as diffusers' `FluxPipeline._pack_latents` orders them from NCHW latents.
  """
  b, h, w, c = z.shape
  if h % patch or w % patch:
    raise ValueError(f"pack_latents: latent size {h}x{w} not divisible by patch {patch}")
  z = z.reshape(b, h // patch, patch, w // patch, patch, c)
  z = z.transpose(0, 1, 3, 5, 2, 4)  # b, h', w', c, dy, dx
  return z.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: jax.Array, h: int, w: int, patch: int = 2) -> jax.Array:
  """Inverse of `pack_latents`: tokens [B, (h/p)(w/p), C*p*p] -> NHWC latents [B, h, w, C] (h, w in latent px)."""
  b, n, cpp = tokens.shape
  if n != (h // patch) * (w // patch) or cpp % (patch * patch):
    raise ValueError(f"unpack_latents: tokens {tokens.shape} do not fit a {h}x{w} latent with patch {patch}")
  c = cpp // (patch * patch)
  z = tokens.reshape(b, h // patch, w // patch, c, patch, patch)
  z = z.transpose(0, 1, 4, 2, 5, 3)  # b, h', dy, w', dx, c
  return z.reshape(b, h, w, c)


def image_ids(h_tokens: int, w_tokens: int, index: int = 0) -> np.ndarray:
  """Position ids [h*w, 3] = (index, row, column) of a row-major token grid (float32)."""
  rows, cols = np.meshgrid(np.arange(h_tokens), np.arange(w_tokens), indexing="ij")
  ids = np.stack([np.full_like(rows, index), rows, cols], axis=-1)
  return ids.reshape(h_tokens * w_tokens, 3).astype(np.float32)


def text_ids(length: int) -> np.ndarray:
  """Position ids [length, 3] of text tokens: all zero (RoPE is the identity on them)."""
  return np.zeros((length, 3), np.float32)


def dummy_inputs(module: FluxTransformer, batch: int = 1, h_tokens: int = 4, w_tokens: int = 4,
                 text_len: int = 8, dtype: Dtype = jnp.float32) -> dict[str, jax.Array]:
  """Zero inputs of the right shapes for `module.init` / `jax.eval_shape` (keyword arguments)."""
  out = dict(hidden_states=jnp.zeros((batch, h_tokens * w_tokens, module.in_channels), dtype),
             encoder_hidden_states=jnp.zeros((batch, text_len, module.joint_attention_dim), dtype),
             pooled_projections=jnp.zeros((batch, module.pooled_projection_dim), dtype),
             timestep=jnp.zeros((batch,), jnp.float32),
             img_ids=jnp.asarray(image_ids(h_tokens, w_tokens)),
             txt_ids=jnp.asarray(text_ids(text_len)))
  if module.guidance_embeds:
    out["guidance"] = jnp.ones((batch,), jnp.float32)
  return out


MMDIT_PRESETS: dict[str, dict[str, Any]] = {
    # black-forest-labs/FLUX.1-dev transformer/config.json (11.9 B parameters).
    "flux1_dev": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                      pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    # FLUX.1-schnell: same architecture without the guidance embedder.
    "flux1_schnell": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                          attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                          pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56)),
    # Small model for tests / toy runs: 4-channel latents packed 2x2 -> 16 channels.
    "tiny": dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                 guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}
