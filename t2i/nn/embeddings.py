"""Timestep embeddings: the sinusoidal projection and the two-layer MLP on top of it."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i.nn.layers import Dense

Dtype = Any


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [n, dim] (float32) of `timesteps` [n] (may be fractional).

  Frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)), i < dim/2; halves [sin, cos]
  (or [cos, sin] with `flip_sin_to_cos`); an odd `dim` gets one trailing zero.
  """
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be 1-D [n], got shape {timesteps.shape}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = timesteps[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepMLP(nn.Module):
  """Dense -> SiLU -> Dense (diffusers' TimestepEmbedding with act_fn="silu")."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Dense(self.features, axes=("embed", "mlp"), name="linear_1", **kw)(x.astype(self.dtype))
    return Dense(self.features, axes=("mlp", "embed"), name="linear_2", **kw)(nn.silu(x))
