"""Human-figure variant of shapes-bench: a simple standing figure whose parts carry colour/style attributes.

Parts (mask labels): 1 hair, 2 head, 3 top, 4 bottom, 5 shoes; exposed arm/leg skin is label 6 ("skin").
Captions are grouped by body part: "hair: short black. head: light skin. top: red t-shirt. bottom: blue
trousers. shoes: white."
"""
from __future__ import annotations

import json
from typing import Any, Callable, Iterator

import numpy as np

from data_pipelines.shapes import palette
from data_pipelines.shapes.rendering import png_bytes

PARTS = ("hair", "head", "top", "bottom", "shoes")
SKIN_LABEL = 6
HAIR_COLORS = {"black": (30, 28, 28), "brown": (115, 70, 35), "blonde": (238, 208, 115), "red": (185, 65, 30)}
SKIN_TONES = {"light": (242, 208, 178), "tan": (205, 150, 105), "dark": (115, 75, 50)}
CLOTH_COLORS = dict(palette.COLORS, black=(30, 30, 30), white=(250, 250, 250))
SHOE_COLORS = {k: CLOTH_COLORS[k] for k in ("black", "white", "red", "blue")} | {"brown": (115, 70, 35)}
HAIR_STYLES = ("short", "long")
TOPS = ("t-shirt", "long-sleeved top")
BOTTOMS = ("trousers", "shorts", "skirt")

Pred = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _cover(pred: Pred, canvas: int, samples: int = 4) -> np.ndarray:
  offs = (np.arange(samples) + 0.5) / samples
  c = (np.arange(canvas)[:, None] + offs[None, :]).reshape(-1)
  return pred(c[None, :], c[:, None]).reshape(canvas, samples, canvas, samples).mean(axis=(1, 3))


def _rect(x0, y0, x1, y1) -> Pred:
  return lambda x, y: (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _union(*preds: Pred) -> Pred:
  def pred(x, y):
    out = preds[0](x, y)
    for p in preds[1:]:
      out = out | p(x, y)
    return out
  return pred


def _figure(attrs: dict[str, str], cx: float, top: float, r: float) -> list[tuple[int, tuple, Pred]]:
  """Painter's-order layers (label, rgb, predicate); r is the head radius, the figure is 11.4 r tall."""
  skin = SKIN_TONES[attrs["skin"]]
  hair, top_c = HAIR_COLORS[attrs["hair_color"]], CLOTH_COLORS[attrs["top_color"]]
  bottom_c, shoe_c = CLOTH_COLORS[attrs["bottom_color"]], SHOE_COLORS[attrs["shoes_color"]]
  hy = top + 1.1 * r  # head centre
  y = lambda k: top + k * r  # noqa: E731
  layers = []
  if attrs["hair_style"] == "long":
    layers.append((1, hair, _rect(cx - 1.2 * r, hy, cx + 1.2 * r, y(3.6))))
  arm_l, arm_r = (cx - 2.3 * r, cx - 1.75 * r), (cx + 1.75 * r, cx + 2.3 * r)
  sleeve_end = y(3.9) if attrs["top"] == "t-shirt" else y(6.0)
  layers.append((SKIN_LABEL, skin, _union(_rect(arm_l[0], y(2.4), arm_l[1], y(6.0)),
                                          _rect(arm_r[0], y(2.4), arm_r[1], y(6.0)))))
  layers.append((3, top_c, _union(_rect(cx - 1.6 * r, y(2.3), cx + 1.6 * r, y(6.3)),
                                  _rect(arm_l[0], y(2.4), arm_l[1], sleeve_end),
                                  _rect(arm_r[0], y(2.4), arm_r[1], sleeve_end))))
  legs = (cx - 1.45 * r, cx - 0.2 * r), (cx + 0.2 * r, cx + 1.45 * r)
  layers.append((SKIN_LABEL, skin, _union(*(_rect(a, y(6.3), b, y(10.6)) for a, b in legs))))
  if attrs["bottom"] == "trousers":
    bottom = _union(_rect(cx - 1.6 * r, y(6.3), cx + 1.6 * r, y(7.2)), *(_rect(a, y(6.3), b, y(10.6)) for a, b in legs))
  elif attrs["bottom"] == "shorts":
    bottom = _union(_rect(cx - 1.6 * r, y(6.3), cx + 1.6 * r, y(7.2)), *(_rect(a, y(6.3), b, y(8.2)) for a, b in legs))
  else:  # skirt: trapezoid widening from the waist
    bottom = lambda x, yy: (yy >= y(6.3)) & (yy <= y(8.8)) & (  # noqa: E731
        np.abs(x - cx) <= 1.6 * r + 0.5 * (yy - y(6.3)))
  layers.append((4, bottom_c, bottom))
  layers.append((5, shoe_c, _union(*(_rect(a - 0.15 * r, y(10.6), b + 0.3 * r, y(11.4)) for a, b in legs))))
  layers.append((2, skin, lambda x, yy: (x - cx) ** 2 + (yy - hy) ** 2 <= r * r))
  cap = lambda x, yy: ((x - cx) ** 2 + (yy - hy) ** 2 <= (1.15 * r) ** 2) & (yy <= hy - 0.2 * r)  # noqa: E731
  layers.append((1, hair, cap))
  return layers


def render_figure(attrs: dict[str, str], background: str, size: int, cx: float | None = None):
  """(image HxWx3 uint8, label map HxW uint8) of one figure."""
  r = 0.85 * size / 11.4
  cx = size / 2 if cx is None else cx
  bg = np.asarray(palette.BACKGROUNDS[background][0], np.float32)
  img = np.broadcast_to(bg, (size, size, 3)).copy()
  labels = np.zeros((size, size), np.uint8)
  for label, rgb, pred in _figure(attrs, cx, 0.075 * size, r):
    cov = _cover(pred, size)[..., None]
    img = img * (1 - cov) + np.asarray(rgb, np.float32) * cov
    labels[cov[..., 0] >= 0.5] = label
  return np.round(img).clip(0, 255).astype(np.uint8), labels


def figure_caption(attrs: dict[str, str]) -> str:
  return (f"hair: {attrs['hair_style']} {attrs['hair_color']}. head: {attrs['skin']} skin. "
          f"top: {attrs['top_color']} {attrs['top']}. bottom: {attrs['bottom_color']} {attrs['bottom']}. "
          f"shoes: {attrs['shoes_color']}.")


def sample_attributes(rng: np.random.Generator, background: str) -> dict[str, str]:
  pick = lambda xs: list(xs)[int(rng.integers(len(xs)))]  # noqa: E731
  dark = background == "dark slate"
  return {
      "hair_style": pick(HAIR_STYLES), "hair_color": pick([c for c in HAIR_COLORS if not (dark and c == "black")]),
      "skin": pick(SKIN_TONES), "top": pick(TOPS),
      "top_color": pick([c for c in CLOTH_COLORS if not (dark and c == "black")]),
      "bottom": pick(BOTTOMS), "bottom_color": pick([c for c in CLOTH_COLORS if not (dark and c == "black")]),
      "shoes_color": pick([c for c in SHOE_COLORS if not (dark and c == "black")]),
  }


def human_figures(num: int, seed: int = 0, size: int = 64) -> Iterator[dict[str, Any]]:
  """Deterministic figure records {"id", "image" (PNG), "caption" (grouped by body part), "attributes",
  "annotation" (JSON: background, per part colour/style/bbox/mask label), "mask" (PNG label map, see PARTS),
  "part_masks": {part: PNG of a 0/255 mask}}."""
  size = palette.check_canvas(size)
  for i in range(int(num)):
    rng = palette.rng_for(seed, "human", i)
    background = palette.BACKGROUND_NAMES[int(rng.integers(len(palette.BACKGROUND_NAMES)))]
    attrs = sample_attributes(rng, background)
    cx = size / 2 + rng.uniform(-0.25, 0.25) * size
    img, labels = render_figure(attrs, background, size, cx)
    parts = {}
    for k, part in enumerate(PARTS, start=1):
      ys, xs = np.nonzero(labels == k)
      color = {"hair": "hair_color", "head": "skin", "top": "top_color", "bottom": "bottom_color",
               "shoes": "shoes_color"}[part]
      style = {"hair": attrs["hair_style"], "top": attrs["top"], "bottom": attrs["bottom"]}.get(part)
      parts[part] = {"color": attrs[color], "style": style, "mask_label": k,
                     "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if len(xs) else None}
    ann = {"background": background, "parts": parts, "skin_label": SKIN_LABEL}
    yield {"id": f"human-{seed}-{i:08d}", "image": png_bytes(img), "caption": figure_caption(attrs),
           "attributes": attrs, "annotation": json.dumps(ann, sort_keys=True), "mask": png_bytes(labels),
           "part_masks": {p: png_bytes(((labels == k) * 255).astype(np.uint8)) for k, p in enumerate(PARTS, 1)}}
