"""Anti-aliased rendering of shapes-bench scenes (numpy supersampling) and image flaws.

A scene ("render spec") is a dict
  {"background": name, "objects": [{"shape", "color", "size": "small"|"large", "center": (x, y)}], "flaws": [...]}
in continuous pixel coordinates (pixel (row i, col j) covers [j, j+1) x [i, i+1)). `center` is the centroid of
the shape: for the apex-up triangle (base = height = side) it lies a third of the height above the base.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from data_pipelines.shapes import palette


def extents(shape: str, side: float) -> tuple[float, float, float, float]:
  """Bounding box of a shape relative to its centre: (dx0, dy0, dx1, dy1)."""
  half = side / 2
  if shape in ("circle", "square"):
    return -half, -half, half, half
  if shape == "triangle":
    return -half, -2 * side / 3, half, side / 3
  raise ValueError(f"shape must be one of {palette.SHAPES}, got {shape!r}")


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray:
  dx, dy = x - cx, y - cy
  half = side / 2
  if shape == "circle":
    return dx * dx + dy * dy <= half * half
  if shape == "square":
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  # Apex-up isosceles triangle, base = height = side, centroid at (cx, cy).
  t = (dy + 2 * side / 3) / side  # 0 at the apex, 1 at the base
  return (t >= 0) & (t <= 1) & (np.abs(dx) <= half * t)


def coverage(shape: str, center, side: float, canvas: int, samples: int | None = None) -> np.ndarray:
  """Fraction (float32 in [0, 1]) of each pixel covered by the shape, from samples x samples points per pixel."""
  if samples is None:
    samples = 8 if canvas <= 128 else 4
  cx, cy = float(center[0]), float(center[1])
  dx0, dy0, dx1, dy1 = extents(shape, side)
  x0, y0 = max(int(np.floor(cx + dx0)), 0), max(int(np.floor(cy + dy0)), 0)
  x1, y1 = min(int(np.ceil(cx + dx1)) + 1, canvas), min(int(np.ceil(cy + dy1)) + 1, canvas)
  cov = np.zeros((canvas, canvas), np.float32)
  if x1 <= x0 or y1 <= y0:
    return cov
  offs = (np.arange(samples) + 0.5) / samples
  xs = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1)
  ys = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1)
  hit = _inside(shape, xs[None, :], ys[:, None], cx, cy, side)
  hit = hit.reshape(y1 - y0, samples, x1 - x0, samples).mean(axis=(1, 3))
  cov[y0:y1, x0:x1] = hit
  return cov


def object_box(obj: dict[str, Any], canvas: int) -> list[float]:
  """[x0, y0, x1, y1] of an object in continuous pixel coordinates."""
  side = palette.object_side(obj["size"], canvas)
  dx0, dy0, dx1, dy1 = extents(obj["shape"], side)
  cx, cy = obj["center"]
  return [cx + dx0, cy + dy0, cx + dx1, cy + dy1]


def _check_spec(spec: dict[str, Any]) -> None:
  if spec.get("background", "light grey") not in palette.BACKGROUNDS:
    raise ValueError(f"spec background must be one of {palette.BACKGROUND_NAMES}, got {spec.get('background')!r}")
  for i, obj in enumerate(spec.get("objects", ())):
    for key in ("shape", "color", "size", "center"):
      if key not in obj:
        raise ValueError(f"spec objects[{i}] is missing {key!r}: {obj}")
    if obj["color"] not in palette.COLORS:
      raise ValueError(f"spec objects[{i}] colour must be one of {palette.COLOR_NAMES}, got {obj['color']!r}")
  for f in spec.get("flaws", ()):
    if f not in palette.FLAWS:
      raise ValueError(f"spec flaw must be one of {palette.FLAWS}, got {f!r}")


def render_clean(spec: dict[str, Any], size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """Flawless image (HxWx3 uint8) and instance label map (HxW uint8: 0 background, i = objects[i-1])."""
  size = palette.check_canvas(size)
  _check_spec(spec)
  bg = np.asarray(palette.BACKGROUNDS[spec.get("background", "light grey")][0], np.float32)
  img = np.broadcast_to(bg, (size, size, 3)).copy()
  labels = np.zeros((size, size), np.uint8)
  for i, obj in enumerate(spec.get("objects", ())):
    cov = coverage(obj["shape"], obj["center"], palette.object_side(obj["size"], size), size)
    color = np.asarray(palette.COLORS[obj["color"]], np.float32)
    img = img * (1 - cov[..., None]) + color * cov[..., None]
    labels[cov >= 0.5] = i + 1
  return np.round(img).clip(0, 255).astype(np.uint8), labels


def apply_flaw(img: np.ndarray, flaw: str, rng: np.random.Generator) -> np.ndarray:
  """Degrades an HxWx3 uint8 image with a named flaw (see palette.FLAWS)."""
  size = img.shape[0]
  if flaw == "blurry":
    radius = max(1.0, 0.03 * size) * rng.uniform(1.0, 1.5)
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
  if flaw == "noisy":
    noise = rng.normal(0.0, rng.uniform(18, 30), img.shape)
    return np.clip(img.astype(np.float32) + noise, 0, 255).round().astype(np.uint8)
  if flaw == "washed out":
    x = img.astype(np.float32)
    k = rng.uniform(0.3, 0.45)
    return np.clip(k * x + (1 - k) * (0.5 * x.mean() + 0.5 * 235.0), 0, 255).round().astype(np.uint8)
  if flaw == "jpeg artifacts":
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=int(rng.integers(3, 9)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
  raise ValueError(f"flaw must be one of {palette.FLAWS}, got {flaw!r}")


def render(spec: dict[str, Any], size: int = 64, seed: int = 0) -> np.ndarray:
  """Renders a scene (flaws included) to an HxWx3 uint8 image; `seed` drives the random flaws only."""
  img, _ = render_clean(spec, size)
  rng = np.random.default_rng(seed)
  for flaw in spec.get("flaws", ()):
    img = apply_flaw(img, flaw, rng)
  return img


def png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
