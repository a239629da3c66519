"""Attention-grounding loss on cross-attention maps: CosmicMan's HOLA (Li et al., CVPR 2024).

Each caption comes with attribute groups (`config.data.token_groups`): the tokens of a group's words and the
pixels they describe. For token j's cross-attention map m_j (softmax over the text tokens, per head and image
position) and group i's mask h_i at the layer's resolution,

  L_HOLA = mean over groups i of  [ mean_j in i  mean_(head, pos) (m_j - h_i)^2        (token level)
                                    + mean_(head, pos) (mean_j in i m_j - h_i)^2 ]     (group level),

averaged over the supervised layers, as in the official code (means, not the paper's sums). It pulls each word's
attention onto the pixels it names, which the plain denoising loss only rewards indirectly.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

PROBS_NAME = "cross_attn_probs"  # what t2i.models.unet sows


def attention_maps(intermediates: Any) -> list[jax.Array]:
  """Every cross-attention probability array [B, heads, Q, L] sown under `intermediates` (scanned layers'
  [n, B, heads, Q, L] stacks are folded into the heads axis)."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    if any(getattr(k, "key", None) == PROBS_NAME for k in path):
      if leaf.ndim == 5:
        leaf = jnp.moveaxis(leaf, 0, 1).reshape(leaf.shape[1], -1, *leaf.shape[3:])
      out.append(leaf)
  return out


def _pool(masks: jax.Array, q: int) -> jax.Array | None:
  """masks [B, K, h, w] area-pooled to q positions [B, K, q] (same aspect), or None if no integer factor fits."""
  b, k, h, w = masks.shape
  for f in range(1, min(h, w) + 1):
    if h % f == 0 and w % f == 0 and (h // f) * (w // f) == q:
      return masks.reshape(b, k, h // f, f, w // f, f).mean(axis=(3, 5)).reshape(b, k, q)
  return None


def hola_loss(maps: Sequence[jax.Array], group_tokens: jax.Array, group_masks: jax.Array,
              row_weight: jax.Array | None = None, resolutions: Sequence[int] = ()) -> tuple[jax.Array, dict]:
  """HOLA term and metrics over the cross-attention maps whose positions the group masks pool to.

  Args:
    maps: [B, heads, Q, L] attention probabilities (`attention_maps`).
    group_tokens: f32 [B, K, L], 1 on the tokens of group k (all zero: no group).
    group_masks: f32 [B, K, h, w] in [0, 1], each group's pixels (any resolution that pools to the maps').
    row_weight: optional [B] (0 for rows made unconditional by condition dropout).
    resolutions: supervise only maps with these side lengths (sqrt of Q for square maps); empty: every map the
      masks pool to.
  Returns:
    (term, {"hola", "attn_in_mask"}): attn_in_mask is the share of a group's mean attention that falls inside its
    mask (averaged over groups, heads and layers), a diagnostic that the term should raise.
  """
  sel = group_tokens.astype(jnp.float32)
  n = jnp.sum(sel, axis=-1)  # [B, K]
  valid = (n > 0).astype(jnp.float32)
  if row_weight is not None:
    valid = valid * row_weight.astype(jnp.float32)[:, None]
  n = jnp.maximum(n, 1.0)
  count = jnp.maximum(jnp.sum(valid), 1.0)
  terms, inside = [], []
  for m in maps:
    q = m.shape[2]
    if resolutions and not any(r * r == q for r in resolutions):
      continue
    mask = _pool(group_masks.astype(jnp.float32), q)
    if mask is None:
      continue
    m = m.astype(jnp.float32)
    hq = m.shape[1] * q
    # token level: sum_j sel_kj mean(m_j - h_k)^2 / n_k, expanded so that no [B, K, heads, Q, L] array is formed
    sq = jnp.einsum("bhqj->bj", m * m) / hq
    cross = jnp.einsum("bhqj,bkq->bkj", m, mask) / q / m.shape[1]
    token = (jnp.einsum("bkj,bj->bk", sel, sq) - 2 * jnp.sum(sel * cross, -1)) / n + jnp.mean(mask * mask, -1)
    g = jnp.einsum("bhqj,bkj->bhkq", m, sel) / n[:, None, :, None]  # group mean maps
    group = jnp.mean((g - mask[:, None]) ** 2, axis=(1, 3))
    terms.append(jnp.sum((token + group) * valid) / count)
    share = jnp.sum(g * mask[:, None], -1) / jnp.maximum(jnp.sum(g, -1), 1e-9)  # [B, heads, K]
    inside.append(jnp.sum(jnp.mean(share, 1) * valid) / count)
  if not terms:
    raise ValueError(f"hola_loss: no cross-attention map matches the group masks {group_masks.shape[2:]} "
                     f"(map positions {[m.shape[2] for m in maps]}, resolutions {list(resolutions)})")
  term = sum(terms) / len(terms)
  return term, {"hola": term, "attn_in_mask": sum(inside) / len(inside)}
