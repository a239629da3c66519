"""Guidance distillation on shapes-bench: a guidance-embedded student (the tiny MMDiT plus FLUX.1-dev's guidance
embedder) learns to match, in one pass per step, the classifier-free-guided velocity of the frozen SFT teacher at
g ~ U[1, 6]. The student starts from the teacher's weights (its guidance embedder fresh); text encoders frozen.

Run (after experiments/flux_shapes_sft.py; about 5 minutes on 2 CPU cores):
  python -m launch.main --config=experiments/flux_shapes_distill.py --workdir=workdirs/flux_distill \\
      --config.init_from.workdir=workdirs/flux_sft
  python -m t2i.sample --workdir=workdirs/flux_distill --prompts_file=P --guidance=4 --out=O   # g = 4, one pass
Expected: at least 90 % of the CFG teacher's shapes-bench accuracy (docs/results.md).
Variants: `:smoke` (tests).
"""
from __future__ import annotations

import ml_collections

from experiments import common
from experiments import flux_shapes_pretrain as pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = pretrain.flux_shapes_base()
  c.objective = "flow_guidance_distill"
  c.init_from.workdir = "workdirs/flux_sft"
  c.transformer = pretrain.tiny_flux(guidance_embeds=True)
  pretrain.tiny_text_encoders(c, trainable=False)
  # The teacher: the same MMDiT without a guidance embedder, frozen, from the init_from run.
  c.reference = common.reference_config(guidance_embeds=False)
  c.distill = ml_collections.ConfigDict(dict(guidance_min=1.0, guidance_max=6.0))
  c.total_steps = 600
  c.ckpt_every = 300
  c.sample_every = 600
  c.optimizer = common.optimizer_config(lr=2e-4, warmup_steps=50, schedule="cosine", weight_decay=0.0,
                                        grad_clip=1.0)
  c.data.shapes_split = "curated"
  c.data.shapes_num = 1000
  if variant == "smoke":
    pretrain.smoke(c)
  elif variant != "default":
    raise ValueError(f"experiments/flux_shapes_distill.py: unknown variant {variant!r} (default, smoke)")
  return c
