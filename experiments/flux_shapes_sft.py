"""Krea recipe, stage 2 on shapes-bench: supervised fine-tuning of the pre-trained tiny MMDiT on the small curated
split (clean, flawless, exact captions), starting from the pre-training run's EMA weights.

Run (after experiments/flux_shapes_pretrain.py; about 3 minutes on 2 CPU cores):
  python -m launch.main --config=experiments/flux_shapes_sft.py --workdir=workdirs/flux_sft \\
      --config.init_from.workdir=workdirs/flux_pretrain
Expected: the SFT rows of the Krea tables in docs/results.md (measured: overall 0.150 -> 0.150 on 120 prompts,
0.153 -> 0.120 on 300 others; the goal, higher accuracy than pre-training, is not reached; `:filtered` 0.133 /
0.103, lr 3e-5 0.200 / 0.127). From `flux_shapes_pretrain.py:long`: 0.139 -> 0.156 over 1,620 prompts (mean of 3
training seeds, 0.147-0.163 each; paired difference +0.017 +- 0.006).
Variants: `:filtered` (the whole pre-training split curated by a quality filter, palette fidelity >= 0.9, instead
of the curated split);
`:smoke` (tests).
"""
from __future__ import annotations

import ml_collections

from experiments import common
from experiments import flux_shapes_pretrain as pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = pretrain.flux_shapes_base()
  c.init_from.workdir = "workdirs/flux_pretrain"
  c.total_steps = 600
  c.ckpt_every = 300
  c.sample_every = 600
  c.optimizer = common.optimizer_config(lr=2e-4, warmup_steps=50, schedule="cosine", weight_decay=1e-2,
                                        grad_clip=1.0)
  c.data.shapes_split = "curated"
  c.data.shapes_num = 1000
  if variant == "filtered":
    c.data.shapes_split = "pretrain"
    c.data.shapes_num = 20000
    c.data.quality_filter = "data_pipelines.shapes.scoring.palette_fidelity_score"
    c.data.quality_min = 0.9
  elif variant == "smoke":
    pretrain.smoke(c)
  elif variant != "default":
    raise ValueError(f"experiments/flux_shapes_sft.py: unknown variant {variant!r} (default, filtered, smoke)")
  return c
