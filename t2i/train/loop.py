"""The one train loop: `train(config, workdir)`.

Reads top to bottom like the run it performs: mesh, tokenizer & data, models & optimiser, sharded state,
update step (AOT-compiled), checkpoint restore, then the loop (step, log, NaN guard, checkpoint, samples).
The model family (`config.family`: "t2i" default, "tokens"; see `t2i.train.family`) supplies the tokenizer, the
models object and the data iterator; the objective supplies the loss, sampler and optional post-update hook.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from t2i import parallel
from t2i.train import cache as cache_lib
from t2i.train import checkpoint as ckpt_lib
from t2i.train import ema as ema_lib
from t2i.train import family as family_lib
from t2i.train import init_from
from t2i.train import logging as log_lib
from t2i.train import models as models_lib
from t2i.train import objectives
from t2i.train import optimizer as opt_lib
from t2i.train import step as step_lib
from t2i.train.state import param_count


class NonFiniteError(FloatingPointError):
  """A metric became NaN or inf; the message names the step and the metric."""


def check_finite(metrics: dict[str, Any], step: int, last_ckpt: int | None) -> None:
  for k, v in metrics.items():
    if not np.all(np.isfinite(v)):
      raise NonFiniteError(
          f"step {step}: metric {k!r} is not finite ({float(np.asarray(v))}); stopping. Last good checkpoint: "
          f"{'none' if last_ckpt is None else f'step {last_ckpt}'}. Lower config.optimizer.lr, enable "
          "config.optimizer.grad_clip or check the data.")


def make_data_iterator(config: Any, tokenize, mesh) -> Any:
  """The checkpointable training iterator named by config.data.name ("toy" or a grain pipeline)."""
  if config.data.name == "toy":
    from t2i.train.toy import ToyDataIterator
    return ToyDataIterator(tokenize, config.batch_size, config.image_size, seed=config.seed,
                           nan_batch=int(config.data.get("nan_batch", -1)), pair=bool(config.data.get("pair", False)))
  from data_pipelines import pipeline
  cfg = config.data.to_dict()
  kind = cfg.pop("name")
  cfg["data_dir"] = os.path.expanduser(cfg.get("data_dir") or "~/t2i_data")
  cfg["image_size"] = int(config.image_size)
  cfg["max_length"] = models_lib.token_length(config)
  if kind == "shapes":  # generate + build the split once (deterministic), then read it like any dataset
    split, num = cfg.pop("shapes_split", "train"), cfg.pop("shapes_num", None)
    if jax.process_index() == 0:
      cfg["dataset"] = pipeline.prepare_shapes(cfg["data_dir"], split, num, size=int(config.image_size))
    else:
      from data_pipelines.tfds import shapes_bench
      cfg["dataset"] = "shapes_bench/" + shapes_bench.shapes_config(split, num, int(config.image_size)).name
  elif kind == "shapes_pairs":  # shapes-bench preference pairs (Pick-a-Pic layout), built once
    from data_pipelines.tfds import common, preference_pairs as pp
    pc = pp.shapes_pairs_config(int(cfg.pop("shapes_num", 2000)), int(config.image_size),
                                int(cfg.pop("shapes_seed", 0)))
    if jax.process_index() == 0:
      common.prepare(pp.PreferencePairs(config=pc, data_dir=cfg["data_dir"], file_format=common.FILE_FORMAT))
    cfg["dataset"], cfg["pair"] = f"preference_pairs/{pc.name}", True
  elif kind == "spin":  # (real, opponent sample) pairs of a SPIN round, sampled once by the opponent run
    from t2i.train import generated_pairs
    opponent = config.reference.get("init_from") or config.init_from.workdir
    split, num = cfg.pop("shapes_split", "train"), int(cfg.pop("shapes_num", 1000))
    real = pipeline.prepare_shapes(cfg["data_dir"], split, None, size=int(config.image_size))
    cfg["dataset"] = generated_pairs.build_round(opponent, cfg["data_dir"], real, num, int(config.image_size),
                                                 seed=int(cfg.pop("round_seed", config.seed)))
    cfg["pair"] = True
  elif kind == "judged":  # the start run's samples judged by the scorer: (passing or rendered, failing) pairs
    from t2i.train import generated_pairs
    policy = config.reference.get("init_from") or config.init_from.workdir
    cfg["dataset"], _ = generated_pairs.build_judged(
        policy, cfg["data_dir"], int(cfg.pop("prompts_per_family")), int(cfg.pop("samples_per_prompt", 4)),
        int(cfg.pop("max_pairs_per_prompt", 4)), seed=int(cfg.pop("prompt_seed", 0)),
        winner=cfg.pop("winner", "sample"))
    cfg["pair"] = True
  elif kind != "tfds":
    raise ValueError(f"config.data.name={kind!r}: expected 'toy', 'shapes', 'shapes_pairs', 'spin', 'judged' or "
                     "'tfds'")
  return pipeline.make_train_iterator(ml_collections.ConfigDict(cfg), tokenize, int(config.batch_size),
                                      mesh=mesh, seed=int(config.seed))


def eval_data_config(config: Any) -> ml_collections.ConfigDict:
  """A copy of `config` whose `data` has the set (non-empty) fields of `config.eval.data` laid over it (naming a
  dataset replaces a training mix of `config.data.sources`)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  overlay = {k: v for k, v in dict(config.eval.get("data") or {}).items() if v not in ("", None)}
  if "dataset" in overlay and "sources" in cfg.data:
    cfg.data.sources = ()
  cfg.data.update(overlay)
  return cfg


def make_eval_batches(config: Any, family: Any, tokenize, mesh, structs: dict[str, jax.ShapeDtypeStruct],
                      cache_dir: str | None = None) -> list[dict[str, jax.Array]]:
  """The `config.eval.batches` fixed batches of the held-out loss: from `config.eval.data` laid over `config.data`
  (e.g. shapes_split="heldout", or split="validation" of a TFDS data set), or, when none is set, the first batches
  of the training data (then not held out); a cached run takes its first cached batches."""
  n = int(config.eval.get("batches", 2))
  if cache_dir is not None:
    it = cache_lib.CachedIterator(cache_dir)
  else:
    it = family.make_data_iterator(eval_data_config(config), tokenize, mesh)
  ones = {k: np.ones(s.shape, s.dtype) for k, s in structs.items() if k == "loss_weight"}  # held-out data: unweighted
  return [put_batch({**ones, **next(it)}, structs) for _ in range(n)]


def put_batch(batch: dict[str, Any], structs: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Keeps the keys the step expects; numpy (global) or jax arrays -> arrays in the step's batch sharding."""
  out = {}
  for k, s in structs.items():
    if k not in batch:
      raise KeyError(f"data batch has no {k!r} (keys: {sorted(batch)})")
    x = batch[k]
    if tuple(x.shape) != s.shape:
      raise ValueError(f"data batch {k!r} has shape {tuple(x.shape)}, the step expects {s.shape} "
                       "(check config.batch_size / image_size / tokenizer.max_length)")
    if isinstance(x, jax.Array):
      out[k] = x if x.sharding == s.sharding else jax.device_put(x, s.sharding)
    else:
      x = np.asarray(x, s.dtype)
      out[k] = jax.make_array_from_callback(s.shape, s.sharding, lambda idx, x=x: x[idx])
  return out


def make_sampler(config: Any, models, objective) -> Any:
  """Jitted (params, frozen, ids, uncond_ids, rng, guidance) -> images; one compiled sampling loop (guidance is a
  static Python float for objectives with `static_guidance`)."""
  cfg = config.sample
  fn = lambda p, f, ids, u, rng, g: objective.sample(p, f, ids, u, rng, models, num_steps=int(cfg.num_steps),
                                                     guidance_scale=g, sampler=cfg.get("sampler", "ddim"))
  return jax.jit(fn, static_argnums=(5,) if objective.static_guidance else ())


def train(config: Any, workdir: str) -> dict[str, float]:
  """Trains per `config`, writing checkpoints, logs and samples into `workdir`; resumes if it holds a run."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  rules = tuple(tuple(r) for r in config.axis_rules)

  # ---------------------------------------------------------------- mesh
  mesh = parallel.make_mesh(config.mesh)
  logging.info("mesh: %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

  # ---------------------------------------------------------------- tokenizer & data
  family = family_lib.get(config)
  tokenize = family.setup_tokenizer(config, workdir)
  data_it = family.make_data_iterator(config, tokenize, mesh)

  # ---------------------------------------------------------------- models & optimiser
  models = family.build_models(config, tokenize)
  objective = objectives.get(config.objective)
  total = int(config.total_steps)
  tx, sched = opt_lib.make_optimizer(config.optimizer, total)
  use_ema = ema_lib.enabled(config.get("ema"))

  # ---------------------------------------------------------------- sharded state (abstract first)
  state_structs, state_shards, f_structs, f_shards = step_lib.abstract_state(models, tx, mesh, rules, use_ema)
  logging.info("params: trainable %s = %.2fM; frozen %s = %.2fM", list(state_structs.params),
               param_count(state_structs.params) / 1e6, list(f_structs), param_count(f_structs) / 1e6)

  # ---------------------------------------------------------------- update step (AOT-compiled)
  update = step_lib.make_update(models, objective.loss, tx, sched, config.get("ema"),
                                int(config.optimizer.get("grad_accum", 1)), post_update=objective.post_update)
  plain_structs = step_lib.batch_structs(models, int(config.batch_size), mesh, rules, pair=objective.pair)
  use_cache = config.get("cache") is not None and bool(config.cache.get("enabled", False))
  b_structs = cache_lib.batch_structs(models, plain_structs, f_structs, mesh, rules) if use_cache else plain_structs
  t0 = time.perf_counter()
  train_step = step_lib.compile_step(update, mesh, rules, state_structs, state_shards, f_structs, f_shards,
                                     b_structs)
  mem = train_step.memory_analysis()
  logging.info("train step compiled in %.1fs; per-device memory: %s", time.perf_counter() - t0,
               _memory_str(mem))

  # ---------------------------------------------------------------- checkpoint restore (or init)
  mngr = ckpt_lib.make_manager(workdir, keep=int(config.get("keep_ckpts", 3)),
                               async_save=bool(config.get("async_ckpt", True)))
  restored = ckpt_lib.restore(mngr, state_structs, f_structs)
  if restored is not None:
    state, frozen, data_state = restored
    logging.info("resumed from %s at step %d", mngr.directory, int(state.step))
  else:
    pretrained = models_lib.pretrained_params(config)
    pretrained.update(init_from.pretrained_from_runs(config, models, {**state_structs.params, **f_structs}))
    state, frozen = step_lib.init_state(models, tx, mesh, rules, int(config.seed), state_shards, f_shards,
                                        pretrained)
    data_state = None
    logging.info("initialised %s", f"from {sorted(pretrained)} (rest fresh)" if pretrained else "from scratch")

  # ---------------------------------------------------------------- optional latent / embedding cache
  if use_cache:
    cache_dir = cache_lib.build(workdir, int(config.cache.num_batches), models, frozen, data_it, put_batch,
                                plain_structs)
    data_it = cache_lib.CachedIterator(cache_dir)
    logging.info("training from the cache in %s (keys %s)", cache_dir, sorted(b_structs))
  if data_state is not None:
    data_it.set_state(data_state)
  start = int(jax.device_get(state.step))
  last_ckpt = mngr.latest_step()

  # ---------------------------------------------------------------- held-out loss (config.eval.every > 0)
  eval_every = int(config.eval.get("every", 0)) if config.get("eval") is not None else 0
  eval_loss = None
  if eval_every:
    eval_batches = make_eval_batches(config, family, tokenize, mesh, b_structs, cache_dir if use_cache else None)
    eval_rng = jax.random.PRNGKey(int(config.eval.get("seed", 0)))  # same t, noise and dropout at every eval
    eval_fn = parallel.traced_in(jax.jit(lambda p, f, b: objective.loss(p, f, b, eval_rng, models)[0]), mesh, rules)

    def eval_loss() -> dict[str, float]:
      out = {"eval_loss": float(np.mean([eval_fn(state.params, frozen, b) for b in eval_batches]))}
      if state.ema_params is not None:
        out["eval_loss_ema"] = float(np.mean([eval_fn(state.ema_params, frozen, b) for b in eval_batches]))
      return out

  # ---------------------------------------------------------------- logging & validation sampler
  writer = log_lib.SummaryWriter(os.path.join(workdir, "tb")) if is_main else None
  metrics_file = log_lib.MetricsFile(os.path.join(workdir, "metrics.jsonl")) if is_main else None
  sample_every = int(config.get("sample_every", 0))
  sampler = recon = None
  if objective.sample is not None:
    sampler = parallel.traced_in(make_sampler(config, models, objective), mesh, rules)
  if objective.reconstruct:
    recon = parallel.traced_in(jax.jit(lambda p, f, x: objective.reconstruct(p, f, x, models)), mesh, rules)
  prompts = list(config.sample.prompts) if config.get("sample") is not None else []

  def write_samples(step: int, batch: dict[str, jax.Array]) -> None:
    params = state.ema_params if state.ema_params is not None else state.params
    cols = None
    if recon is not None:  # autoencoders: row 1 = the step's batch images, row 2 = their reconstructions
      x = parallel.global_to_host(batch["image"])
      cols = len(x)
      imgs = np.concatenate([x, parallel.global_to_host(recon(params, frozen, batch["image"]))], 0)
    elif sampler is None or not prompts:
      return
    else:
      ids = tokenize(prompts)
      uncond = models_lib.unconditional_ids(tokenize, prompts, "")
      g = config.sample.guidance_scale
      g = float(g) if objective.static_guidance else jnp.float32(g)
      imgs = sampler(params, frozen, ids, uncond, jax.random.PRNGKey(int(config.sample.get("seed", 0))), g)
    grid = log_lib.image_grid(parallel.global_to_host(imgs), cols)
    if is_main:
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      from PIL import Image
      Image.fromarray(grid).save(os.path.join(workdir, "samples", f"step_{step:06d}.png"))
      writer.image("samples", grid, step)
      writer.flush()

  stop = {"signal": None}

  def on_signal(signum, _frame):  # Finish the current step, save, exit.
    stop["signal"] = signum
  old_handlers = {}
  if threading.current_thread() is threading.main_thread():
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

  # ---------------------------------------------------------------- loop
  ckpt_every = int(config.get("ckpt_every", 0))
  log_every = max(1, int(config.get("log_every", 1)))
  bar = log_lib.progress_bar(total, start, enabled=is_main and bool(config.get("progress", True)))
  record: dict[str, float] = {}
  try:
    for step in range(start + 1, total + 1):
      t_step = time.perf_counter()
      batch = put_batch(next(data_it), b_structs)
      state, metrics = train_step(state, frozen, batch)
      metrics = jax.device_get(metrics)
      dt = time.perf_counter() - t_step
      check_finite(metrics, step, last_ckpt)
      record = {k: float(v) for k, v in metrics.items()}
      record.update(step_time=dt, images_per_sec=int(config.batch_size) / dt)
      if eval_loss is not None and (step % eval_every == 0 or step == total):
        record.update(eval_loss())
      if is_main:
        metrics_file.write({"step": step, **record})
        if step % log_every == 0 or step == total or "eval_loss" in record:
          writer.scalars(record, step)
          writer.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
      done = step == total or stop["signal"] is not None
      if (ckpt_every and step % ckpt_every == 0) or done:
        ckpt_lib.save(mngr, state, frozen, data_it.get_state())
        last_ckpt = step
      if (sample_every and step % sample_every == 0) or (step == total and sample_every):
        write_samples(step, batch)
      if stop["signal"] is not None:
        logging.warning("signal %d: saved a checkpoint at step %d and stopped", stop["signal"], step)
        break
  finally:
    mngr.wait_until_finished()
    bar.close()
    if is_main:
      writer.close()
      metrics_file.close()
    for s, h in old_handlers.items():
      signal.signal(s, h)
  return record


def _memory_str(mem: Any) -> str:
  if mem is None:
    return "n/a"
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
  return ", ".join(f"{f.replace('_size_in_bytes', '')}={getattr(mem, f, 0) / 2**20:.1f}MiB" for f in fields)
