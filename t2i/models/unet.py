"""Conditional 2-D U-Net of the Stable Diffusion family (SD-1.x/2.x, SDXL), NHWC, flax.linen.

Configured with the keys of diffusers' `UNet2DConditionModel` config (so a `config.json` can be used
as is, see `UNet2DConditionModel.from_config`). Note that, as in diffusers, `attention_head_dim` is
the number of attention *heads* per block (head size = channels / heads).

Hooks for methods built on top:
  * every cross-attention computes its keys/values in `Attention.project_kv(context)`, which a
    caller can replace with `flax.linen.intercept_methods`;
  * `token_order_keys=True` (CoMPaSS's TENOR) adds a sinusoidal encoding of each text token's index to the
    context before every cross-attention's key projection (values unchanged); parameter-free;
  * with `mutable=["intermediates"]`, every cross-attention sows its probabilities
    [batch, heads, q_len, k_len] as "cross_attn_probs" (stacked on a leading axis under `scan_layers`).

`scan_layers=True` runs the blocks of every spatial transformer in a `jax.lax.scan` (params under
`transformer_blocks_stack`, see `t2i.nn.scan`); the diffusers loader stacks on load.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i.nn.attention import attention_weights, dot_product_attention
from t2i.nn.embeddings import TimestepMLP, timestep_embedding
from t2i.nn.layers import Conv, Dense, GroupNorm, IMAGE_AXES, LayerNorm, TOKEN_AXES, constrain
from t2i.nn.scan import STACK_SUFFIX, scanned

Dtype = Any
IMAGE, TOKENS = IMAGE_AXES, TOKEN_AXES

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


class Attention(nn.Module):
  """Multi-head attention; self-attention when `context` is None, else cross-attention."""
  heads: int
  head_dim: int
  out_features: int
  token_order_keys: bool = False  # cross-attention keys from context + token_order_encoding (TENOR)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    self.to_q = Dense(inner, axes=("embed", "heads"), use_bias=False, **kw)
    self.to_k = Dense(inner, axes=("embed", "heads"), use_bias=False, **kw)
    self.to_v = Dense(inner, axes=("embed", "heads"), use_bias=False, **kw)
    self.to_out = Dense(self.out_features, axes=("heads", "embed"), **kw)

  def project_kv(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [batch, k_len, heads * head_dim] of a cross-attention's context."""
    if self.token_order_keys:
      return self.to_k(context + token_order_encoding(*context.shape[1:]).astype(context.dtype)), self.to_v(context)
    return self.to_k(context), self.to_v(context)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    b, n, _ = x.shape
    q = self.to_q(x)
    if context is None:
      k, v = self.to_k(x), self.to_v(x)
    else:
      k, v = self.project_kv(context)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)
    q, k, v = split(q), split(k), split(v)
    if context is not None and self.is_mutable_collection("intermediates"):
      probs = attention_weights(q, k)
      self.sow("intermediates", "cross_attn_probs", probs)
      out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    else:
      out = dot_product_attention(q, k, v)
    out = constrain(out.reshape(b, n, self.heads * self.head_dim), TOKENS)
    return self.to_out(out)


class FeedForward(nn.Module):
  """GEGLU feed-forward: Dense(2 * mult * dim) -> a * gelu(gate) -> Dense(dim)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(2 * self.mult * dim, axes=("embed", "mlp"), name="proj_in", **kw)(x)
    a, gate = jnp.split(h, 2, axis=-1)
    h = constrain(a * nn.gelu(gate, approximate=False), ("batch", "length", "mlp"))
    return Dense(dim, axes=("mlp", "embed"), name="proj_out", **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN block: self-attention, cross-attention, GEGLU MLP, each with a residual."""
  heads: int
  head_dim: int
  token_order_keys: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # token_order_keys acts in project_kv, which only a cross-attention (attn2) calls.
    attn = lambda name: Attention(self.heads, self.head_dim, dim, self.token_order_keys, name=name, **kw)
    x = x + attn("attn1")(LayerNorm(name="norm1", **kw)(x))
    x = x + attn("attn2")(LayerNorm(name="norm2", **kw)(x), context)
    x = x + FeedForward(name="ff", **kw)(LayerNorm(name="norm3", **kw)(x))
    return constrain(x, TOKENS)


BLOCK_KINDS = ("transformer_blocks",)  # the scanned kinds (t2i.nn.scan.stack_layers)


class SpatialTransformer(nn.Module):
  """GroupNorm -> proj_in -> `depth` transformer blocks on HW tokens -> proj_out, plus residual."""
  heads: int
  depth: int
  norm_num_groups: int
  use_linear_projection: bool
  remat: bool = False
  scan: bool = False   # blocks in a jax.lax.scan, params under "transformer_blocks_stack" (t2i.nn.scan)
  token_order_keys: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    if c % self.heads:
      raise ValueError(f"channels {c} not divisible by attention heads {self.heads} (attention_head_dim)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    residual = x
    y = GroupNorm(self.norm_num_groups, epsilon=1e-6, name="norm", **kw)(x)
    if self.use_linear_projection:
      y = Dense(c, axes=("embed", "heads"), name="proj_in", **kw)(y.reshape(b, h * w, c))
    else:
      y = Conv(c, (1, 1), name="proj_in", **kw)(y).reshape(b, h * w, c)
    y = constrain(y, TOKENS)
    if self.scan:
      y = scanned(TransformerBlock, self.depth, self.remat, 1)(self.heads, c // self.heads, self.token_order_keys,
                                                         name="transformer_blocks" + STACK_SUFFIX, **kw)(y, context)[0]
    else:
      block = nn.remat(TransformerBlock) if self.remat else TransformerBlock
      for i in range(self.depth):
        y = block(self.heads, c // self.heads, self.token_order_keys, name=f"transformer_blocks_{i}", **kw)(y, context)
    if self.use_linear_projection:
      y = Dense(c, axes=("heads", "embed"), name="proj_out", **kw)(y).reshape(b, h, w, c)
    else:
      y = Conv(c, (1, 1), name="proj_out", **kw)(y.reshape(b, h, w, c))
    return constrain(y + residual, IMAGE)


class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv, + projected time embedding, GroupNorm-SiLU-Conv; 1x1 shortcut if needed."""
  features: int
  norm_num_groups: int
  norm_eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, name=name, **kw)
    h = Conv(self.features, (3, 3), name="conv1", **kw)(nn.silu(norm("norm1")(x)))
    t = Dense(self.features, axes=("mlp", "embed"), name="time_emb_proj", **kw)(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = Conv(self.features, (3, 3), name="conv2", **kw)(nn.silu(norm("norm2")(h)))
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), name="conv_shortcut", **kw)(x)
    return constrain(x + h, IMAGE)


class Downsample(nn.Module):
  """3x3 conv with stride 2 and symmetric padding 1."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv(self.features, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name="conv",
                dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then 3x3 conv."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(self.features, (3, 3), name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _per_block(value: Any, n: int, key: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{key}: expected {n} entries (one per block), got {list(value)}")
    if any(isinstance(v, (list, tuple)) for v in value):
      raise ValueError(f"{key}: nested per-layer lists are not supported, got {list(value)}")
    return tuple(value)
  return (value,) * n


class UNet2DConditionModel(nn.Module):
  """Text-conditioned U-Net. Call: (sample [B,H,W,C], timesteps [B] or scalar, context [B,L,D],
  text_embeds=None, time_ids=None) -> [B,H,W,out_channels]."""
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D")
  up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D")
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int | Sequence[int] = 2
  cross_attention_dim: int | Sequence[int] = 768
  attention_head_dim: int | Sequence[int] = 8
  transformer_layers_per_block: int | Sequence[int] = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  use_linear_projection: bool = False
  center_input_sample: bool = False
  upcast_attention: bool | None = False  # softmax always runs in float32
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False  # each SpatialTransformer's blocks in a jax.lax.scan (t2i.nn.scan; SDXL's depth 10)
  # > 0: Fourier features of each pixel's (y, x) in [-1, 1] (this many octaves, plus the raw coordinates),
  # projected by a zero-initialised Dense and added after conv_in, so the network knows where it draws ("to the
  # left of", "at (16, 40)"); a convolutional U-Net otherwise sees position only through its zero padding. Not a
  # diffusers option: 0 keeps the diffusers layout, and switching it on for a loaded checkpoint changes nothing at
  # step 0.
  coord_octaves: int = 0
  # True: CoMPaSS's TENOR (arXiv 2412.13195): every cross-attention's keys see the text tokens' order, through a
  # sinusoidal encoding of the token index added to the context before the key projection (values unchanged).
  # Parameter-free, so it can be switched on for a loaded checkpoint; not a diffusers option.
  token_order_keys: bool = False
  # Two context channels (x, y) in [-1, 1] that say where each text token's object goes (trained by
  # t2i.objectives.layout, config.diffusion.layout): each token's state, gated and projected by zero-initialised
  # Dense layers, is splatted as a Gaussian of std `layout_splat_sigma` at that place and added after conv_in, so
  # a relation the text encoder resolved reaches the pixels as a feature at the right place (a first-order path,
  # where cross-attention needs query and key to learn the place together). () = off; not a diffusers option.
  layout_splat_channels: Sequence[int] = ()
  layout_splat_sigma: float = 0.3
  # (start, stop): the context channels the splat's gate and value read (() = all). With a text encoder that
  # appends its token embeddings (`CLIPTextModel.append_token_embeddings`), the embedding slice paints what each
  # word is, and only the places come from the contextual state.
  layout_splat_value_channels: Sequence[int] = ()
  # >= 0: the gate is also multiplied by sigmoid(context[..., c]), an "is an object word" logit trained by
  # config.diffusion.layout.object_channel, so function words and background phrases are not painted.
  layout_splat_object_channel: int = -1
  # >= 0: each token's Gaussian has std exp(context[..., c]) (clipped to [0.05, 1]; trained by
  # config.diffusion.layout.spread_channel as its object's extent and place uncertainty) instead of
  # layout_splat_sigma, at full height up to that std and with its mass kept beyond it: a footprint wider than
  # layout_splat_sigma paints (layout_splat_sigma / std)^2 as strongly.
  layout_splat_spread_channel: int = -1

  @classmethod
  def from_config(cls, config: dict[str, Any], **overrides) -> "UNet2DConditionModel":
    """Builds from a diffusers config dict; unknown keys are ignored, unsupported values raise."""
    module = cls(**_fields_from_config(config), **overrides)
    module._check()
    return module

  def _check(self) -> None:
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"down_block_types/up_block_types/block_out_channels must have equal lengths, "
                       f"got {len(self.down_block_types)}/{len(self.up_block_types)}/{n}")
    for t in self.down_block_types:
      if t not in DOWN_BLOCKS:
        raise ValueError(f"down_block_types: unsupported {t!r} (supported: {DOWN_BLOCKS})")
    for t in self.up_block_types:
      if t not in UP_BLOCKS:
        raise ValueError(f"up_block_types: unsupported {t!r} (supported: {UP_BLOCKS})")
    if self.mid_block_type not in MID_BLOCKS:
      raise ValueError(f"mid_block_type: unsupported {self.mid_block_type!r} (supported: {MID_BLOCKS})")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"addition_embed_type: unsupported {self.addition_embed_type!r} "
                       "(supported: None, 'text_time')")
    if self.addition_embed_type == "text_time" and (self.addition_time_embed_dim is None or
                                                     self.projection_class_embeddings_input_dim is None):
      raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                       "projection_class_embeddings_input_dim")

  def _layout_splat(self, context: jax.Array, height: int, width: int, channels: int, kw: dict) -> jax.Array:
    """[B, height, width, channels]: the gated, projected token states splatted at their places."""
    if len(self.layout_splat_channels) != 2:
      raise ValueError(f"layout_splat_channels must name 2 context channels (x, y), got {self.layout_splat_channels}")
    places = jnp.take(context.astype(jnp.float32), jnp.asarray(self.layout_splat_channels), axis=-1)
    source = context
    if self.layout_splat_value_channels:
      if len(self.layout_splat_value_channels) != 2:
        raise ValueError("layout_splat_value_channels must be (start, stop), got "
                         f"{self.layout_splat_value_channels}")
      start, stop = (int(c) for c in self.layout_splat_value_channels)
      if not 0 <= start < stop <= context.shape[-1]:
        raise ValueError(f"layout_splat_value_channels=({start}, {stop}) is outside the context's "
                         f"{context.shape[-1]} channels")
      source = context[..., start:stop]
    gate = nn.sigmoid(Dense(1, axes=("embed", None), name="layout_gate", **kw)(source))  # [B, L, 1]
    if self.layout_splat_object_channel >= 0:
      gate = gate * nn.sigmoid(context[..., self.layout_splat_object_channel, None])
    value = Dense(channels, axes=("embed", "conv_out"), kernel_init=nn.initializers.zeros, name="layout_value",
                  **kw)(source)
    if self.layout_splat_spread_channel >= 0:
      sigma = jnp.clip(jnp.exp(context[..., self.layout_splat_spread_channel].astype(jnp.float32)), 0.05, 1.0)
      w = splat_weights(places, height, width, sigma, reference=self.layout_splat_sigma)
    else:
      w = splat_weights(places, height, width, self.layout_splat_sigma)
    w = w.astype(self.dtype) * gate[..., None]
    return jnp.einsum("blhw,blc->bhwc", w, value)

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
    self._check()
    n = len(self.block_out_channels)
    layers = _per_block(self.layers_per_block, n, "layers_per_block")
    heads = _per_block(self.attention_head_dim, n, "attention_head_dim")
    depths = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups, eps = self.norm_num_groups, self.norm_eps
    resnet = nn.remat(ResnetBlock) if self.remat else ResnetBlock

    def transformer(name, nheads, depth):
      return SpatialTransformer(nheads, depth, groups, self.use_linear_projection, remat=self.remat,
                                scan=self.scan_layers, token_order_keys=self.token_order_keys, name=name, **kw)

    b = sample.shape[0]
    if sample.ndim != 4 or sample.shape[-1] != self.in_channels:
      raise ValueError(f"sample must be NHWC with {self.in_channels} channels, got {sample.shape}")
    context = constrain(encoder_hidden_states.astype(self.dtype), TOKENS)

    # Time (and SDXL size/crop/text) embedding.
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    c0 = self.block_out_channels[0]
    emb = timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
    emb = TimestepMLP(4 * c0, name="time_embedding", **kw)(emb)
    if self.addition_embed_type == "text_time":
      if text_embeds is None or time_ids is None:
        raise ValueError("addition_embed_type='text_time' (SDXL) needs text_embeds and time_ids")
      tid = timestep_embedding(jnp.asarray(time_ids, jnp.float32).reshape(-1), self.addition_time_embed_dim,
                               self.flip_sin_to_cos, self.freq_shift).reshape(b, -1)
      add = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), tid], axis=-1)
      if add.shape[-1] != self.projection_class_embeddings_input_dim:
        raise ValueError(f"text_embeds {text_embeds.shape} + time_ids {time_ids.shape} give {add.shape[-1]} "
                         f"features, projection_class_embeddings_input_dim is "
                         f"{self.projection_class_embeddings_input_dim}")
      emb = emb + TimestepMLP(4 * c0, name="add_embedding", **kw)(add)

    x = sample.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0
    x = Conv(c0, (3, 3), name="conv_in", **kw)(x)
    if self.coord_octaves:
      x = x + Dense(c0, axes=(None, "conv_out"), kernel_init=nn.initializers.zeros, name="coord_embedding",
                    **kw)(coordinate_features(x.shape[1], x.shape[2], self.coord_octaves).astype(self.dtype))[None]
    if self.layout_splat_channels:
      x = x + self._layout_splat(context, x.shape[1], x.shape[2], c0, kw)
    x = constrain(x, IMAGE)

    skips = [x]
    for i, btype in enumerate(self.down_block_types):
      ch = self.block_out_channels[i]
      for j in range(layers[i]):
        x = resnet(ch, groups, eps, name=f"down_blocks_{i}_resnets_{j}", **kw)(x, emb)
        if btype == "CrossAttnDownBlock2D":
          x = transformer(f"down_blocks_{i}_attentions_{j}", heads[i], depths[i])(x, context)
        skips.append(x)
      if i < n - 1:
        x = Downsample(ch, name=f"down_blocks_{i}_downsamplers_0", **kw)(x)
        skips.append(x)

    if self.mid_block_type == "UNetMidBlock2DCrossAttn":
      ch = self.block_out_channels[-1]
      x = resnet(ch, groups, eps, name="mid_block_resnets_0", **kw)(x, emb)
      x = transformer("mid_block_attentions_0", heads[-1], depths[-1])(x, context)
      x = resnet(ch, groups, eps, name="mid_block_resnets_1", **kw)(x, emb)

    rev_ch, rev_layers = self.block_out_channels[::-1], layers[::-1]
    rev_heads, rev_depths = heads[::-1], depths[::-1]
    for i, btype in enumerate(self.up_block_types):
      ch = rev_ch[i]
      for j in range(rev_layers[i] + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = resnet(ch, groups, eps, name=f"up_blocks_{i}_resnets_{j}", **kw)(x, emb)
        if btype == "CrossAttnUpBlock2D":
          x = transformer(f"up_blocks_{i}_attentions_{j}", rev_heads[i], rev_depths[i])(x, context)
      if i < n - 1:
        x = Upsample(ch, name=f"up_blocks_{i}_upsamplers_0", **kw)(x)

    x = nn.silu(GroupNorm(groups, epsilon=eps, name="conv_norm_out", **kw)(x))
    x = Conv(self.out_channels, (3, 3), name="conv_out", **kw)(x)
    return x


def token_order_encoding(length: int, dim: int) -> jax.Array:
  """[length, dim] float32 sinusoidal encoding of token indices 0..length-1 (halves [sin, cos], periods up to
  10,000 tokens), as TENOR adds to a cross-attention's context before its key projection."""
  return timestep_embedding(jnp.arange(length), dim, flip_sin_to_cos=False, freq_shift=0.0)


def pixel_centres(n: int) -> jax.Array:
  """[n] float32: the centres of n pixels along an axis in [-1, 1] coordinates (-1 = the first pixel's edge)."""
  return (jnp.arange(n, dtype=jnp.float32) + 0.5) / n * 2 - 1


def squared_distances(places: jax.Array, height: int, width: int) -> jax.Array:
  """[..., height, width]: squared distance from each pixel centre to places [..., 2] as (x, y) in [-1, 1]."""
  y, x = pixel_centres(height), pixel_centres(width)
  return (x - places[..., 0, None, None]) ** 2 + (y[:, None] - places[..., 1, None, None]) ** 2


def splat_weights(places: jax.Array, height: int, width: int, sigma: float | jax.Array,
                  reference: float | None = None) -> jax.Array:
  """[B, L, height, width]: a Gaussian of std `sigma` (a number or [B, L]) around each token's place, places
  [B, L, 2] as (x, y) in [-1, 1] (`pixel_centres`), of height 1, or with a `reference` std of height
  min(1, (reference / sigma)^2): wider footprints keep the mass of the reference one."""
  d2 = squared_distances(places, height, width)
  sigma = jnp.asarray(sigma, jnp.float32)
  if sigma.ndim:
    sigma = sigma[..., None, None]
  w = jnp.exp(-d2 / (2 * sigma ** 2))
  return w if reference is None else w * jnp.minimum(1.0, (reference / sigma) ** 2)


def coordinate_features(height: int, width: int, octaves: int) -> jax.Array:
  """[height, width, 2 + 4 * octaves]: pixel-centre (y, x) in [-1, 1], then the sines, then the cosines, of
  2^k pi y (k < octaves) and 2^k pi x."""
  y, x = pixel_centres(height), pixel_centres(width)
  yx = jnp.stack(jnp.meshgrid(y, x, indexing="ij"), axis=-1)  # [H, W, 2]
  freqs = jnp.pi * 2.0 ** jnp.arange(octaves, dtype=jnp.float32)
  angles = (yx[..., None] * freqs).reshape(height, width, -1)  # [H, W, 2 * octaves]
  return jnp.concatenate([yx, jnp.sin(angles), jnp.cos(angles)], axis=-1)


def dummy_inputs(module: UNet2DConditionModel, batch: int = 1, height: int | None = None,
                 text_len: int = 77, dtype: Dtype = jnp.float32) -> dict[str, jax.Array]:
  """Zero inputs of the right shapes for `module.init` / `jax.eval_shape` (keyword arguments)."""
  size = height or module.sample_size
  if isinstance(size, (list, tuple)):
    size = size[0]
  ctx_dim = module.cross_attention_dim
  if isinstance(ctx_dim, (list, tuple)):
    if len(set(ctx_dim)) != 1:
      raise ValueError(f"cross_attention_dim: per-block values {ctx_dim} are not supported")
    ctx_dim = ctx_dim[0]
  out = dict(sample=jnp.zeros((batch, size, size, module.in_channels), dtype),
             timesteps=jnp.zeros((batch,), jnp.float32),
             encoder_hidden_states=jnp.zeros((batch, text_len, ctx_dim), dtype))
  if module.addition_embed_type == "text_time":
    n_text = module.projection_class_embeddings_input_dim - 6 * module.addition_time_embed_dim
    out["text_embeds"] = jnp.zeros((batch, n_text), dtype)
    out["time_ids"] = jnp.zeros((batch, 6), jnp.float32)
  return out


# diffusers config keys -> accepted values (anything else raises). Keys not listed here and not fields
# of the module are ignored (e.g. "_class_name", "_diffusers_version", "sample_size" is a field).
_REQUIRED_VALUES: dict[str, tuple] = {
    "act_fn": ("silu",),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "reverse_transformer_layers_per_block": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "dropout": (0.0,),
}


def _fields_from_config(config: dict[str, Any]) -> dict[str, Any]:
  for key, ok in _REQUIRED_VALUES.items():
    if key in config and config[key] not in ok:
      raise ValueError(f"UNet config: {key}={config[key]!r} is not supported (supported: {ok})")
  if isinstance(config.get("only_cross_attention"), list) and any(config["only_cross_attention"]):
    raise ValueError("UNet config: only_cross_attention is not supported")
  names = {f.name for f in dataclasses.fields(UNet2DConditionModel)} - {"parent", "name", "dtype",
                                                                        "param_dtype", "remat", "scan_layers"}
  out = {}
  for k, v in config.items():
    if k in names:
      out[k] = tuple(v) if isinstance(v, list) else v
  if out.get("upcast_attention") is None:
    out.pop("upcast_attention", None)
  return out


UNET_PRESETS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json (859.5 M parameters).
    "sd15": dict(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, transformer_layers_per_block=1, norm_num_groups=32, norm_eps=1e-5,
        flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.567 B parameters).
    "sdxl": dict(
        sample_size=128, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), norm_num_groups=32,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816),
}
