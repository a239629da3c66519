"""SPIN-Diffusion round data: the opponent (the previous iterate) samples one image for the caption of every real
training image with its compiled sampler; (real, generated) pairs are written as a Pick-a-Pic-layout dataset
(caption, jpg_0 = real, jpg_1 = opponent sample, label_0 = 1) and built into `data_dir` as
`preference_pairs/<name>`, so a SPIN round trains on it like any preference data (config.data.pair).

The set is cached: a rerun (or a resumed round) reuses the built dataset.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
from absl import logging


def round_name(opponent_workdir: str, real_dataset: str, num: int, seed: int) -> str:
  """Dataset config name of a round: opponent run (folder name, a hash of its full path and its latest checkpoint
  step) + real data + size + seed. Stable across restarts of the round; a different run of the same folder name,
  or the same run trained further, gets a new name instead of another opponent's cached samples."""
  from t2i.train.checkpoint import saved_steps
  path = os.path.normpath(os.path.abspath(os.path.expanduser(opponent_workdir)))
  tag = f"{hashlib.sha1(path.encode()).hexdigest()[:8]}_st{max(saved_steps(path), default=-1)}"
  real = real_dataset.replace("/", "_").replace(":", "_")
  clean = "".join(ch if ch.isalnum() else "_" for ch in f"spin_{tag}_{os.path.basename(path)}_{real}_n{num}_s{seed}")
  return clean[:120]


def build_round(opponent_workdir: str, data_dir: str, real_dataset: str, num: int, image_size: int, seed: int = 0,
                batch: int = 32, num_steps: int | None = None, guidance_scale: float | None = None) -> str:
  """Builds (once) the round's pair dataset from the first `num` real records; returns its `cfg.dataset` name."""
  from data_pipelines.pipeline import resize_crop
  from data_pipelines.shapes.rendering import png_bytes
  from data_pipelines import image_decode
  from data_pipelines.tfds import common, preference_pairs as pp
  name = round_name(opponent_workdir, real_dataset, num, seed)
  builder = pp.PreferencePairs(config=pp.PreferencePairsConfig(name=name, source="parquet"), data_dir=data_dir,
                               file_format=common.FILE_FORMAT,
                               parquet_files=[os.path.join(data_dir, name + ".parquet")])
  dataset = f"preference_pairs/{name}"
  try:
    common.dataset_dir(data_dir, dataset)
    logging.info("SPIN round data %s exists; reusing it", dataset)
    return dataset
  except FileNotFoundError:
    pass
  import pyarrow as pa
  import pyarrow.parquet as pq
  from t2i.sample import Sampler
  source = common.load_source(data_dir, real_dataset, "train")
  n = min(int(num), len(source))
  real = [source[i] for i in range(n)]
  captions = [common.text(r["caption"]) for r in real]
  s = Sampler(opponent_workdir)
  cfg = s.config.sample
  steps = int(num_steps or cfg.num_steps)
  g = float(cfg.guidance_scale if guidance_scale is None else guidance_scale)
  rows: dict[str, list[Any]] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
  for b0 in range(0, n, batch):
    chunk = list(range(b0, min(n, b0 + batch)))
    pad = chunk + [chunk[-1]] * (batch - len(chunk))
    imgs = s([captions[i] for i in pad], [seed * 1_000_003 + i for i in pad], num_steps=steps, guidance_scale=g,
             sampler=cfg.get("sampler", "ddim"))[:len(chunk)]
    for i, im in zip(chunk, imgs):
      real_img = resize_crop(image_decode.decode_rgb(real[i]["image"]), (image_size, image_size))
      rows["caption"].append(captions[i])
      rows["jpg_0"].append(png_bytes(real_img))
      rows["jpg_1"].append(png_bytes(image_decode.to_uint8(im)))
      rows["label_0"].append(1.0)
    logging.info("SPIN round data: %d / %d opponent samples", len(rows["caption"]), n)
  os.makedirs(data_dir, exist_ok=True)
  pq.write_table(pa.table(rows), os.path.join(data_dir, name + ".parquet"))
  common.prepare(builder)
  return dataset
