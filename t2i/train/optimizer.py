"""Optax optimiser from the config: AdamW (or Lion, Adafactor, ...) + weight-decay mask, warm-up + cosine/constant,
clipping, accumulation.

config.optimizer fields:
  name: "adamw" | "lion" | "adafactor" | "adam" | "sgd"; lr; b1; b2; eps; weight_decay (decoupled: each step
    subtracts lr * weight_decay * param, for every name but "adam" and "sgd");
    "lion" keeps one moment (half of AdamW's state) and reads the same b1, b2 (its paper uses 0.9, 0.99, where
    experiments/common.py sets AdamW's 0.9, 0.999) and usually a 3-10x smaller lr than AdamW's;
    "adafactor" keeps factored second moments (a row and a column vector per matrix whose two largest dims are
    >= factored_min_dim, default 128) and no first moment unless `momentum` is set, with an absolute lr (no
    relative step, no parameter scaling) and update clipping at RMS `clip_rms` (default 1.0): its state is a
    small fraction of AdamW's, for models whose optimiser state does not fit;
  wd_mask: "ndim>=2" (decay kernels/embeddings only) | "all" | "none";
  schedule: "cosine" | "constant"; warmup_steps; min_lr_ratio (cosine end value / lr);
  grad_clip (global norm, 0 = off); grad_accum (micro-steps per update, via optax.MultiSteps);
  lr_scale: {group: factor} multiplies the learning rate of a trainable group (a top-level params key such as
    "unet" or "text_encoder"), e.g. a faster text encoder trained jointly with the denoiser.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax


def lr_schedule(cfg: Any, total_steps: int) -> Callable[[Any], Any]:
  """Learning rate as a function of the optimiser update count."""
  lr = float(cfg.lr)
  warmup = int(cfg.get("warmup_steps", 0))
  kind = cfg.get("schedule", "cosine")
  updates = max(1, total_steps // max(1, int(cfg.get("grad_accum", 1))))
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, max(1, updates - warmup), alpha=float(cfg.get("min_lr_ratio", 0.0)))
  else:
    raise ValueError(f"config.optimizer.schedule={kind!r}: expected 'cosine' or 'constant'")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(kind: str) -> Any:
  if kind == "all":
    return None
  if kind == "none":
    return lambda params: jax.tree.map(lambda _: False, params)
  if kind == "ndim>=2":  # per-layer ndim: a scanned stack's leading "layers" axis does not count
    from t2i.nn.scan import is_layer_stacked
    return lambda params: jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim - is_layer_stacked(path) >= 2, params)
  raise ValueError(f"config.optimizer.wd_mask={kind!r}: expected 'ndim>=2', 'all' or 'none'")


def scale_groups(factors: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of each top-level params group named in `factors` (a per-group learning rate)."""
  factors = {str(k): float(v) for k, v in factors.items()}

  def init(params):
    if not isinstance(params, Mapping):  # optax.tree_map_params inits with a placeholder
      return optax.EmptyState()
    unknown = sorted(set(factors) - set(params))
    if unknown:
      raise ValueError(f"config.optimizer.lr_scale: no trainable group {unknown} (groups: {sorted(params)})")
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return {k: jax.tree.map(lambda u, f=factors.get(k, 1.0): u * f, v) if factors.get(k, 1.0) != 1.0 else v
            for k, v in updates.items()}, state
  return optax.GradientTransformation(init, update)


def _adafactor(cfg: Any, sched: Callable[[Any], Any], decay: Any) -> optax.GradientTransformation:
  """Adafactor with an absolute learning rate and AdamW's decoupled weight decay (lr * wd * param)."""
  parts = [optax.scale_by_factored_rms(decay_rate=cfg.get("decay_rate", 0.8),
                                       min_dim_size_to_factor=int(cfg.get("factored_min_dim", 128)))]
  clip_rms = float(cfg.get("clip_rms", 1.0))
  if clip_rms:
    parts.append(optax.clip_by_block_rms(clip_rms))
  if cfg.get("momentum", None):
    parts.append(optax.ema(float(cfg.momentum), debias=False))
  if cfg.get("weight_decay", 0.0):
    parts.append(optax.add_decayed_weights(float(cfg.weight_decay), decay))
  parts.append(optax.scale_by_learning_rate(sched))
  return optax.chain(*parts)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Returns (tx, schedule). With grad_accum > 1, tx is an `optax.MultiSteps` wrapper."""
  sched = lr_schedule(cfg, total_steps)
  name = cfg.get("name", "adamw")
  decay = decay_mask(cfg.get("wd_mask", "ndim>=2"))
  if name == "adamw":
    opt = optax.adamw(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8),
                      weight_decay=cfg.get("weight_decay", 0.0), mask=decay)
  elif name == "lion":
    opt = optax.lion(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.99), weight_decay=cfg.get("weight_decay", 0.0),
                     mask=decay)
  elif name == "adafactor":
    opt = _adafactor(cfg, sched, decay)
  elif name == "adam":
    opt = optax.adam(sched, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), eps=cfg.get("eps", 1e-8))
  elif name == "sgd":
    opt = optax.sgd(sched, momentum=cfg.get("momentum", None))
  else:
    raise ValueError(f"config.optimizer.name={name!r}: expected 'adamw', 'lion', 'adafactor', 'adam' or 'sgd'")
  parts = []
  if cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  parts.append(opt)
  if cfg.get("lr_scale"):
    parts.append(scale_groups(dict(cfg.lr_scale)))
  tx = optax.chain(*parts)
  accum = int(cfg.get("grad_accum", 1))
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx, sched


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any,
                        replicated: Any) -> tuple[Any, Any]:
  """(abstract opt state, shardings): leaves of their param's shape follow its sharding, others are replicated
  (counts, and Adafactor's factored row/column statistics, which are vectors of a matrix's side lengths)."""
  abstract = jax.eval_shape(tx.init, abstract_params)
  shardings = optax.tree_map_params(
      tx, lambda leaf, p, s: s if leaf.shape == p.shape else replicated, abstract, abstract_params, param_shardings,
      transform_non_params=lambda _: replicated)
  return abstract, shardings
