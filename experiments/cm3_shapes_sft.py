"""Multi-task SFT of the CM3Leon-style token LM on shapes-bench (CM3Leon's supervised fine-tuning stage): starts
from an `experiments/cm3_shapes.py` run (config.init_from.workdir: group "lm" from its EMA params, the frozen "vq"
group from its checkpoint) and fine-tunes the LM on a task mixture, loss on the response only.

Tasks (`data_pipelines/token_tasks.py`, equal weights in config.data.tasks): caption -> image (shapes-bench train
captions, 10 % `<mask>` prompts for CFG), image -> caption (canonical caption of every object), VQA (counts,
colour / shape of an object, existence), text-guided editing (recolour / reshape / remove / add / background) and
grounded generation (one `<loc_x><loc_y>` centroid per object; 32 coordinate tokens appended to the pretrained
vocabulary, their embedding rows and LM-head columns starting at the mean, config.init_from.grow). Derived records
(`data_pipelines/shapes/derived.py`, generator seed config.data.task_seed = 0, 4000 per kind) are encoded once by
the frozen VQ into `vq_tasks/<name>` sets in data_dir. Same model and sampler as cm3_shapes (d=128, 4 layers),
documents padded to 160 tokens, lr 3e-4 cosine.

Run (after cm3_shapes):
  python -m launch.main --config=experiments/cm3_shapes_sft.py --workdir=workdirs/cm3_shapes_sft \\
      --config.init_from.workdir=workdirs/cm3_shapes
  python -m benchmarks.cm3_tasks_eval --workdir=workdirs/cm3_shapes_sft --num=64 --seed=1000
Expected: the 1,500-step default has not been measured. A 1,000-step run from a short (1,200-step) cm3_shapes run
gave, on 64 held-out records per task: captioning 0.11, VQA 0.58 (answer prior 0.52), editing 0.05, grounding 0.00
(VQ-reconstruction ceilings 0.70 / 0.52); see docs/results.md.
The eval's held-out records use generator seed 1000 (training: 0). Variant `:smoke` (the smoke cm3 run's tiny
models, 32 records per kind, 4 steps) is used by the tests.
"""
from __future__ import annotations

import ml_collections

from experiments import cm3_shapes, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = cm3_shapes.get_config("smoke" if variant == "smoke" else None)  # same VQ / LM / tokenizer as the base run
  c.total_steps = 1500
  c.ckpt_every = 250
  c.sample_every = 500
  c.optimizer = common.optimizer_config(lr=3e-4, warmup_steps=50, schedule="cosine", weight_decay=0.1,
                                        grad_clip=1.0)
  c.optimizer.b2 = 0.95
  c.optimizer.min_lr_ratio = 0.1
  c.init_from.update(workdir="workdirs/cm3_shapes", grow=True)
  c.tokenizer.num_locations = 32   # appended to the base run's vocabulary (token_models.setup_tokenizer)
  c.lm = cm3_shapes.tiny_lm(128, 4, 4, 160)
  # vq_workdir: "" = the init_from run (its frozen "vq" group: the same params as the VQ run).
  c.data = ml_collections.ConfigDict(dict(
      name="vq_tasks", data_dir="~/t2i_data", vq_workdir="", shapes_split="train", shapes_num=10000,
      task_num=4000, task_seed=0, tasks="t2i:1,caption:1,vqa:1,edit:1,ground:1", max_length=160,
      uncond_rate=0.1))
  if variant == "smoke":
    common.smoke_schedule(c, total_steps=4, ckpt_every=2, sample_every=4, lr=3e-3, warmup_steps=0,
                          schedule="constant", weight_decay=0.0)
    c.init_from.workdir = ""   # the tests pass the smoke cm3 run
    c.lm = cm3_shapes.tiny_lm(32, 2, 2, 96)
    c.data.shapes_num = 64
    c.data.task_num = 32
    c.data.max_length = 96
  elif variant != "default":
    raise ValueError(f"experiments/cm3_shapes_sft.py: unknown variant {variant!r} (default, smoke)")
  return c
