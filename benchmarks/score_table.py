"""A results table from `benchmarks.shapes_eval` / `cm3_eval` JSON lines: per arm (one or more training seeds, one
workdir each), the accuracy of each run pooled over the prompt sets it was scored on, the mean over seeds, and a
binomial standard error of that mean. This is the form of the preference table (issue: mean over >= 2 seeds).

  python -m benchmarks.score_table --scores=S1.jsonl,S2.jsonl --arm="SFT checkpoint=W0" \\
      --arm="continued SFT=W1,W2" --arm="DPO=W3,W4" [--setting=plain] [--family=single] [--baseline="continued SFT"]

A prompt set is (prompt seed, number of prompts); rows written before the prompt seed was recorded fall back to the
number of prompts alone. Every run of the table must have been scored on the same prompt sets (else an error names
the run and what it lacks); for a repeated (workdir, setting, prompt set) the last line wins. The standard error is
sqrt(p (1 - p) / n) over all n scored images of the arm: it counts prompt noise, not seed-to-seed spread, which the
per-seed column shows.

With `--baseline=NAME` each arm also gets its difference to that arm, paired over the scored prompts: every run
samples prompt i of a set from the same noise, so two close models pass or fail mostly the same prompts and the
difference is far less noisy than the two standard errors suggest. Per prompt, each arm's pass rate over its seeds
is taken; the column shows the mean difference and its standard error over prompts (sd / sqrt(prompts)). Like the
s.e. column it counts prompt noise only: whether the difference holds across training seeds shows in the per-seed
column. This needs the per-sample "passed" strings that `benchmarks.eval_common.sample_and_score` writes; older
rows give "-".
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Iterable, Sequence

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SCORES = flags.DEFINE_list("scores", None, "JSON-line score files (shapes_eval / cm3_eval --out).")
_ARMS = flags.DEFINE_multi_string("arm", None, "NAME=WORKDIR[,WORKDIR...]: one arm, one workdir per seed.")
_SETTING = flags.DEFINE_string("setting", "plain", "Which sampling setting's rows to use.")
_FAMILY = flags.DEFINE_string("family", "", "Score one family (e.g. single) instead of overall accuracy.")
_BASELINE = flags.DEFINE_string("baseline", "", "Arm NAME to which every arm's paired difference is printed.")


def prompt_set(row: dict) -> tuple:
  return (row.get("prompt_seed"), int(row["num"]))


def load_rows(lines: Iterable[str], setting: str) -> dict[str, dict[tuple, dict]]:
  """workdir -> prompt set -> row, for one sampling setting and each workdir's latest scored checkpoint step (the
  last line wins among repeats)."""
  rows = [json.loads(line) for line in lines if line.strip()]
  rows = [r for r in rows if r.get("setting", "plain") == setting]
  latest: dict[str, int] = {}
  for r in rows:
    w = os.path.normpath(r["workdir"])
    latest[w] = max(latest.get(w, -1), int(r.get("step", -1)))
  runs: dict[str, dict[tuple, dict]] = {}
  for r in rows:
    w = os.path.normpath(r["workdir"])
    if int(r.get("step", -1)) == latest[w]:
      runs.setdefault(w, {})[prompt_set(r)] = r
  return runs


def _accuracy(row: dict, family: str) -> float:
  if not family:
    return float(row["overall"])
  if family not in row["per_family"]:
    raise ValueError(f"--family={family!r}: not in {sorted(row['per_family'])}")
  return float(row["per_family"][family])


def _family_count(row: dict, family: str) -> int:
  return int(row["num"]) // len(row["per_family"]) if family else int(row["num"])


def _outcomes(row: dict, family: str) -> list[int] | None:
  """Per-sample 0/1 outcomes of one row (one family, or all families in name order); None for rows without them."""
  passed = row.get("passed")
  if not isinstance(passed, dict):
    return None
  families = [family] if family else sorted(passed)
  return [int(c) for f in families for c in passed.get(f, "")]


def _per_prompt_rate(rows_per_run: Sequence[Sequence[dict]], family: str) -> list[float] | None:
  """Per prompt (over the shared sets in order), the fraction of the arm's runs that passed it."""
  runs = []
  for rows in rows_per_run:
    outcomes = [_outcomes(r, family) for r in rows]
    if any(o is None for o in outcomes):
      return None
    runs.append([x for o in outcomes for x in o])
  if len({len(r) for r in runs}) != 1:
    return None
  return [sum(col) / len(col) for col in zip(*runs)]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """(mean of a - b, its standard error over the paired items)."""
  if len(a) != len(b) or len(a) < 2:
    raise ValueError(f"paired difference needs two equal-length lists of >= 2 items, got {len(a)} and {len(b)}")
  d = [x - y for x, y in zip(a, b)]
  mean = sum(d) / len(d)
  var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
  return mean, math.sqrt(var / len(d))


def table(runs: dict[str, dict[tuple, dict]], arms: Sequence[tuple[str, Sequence[str]]], family: str = "",
          baseline: str = "") -> str:
  """Markdown table: arm | per-seed pooled accuracy | mean | standard error | images scored [| paired difference to
  the baseline arm]."""
  if baseline and baseline not in [name for name, _ in arms]:
    raise ValueError(f"--baseline={baseline!r}: not one of the arms {[name for name, _ in arms]}")
  for name, workdirs in arms:
    for w in workdirs:
      if not runs.get(os.path.normpath(w)):
        raise ValueError(f"arm {name!r}: no score rows for workdir {w}")
  run_sets = [set(runs[os.path.normpath(w)]) for _, ws in arms for w in ws]
  shared, seen = set.intersection(*run_sets), set.union(*run_sets)
  if not shared:
    raise ValueError("the runs share no prompt set")
  order = sorted(shared, key=str)
  lines = [f"prompt sets (seed, prompts): {', '.join(str(s) for s in order)}"]
  if seen - shared:
    lines.append(f"left out (not scored for every run): {', '.join(str(s) for s in sorted(seen - shared, key=str))}")
  rates = {name: _per_prompt_rate([[runs[os.path.normpath(w)][s] for s in order] for w in ws], family)
           for name, ws in arms}
  header, rule = "| arm | per seed | mean | s.e. | images |", "|---|---|---|---|---|"
  if baseline:
    header, rule = header + f" vs {baseline} (paired) |", rule + "---|"
  lines += ["", header, rule]
  for name, workdirs in arms:
    per_seed, hits, n = [], 0.0, 0
    for w in workdirs:
      rows = [runs[os.path.normpath(w)][s] for s in order]
      counts = [_family_count(r, family) for r in rows]
      correct = sum(_accuracy(r, family) * c for r, c in zip(rows, counts))
      per_seed.append(correct / sum(counts))
      hits, n = hits + correct, n + sum(counts)
    mean = hits / n
    se = math.sqrt(mean * (1 - mean) / n)
    line = f"| {name} | {' / '.join(f'{p:.3f}' for p in per_seed)} | **{mean:.3f}** | {se:.3f} | {n} |"
    if baseline:
      a, b = rates[name], rates[baseline]
      if name == baseline:
        line += " |"
      elif a is None or b is None or len(a) != len(b):
        line += " - |"
      else:
        d, d_se = paired_difference(a, b)
        line += f" {d:+.3f} ± {d_se:.3f} |"
    lines.append(line)
  if baseline and any(r is None for r in rates.values()):
    lines.append("\n-: rows without per-sample outcomes (scored before they were recorded); re-score to pair them")
  return "\n".join(lines)


def parse_arm(text: str) -> tuple[str, list[str]]:
  name, sep, dirs = text.partition("=")
  if not sep or not name.strip() or not dirs.strip():
    raise app.UsageError(f"--arm={text!r}: expected NAME=WORKDIR[,WORKDIR...]")
  return name.strip(), [d for d in dirs.split(",") if d]


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _SCORES.value or not _ARMS.value:
    raise app.UsageError("--scores and at least one --arm are required")
  lines: list[str] = []
  for path in _SCORES.value:
    if not os.path.exists(path):
      raise app.UsageError(f"--scores: no file {path}")
    with open(path) as f:
      lines += f.readlines()
  print(table(load_rows(lines, _SETTING.value), [parse_arm(a) for a in _ARMS.value], _FAMILY.value,
              _BASELINE.value))


if __name__ == "__main__":
  app.run(main)
