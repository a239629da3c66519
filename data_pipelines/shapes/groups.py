"""Attribute groups of shapes-bench captions: which caption words describe which pixels.

The `config.data.token_groups` hook of the data pipeline (for attention-grounding losses such as CosmicMan's
HOLA, `t2i.objectives.attention`): one group per object named in the caption (its size, colour and shape words;
the mask covers every object of that colour and shape, so "three green triangles" is one group over three
triangles) and, when the caption names it, one for the background phrase (the mask covers what no object does).
A group is "placed" when its caption fixes where it goes: the objects of position captions (a relation) and of
grounding captions (coordinates); single objects, unrelated pairs, counts and backgrounds may go anywhere.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from data_pipelines import image_decode
from data_pipelines.shapes import captions


PLACED_FAMILIES = ("position", "grounding")  # caption families that fix their objects' places


def token_groups(caption: str, record: dict[str, Any]) -> list[tuple[list[tuple[int, int]], np.ndarray, bool]]:
  """[(character spans of the group's words in `caption`, bool mask [H, W], placed)] of a shapes-bench record; []
  for an empty caption or one that is not in the generator's form (a trigger prefix, tag shuffling)."""
  if not caption:
    return []
  try:
    spec, spans, bg_span = captions.object_spans(caption)
  except captions.PromptParseError:
    return []
  ann = record["annotation"]
  ann = json.loads(ann.decode("utf-8") if isinstance(ann, bytes) else ann)
  if not record.get("mask"):
    raise ValueError("token_groups: the record has no 'mask' field (shapes-bench records carry one)")
  labels = np.asarray(image_decode.open_image(record["mask"]), np.uint8)  # object i is label i + 1, 0 background
  groups = []
  placed = spec["family"] in PLACED_FAMILIES
  for obj, obj_spans in zip(spec["objects"], spans):
    ids = [o["mask_label"] for o in ann["objects"] if (o["color"], o["shape"]) == (obj["color"], obj["shape"])]
    if ids:  # a mislabelled caption (pretrain split) may name an object the image lacks: no group
      groups.append((obj_spans, np.isin(labels, ids), placed))
  if bg_span is not None:
    groups.append(([bg_span], labels == 0, False))
  return groups
