"""A fixed, parameter-free "autoencoder" that folds pixel patches into channels (space-to-depth).

It stands where a KL-VAE stands (same `encode -> (mean, logvar)` / `decode` interface), so a U-Net can be trained
on a coarse grid without first training a VAE: 32x32x3 pixels with factor 4 become an 8x8x48 "latent". This is
what makes the CPU demo fast; real runs use `AutoencoderKL`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# log-variance of the (deterministic) latent distribution: exp(-30/2) ~ 3e-7 standard deviation.
_DETERMINISTIC_LOGVAR = -30.0


def space_to_depth(x: jax.Array, factor: int) -> jax.Array:
  """[B, H, W, C] -> [B, H/f, W/f, f*f*C]; channel order (row offset, column offset, channel)."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"space_to_depth: image {h}x{w} is not divisible by factor {factor}")
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // factor, w // factor, factor * factor * c)


def depth_to_space(z: jax.Array, factor: int) -> jax.Array:
  """Inverse of `space_to_depth`."""
  b, h, w, d = z.shape
  c = d // (factor * factor)
  z = z.reshape(b, h, w, factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
  return z.reshape(b, h * factor, w * factor, c)


class SpaceToDepth(nn.Module):
  """Lossless patch folding with the AutoencoderKL interface (no parameters)."""
  factor: int = 4
  scaling_factor: float = 1.0
  shift_factor: float = 0.0

  def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    z = space_to_depth(x.astype(jnp.float32), self.factor)
    return z, jnp.full_like(z, _DETERMINISTIC_LOGVAR)

  def decode(self, z: jax.Array) -> jax.Array:
    return depth_to_space(z, self.factor)

  def __call__(self, x: jax.Array, sample_posterior: bool = False, rng=None):
    mean, logvar = self.encode(x)
    return self.decode(mean), mean, logvar
