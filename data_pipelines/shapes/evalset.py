"""Evaluation prompts of shapes-bench (all six families, a share binding held-out pairs)."""
from __future__ import annotations

from typing import Any, Sequence

from data_pipelines.shapes import captions, palette, scenes

HELD_OUT_SHARE = 0.25


def eval_prompts(num_per_family: int, seed: int = 0, families: Sequence[str] | None = None,
                 size: int = 64) -> list[dict[str, Any]]:
  """Prompts {"prompt", "spec", "family", "heldout", "scene"} for every family (grounding points in px of `size`).

  About a quarter of the prompts bind a held-out pair (purple triangle, orange circle, green square) in their
  first object; counts are 1..4; `scene` is a ground-truth render spec that satisfies the prompt.
  """
  size = palette.check_canvas(size)
  families = tuple(families or palette.FAMILIES)
  for f in families:
    if f not in palette.FAMILIES:
      raise ValueError(f"family must be one of {palette.FAMILIES}, got {f!r}")
  out = []
  for family in families:
    for j in range(int(num_per_family)):
      rng = palette.rng_for(seed, "eval/" + family, j)
      heldout = bool(rng.random() < HELD_OUT_SHARE)
      spec = scenes.sample_spec(family, rng, palette.ALL_PAIRS, size, name_size=0.5 if family == "single" else 0.0,
                                first_pairs=palette.HELD_OUT if heldout else palette.TRAIN_PAIRS,
                                count=1 + j % 4 if family == "counting" else None)
      scene = scenes.scene_for(spec, rng, size)
      spec = scenes.clean_spec(spec)
      if rng.random() < 0.2:
        spec["background"] = scene["background"]
      out.append({"prompt": captions.text_for(spec, rng=rng), "spec": spec, "family": family, "heldout": heldout,
                  "scene": scene})
  return out


