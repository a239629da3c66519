"""TensorBoard event files (no TensorFlow needed), metrics.jsonl, and a tqdm progress bar with ETA."""
from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from data_pipelines.image_decode import to_uint8


class SummaryWriter:
  """Writes scalar and image summaries to `logdir` as TensorBoard event files."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self._writer = EventFileWriter(logdir)

  def _event(self, step: int, value: summary_pb2.Summary.Value) -> None:
    ev = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=[value]))
    self._writer.add_event(ev)

  def scalar(self, tag: str, value: float, step: int) -> None:
    self._event(step, summary_pb2.Summary.Value(tag=tag, simple_value=float(value)))

  def scalars(self, metrics: dict[str, float], step: int) -> None:
    for k, v in metrics.items():
      self.scalar(k, v, step)

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """image: uint8 [H, W, 3]."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    h, w = image.shape[:2]
    img = summary_pb2.Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=buf.getvalue())
    self._event(step, summary_pb2.Summary.Value(tag=tag, image=img))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricsFile:
  """Appends one JSON object per line to `path` (flushed per write, so a killed run keeps its history)."""

  def __init__(self, path: str):
    self._f = open(path, "a", buffering=1)

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record) + "\n")
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  """[N, H, W, 3] floats in [-1, 1] (or uint8) -> one uint8 grid image."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  cols = cols or int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = im
  return grid


def progress_bar(total: int, initial: int, enabled: bool = True):
  """tqdm bar over train steps (shows rate and ETA); a no-op object when disabled."""
  if not enabled:
    class _Null:
      def update(self, n=1): pass
      def set_postfix(self, *a, **k): pass
      def close(self): pass
    return _Null()
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, mininterval=1.0)
