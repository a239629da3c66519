"""Optional precompute pass: frozen-VAE latent moments (and frozen text-encoder embeddings) of the first
`config.cache.num_batches` training batches, saved in `workdir/cache/`; training then cycles over them.

As in other trainers' latent caches, the augmentations of the pass are fixed (one crop/flip per image). Text
embeddings are cached only when every text encoder is frozen. Enable with `--config.cache.enabled=True`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from t2i import parallel
from t2i.train.models import T2IModels


def text_frozen(models: T2IModels) -> bool:
  return not any(n in models.trainable for n in models.text_encoders)


def encode_batch(models: T2IModels, frozen: dict, batch: dict) -> dict:
  """What the cache stores for one batch (pure; jit it)."""
  keep = ("input_ids", "loss_weight", "mask", "neg_input_ids", "neg_mask", "group_tokens", "group_masks",
          "group_placed")
  out = {k: batch[k] for k in keep if k in batch}
  if models.vae is not None:
    out["latent_mean"], out["latent_logvar"] = models.vae.apply({"params": frozen["vae"]}, batch["image"],
                                                                method="encode")
  else:
    out["image"] = batch["image"]
  if text_frozen(models):  # the denoiser's whole conditioning dict, as "cond.<key>"
    out.update({f"cond.{k}": v for k, v in models.cond(frozen, batch["input_ids"]).items()})
  return out


def batch_structs(models: T2IModels, plain: dict, f_structs: dict, mesh: Any, rules: Any) -> dict:
  """Shapes of cached batches, sharded on the batch dim like the plain ones."""
  shapes = jax.eval_shape(lambda f, b: encode_batch(models, f, b), f_structs, plain)
  return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=parallel.batch_sharding(mesh, rules, len(s.shape),
                                                                                     s.shape[0]))
          for k, s in shapes.items()}


def build(workdir: str, num_batches: int, models: T2IModels, frozen: dict, data_it: Any, put_batch: Any,
          plain_structs: dict) -> str:
  """Runs the precompute pass unless `workdir/cache/done.json` exists; returns the cache directory."""
  d = os.path.join(workdir, "cache")
  done = os.path.join(d, "done.json")
  if os.path.exists(done):
    return d
  os.makedirs(d, exist_ok=True)
  encode = jax.jit(lambda f, b: encode_batch(models, f, b))
  for i in range(num_batches):
    out = parallel.global_to_host(encode(frozen, put_batch(next(data_it), plain_structs)))
    if jax.process_index() == 0:
      np.savez(os.path.join(d, f"{i:06d}.npz"), **out)
  if jax.process_index() == 0:
    with open(done, "w") as f:
      json.dump({"num_batches": num_batches, "keys": sorted(out)}, f)
  return d


class CachedIterator:
  """Cycles over the cached batches in order; `get_state()` / `set_state()` carry the position."""

  def __init__(self, cache_dir: str):
    with open(os.path.join(cache_dir, "done.json")) as f:
      self._n = json.load(f)["num_batches"]
    self._dir = cache_dir
    self._pos = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    with np.load(os.path.join(self._dir, f"{self._pos % self._n:06d}.npz")) as z:
      out = {k: z[k] for k in z.files}
    self._pos += 1
    return out

  def get_state(self) -> dict:
    return {"cache_pos": self._pos}

  def set_state(self, state: dict) -> None:
    if "cache_pos" not in state:
      raise ValueError(f"data state {state} is not a cache position (was the run started without the cache?)")
    self._pos = int(state["cache_pos"])
