"""Pieces shared by the shapes-bench scoring scripts (`benchmarks.shapes_eval`, `benchmarks.cm3_eval`): the eval
prompt list, sample-then-score into a temporary folder, JSON-line output. No flags, so any script can import it."""
from __future__ import annotations

import json
import tempfile
from typing import Sequence


def eval_prompt_texts(num_per_family: int, seed: int, image_size: int) -> list[str]:
  """The shapes-bench eval prompts (num_per_family per family, 6 families) at `image_size`."""
  from data_pipelines.shapes.evalset import eval_prompts
  return [p["prompt"] for p in eval_prompts(num_per_family, seed, None, int(image_size))]


def sample_and_score(model, prompts: Sequence[str], seed: int, batch: int, **sample_kw) -> dict:
  """Samples one image per prompt with `model` (a `t2i.sample.Sampler`; image i from seed + i; `sample_kw` go to
  its call, e.g. sampler="top_p") into a temporary folder and returns its
  `t2i.evaluate.evaluate_dir` summary ({"per_family", "overall", "sharpness", "num"}) with "prompt_seed": seed,
  which with "num" names the prompt set (`benchmarks.score_table` pools by it), and "passed": per family, one
  "0"/"1" character per sample in prompt order (what `score_table --baseline` pairs)."""
  from t2i import evaluate
  from t2i.sample import sample_prompts
  with tempfile.TemporaryDirectory() as out:
    sample_prompts(model, list(prompts), 1, seed, batch, out, **sample_kw)
    summary = evaluate.evaluate_dir(out, return_results=True)
  passed: dict[str, str] = {}
  for r in summary.pop("results"):
    passed[r["family"]] = passed.get(r["family"], "") + ("1" if r["passed"] else "0")
  return {**summary, "prompt_seed": seed, "passed": passed}


def emit(rows: Sequence[dict], out: str | None) -> None:
  """Prints each row as a JSON line (and appends it to `out` when given)."""
  for row in rows:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
      with open(out, "a") as f:
        f.write(line + "\n")
