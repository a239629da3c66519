"""CLI writing shapes-bench evaluation prompts one per line (for `t2i.sample --prompts_file`).

  python -m data_pipelines.shapes.prompts --num_per_family=N --seed=S --size=64 --out=prompts.txt
"""
from __future__ import annotations

from typing import Sequence

from absl import app, flags

from data_pipelines.shapes import palette
from data_pipelines.shapes.evalset import eval_prompts

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_integer("num_per_family", 50, "Prompts per family.")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_integer("size", 64, "Canvas size in px (grounding coordinates are in these pixels).")
  flags.DEFINE_string("out", None, "Output text file, one prompt per line.")
  flags.DEFINE_list("families", None, f"Subset of {','.join(palette.FAMILIES)} (default all).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.out:
    raise app.UsageError("--out is required")
  prompts = eval_prompts(FLAGS.num_per_family, FLAGS.seed, FLAGS.families, FLAGS.size)
  with open(FLAGS.out, "w") as f:
    f.writelines(p["prompt"] + "\n" for p in prompts)
  print(f"wrote {len(prompts)} prompts to {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
