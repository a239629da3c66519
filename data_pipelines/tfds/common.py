"""Helpers shared by the TFDS builders: bytes features, offline preparation, reading without TensorFlow."""
from __future__ import annotations

import contextlib
import fcntl
import pathlib

import numpy as np
import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"


def bytes_feature(doc: str = "") -> tfds.features.Tensor:
  """A scalar bytes feature (encoded image, mask, ...). `tfds.features.Image` would need TensorFlow."""
  return tfds.features.Tensor(shape=(), dtype=np.object_, doc=doc)


def prepare(builder: tfds.core.DatasetBuilder, overwrite: bool = False) -> pathlib.Path:
  """Generates `builder` into its data_dir (offline, no Beam); returns the dataset version folder.

  Concurrent calls for the same dataset (two runs started at once on one machine) are serialised by a lock file
  beside the version folder: the second waits, then reuses what the first wrote. Where the lock does not hold
  (another host on a shared file system), losing the final rename to a complete copy counts as success.
  """
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  path = pathlib.Path(str(builder.data_dir))
  with prepare_lock(path):
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(download_mode=mode, try_download_gcs=False))
    except FileExistsError:
      if not (path / "dataset_info.json").is_file():
        raise
  return path


@contextlib.contextmanager
def prepare_lock(version_dir: pathlib.Path):
  """Exclusive lock (flock on a file beside `version_dir`) held while a dataset version is prepared."""
  version_dir.parent.mkdir(parents=True, exist_ok=True)
  with open(version_dir.parent / f".{version_dir.name}.prepare.lock", "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def dataset_dir(data_dir: str | pathlib.Path, dataset: str) -> pathlib.Path:
  """`data_dir/name[/config]/<version>` for dataset "name[/config][:version]" (newest version by default)."""
  name, _, version = dataset.partition(":")
  root = pathlib.Path(data_dir) / name
  if not root.is_dir():
    raise FileNotFoundError(f"dataset {dataset!r}: {root} not found; build it first "
                            "(python -m data_pipelines.ingest, or data_pipelines.pipeline.prepare_shapes)")
  if version:
    path = root / version
  else:
    versions = [p for p in root.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()]
    if not versions:
      raise FileNotFoundError(f"dataset {dataset!r}: no prepared version under {root} "
                              f"(found: {sorted(p.name for p in root.iterdir())})")
    path = max(versions, key=lambda p: tuple(int(x) for x in p.name.split(".") if x.isdigit()))
  if not (path / "dataset_info.json").is_file():
    raise FileNotFoundError(f"dataset {dataset!r}: {path}/dataset_info.json not found")
  return path


def load_source(data_dir: str | pathlib.Path, dataset: str, split: str = "train"):
  """Random-access source (ArrayRecordDataSource) of a prepared dataset; no builder code or TensorFlow needed."""
  path = dataset_dir(data_dir, dataset)
  builder = tfds.builder_from_directory(str(path))
  if split not in builder.info.splits:
    raise KeyError(f"dataset {dataset!r} at {path}: no split {split!r} (has {list(builder.info.splits)})")
  return builder.as_data_source(split=split)


def text(value) -> str:
  """Text feature value (bytes from array_record) -> str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
