"""Fixed vocabulary of shapes-bench: shapes, colours, backgrounds, sizes, families, held-out pairs."""
from __future__ import annotations

import zlib

import numpy as np

SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}

# Object colours: far apart from each other (min distance ~77, orange/yellow) and from every background.
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 25),
}
COLOR_NAMES = tuple(COLORS)

# Background name -> (RGB, caption phrase).
BACKGROUNDS = {
    "light grey": ((200, 200, 200), "a light grey background"),
    "off-white": ((245, 242, 232), "an off-white background"),
    "dark slate": ((40, 46, 56), "a dark background"),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)

SIZES = ("small", "large")

# (colour, shape) pairs that never appear bound together in training images or captions.
HELD_OUT = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))
ALL_PAIRS = tuple((c, s) for c in COLOR_NAMES for s in SHAPES)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)

FAMILIES = ("single", "two_objects", "counting", "colours", "position", "grounding")
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE_RELATION = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
                     "below": "above"}
FLAWS = ("blurry", "noisy", "washed out", "jpeg artifacts")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SPLITS = ("pretrain", "curated", "train", "heldout")
CURATED_FRACTION = 0.05  # default size of the curated (SFT) split relative to the pre-training split


def is_held_out(color: str, shape: str) -> bool:
  return (color, shape) in HELD_OUT


def object_side(size_name: str, canvas: int) -> float:
  """Side (bounding-box width = height) in pixels of an object of `size_name` on a `canvas`-px image.

  Nominal sizes are 20 % (small) and 40 % (large) of the canvas. Below 45 px a small object would be too few
  pixels to tell a triangle from a circle, so small objects are at least 9 px (28 % at 32 px) and large ones at
  least 13.5 px (42 % at 32 px; two fit side by side), which keeps the sizes apart.
  """
  if size_name == "small":
    return max(0.2 * canvas, 9.0)
  if size_name == "large":
    return max(0.4 * canvas, 13.5)
  raise ValueError(f"object size must be one of {SIZES}, got {size_name!r}")


def check_canvas(size: int) -> int:
  if not isinstance(size, (int, np.integer)) or not 32 <= int(size) <= 512:
    raise ValueError(f"shapes-bench canvas size must be an int in 32..512, got {size!r}")
  return int(size)


def rng_for(seed: int, stream: str, index: int) -> np.random.Generator:
  """Independent, reproducible generator for record `index` of a named stream (split or task)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode()), int(index)])
