"""SPIN-Diffusion of the shapes demo U-Net: each round, the opponent (the previous iterate, frozen as the
reference) samples one image per caption of the real training images; the policy learns to prefer the real image
over the opponent's, relative to the opponent. Round 1 starts from the SFT checkpoint, round 2 from round 1.

Run (after `make demo`; each round samples the opponent's images once, then trains):
  python -m launch.main --config=experiments/sd_shapes_spin.py --workdir=workdirs/sd_spin1 \\
      --config.init_from.workdir=workdirs/sd_shapes
  python -m launch.main --config=experiments/sd_shapes_spin.py --workdir=workdirs/sd_spin2 \\
      --config.init_from.workdir=workdirs/sd_spin1
Expected (docs/results.md, "Opponent anchor"; 2 seeds x 1,020 prompts): overall 0.086 after round 1 and 0.085 after
round 2 vs continued SFT 0.073. `--config.preference.opponent_anchor=0` gives plain SPIN (the main preference
table: 0.044 / 0.046, texture collapse in round 2).
"""
from __future__ import annotations

import ml_collections

from experiments import common
from experiments import sd_shapes
from experiments import sd_shapes_dpo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "default"):
    raise ValueError(f"experiments/sd_shapes_spin.py: unknown variant {arg!r} (default)")
  c = sd_shapes.get_config()
  sd_shapes_dpo.preference_arm(c, "workdirs/sd_shapes")
  c.diffusion.cond_dropout = 0.0
  c.objective = "diffusion_spin"
  c.reference = common.reference_config()  # = the opponent
  c.preference = ml_collections.ConfigDict(dict(beta=2000.0, loss_kind="sigmoid", sft_weight=0.0,
                                                opponent_anchor=1.0))  # docs/results.md, "Opponent anchor"
  c.data = ml_collections.ConfigDict(dict(name="spin", data_dir="~/t2i_data", shapes_split="train", shapes_num=1200,
                                          round_seed=0, caption_dropout=0.0, flip=False, worker_count=0))
  return c
