"""Krea stage 3 on shapes-bench: preference tuning of the tiny MMDiT after SFT (experiments/flux_shapes_sft.py),
with Diffusion-DPO on velocity errors (the stand-in for Krea's undisclosed TPO), SPIN on velocity errors, or the
continued-SFT baseline, each with the same steps and batch.

Run (after the SFT run):
  python -m launch.main --config=experiments/flux_shapes_dpo.py --workdir=workdirs/flux_dpo \\
      --config.init_from.workdir=workdirs/flux_sft
  python -m launch.main --config=experiments/flux_shapes_dpo.py:spin --workdir=workdirs/flux_spin1 \\
      --config.init_from.workdir=workdirs/flux_sft          # round 2: init_from = workdirs/flux_spin1
  python -m launch.main --config=experiments/flux_shapes_dpo.py:sft --workdir=workdirs/flux_csft \\
      --config.init_from.workdir=workdirs/flux_sft
Expected: the MMDiT rows of the preference table in docs/results.md; `:spin` runs with the opponent anchor
(round 1: 0.132 vs continued SFT 0.122, 2 seeds x 1,020 prompts; `--config.preference.opponent_anchor=0` for plain
SPIN, 0.074). From the SFT of `flux_shapes_pretrain.py:long` every arm ties (0.163-0.166, 3 seeds).
Variants: `:dpo` (default), `:spin`, `:sft`, `:judged` / `:judged_winners` (on-policy pairs judged by the
shapes-bench scorer, and SFT on their winners: see `sd_shapes_dpo.py`), `:smoke` (tests).
"""
from __future__ import annotations

import ml_collections

from experiments import common
from experiments import flux_shapes_pretrain as pretrain


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "dpo"
  c = pretrain.flux_shapes_base()
  c.init_from.workdir = "workdirs/flux_sft"
  c.total_steps = c.ckpt_every = c.sample_every = 150
  c.optimizer = common.optimizer_config(lr=1e-4, warmup_steps=20, schedule="constant", weight_decay=0.0,
                                        grad_clip=1.0)
  c.ema = ml_collections.ConfigDict(dict(decay=0.0, every=1, warmup=False))
  c.text_encoder.trainable = c.text_encoder_2.trainable = False
  c.flow.cond_dropout = 0.0
  c.reference = common.reference_config()
  c.preference = ml_collections.ConfigDict(dict(beta=500.0, loss_kind="sigmoid", weighting="constant",
                                                sft_on_winners=False, sft_weight=0.0, opponent_anchor=0.0))
  pairs = ml_collections.ConfigDict(dict(name="shapes_pairs", data_dir="~/t2i_data", shapes_num=4000, shapes_seed=0,
                                         caption_dropout=0.0, flip=False, worker_count=0))
  if variant in ("dpo", "judged", "judged_winners"):
    c.objective = "flow_dpo"
    c.data = pairs
    if variant.startswith("judged"):  # on-policy pairs judged by the scorer (sd_shapes_dpo.py's `:judged`)
      c.data = common.judged_pairs_data()
      c.preference.update(opponent_anchor=1.0, sft_on_winners=variant == "judged_winners")
  elif variant == "spin":
    c.objective = "flow_spin"
    c.preference.opponent_anchor = 1.0  # docs/results.md, "Opponent anchor"
    c.data = ml_collections.ConfigDict(dict(name="spin", data_dir="~/t2i_data", shapes_split="train",
                                            shapes_num=1200, round_seed=0, caption_dropout=0.0, flip=False,
                                            worker_count=0))
  elif variant == "sft":
    c.objective = "flow"
    c.reference = None
    c.flow.cond_dropout = 0.1
    c.data.shapes_split = "train"
    c.data.shapes_num = 10000
  elif variant == "smoke":
    c.objective = "flow_dpo"
    pretrain.smoke(c)
    c.init_from.workdir = ""
    c.data = ml_collections.ConfigDict(dict(name="toy", nan_batch=-1, pair=True))
  else:
    raise ValueError(f"experiments/flux_shapes_dpo.py: unknown variant {variant!r} "
                     "(dpo, spin, sft, judged, judged_winners, smoke)")
  return c
