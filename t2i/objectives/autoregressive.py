"""Next-token losses for autoregressive token models (CM3 objective = plain NLL on CM3-transformed documents).

  inputs, targets, mask = next_token_batch(tokens, loss_mask)
  logits = module.apply({"params": p}, inputs, attention_mask=attention_mask[:, :-1])
  loss, metrics = cm3_lm_loss(logits, targets, mask, z_loss_weight=1e-5)

The CM3 transform itself (span masking, `<infill>`) happens in the data pipeline (`data_pipelines.cm3`); the loss
is next-token cross-entropy over every real token (CM3Leon: no up-weighting), plus Chameleon's z-loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from t2i.models.transformer import z_loss


def next_token_batch(tokens: jax.Array, loss_mask: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(inputs [B, L-1], targets [B, L-1], mask [B, L-1] float32) from token rows [B, L]; mask defaults to ones
  and belongs to the target position (0 for padding)."""
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"next_token_batch: tokens must be [batch, length >= 2], got shape {tokens.shape}")
  mask = jnp.ones(tokens.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
  return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def cm3_lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None,
                z_loss_weight: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Masked mean next-token NLL + z_loss_weight * mean log²Z; returns (loss, metrics).

  logits: [B, L, V]; targets: int [B, L]; mask: [B, L] (1 = count this position). Metrics: loss, nll, z_loss,
  accuracy (argmax == target), perplexity = exp(nll), tokens (number of counted positions).
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(f"cm3_lm_loss: logits {logits.shape} do not match targets {targets.shape}")
  logits = logits.astype(jnp.float32)
  mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  denom = jnp.maximum(mask.sum(), 1.0)
  logz = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = ((logz - tgt) * mask).sum() / denom
  zl = (z_loss(logits) * mask).sum() / denom
  acc = ((jnp.argmax(logits, -1) == targets) * mask).sum() / denom
  loss = nll + z_loss_weight * zl
  return loss, {"loss": loss, "nll": nll, "z_loss": zl, "accuracy": acc, "perplexity": jnp.exp(nll),
                "tokens": mask.sum()}
