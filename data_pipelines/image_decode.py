"""Image bytes -> 8-bit RGB: validation and normalisation (ingest) and fast decoding (input pipeline)."""
from __future__ import annotations

import io
from typing import NamedTuple
import warnings

import numpy as np
from PIL import Image, ImageOps


class SkipSample(ValueError):
  """A sample that cannot be used; `reason` says why (e.g. "truncated image", "zero-byte file")."""

  def __init__(self, reason: str):
    super().__init__(reason)
    self.reason = reason


def to_float(images):
  """uint8 pixels -> float32 in [-1, 1] (numpy in, numpy out; jax arrays stay jax arrays)."""
  return images.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def to_uint8(images):
  """Floats in [-1, 1] -> uint8 pixels, rounded and clipped (numpy in, numpy out; jax arrays stay jax arrays)."""
  x = (images + 1.0) * 127.5
  return x.round().clip(0, 255).astype(np.uint8)


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
  """High-bit-depth / float single-channel pixels -> uint8."""
  if mode == "F":
    arr = arr.astype(np.float64)
    scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0
    return np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8)
  # "I", "I;16", "I;16B", ...: PIL keeps 16-bit PNG/TIFF samples in 0..65535.
  return np.clip(arr.astype(np.int64) / 257.0, 0, 255).round().astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
  mode = img.mode
  if mode == "RGB":
    return img
  if mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    mode = img.mode
    if mode == "RGB":
      return img
  if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if mode.startswith("I") or mode == "F":
    grey = _to_uint8(np.asarray(img), mode)
    if grey.ndim == 3:  # multi-channel 16-bit (recent Pillow): keep the first three channels
      return Image.fromarray(grey[..., :3], "RGB")
    return Image.fromarray(grey, "L").convert("RGB")
  return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def open_image(data: bytes) -> Image.Image:
  """Fully decodes `data`; raises SkipSample with a reason for empty, truncated or unreadable bytes."""
  if not data:
    raise SkipSample("zero-byte file")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      img = Image.open(io.BytesIO(data))
      img.load()
  except Image.DecompressionBombError as e:
    raise SkipSample(f"image too large: {e}") from e
  except OSError as e:
    msg = str(e)
    if any(k in msg.lower() for k in ("truncated", "broken data stream", "unexpected end", "premature end")):
      raise SkipSample(f"truncated image: {msg}") from e
    raise SkipSample(f"unreadable image: {msg}") from e
  except Exception as e:  # PIL raises SyntaxError, ValueError, struct.error, ... on corrupt files
    raise SkipSample(f"unreadable image: {type(e).__name__}: {e}") from e
  return img


class Normalized(NamedTuple):
  png: bytes
  height: int
  width: int
  source_mode: str  # PIL mode before conversion, e.g. "CMYK", "I;16", "RGBA"
  mask_png: bytes = b""  # the alpha channel as 8-bit greyscale PNG, b"" when the image has none


def _alpha(img: Image.Image) -> Image.Image | None:
  """The alpha channel of `img` (mode "L") or None when it has no transparency."""
  if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "RGBa", "La"):
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA"):
    return img.getchannel("A")
  return None


def normalize_image(data: bytes, min_size: int = 2) -> Normalized:
  """Validates encoded image bytes and re-encodes them as 8-bit RGB PNG.

  Applies the EXIF orientation. Keeps the alpha channel, if any, as `mask_png` (for masked losses). Raises
  SkipSample when the bytes are empty, truncated or unreadable, or when the shorter side is below `min_size`.
  """
  img = open_image(data)
  mode = img.mode
  try:
    img = ImageOps.exif_transpose(img)
    alpha = _alpha(img)
    img = to_rgb(img)
  except Exception as e:  # broken EXIF or exotic modes
    raise SkipSample(f"unreadable image: cannot convert mode {img.mode}: {e}") from e
  w, h = img.size
  if min(w, h) < min_size:
    raise SkipSample(f"image too small: {w}x{h} < min_size {min_size}")
  out = io.BytesIO()
  img.save(out, format="PNG", compress_level=3)
  mask = b""
  if alpha is not None:
    buf = io.BytesIO()
    alpha.save(buf, format="PNG", compress_level=3)
    mask = buf.getvalue()
  return Normalized(out.getvalue(), h, w, mode, mask)


def decode_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
  """Stored mask bytes -> uint8 [H, W] (255 = train on this pixel); b"" (no alpha) -> all 255 of `shape`."""
  if not data:
    return np.full(shape, 255, np.uint8)
  img = open_image(data)
  mask = np.asarray(img.convert("L") if img.mode != "L" else img, dtype=np.uint8)
  if mask.shape != tuple(shape):
    raise SkipSample(f"mask shape {mask.shape} != image shape {tuple(shape)}")
  return mask


def decode_rgb(data: bytes) -> np.ndarray:
  """Encoded image -> uint8 [H, W, 3]; raises SkipSample on bad bytes."""
  img = open_image(data)
  if img.mode != "RGB":
    img = to_rgb(img)
  return np.asarray(img, dtype=np.uint8)
