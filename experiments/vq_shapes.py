"""VQ image tokenizer (VQ-VAE) on shapes-bench, 32 px -> 8x8 codes of a 256-entry codebook: stage 1 of the
autoregressive (CM3Leon-style) family; `experiments/cm3_shapes.py` trains the token LM on its codes.

Loss: reconstruction MSE + codebook + 0.25 * commitment (`t2i.models.vq.vq_loss`), straight-through estimator.
Dead codes are restarted inside the train step (objective "vq" post_update, config.vq_train): every 100 steps
until step 2000, codes unused in the batch take random encoder outputs of the batch. No EMA (the LM stage and the
code dataset read the raw params). Validation (sample_every) writes samples/step_*.png: the step's batch images
(top row) and their reconstructions (bottom row). Metrics: psnr (dB, images in [-1, 1]), perplexity, used_codes.

Run:
  python -m launch.main --config=experiments/vq_shapes.py --workdir=workdirs/vq_shapes
Expected (measured on 2 loaded CPU cores with --config.total_steps=600 --config.data.shapes_num=2000, stopped at
step 321): train psnr 17.7 dB at step 50, 22.3 dB at 150, 24.5 dB at 200, ~27 dB at steps 300-320 (perplexity
~130 of 256 codes, ~85 % of codes used in a batch); reconstructions at step 300 keep shape, colour and position.
A full --config.total_steps=600 run (10,000 images, 1 shared core, 12.5 min) ends at 28.8 dB (mean of steps
591-600; 20.4 dB at 100, 24.8 at 200, 26.4 at 300), perplexity ~150, ~91 % of codes used in a batch.
The full 3000-step default has not been measured yet. Variant `:smoke` (tiny VQ, 4x4 codes, 64 images, 6 steps)
is used by the tests.
"""
from __future__ import annotations

import ml_collections

from experiments import common


def vq_module(variant: str = "default") -> ml_collections.ConfigDict:
  """The VQ entry; cm3_shapes.py builds the same one to read this run's codes."""
  if variant == "smoke":
    return common.module_config("t2i.models.vq.VQModel", dict(channels=(8, 16, 16, 16), num_codes=32, code_dim=8,
                                                                beta=0.25, groups=8))
  return common.module_config("t2i.models.vq.VQModel", dict(channels=(32, 64, 64), num_codes=256, code_dim=16,
                                                              beta=0.25, groups=8))


def token_base_config() -> ml_collections.ConfigDict:
  """base_config without the diffusion-only fields, for config.family = "tokens"."""
  c = common.base_config()
  for k in ("diffusion", "text_encoder_2", "vae", "cache"):
    del c[k]
  c.family = "tokens"
  c.lm = None
  return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = token_base_config()
  c.objective = "vq"
  c.image_size = 32
  c.batch_size = 32
  c.total_steps = 3000
  c.ckpt_every = 500
  c.sample_every = 500
  c.log_every = 10
  c.optimizer = common.optimizer_config(lr=1e-3, warmup_steps=100, schedule="cosine", weight_decay=0.0,
                                        grad_clip=1.0)
  c.optimizer.min_lr_ratio = 0.1
  c.ema = ml_collections.ConfigDict(dict(decay=0.0))
  c.vq = vq_module()
  c.vq_train = ml_collections.ConfigDict(dict(restart_every=100, restart_until=2000, restart_min_count=1.0))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="none", max_length=1))  # no text in this stage
  c.data = ml_collections.ConfigDict(dict(name="shapes", dataset="", data_dir="~/t2i_data", shapes_split="train",
                                          shapes_num=10000, caption_dropout=0.0, flip=False, worker_count=0))
  c.sample = ml_collections.ConfigDict(dict(prompts=[], num_steps=0, guidance_scale=1.0, sampler="", seed=0))
  if variant == "smoke":
    common.smoke_schedule(c, total_steps=6, ckpt_every=3, sample_every=6, lr=3e-3, warmup_steps=0,
                          schedule="constant", weight_decay=0.0)
    c.vq = vq_module("smoke")
    c.vq_train = ml_collections.ConfigDict(dict(restart_every=2, restart_until=4, restart_min_count=1.0))
    c.data.shapes_num = 64
  elif variant != "default":
    raise ValueError(f"experiments/vq_shapes.py: unknown variant {variant!r} (default, smoke)")
  return c
