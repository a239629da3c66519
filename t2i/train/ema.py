"""Exponential moving average of the trainable params, updated every N steps.

config.ema fields: decay (0 disables EMA), every (update interval in steps), warmup (bool: use
min(decay, (1 + n) / (10 + n)) with n the number of EMA updates so far, so early averages are not stuck at init).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def enabled(cfg: Any) -> bool:
  return cfg is not None and float(cfg.get("decay", 0.0)) > 0.0


def update(ema: Any, params: Any, step: jax.Array, cfg: Any) -> Any:
  """EMA after the update that made `step` the completed-step count (step >= 1)."""
  if ema is None:
    return None
  every = int(cfg.get("every", 1))
  decay = jnp.asarray(float(cfg.decay), jnp.float32)
  if cfg.get("warmup", False):
    n = (step // every).astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  d = jnp.where(step % every == 0, decay, 1.0)
  return jax.tree.map(lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype),
                      ema, params)
