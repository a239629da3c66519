"""Preference-pair records (Pick-a-Pic layout: caption, jpg_0, jpg_1, label_0) -> winner-first training examples.

label_0 = 1: jpg_0 preferred; 0: jpg_1 preferred; anything else (0.5 = tie, NaN, None) is dropped, as in
Diffusion-DPO. Pieces that plug into Grain:
  ds.filter(is_decided).map(functools.partial(to_example, size=256))
or, without Grain, `select_pairs(records, stats)` (filter + reorder, counting ties) followed by `decode_pair`.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import numpy as np

from data_pipelines import image_decode
from data_pipelines.pipeline import resize_crop

Record = dict[str, Any]


def _label(record: Record) -> float | None:
  label = record.get("label_0")
  if label is None:
    return None
  label = float(np.asarray(label).reshape(()))
  return None if math.isnan(label) else label


def is_decided(record: Record) -> bool:
  """Filter predicate: True when label_0 is exactly 0 or 1 (ties and missing labels are dropped)."""
  return _label(record) in (0.0, 1.0)


def _caption(record: Record) -> str:
  caption = record.get("caption", "")
  if isinstance(caption, np.ndarray):
    caption = caption.item()
  return caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)


def winner_first(record: Record) -> Record:
  """{"caption" (str), "jpg_w", "jpg_l"} (encoded bytes, preferred first); raises ValueError on a tie."""
  label = _label(record)
  if label not in (0.0, 1.0):
    raise ValueError(f"winner_first needs label_0 in {{0, 1}}, got {record.get('label_0')!r}; filter ties first")
  w, l = ("jpg_0", "jpg_1") if label == 1.0 else ("jpg_1", "jpg_0")
  return {"caption": _caption(record), "jpg_w": record[w], "jpg_l": record[l]}


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def decode_image(data: bytes, size: int | tuple[int, int]) -> np.ndarray:
  """Encoded PNG/JPEG/... bytes -> float32 [h, w, 3] in [-1, 1], resized to cover `size` and centre-cropped."""
  img = resize_crop(image_decode.decode_rgb(data), _size_hw(size))
  return image_decode.to_float(img)


def decode_pair(pair: Record, size: int | tuple[int, int]) -> Record:
  """`winner_first` output -> {"image_w", "image_l" float32 [h, w, 3] in [-1, 1], "caption"}."""
  return {"image_w": decode_image(pair["jpg_w"], size), "image_l": decode_image(pair["jpg_l"], size),
          "caption": pair["caption"]}


def to_example(record: Record, size: int | tuple[int, int], *, skip_bad: bool = False) -> Record:
  """Raw record -> {"image_w", "image_l", "caption"} (Grain .map after .filter(is_decided)).

  Undecodable images raise image_decode.SkipSample, or with skip_bad=True return {"skip": reason} so a following
  `.filter(lambda r: "skip" not in r)` drops them.
  """
  try:
    return decode_pair(winner_first(record), size)
  except image_decode.SkipSample as e:
    if skip_bad:
      return {"skip": e.reason}
    raise


def select_pairs(records: Iterable[Record], stats: dict[str, int] | None = None) -> Iterator[Record]:
  """Lazily drops undecided records and reorders the rest winner-first (`winner_first` output, still encoded).

  `stats`, if given, is updated in place: "seen", "kept" and "ties" (dropped: label_0 not in {0, 1}).
  """
  if stats is not None:
    for k in ("seen", "kept", "ties"):
      stats.setdefault(k, 0)
  for r in records:
    keep = is_decided(r)
    if stats is not None:
      stats["seen"] += 1
      stats["kept" if keep else "ties"] += 1
    if keep:
      yield winner_first(r)
