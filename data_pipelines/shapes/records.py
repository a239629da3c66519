"""Image-caption records of the shapes-bench splits (pretrain, curated, train, heldout)."""
from __future__ import annotations

import copy
import json
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipelines.shapes import captions, palette, scenes
from data_pipelines.shapes.rendering import apply_flaw, object_box, png_bytes, render_clean


def annotation(scene: dict[str, Any], canvas: int) -> dict[str, Any]:
  """Structured annotation of a scene; object i is label i + 1 of the record's mask."""
  objs = []
  for i, o in enumerate(scene["objects"]):
    objs.append({"shape": o["shape"], "color": o["color"], "size": o["size"], "mask_label": i + 1,
                 "bbox": [round(float(v), 2) for v in object_box(o, canvas)],
                 "centroid": [round(float(v), 2) for v in o["center"]]})
  return {"background": scene["background"], "flaws": list(scene.get("flaws", ())), "objects": objs}


def mislabel(spec: dict[str, Any], rng: np.random.Generator,
             pairs: Sequence[tuple[str, str]] = palette.TRAIN_PAIRS) -> dict[str, Any]:
  """Copy of a prompt spec with one attribute wrong (alt-text style noise), never naming a pair outside `pairs`."""
  out = copy.deepcopy(spec)
  kinds = ["colour", "shape"] + (["count"] if spec["family"] == "counting" else []) + (
      ["relation"] if spec["family"] == "position" else [])
  kind = kinds[int(rng.integers(len(kinds)))]
  if kind == "count":
    n = out["count"]
    out["count"] = n + 1 if n == 1 else n - 1 if n == 4 else n + int(rng.choice([-1, 1]))
    return out
  if kind == "relation":
    out["relation"] = palette.OPPOSITE_RELATION[out["relation"]]
    return out
  i = int(rng.integers(len(out["objects"])))
  o = out["objects"][i]
  taken = {(p["color"], p["shape"]) for p in out["objects"]}
  options = [p for p in pairs if p not in taken and (p[1] == o["shape"] if kind == "colour" else p[0] == o["color"])]
  if not options:
    options = [p for p in pairs if p not in taken]
  o["color"], o["shape"] = options[int(rng.integers(len(options)))]
  return out


def make_record(split: str, index: int, seed: int, size: int, flaw_rate: float,
                caption_noise: float) -> dict[str, Any]:
  rng = palette.rng_for(seed, split, index)
  family = palette.FAMILIES[int(rng.integers(len(palette.FAMILIES)))]
  pairs = palette.HELD_OUT if split == "heldout" else palette.TRAIN_PAIRS
  spec = scenes.sample_spec(family, rng, pairs, size)
  scene = scenes.scene_for(spec, rng, size)
  spec = scenes.clean_spec(spec)
  if rng.random() < 0.4:
    spec["background"] = scene["background"]
  noisy = False
  if split == "pretrain":
    if rng.random() < flaw_rate:
      scene["flaws"] = [palette.FLAWS[int(rng.integers(len(palette.FLAWS)))]]
    if rng.random() < caption_noise:
      spec, noisy = mislabel(spec, rng, pairs), True
  spec["flaws"] = list(scene["flaws"])
  img, labels = render_clean(scene, size)
  for flaw in scene["flaws"]:
    img = apply_flaw(img, flaw, rng)
  ann = annotation(scene, size)
  ann["caption_noise"] = noisy
  return {"id": f"{split}-{seed}-{index:08d}", "image": png_bytes(img), "caption": captions.text_for(spec, rng=rng),
          "family": family, "annotation": json.dumps(ann, sort_keys=True), "mask": png_bytes(labels)}


def generate_records(split: str, num: int, seed: int = 0, size: int = 64, flaw_rate: float = 0.3,
                     caption_noise: float = 0.2) -> Iterator[dict[str, Any]]:
  """Deterministic shapes-bench records of a split.

  pretrain: a share `flaw_rate` of images degraded by a flaw named at the end of the caption, a share
    `caption_noise` of captions with one attribute wrong (annotation["caption_noise"] says which).
  curated / train: clean, flawless (curated is the small SFT set, train the default demo training split; they use
    different random streams). heldout: only the held-out pairs (purple triangle, orange circle, green square).
  No training split binds a held-out pair in its images or captions.
  Each record: {"id", "image" (PNG), "caption", "family", "annotation" (JSON), "mask" (PNG uint8 label map)}.
  """
  if split not in palette.SPLITS:
    raise ValueError(f"split must be one of {palette.SPLITS}, got {split!r}")
  size = palette.check_canvas(size)
  if not 0 <= flaw_rate <= 1 or not 0 <= caption_noise <= 1:
    raise ValueError(f"flaw_rate and caption_noise must be in [0, 1], got {flaw_rate}, {caption_noise}")
  for i in range(int(num)):
    yield make_record(split, i, seed, size, flaw_rate, caption_noise)
