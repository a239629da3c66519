"""Ahead-of-time compile report for an experiment config: no data, weights or tokenizer files needed.

Builds the modules, the abstract sharded train state and the update step, lowers and compiles it on the current
devices' mesh, and reports parameter counts, compile time and per-device memory (`compiled.memory_analysis()`).
"""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np

from t2i import parallel
from t2i.train import ema as ema_lib
from t2i.train import models as models_lib
from t2i.train import objectives
from t2i.train import optimizer as opt_lib
from t2i.train import step as step_lib
from t2i.train.state import param_count


def stand_in_tokenizer(config: Any) -> models_lib.Tokenizer:
  """Zeros of the right shape (one block per configured tokenizer); vocabulary size and EOS id from the text
  encoder each block feeds (CLIP's when its config leaves them open)."""
  parts = []
  for key, encoder in models_lib.TOKENIZERS:
    if config.get(key) is None:
      continue
    te = (config.get(encoder) or config.text_encoder).get("config") or {}
    vocab = te.get("vocab_size", -1)
    vocab = 49408 if vocab in (-1, None) else int(vocab)
    length = int(config[key].max_length)
    parts.append(models_lib.Tokenizer(lambda texts, n=length: np.zeros((len(texts), n), np.int32), vocab, vocab - 1))
  if len(parts) > 1:
    parts[0].second = parts[1]
  return parts[0]


def abstract_setup(config: Any, mesh: Any = None) -> dict[str, Any]:
  """models, tx, schedule, mesh, rules and the abstract state/shardings for `config`."""
  mesh = mesh or parallel.make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.axis_rules)
  models = models_lib.build_models(config, stand_in_tokenizer(config))
  tx, sched = opt_lib.make_optimizer(config.optimizer, int(config.total_steps))
  structs, shards, f_structs, f_shards = step_lib.abstract_state(models, tx, mesh, rules,
                                                                 ema_lib.enabled(config.get("ema")))
  return dict(mesh=mesh, rules=rules, models=models, tx=tx, sched=sched, structs=structs, shards=shards,
              f_structs=f_structs, f_shards=f_shards)


def per_device_bytes(structs: Any) -> int:
  """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (its shard of each leaf)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(structs))


def compile_report(config: Any, mesh: Any = None, do_compile: bool = True) -> dict[str, Any]:
  """Parameter counts, per-device bytes of the train state's parts and, if `do_compile`, compile time and
  `memory_analysis()` of the compiled step."""
  s = abstract_setup(config, mesh)
  models, mesh, rules = s["models"], s["mesh"], s["rules"]
  report: dict[str, Any] = {"mesh": dict(mesh.shape), "global_batch": int(config.batch_size),
                            "image_size": int(config.image_size)}
  for name, tree in {**s["structs"].params, **s["f_structs"]}.items():
    report[f"params_{name}"] = param_count(tree)
  for part in ("params", "opt_state", "ema_params"):
    tree = getattr(s["structs"], part)
    if tree is not None:
      report[f"per_device_{part}_GiB"] = round(per_device_bytes(tree) / 2**30, 3)
  if not do_compile:
    return report
  objective = objectives.get(config.objective)
  update = step_lib.make_update(models, objective.loss, s["tx"], s["sched"], config.get("ema"),
                                int(config.optimizer.get("grad_accum", 1)))
  b_structs = step_lib.batch_structs(models, int(config.batch_size), mesh, rules, pair=objective.pair)
  if config.get("cache") is not None and config.cache.get("enabled", False):
    from t2i.train import cache as cache_lib
    b_structs = cache_lib.batch_structs(models, b_structs, s["f_structs"], mesh, rules)
  report["batch"] = {k: tuple(v.shape) for k, v in b_structs.items()}
  t0 = time.perf_counter()
  compiled = step_lib.compile_step(update, mesh, rules, s["structs"], s["shards"], s["f_structs"], s["f_shards"],
                                   b_structs)
  report["compile_seconds"] = round(time.perf_counter() - t0, 1)
  mem = compiled.memory_analysis()
  for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes"):
    if mem is not None and hasattr(mem, f):
      report[f"per_device_{f.replace('_size_in_bytes', '')}_GiB"] = round(getattr(mem, f) / 2**30, 3)
  if mem is not None:
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - \
        mem.alias_size_in_bytes
    report["per_device_peak_estimate_GiB"] = round(peak / 2**30, 3)
  report["compiled"] = compiled
  return report
