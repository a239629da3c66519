"""shapes-bench scores of trained workdirs under several sampling settings, in one process (one compile per
workdir and step count), printed as one JSON line per (workdir, setting) and appended to --out.

  python -m benchmarks.shapes_eval --workdirs=W1,W2 [--settings=plain,neg] [--num_per_family=20] [--seed=1234]
      [--guidance=G] [--steps=K] [--sampler=ddpm] [--step=N] [--out=scores.jsonl]

Settings: "plain" (CFG against the empty prompt), "neg" (CFG against --negative_prompt, default "blurry, noisy"),
"g=<x>" (guidance x; for a guidance-embedded model the embedded value), and for diffusion runs "thr=<q>" (dynamic
thresholding of x0 at quantile q), "clip=<r>" (x0 clipped to [-r, r]), "rescale=<r>" (CFG rescale) and
"interval=<lo>:<hi>" (CFG only at timesteps lo..hi); parts join with "+", e.g. "neg+clip=1", "g=6+interval=0:700". Each sample image i uses seed --seed + i, so settings and workdirs are compared on the same noise.
Scores: per-family accuracy, overall, mean sharpness.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.eval_common import emit, eval_prompt_texts, sample_and_score  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Train workdirs to score.")
_SETTINGS = flags.DEFINE_list("settings", ["plain"], "plain, neg, g=<guidance>, thr=<q>, clip=<r>, rescale=<r>, "
                               "interval=<lo>:<hi>; join with '+'.")
_NEG = flags.DEFINE_string("negative_prompt", "blurry, noisy", "Negative prompt of the 'neg' setting.")
_NUM = flags.DEFINE_integer("num_per_family", 20, "Eval prompts per family (6 families).")
_SEED = flags.DEFINE_integer("seed", 1234, "Prompt set seed and base sample seed.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Guidance (default: the run's config.sample.guidance_scale).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the run's config.sample.num_steps).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: the run's config.sample.sampler), e.g. ddim, ddpm.")
_BATCH = flags.DEFINE_integer("batch", 40, "Images per compiled call.")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file too.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to score (default: the latest).")


def score_workdir(workdir: str, settings: Sequence[str], num_per_family: int, seed: int, negative_prompt: str,
                  guidance: float | None = None, steps: int | None = None, batch: int = 40,
                  step: int | None = None, sampler: str | None = None) -> list[dict]:
  from t2i.sample import Sampler, parse_interval
  s = Sampler(workdir, step=step)
  cfg = s.config.sample
  prompts = eval_prompt_texts(num_per_family, seed, int(s.config.image_size))
  name = sampler or cfg.get("sampler", "ddim")
  n_steps = int(steps or cfg.num_steps)
  rows = []
  for setting in settings:
    g = float(cfg.guidance_scale if guidance is None else guidance)
    neg, options = "", {}
    for part in setting.split("+"):
      if part == "neg":
        neg = negative_prompt
      elif part.startswith("g="):
        g = float(part[2:])
      elif part.startswith("thr="):
        options["dynamic_threshold"] = float(part[4:])
      elif part.startswith("clip="):
        options["clip_sample_range"] = float(part[5:])
      elif part.startswith("rescale="):
        options["guidance_rescale"] = float(part[8:])
      elif part.startswith("interval="):
        options["guidance_interval"] = parse_interval(part[9:], f"--settings {setting!r}")
      elif part != "plain":
        raise ValueError(f"--settings: unknown setting {part!r} in {setting!r} (plain, neg, g=<x>, thr=<quantile>, "
                         "clip=<range>, rescale=<r>, interval=<lo>:<hi>, joined by '+')")
    summary = sample_and_score(s, prompts, seed, batch, negative_prompt=neg, num_steps=n_steps, guidance_scale=g,
                               sampler=name, **options)
    rows.append({"workdir": workdir, "step": s.step, "setting": setting, "guidance": g, "negative_prompt": neg,
                 "sampler": name, "steps": n_steps, **options,
                 **summary})
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIRS.value:
    raise app.UsageError("--workdirs is required")
  for wd in _WORKDIRS.value:
    emit(score_workdir(wd, _SETTINGS.value, _NUM.value, _SEED.value, _NEG.value, _GUIDANCE.value, _STEPS.value,
                       _BATCH.value, _STEP.value, _SAMPLER.value), _OUT.value)


if __name__ == "__main__":
  app.run(main)
