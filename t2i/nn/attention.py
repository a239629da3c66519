"""Scaled dot-product attention on [batch, length, heads, head_dim] tensors."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) as [batch, heads, q_len, k_len], softmax in float32."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Returns softmax(q k^T / sqrt(d)) v as [batch, q_len, heads, head_dim].

  mask: optional boolean, broadcastable to [batch, heads, q_len, k_len]; True = attend.
  """
  w = attention_weights(q, k, mask).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)
