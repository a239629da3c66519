"""benchmarks.score_table: pooling over prompt sets, mean over seeds, shared-set rule, paired differences, errors
naming the input."""
import json

import pytest

from benchmarks import score_table


def _row(workdir, overall, num, prompt_seed=None, setting="plain", single=0.5, step=100, passed=None):
  row = {"workdir": workdir, "step": step, "setting": setting, "overall": overall, "num": num,
         "per_family": {"single": single, "two_objects": 0.0}}
  if prompt_seed is not None:
    row["prompt_seed"] = prompt_seed
  if passed is not None:
    row["passed"] = passed
  return json.dumps(row)


def _scored(workdir, single, two, prompt_seed):
  """A row with per-sample outcomes: `single` / `two` are "0"/"1" strings of equal length."""
  n = len(single)
  return _row(workdir, (single.count("1") + two.count("1")) / (2 * n), 2 * n, prompt_seed,
              single=single.count("1") / n, passed={"single": single, "two_objects": two})


def test_paired_difference_hand_values():
  d, se = score_table.paired_difference([1, 1, 0, 1], [1, 0, 0, 0])  # differences 0, 1, 0, 1
  assert d == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)
  with pytest.raises(ValueError, match="equal-length"):
    score_table.paired_difference([1, 0], [1])


def test_baseline_column_pairs_prompts_and_averages_seeds():
  lines = [_scored("/a0", "1100", "1000", 1), _scored("/a0", "10", "00", 2),
           _scored("/a1", "1110", "0000", 1), _scored("/a1", "11", "00", 2),
           _scored("/b", "1000", "1000", 1), _scored("/b", "10", "00", 2),
           _row("/old", 0.25, 8, 1), _row("/old", 0.25, 4, 2)]  # scored before outcomes were recorded
  runs = score_table.load_rows(lines, "plain")
  out = score_table.table(runs, [("A", ["/a0", "/a1"]), ("B", ["/b"]), ("old", ["/old"])], baseline="B")
  assert "| arm | per seed | mean | s.e. | images | vs B (paired) |" in out
  # per prompt (set 1 single, set 1 two objects, set 2 single, set 2 two): A's mean over seeds minus B
  # differences: single set 1 [0, 1, .5, 0], two set 1 [-.5, 0, 0, 0], single set 2 [0, .5], two set 2 [0, 0]
  d = [0, 1, .5, 0, -.5, 0, 0, 0, 0, .5, 0, 0]
  mean, se = score_table.paired_difference(d, [0] * len(d))
  row = {line.split(" |")[0][2:]: line for line in out.splitlines() if line.startswith("| ")}
  assert row["A"].endswith(f"| {mean:+.3f} ± {se:.3f} |")
  assert row["B"].endswith("| 12 | |")  # the baseline itself
  assert row["old"].endswith("| - |") and "re-score to pair them" in out
  single = score_table.table(runs, [("A", ["/a0", "/a1"]), ("B", ["/b"])], family="single", baseline="B")
  mean, se = score_table.paired_difference([0, 1, .5, 0, 0, .5], [0] * 6)
  assert f"| {mean:+.3f} ± {se:.3f} |" in single
  with pytest.raises(ValueError, match="--baseline='C'"):
    score_table.table(runs, [("B", ["/b"])], baseline="C")


def test_pooled_per_seed_mean_and_shared_sets():
  lines = [_row("/r/a0", 0.5, 100, 1), _row("/r/a0", 0.2, 300, 2), _row("/r/a1", 0.3, 100, 1),
           _row("/r/a1", 0.4, 300, 2), _row("/r/b", 0.1, 100, 1), _row("/r/b", 0.0, 300, 2),
           _row("/r/b", 0.9, 50, 3),  # only b has this set: left out
           _row("/r/a0", 0.9, 100, 1, setting="neg"),  # another setting: ignored
           _row("/r/a1", 0.9, 100, 1, step=50), _row("/r/a1", 0.9, 70, 5, step=50),  # an earlier step: ignored
           _row("/r/b/", 0.6, 300, 2)]  # same run (path normalised), later line wins
  runs = score_table.load_rows(lines, "plain")
  out = score_table.table(runs, [("A", ["/r/a0", "/r/a1"]), ("B", ["/r/b"])])
  # a0: (50 + 60) / 400 = 0.275; a1: (30 + 120) / 400 = 0.375; mean 0.325 over 800 images
  assert "| A | 0.275 / 0.375 | **0.325** | 0.017 | 800 |" in out
  assert "| B | 0.475 | **0.475** | 0.025 | 400 |" in out  # (10 + 180) / 400
  assert "left out (not scored for every run): (3, 50)" in out
  single = score_table.table(runs, [("B", ["/r/b"])], family="single")
  # B alone: all three of its sets count; 2 families, so half of the 450 images are single-object prompts
  assert "| B | 0.500 | **0.500** | 0.033 | 225 |" in single


def test_rows_without_prompt_seed_group_by_size():
  runs = score_table.load_rows([_row("w", 0.5, 120), _row("w", 0.25, 300)], "plain")
  assert set(runs["w"]) == {(None, 120), (None, 300)}


def test_errors_name_the_problem():
  runs = score_table.load_rows([_row("w", 0.5, 120, 1), _row("v", 0.5, 300, 2)], "plain")
  with pytest.raises(ValueError, match="no score rows for workdir x"):
    score_table.table(runs, [("X", ["x"])])
  with pytest.raises(ValueError, match="share no prompt set"):
    score_table.table(runs, [("W", ["w"]), ("V", ["v"])])
  with pytest.raises(ValueError, match="--family='colour'"):
    score_table.table(runs, [("W", ["w"])], family="colour")
  with pytest.raises(Exception, match="NAME=WORKDIR"):
    score_table.parse_arm("no-equals-sign")
