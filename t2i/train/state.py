"""Train state: step, trainable params, optimiser state, EMA params, RNG key."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything the update step changes. Frozen params (VAE, frozen encoders) live outside, sharded alike."""
  step: jax.Array        # int32 scalar: number of completed train steps.
  params: Any            # trainable params, e.g. {"unet": ..., "text_encoder": ...}
  opt_state: Any
  ema_params: Any        # same tree as params, or None when EMA is off.
  rng: jax.Array         # raw uint32[2] key; the step folds in `step`.


def create(params: Any, opt_state: Any, rng: jax.Array, use_ema: bool) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    ema_params=jax.tree.map(jnp.copy, params) if use_ema else None, rng=rng)


def param_count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))
