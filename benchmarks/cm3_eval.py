"""shapes-bench scores of token-model (CM3, `experiments/cm3_shapes.py`) workdirs under decoding and retrieval
settings, in one process; one JSON line per (workdir, retrieval, setting), also appended to --out.

  python -m benchmarks.cm3_eval --workdirs=W1,W2 [--settings=topp,topp_nocfg,cdk] [--retrieval=0,1,2]
      [--num_per_family=20] [--seed=1234] [--guidance=G] [--step=N] [--out=scores.jsonl]

Settings: "topp" (top-p with the run's config.sample.top_p / temperature, CFG at --guidance, default the run's
config.sample.guidance_scale, against the <mask> stream), "topp_nocfg" (top-p, guidance 1: no CFG stream),
"cdk" (CM3Leon's contrastive decoding CD-K, expert = the caption stream, amateur = the <mask> stream,
config.sample.cd_alpha / cd_k / cd_sample; the guidance scale does not enter), "greedy" (argmax with CFG),
"g=<x>" (top-p with guidance x). Retrieval: number of retrieved documents prepended to each prompt (and to its CFG
stream); -1 = the run's own config.sample.retrieval_k (0 for runs without a retriever). Image i of every setting
uses seed --seed + i, so settings, retrieval counts and workdirs are compared on the same randomness. Rows carry
per-family accuracy, overall accuracy, mean sharpness, the number of images, the wall time of the setting and
retrieved_caption_exact (share of retrieved documents whose caption equals the prompt).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Sequence

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.eval_common import emit, eval_prompt_texts, sample_and_score  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Token-model (objective cm3) train workdirs to score.")
_SETTINGS = flags.DEFINE_list("settings", ["topp", "topp_nocfg", "cdk"], "topp, topp_nocfg, cdk, greedy, g=<x>.")
_RETRIEVAL = flags.DEFINE_list("retrieval", ["-1"], "Retrieved documents per prompt (-1: the run's default).")
_NUM = flags.DEFINE_integer("num_per_family", 20, "Eval prompts per family (6 families).")
_SEED = flags.DEFINE_integer("seed", 1234, "Prompt set seed and base sample seed.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "CFG scale (default: the run's config.sample.guidance_scale).")
_BATCH = flags.DEFINE_integer("batch", 40, "Images per compiled call.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file too.")

# setting -> (sampler, guidance: None = the run's / --guidance)
SETTINGS = {"topp": ("top_p", None), "topp_nocfg": ("top_p", 1.0), "cdk": ("cd_k", None), "greedy": ("greedy", None)}


def parse_setting(setting: str, default_guidance: float) -> tuple[str, float]:
  """(sampler name, guidance scale) of a setting name."""
  if setting.startswith("g="):
    return "top_p", float(setting[2:])
  if setting not in SETTINGS:
    raise ValueError(f"--settings: unknown setting {setting!r} ({', '.join(SETTINGS)}, g=<x>)")
  sampler, g = SETTINGS[setting]
  return sampler, float(default_guidance if g is None else g)


def score_workdir(workdir: str, settings: Sequence[str], retrieval: Sequence[int], num_per_family: int, seed: int,
                  guidance: float | None = None, batch: int = 40, step: int | None = None) -> list[dict]:
  """One row per (retrieval count, setting) for a token-model workdir at checkpoint `step` (None: latest)."""
  from t2i.sample import Sampler
  s = Sampler(workdir, step=step)
  if s.config.objective != "cm3":
    raise ValueError(f"{workdir}: config.objective={s.config.objective!r}; benchmarks.cm3_eval scores 'cm3' runs "
                     "(use benchmarks.shapes_eval for diffusion / flow runs)")
  cfg = s.config.sample
  g_run = float(cfg.guidance_scale if guidance is None else guidance)
  prompts = eval_prompt_texts(num_per_family, seed, int(s.config.image_size))
  base_tok = s.tokenize
  rows = []
  try:
    for r in retrieval:
      s.tokenize = base_tok if r < 0 else base_tok.with_retrieval(int(r))
      docs = s.tokenize.documents(prompts)
      # share of retrieved documents whose caption is the prompt itself (None without retrieval)
      exact = [c == p for p, d in zip(prompts, docs) for c, _ in d]
      exact = round(sum(exact) / len(exact), 3) if exact else None
      for setting in settings:
        sampler, g = parse_setting(setting, g_run)
        t0 = time.perf_counter()
        summary = sample_and_score(s, prompts, seed, batch, negative_prompt="", num_steps=0, guidance_scale=g,
                                   sampler=sampler)
        rows.append({"workdir": workdir, "step": s.step, "setting": setting, "sampler": sampler, "guidance": g,
                     "retrieval_k": s.tokenize.retrieval_k, "retrieved_caption_exact": exact, **summary,
                     "seconds": round(time.perf_counter() - t0, 1)})
  finally:
    s.tokenize = base_tok
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIRS.value:
    raise app.UsageError("--workdirs is required")
  try:
    retrieval = [int(r) for r in _RETRIEVAL.value]
  except ValueError as e:
    raise app.UsageError(f"--retrieval: integers expected, got {_RETRIEVAL.value}") from e
  for wd in _WORKDIRS.value:
    emit(score_workdir(wd, _SETTINGS.value, retrieval, _NUM.value, _SEED.value, _GUIDANCE.value, _BATCH.value,
                       _STEP.value),
         _OUT.value)


if __name__ == "__main__":
  app.run(main)
