"""KL-regularised convolutional autoencoder (diffusers' AutoencoderKL layout), NHWC.

Field names follow the diffusers `AutoencoderKL` config so a `config.json` maps onto the module directly.
Parameter names mirror the diffusers module tree (`encoder/down_blocks_0/resnets_1/conv1/...`), see
`t2i.convert.vae` for the mapping.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i.nn.attention import dot_product_attention
from t2i.nn.layers import Conv, Dense, GroupNorm, IMAGE_AXES, constrain

Dtype = Any
LOGVAR_RANGE = (-30.0, 20.0)  # clipping of diffusers' DiagonalGaussianDistribution
_NORM_EPS = 1e-6

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "relu": nn.relu,
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}

_SD_BASE = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu", norm_num_groups=32)

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # SD-1.x / SD-2.x VAE.
    "sd": dict(_SD_BASE, latent_channels=4, sample_size=512, scaling_factor=0.18215),
    # SDXL VAE: same architecture, different latent scale.
    "sdxl": dict(_SD_BASE, latent_channels=4, sample_size=1024, scaling_factor=0.13025),
    # FLUX.1 VAE: 16 latent channels, no quant convs, latent shift.
    "flux": dict(_SD_BASE, latent_channels=16, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise ValueError(f"AutoencoderKL.act_fn={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def _conv(features: int, kernel: int, dtype: Dtype, param_dtype: Dtype, name: str, strides: int = 1,
          padding: Any = None) -> Conv:
  pad = ((kernel // 2,) * 2,) * 2 if padding is None else padding
  return Conv(features, (kernel, kernel), strides=(strides, strides), padding=pad, dtype=dtype,
              param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
  """GroupNorm -> act -> conv3x3 -> GroupNorm -> act -> conv3x3, plus (1x1-projected) shortcut."""
  out_channels: int
  norm_num_groups: int
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = activation(self.act_fn)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = act(GroupNorm(self.norm_num_groups, _NORM_EPS, name="norm1", **kw)(x))
    h = _conv(self.out_channels, 3, name="conv1", **kw)(h)
    h = act(GroupNorm(self.norm_num_groups, _NORM_EPS, name="norm2", **kw)(h))
    h = _conv(self.out_channels, 3, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    return constrain(x + h, IMAGE_AXES)


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all pixels with a GroupNorm in front and a residual connection."""
  norm_num_groups: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    y = GroupNorm(self.norm_num_groups, _NORM_EPS, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
    q, k, v = (Dense(c, axes=("embed", "heads"), name=n, **kw)(y) for n in ("to_q", "to_k", "to_v"))
    y = dot_product_attention(q, k, v).reshape(b, h * w, c)
    y = Dense(c, axes=("heads", "embed"), name="to_out", **kw)(y).reshape(b, h, w, c)
    return constrain(x + y, IMAGE_AXES)


class MidBlock(nn.Module):
  """resnet -> (attention) -> resnet at the lowest resolution."""
  norm_num_groups: int
  act_fn: str = "silu"
  add_attention: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    c = x.shape[-1]
    x = block(c, self.norm_num_groups, self.act_fn, name="resnets_0", **kw)(x)
    if self.add_attention:
      x = SpatialSelfAttention(self.norm_num_groups, name="attentions_0", **kw)(x)
    return block(c, self.norm_num_groups, self.act_fn, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  """Image [b, H, W, in] -> moments [b, H/f, W/f, 2 * latent] (before quant_conv)."""
  in_channels: int
  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    x = _conv(self.block_out_channels[0], 3, name="conv_in", **kw)(x.astype(self.dtype))
    for i, ch in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        x = block(ch, self.norm_num_groups, self.act_fn, name=f"down_blocks_{i}_resnets_{j}", **kw)(x)
      if i < len(self.block_out_channels) - 1:
        # Asymmetric (0, 1) zero padding then a VALID stride-2 conv, as in the reference.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = _conv(ch, 3, strides=2, padding="VALID", name=f"down_blocks_{i}_downsample", **kw)(x)
        x = constrain(x, IMAGE_AXES)
    x = MidBlock(self.norm_num_groups, self.act_fn, self.mid_block_add_attention, self.remat, name="mid_block",
                 **kw)(x)
    x = activation(self.act_fn)(GroupNorm(self.norm_num_groups, _NORM_EPS, name="conv_norm_out", **kw)(x))
    return _conv(2 * self.latent_channels, 3, name="conv_out", **kw)(x)


class Decoder(nn.Module):
  """Latent [b, h, w, latent] (after post_quant_conv) -> image [b, h*f, w*f, out]."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  act_fn: str = "silu"
  mid_block_add_attention: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    channels = tuple(reversed(self.block_out_channels))
    x = _conv(channels[0], 3, name="conv_in", **kw)(z.astype(self.dtype))
    x = MidBlock(self.norm_num_groups, self.act_fn, self.mid_block_add_attention, self.remat, name="mid_block",
                 **kw)(x)
    for i, ch in enumerate(channels):
      for j in range(self.layers_per_block + 1):
        x = block(ch, self.norm_num_groups, self.act_fn, name=f"up_blocks_{i}_resnets_{j}", **kw)(x)
      if i < len(channels) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        x = constrain(x, IMAGE_AXES)
        x = _conv(ch, 3, name=f"up_blocks_{i}_upsample", **kw)(x)
    x = activation(self.act_fn)(GroupNorm(self.norm_num_groups, _NORM_EPS, name="conv_norm_out", **kw)(x))
    return _conv(self.out_channels, 3, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
  """KL-VAE: `encode(x) -> (mean, logvar)`, `decode(z) -> x`, NHWC; images in [-1, 1]."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = ("DownEncoderBlock2D",)
  up_block_types: Sequence[str] = ("UpDecoderBlock2D",)
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | Sequence[int] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False

  def setup(self):
    n = len(self.block_out_channels)
    bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"]
    bad += [t for t in self.up_block_types if t != "UpDecoderBlock2D"]
    if bad:
      raise ValueError(f"AutoencoderKL: unsupported block types {bad}; only DownEncoderBlock2D/UpDecoderBlock2D")
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"AutoencoderKL: {len(self.down_block_types)} down_block_types / {len(self.up_block_types)} "
                       f"up_block_types but {n} block_out_channels")
    bad_groups = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad_groups:
      raise ValueError(f"AutoencoderKL: block_out_channels {bad_groups} not divisible by norm_num_groups="
                       f"{self.norm_num_groups}")
    activation(self.act_fn)
    common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                  norm_num_groups=self.norm_num_groups, act_fn=self.act_fn,
                  mid_block_add_attention=self.mid_block_add_attention, remat=self.remat, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    self.encoder = Encoder(self.in_channels, self.latent_channels, **common)
    self.decoder = Decoder(self.out_channels, **common)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_quant_conv:
      self.quant_conv = _conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, name="post_quant_conv", **kw)

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image [b, H, W, in_channels] -> (mean, logvar), each [b, H/f, W/f, latent_channels], float32."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"AutoencoderKL.encode: expected NHWC images with {self.in_channels} channels, got shape "
                       f"{x.shape}")
    h = self.encoder(x)
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z: jax.Array) -> jax.Array:
    """Raw (unscaled) latent [b, h, w, latent_channels] -> image [b, h*f, w*f, out_channels]."""
    if z.ndim != 4 or z.shape[-1] != self.latent_channels:
      raise ValueError(f"AutoencoderKL.decode: expected NHWC latents with {self.latent_channels} channels, got "
                       f"shape {z.shape}")
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z)

  def __call__(self, x: jax.Array, sample_posterior: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstruction for training: returns (reconstruction, mean, logvar).

    With `sample_posterior`, decodes a posterior sample drawn with `rng` (or the "latent" rng stream);
    otherwise decodes the mean.
    """
    mean, logvar = self.encode(x)
    z = mean
    if sample_posterior:
      z = latents_from_moments(mean, logvar, self.make_rng("latent") if rng is None else rng)
    return self.decode(z), mean, logvar

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


def latents_from_moments(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
  """A sample of N(mean, exp(logvar)) (raw latent, before `to_latent`)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, 1)) summed over H, W, C; shape [b]."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def _scale_shift(cfg: Any) -> tuple[float, float]:
  get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
  scale, shift = get("scaling_factor", None), get("shift_factor", None)
  if scale is None:
    raise ValueError(f"{type(cfg).__name__} has no scaling_factor (expected an AutoencoderKL or its config)")
  return float(scale), float(shift or 0.0)


def to_latent(z_raw: jax.Array, cfg: Any) -> jax.Array:
  """Raw VAE latent -> diffusion-model latent: (z - shift_factor) * scaling_factor."""
  scale, shift = _scale_shift(cfg)
  return (z_raw - shift) * scale


def from_latent(z: jax.Array, cfg: Any) -> jax.Array:
  """Diffusion-model latent -> raw VAE latent for `decode`: z / scaling_factor + shift_factor."""
  scale, shift = _scale_shift(cfg)
  return z / scale + shift
