"""Multi-axis rotary position embeddings (RoPE) in the interleaved-pair convention of FLUX.

Each token has integer-valued (possibly fractional) position ids, one per axis, e.g. (index, row, column)
for FLUX. Axis `a` owns `axes_dim[a]` consecutive channels of every head (so `sum(axes_dim) == head_dim`);
within an axis, channel pairs (2i, 2i+1) are rotated by the angle `pos_a * theta ** (-2i / axes_dim[a])`:

  out[2i]   = x[2i] cos - x[2i+1] sin
  out[2i+1] = x[2i+1] cos + x[2i] sin

This is diffusers' `FluxPosEmbed` + `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)` (and the
complex-number formulation of the original FLUX code).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(ids: jax.Array, axes_dim: Sequence[int], theta: float = 10000.0
                     ) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) of the rotation angles, each float32 [..., length, sum(axes_dim) // 2].

  ids: [length, n_axes] or [batch, length, n_axes] positions (any numeric dtype).
  """
  ids = jnp.asarray(ids)
  if ids.ndim not in (2, 3) or ids.shape[-1] != len(axes_dim):
    raise ValueError(f"rope ids must be [length, {len(axes_dim)}] or [batch, length, {len(axes_dim)}], "
                     f"got shape {ids.shape}")
  if any(d % 2 for d in axes_dim):
    raise ValueError(f"rope axes_dim entries must be even, got {tuple(axes_dim)}")
  pos = ids.astype(jnp.float32)
  angles = []
  for a, dim in enumerate(axes_dim):
    # Inverse frequencies computed in float64 on the host (static), like the reference.
    inv = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    angles.append(pos[..., a:a + 1] * jnp.asarray(inv, jnp.float32))
  ang = jnp.concatenate(angles, axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, freqs: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates channel pairs of x [batch, length, heads, head_dim] by `freqs` from `rope_frequencies`.

  freqs: (cos, sin) of shape [length, head_dim // 2] or [batch, length, head_dim // 2]; computed in
  float32, returned in x.dtype.
  """
  cos, sin = freqs
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  if cos.shape[-1] * 2 != x.shape[-1] or cos.shape[-2] != x.shape[1]:
    raise ValueError(f"rope: freqs {cos.shape} do not match x {x.shape} ([batch, length, heads, head_dim])")
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
  even, odd = xf[..., 0], xf[..., 1]
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
