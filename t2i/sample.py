"""Sample images from a trained workdir (restores the latest checkpoint; EMA weights unless --noema).

  python -m t2i.sample --workdir=DIR (--prompt=TEXT | --prompts_file=F) [--negative_prompt=TEXT] [--num=N]
      [--seed=S] [--steps=K] [--guidance=G] [--sampler=ddim] [--dynamic_threshold=P | --clip_sample_range=R]
      [--guidance_rescale=R] [--guidance_interval=LO,HI] [--batch=B] --out=OUT

Writes OUT/00000.png, ... and OUT/index.jsonl ({"file", "prompt", "seed"} per line). The workdir's config.json
and tokenizer/ are all it needs. Image i starts from the noise of seed S + i and, with the ancestral sampler
(--sampler=ddpm), draws its step noise from that seed too: reproducible image by image, whatever --batch is.
Diffusion samplers: ddim (deterministic), ddpm (ancestral; wants more steps), euler, dpmpp_2m; for pixel-space
models each step's x0 estimate can be clipped (--clip_sample_range=1) or dynamically thresholded
(--dynamic_threshold=0.995); CFG can be rescaled (--guidance_rescale=0.7) or limited to a timestep interval
(--guidance_interval=200,800). Any model family (`t2i.train.family`) with a sampler works: for a token model
(config.family="tokens", objective "cm3") seed S + i keys image i's token sampling, --steps is ignored and
--sampler is top_p / greedy / cd_k.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from data_pipelines.image_decode import to_uint8
from t2i import parallel
from t2i.sampling.diffusion import guidance_interval_tuple
from t2i.train import checkpoint as ckpt_lib
from t2i.train import ema as ema_lib
from t2i.train import family as family_lib
from t2i.train import models as models_lib
from t2i.train import objectives
from t2i.train import optimizer as opt_lib
from t2i.train import step as step_lib

FLAGS = flags.FLAGS


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; --workdir must be a train workdir")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class Sampler:
  """Restores a workdir's params and samples prompts with one compiled loop per batch shape."""

  def __init__(self, workdir: str, use_ema: bool = True, step: int | None = None):
    self.config = config = load_config(workdir)
    self.rules = rules = tuple(tuple(r) for r in config.axis_rules)
    self.mesh = mesh = parallel.make_mesh(config.mesh)
    family = family_lib.get(config)
    self.tokenize = family.load_tokenizer(config, workdir)
    self.models = models = family.build_models(config, self.tokenize)
    self.objective = objectives.get(config.objective)
    if self.objective.sample is None:
      raise ValueError(f"config.objective={config.objective!r} has no sampler")
    tx, _ = opt_lib.make_optimizer(config.optimizer, int(config.total_steps))
    has_ema = ema_lib.enabled(config.get("ema"))
    structs, _, f_structs, _ = step_lib.abstract_state(models, tx, mesh, rules, has_ema)
    if use_ema and not has_ema:
      logging.warning("run has no EMA (config.ema.decay=0); using raw params")
    mngr = ckpt_lib.make_manager(workdir, async_save=False)
    restored = ckpt_lib.restore_params(mngr, structs.params, f_structs, ema=use_ema and has_ema, step=step)
    if restored is None:
      raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to sample from")
    self.params, self.frozen, self.step = restored
    self._fns: dict[tuple, Any] = {}

  def _fn(self, num_steps: int, sampler: str, options: dict):
    key = (num_steps, sampler, tuple(sorted(options.items())))
    if key not in self._fns:
      obj, models = self.objective, self.models

      def fn(p, f, ids, u, seeds, g):
        # rng: one key per image, so a stochastic sampler's step noise (ddpm) also follows the image's seed
        return obj.sample(p, f, ids, u, jax.vmap(jax.random.PRNGKey)(seeds), models, num_steps=num_steps,
                          guidance_scale=g, sampler=sampler, x_T=models.noise(seeds), **options)
      self._fns[key] = jax.jit(fn, static_argnums=(5,) if obj.static_guidance else ())
    return self._fns[key]

  def __call__(self, prompts: list[str], seeds: list[int], negative_prompt: str = "", num_steps: int = 25,
               guidance_scale: float = 4.0, sampler: str = "ddim", **options) -> np.ndarray:
    """Images in [-1, 1], [n, H, W, 3]; image i starts from the noise of `PRNGKey(seeds[i])`.

    `options`: further keyword arguments of the objective's sampler (diffusion: clip_sample_range,
    dynamic_threshold, guidance_rescale, guidance_interval)."""
    options = {k: v for k, v in options.items() if v is not None}
    if options and self.objective.sample is not objectives.diffusion_sample:
      raise ValueError(f"sampling options {sorted(options)} apply to diffusion samplers only, "
                       f"not to config.objective={self.config.objective!r}")
    ids = self.tokenize(prompts)
    uncond = models_lib.unconditional_ids(self.tokenize, prompts, negative_prompt)
    seeds = np.asarray(seeds, np.uint32)
    g = float(guidance_scale) if self.objective.static_guidance else jnp.float32(guidance_scale)
    with parallel.tracing_context(self.mesh, self.rules):  # as the train step
      out = self._fn(num_steps, sampler, options)(self.params, self.frozen, ids, uncond, seeds, g)
    return np.asarray(parallel.global_to_host(out))


def parse_interval(value: Any, name: str) -> tuple[float, float] | None:
  """"lo,hi" / "lo:hi" / [lo, hi] -> (lo, hi) timesteps, None for None; bad input raises naming `name`."""
  parts = value.replace(":", ",").split(",") if isinstance(value, str) else value
  try:
    return guidance_interval_tuple(parts)
  except ValueError as e:
    raise ValueError(f"{name}={value!r}: expected two timesteps LO,HI with LO <= HI") from e


def sample_in_batches(s: Sampler, prompts: list[str], seeds: list[int], batch: int, **kw) -> Iterator[np.ndarray]:
  """Images for (prompts[i], seeds[i]), yielded `batch` at a time ([n, H, W, 3] in [-1, 1]): one compiled shape,
  the last batch padded with its last job and cut back. `kw` go to the sampler call."""
  for b0 in range(0, len(prompts), batch):
    chunk = list(range(b0, min(len(prompts), b0 + batch)))
    pad = chunk + [chunk[-1]] * (batch - len(chunk))
    yield s([prompts[i] for i in pad], [seeds[i] for i in pad], **kw)[:len(chunk)]


def sample_prompts(s: Sampler, prompts: list[str], num: int, seed: int, batch: int, out_dir: str, **kw) -> list:
  """Writes num images per prompt into out_dir (00000.png ...) plus index.jsonl; returns the index rows.

  Images are generated `batch` at a time (the last batch padded); image i of the job list starts from the noise
  of seed + i, so it does not depend on the batching.
  """
  from PIL import Image
  os.makedirs(out_dir, exist_ok=True)
  jobs = [(p, seed + i) for i, p in enumerate(p for p in prompts for _ in range(num))]
  images = (im for imgs in sample_in_batches(s, [p for p, _ in jobs], [sd for _, sd in jobs], batch, **kw)
            for im in imgs)
  rows = []
  for j, ((p, sd), im) in enumerate(zip(jobs, images)):
    name = f"{j:05d}.png"
    Image.fromarray(to_uint8(im)).save(os.path.join(out_dir, name))
    rows.append({"file": name, "prompt": p, "seed": sd})
  with open(os.path.join(out_dir, "index.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return rows


def define_flags() -> None:
  """Command-line flags (defined only when run as a program, so importing Sampler defines none)."""
  flags.DEFINE_string("workdir", None, "Train workdir (config.json, tokenizer/, checkpoints/).")
  flags.DEFINE_string("prompt", None, "Prompt text.")
  flags.DEFINE_string("prompts_file", None, "File with one prompt per line.")
  flags.DEFINE_string("negative_prompt", "", "Negative prompt (the unconditional branch of CFG).")
  flags.DEFINE_integer("num", 1, "Images per prompt.")
  flags.DEFINE_integer("seed", 0, "Base seed; image i uses seed + i.")
  flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.num_steps).")
  flags.DEFINE_float("guidance", None, "CFG scale (default: config.sample.guidance_scale).")
  flags.DEFINE_string("sampler", None, "Sampler name (default: config.sample.sampler).")
  flags.DEFINE_float("clip_sample_range", None, "Diffusion: clip each step's x0 estimate to [-r, r] (0 = off; "
                     "default: config.sample.clip_sample_range). For pixel-space models.")
  flags.DEFINE_float("dynamic_threshold", None, "Diffusion: dynamic thresholding of x0 at this quantile, e.g. "
                     "0.995 (0 = off; default: config.sample.dynamic_threshold). For pixel-space models.")
  flags.DEFINE_float("guidance_rescale", None, "Diffusion: CFG rescale factor in [0, 1] (default: "
                     "config.sample.guidance_rescale, 0 = off).")
  flags.DEFINE_list("guidance_interval", None, "Diffusion: LO,HI: guide only at timesteps LO <= t <= HI (default: "
                    "config.sample.guidance_interval, none = every step).")
  flags.DEFINE_integer("batch", 8, "Images per compiled sampling call.")
  flags.DEFINE_bool("noema", False, "Use the raw trained params instead of the EMA.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("out", None, "Output directory.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.out:
    raise app.UsageError("--workdir and --out are required")
  if (FLAGS.prompt is None) == (FLAGS.prompts_file is None):
    raise app.UsageError("give exactly one of --prompt or --prompts_file")
  if FLAGS.prompt is not None:
    prompts = [FLAGS.prompt]
  else:
    with open(FLAGS.prompts_file) as f:
      prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
      raise app.UsageError(f"--prompts_file={FLAGS.prompts_file}: no prompts")
  s = Sampler(FLAGS.workdir, use_ema=not FLAGS.noema, step=FLAGS.step)
  cfg = s.config.sample
  rows = sample_prompts(
      s, prompts, FLAGS.num, FLAGS.seed, FLAGS.batch, FLAGS.out, negative_prompt=FLAGS.negative_prompt,
      num_steps=FLAGS.steps or int(cfg.num_steps),
      guidance_scale=FLAGS.guidance if FLAGS.guidance is not None else float(cfg.guidance_scale),
      sampler=FLAGS.sampler or cfg.get("sampler", "ddim"), clip_sample_range=FLAGS.clip_sample_range,
      dynamic_threshold=FLAGS.dynamic_threshold, guidance_rescale=FLAGS.guidance_rescale,
      guidance_interval=parse_interval(FLAGS.guidance_interval, "--guidance_interval"))
  logging.info("wrote %d images from step %d to %s", len(rows), s.step, FLAGS.out)


if __name__ == "__main__":
  define_flags()
  app.run(main)
