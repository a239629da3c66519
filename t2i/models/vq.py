"""VQ image tokenizer (VQ-VAE): conv encoder -> vector quantiser (straight-through) -> conv decoder, NHWC.

  model = VQModel(channels=(32, 64, 64), num_codes=256, code_dim=16)      # 2 downsamples: 32 px -> 8x8 codes
  params = model.init(rng, images)["params"]                              # images float [B, H, W, 3] in [-1, 1]
  codes = model.apply({"params": params}, images, method=VQModel.encode)  # int32 [B, h, w]
  recon = model.apply({"params": params}, codes, method=VQModel.decode)   # [B, H, W, 3]
  loss, metrics = vq_loss(params, images, rng, model=model)               # pure training loss

Loss = MSE(recon, x) + ||sg(z_e) - e||² + beta ||z_e - sg(e)||² (codebook + commitment, VQ-VAE). Codebook
health: `code_counts` / `perplexity` / `update_usage` (EMA of counts) and `restart_dead_codes`, a pure function
that re-initialises codes whose usage is below a threshold from encoder outputs of the current batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i.nn.layers import Conv, GroupNorm, IMAGE_AXES, constrain

Dtype = Any


class ResBlock(nn.Module):
  features: int
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Conv(self.features, dtype=self.dtype, name="conv1")(nn.swish(GroupNorm(self.groups, name="norm1")(x)))
    h = Conv(self.features, dtype=self.dtype, name="conv2")(nn.swish(GroupNorm(self.groups, name="norm2")(h)))
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1), dtype=self.dtype, name="skip")(x)
    return constrain(x + h, IMAGE_AXES)


class Encoder(nn.Module):
  """Conv stem, one ResBlock per level, stride-2 conv between levels, 1x1 conv to `code_dim`."""
  channels: Sequence[int]
  code_dim: int
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Conv(self.channels[0], dtype=self.dtype, name="stem")(x)
    for i, ch in enumerate(self.channels):
      h = ResBlock(ch, self.groups, self.dtype, name=f"res_{i}")(h)
      if i < len(self.channels) - 1:
        h = Conv(ch, (4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"down_{i}")(h)
    h = nn.swish(GroupNorm(self.groups, name="norm_out")(h))
    return Conv(self.code_dim, (1, 1), dtype=self.dtype, name="proj")(h)


class Decoder(nn.Module):
  """Mirror of the encoder with nearest-neighbour x2 upsampling + conv."""
  channels: Sequence[int]
  out_channels: int = 3
  groups: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    chans = list(self.channels)[::-1]
    h = Conv(chans[0], dtype=self.dtype, name="stem")(z)
    for i, ch in enumerate(chans):
      h = ResBlock(ch, self.groups, self.dtype, name=f"res_{i}")(h)
      if i < len(chans) - 1:
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), "nearest")
        h = Conv(ch, dtype=self.dtype, name=f"up_{i}")(h)
    h = nn.swish(GroupNorm(self.groups, name="norm_out")(h))
    return Conv(self.out_channels, dtype=self.dtype, name="proj")(h)


class VQModel(nn.Module):
  """Encoder + codebook [num_codes, code_dim] + decoder; downsampling factor 2 ** (len(channels) - 1)."""
  channels: Sequence[int] = (32, 64, 64)
  num_codes: int = 256
  code_dim: int = 16
  beta: float = 0.25
  groups: int = 8
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(tuple(self.channels), self.code_dim, self.groups, self.dtype)
    self.decoder = Decoder(tuple(self.channels), 3, self.groups, self.dtype)
    k = self.num_codes
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)  # VQ-VAE
    self.codebook = self.param("codebook", nn.with_logical_partitioning(init, ("vocab", None)),
                               (k, self.code_dim), jnp.float32)

  def encode_latent(self, images: jax.Array) -> jax.Array:
    """Continuous encoder output z_e [B, h, w, code_dim] (float32)."""
    return self.encoder(images).astype(jnp.float32)

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(z_q with straight-through gradient, codes int32 [B, h, w], {"codebook_loss", "commitment_loss"})."""
    cb = self.codebook
    flat = z.reshape(-1, z.shape[-1])
    dist = (jnp.sum(flat ** 2, -1, keepdims=True) - 2 * flat @ cb.T + jnp.sum(cb ** 2, -1)[None])
    codes = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    e = cb[codes].reshape(z.shape)
    losses = {"codebook_loss": jnp.mean(jnp.square(jax.lax.stop_gradient(z) - e)),
              "commitment_loss": jnp.mean(jnp.square(z - jax.lax.stop_gradient(e)))}
    zq = z + jax.lax.stop_gradient(e - z)
    return zq, codes.reshape(z.shape[:-1]), losses

  def code_vectors(self, codes: jax.Array) -> jax.Array:
    return self.codebook[codes]

  def encode(self, images: jax.Array) -> jax.Array:
    """Codes int32 [B, h, w] of images [B, H, W, 3] in [-1, 1]."""
    return self.quantize(self.encode_latent(images))[1]

  def decode(self, codes: jax.Array) -> jax.Array:
    """Images [B, H, W, 3] (float32, roughly [-1, 1]) from codes [B, h, w]."""
    return self.decoder(self.code_vectors(codes).astype(self.dtype)).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(reconstruction, aux {"z_e", "codes", "codebook_loss", "commitment_loss"})."""
    z = self.encode_latent(images)
    zq, codes, losses = self.quantize(z)
    recon = self.decoder(zq.astype(self.dtype)).astype(jnp.float32)
    return recon, {"z_e": z, "codes": codes, **losses}


def code_counts(codes: jax.Array, num_codes: int) -> jax.Array:
  """float32 [num_codes] occurrences of each code."""
  return jnp.zeros((num_codes,), jnp.float32).at[codes.reshape(-1)].add(1.0)


def perplexity(counts: jax.Array) -> jax.Array:
  """exp(entropy) of the code distribution: 1 = one code used, num_codes = uniform use."""
  p = counts / jnp.maximum(counts.sum(), 1e-9)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, 1e-30)), 0.0)))


def update_usage(usage: jax.Array, counts: jax.Array, decay: float = 0.99) -> jax.Array:
  """EMA of per-code counts."""
  return decay * usage + (1.0 - decay) * counts


def restart_dead_codes(params: dict[str, Any], usage: jax.Array, z_e: jax.Array, rng: jax.Array,
                       min_usage: float = 1e-3) -> tuple[dict[str, Any], jax.Array]:
  """Codes with usage < min_usage get a random encoder output of the batch (z_e [..., code_dim]); the others keep
  their vectors exactly. Returns (params with the new codebook, number of restarted codes)."""
  cb = params["codebook"]
  k = cb.shape[0]
  flat = z_e.reshape(-1, z_e.shape[-1]).astype(cb.dtype)
  picks = flat[jax.random.randint(rng, (k,), 0, flat.shape[0])]
  dead = usage < min_usage
  return {**params, "codebook": jnp.where(dead[:, None], picks, cb)}, dead.sum()


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  """PSNR in dB for images in [-1, 1] (peak-to-peak 2), averaged over the batch."""
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
  return jnp.mean(10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10)))


def vq_loss(params: dict[str, Any], images: jax.Array, rng: jax.Array, *, model: VQModel
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction MSE + codebook + beta * commitment. Deterministic (rng kept for the loss signature).
  Metrics: loss, recon_mse, codebook_loss, commitment_loss, psnr, perplexity, used_codes (fraction)."""
  del rng
  recon, aux = model.apply({"params": params}, images)
  mse = jnp.mean(jnp.square(recon - images.astype(jnp.float32)))
  loss = mse + aux["codebook_loss"] + model.beta * aux["commitment_loss"]
  counts = code_counts(aux["codes"], model.num_codes)
  return loss, {"loss": loss, "recon_mse": mse, "codebook_loss": aux["codebook_loss"],
                "commitment_loss": aux["commitment_loss"], "psnr": psnr(recon, images),
                "perplexity": perplexity(counts), "used_codes": jnp.mean(counts > 0)}
