"""Retrieval dual encoder on shapes-bench: the retriever of the CM3Leon-style token family (CLIP stand-in).

Trains `t2i.retrieval.DualEncoder` (strided-conv image tower, 2-layer causal text tower, 64-d shared space) with the
symmetric InfoNCE loss on image-caption pairs of the shapes-bench train split, the caption side with 20 % query-token
dropout (objective "contrastive", family "tokens"; no EMA). The `experiments/cm3_shapes.py:retrieval` run reads it
(config.data.retrieval_workdir): `t2i.retrieval.store` builds the MIPS index over the training documents (document
embedding = normalise(mean(normalised text, normalised image))) once and caches it under data_dir.

Run:
  python -m launch.main --config=experiments/dual_encoder_shapes.py --workdir=workdirs/dual_encoder_shapes
Expected (measured with --config.total_steps=600, one shared CPU core, 2.8 min): held-out (256 pairs of another
seed) text->image top-1 0.289 / top-5 0.652, image->text top-1 0.273 (chance 0.004); the 1500-step default has not
been measured. Variant `:smoke` (tiny towers, 64 images, 4 steps) is used by the tests.
"""
from __future__ import annotations

import ml_collections

from experiments import common, vq_shapes


def dual_encoder_module(variant: str = "default") -> ml_collections.ConfigDict:
  """The module entry; -1 fields take the caption tokenizer's values."""
  ids = dict(vocab_size=-1, bos_id=-1, eos_id=-1, pad_id=-1, max_length=-1)
  if variant == "smoke":
    return common.module_config("t2i.retrieval.dual_encoder.DualEncoder", dict(
        ids, embed_dim=16, text_width=32, text_layers=1, text_heads=2, image_channels=(8, 16), image_width=32))
  return common.module_config("t2i.retrieval.dual_encoder.DualEncoder", dict(
      ids, embed_dim=64, text_width=64, text_layers=2, text_heads=4, image_channels=(32, 64, 128), image_width=128))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = vq_shapes.token_base_config()
  c.objective = "contrastive"
  c.image_size = 32
  c.batch_size = 64
  c.total_steps = 1500
  c.ckpt_every = 500
  c.sample_every = 0
  c.log_every = 10
  c.optimizer = common.optimizer_config(lr=5e-4, warmup_steps=50, schedule="cosine", weight_decay=0.0,
                                        grad_clip=1.0)
  c.optimizer.min_lr_ratio = 0.1
  c.ema = ml_collections.ConfigDict(dict(decay=0.0))
  c.dual_encoder = dual_encoder_module()
  c.dual_encoder_train = ml_collections.ConfigDict(dict(query_dropout=0.2))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="shapes", max_length=32))  # captions: <= 23 tokens with EOS
  c.data = ml_collections.ConfigDict(dict(name="shapes", dataset="", data_dir="~/t2i_data", shapes_split="train",
                                          shapes_num=10000, caption_dropout=0.0, flip=False, worker_count=0))
  c.sample = ml_collections.ConfigDict(dict(prompts=[], num_steps=0, guidance_scale=1.0, sampler="", seed=0))
  if variant == "smoke":
    common.smoke_schedule(c, total_steps=4, ckpt_every=2, sample_every=0, lr=1e-3, warmup_steps=0,
                          schedule="constant", weight_decay=0.0)
    c.dual_encoder = dual_encoder_module("smoke")
    c.data.shapes_num = 64
  elif variant != "default":
    raise ValueError(f"experiments/dual_encoder_shapes.py: unknown variant {variant!r} (default, smoke)")
  return c
