"""Scores a folder of samples on shapes-bench and prints per-family accuracy as JSON.

  python -m t2i.evaluate --samples=OUT [--size=64]

OUT/index.jsonl holds one line per sample: {"file": PNG path (relative to OUT or absolute), "prompt", "seed"}.
Each image is resized to --size (default: its own size) before scoring, so grounding coordinates are read in
pixels of that size.
"""
from __future__ import annotations

import json
import pathlib
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from PIL import Image

from data_pipelines.shapes import PromptParseError, parse_prompt, score, summarize

FLAGS = flags.FLAGS


class EvaluationError(ValueError):
  """A samples folder whose index or images cannot be read or parsed."""


def _load(path: pathlib.Path, size: int | None, where: str) -> np.ndarray:
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      if size and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
      return np.asarray(im)
  except (OSError, ValueError) as e:
    raise EvaluationError(f"{where}: cannot read image {path}: {e}") from e


def evaluate_dir(path: str | pathlib.Path, size: int | None = None, return_results: bool = False) -> dict[str, Any]:
  """{"per_family", "overall", "sharpness", "num"} of the samples listed in `path`/index.jsonl.

  With return_results=True the summary also carries "results": per sample {"file", "prompt", "passed", "family"}.
  """
  folder = pathlib.Path(path)
  index = folder / "index.jsonl"
  if not index.is_file():
    raise EvaluationError(f"{index}: not found (t2i.sample writes it next to the images)")
  results, rows = [], []
  for lineno, line in enumerate(index.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{index}:{lineno}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise EvaluationError(f"{where}: invalid JSON: {e}") from e
    if not isinstance(row, dict) or "file" not in row or "prompt" not in row:
      raise EvaluationError(f"{where}: expected an object with keys 'file' and 'prompt', got {line[:200]!r}")
    try:
      spec = parse_prompt(row["prompt"])
    except PromptParseError as e:
      raise EvaluationError(f"{where}: cannot parse prompt {row['prompt']!r} (file {row['file']}): {e}") from e
    file = pathlib.Path(row["file"])
    file = file if file.is_absolute() else folder / file
    if not file.is_file():
      raise EvaluationError(f"{where}: image file {file} not found")
    r = score(_load(file, size, where), spec)
    results.append(r)
    rows.append({"file": row["file"], "prompt": row["prompt"], "passed": r["passed"], "family": r["family"]})
  if not results:
    raise EvaluationError(f"{index}: no samples listed")
  summary = summarize(results)
  if return_results:
    summary["results"] = rows
  return summary


def define_flags() -> None:
  flags.DEFINE_string("samples", None, "Folder with index.jsonl and the sampled PNGs.")
  flags.DEFINE_integer("size", None, "Scoring size in px (default: each image's own size).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.samples:
    raise app.UsageError("--samples is required")
  try:
    summary = evaluate_dir(FLAGS.samples, FLAGS.size)
  except EvaluationError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
