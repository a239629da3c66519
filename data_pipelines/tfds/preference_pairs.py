"""TFDS builder for preference pairs in Pick-a-Pic layout (caption, jpg_0, jpg_1, label_0).

Sources: Pick-a-Pic style parquet files (config "parquet", pass `parquet_files=`) or the shapes-bench
generator (config "shapes" or `shapes_pairs_config(num, size, seed)`).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import image_decode
from data_pipelines.tfds import common

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


@dataclasses.dataclass(kw_only=True)
class PreferencePairsConfig(tfds.core.BuilderConfig):
  source: str = "shapes"  # "shapes" or "parquet"
  num: int = 2_000
  size: int = 64
  seed: int = 0


def shapes_pairs_config(num: int = 2_000, size: int = 64, seed: int = 0) -> PreferencePairsConfig:
  default = (num, size, seed) == (2_000, 64, 0)
  name = "shapes" if default else f"shapes_{size}px_n{num}_seed{seed}"
  return PreferencePairsConfig(name=name, source="shapes", num=num, size=size, seed=seed,
                               description=f"shapes-bench preference pairs: {num} of {size}px, seed {seed}")


class PreferencePairs(tfds.core.GeneratorBasedBuilder):
  """Preference pairs; `label_0` is 1.0 when jpg_0 is preferred, 0.0 when jpg_1 is, 0.5 for a tie."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      shapes_pairs_config(),
      PreferencePairsConfig(name="parquet", source="parquet", description="Pick-a-Pic style parquet files"),
  ]

  def __init__(self, *, parquet_files: Sequence[str] | None = None, **kwargs):
    self._parquet_files = [str(f) for f in parquet_files or ()]
    self.skipped: list[dict[str, str]] = []  # filled while generating from parquet
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Text-to-image preference pairs (Pick-a-Pic layout).",
        features=tfds.features.FeaturesDict({
            "caption": tfds.features.Text(),
            "jpg_0": common.bytes_feature("encoded image 0"),
            "jpg_1": common.bytes_feature("encoded image 1"),
            "label_0": tfds.features.Scalar(dtype=np.float32, doc="1: image 0 preferred, 0: image 1, 0.5: tie"),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self.builder_config.source == "parquet":
      if not self._parquet_files:
        raise ValueError("PreferencePairs config 'parquet' needs parquet_files=[...]")
      return {"train": self._from_parquet()}
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from data_pipelines import shapes  # pylint: disable=g-import-not-at-top
    c = self.builder_config
    for i, r in enumerate(shapes.preference_pairs(c.num, seed=c.seed, size=c.size)):
      yield f"{i:08d}", {k: r[k] for k in COLUMNS}

  def _from_parquet(self):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    for f in self._parquet_files:
      if not pathlib.Path(f).is_file():
        raise FileNotFoundError(f"PreferencePairs: parquet file {f} not found")
      table = pq.ParquetFile(f)
      missing = [c for c in COLUMNS if c not in table.schema_arrow.names]
      if missing:
        raise KeyError(f"{f}: missing column(s) {missing}; has {table.schema_arrow.names}")
      row = 0
      for batch in table.iter_batches(columns=list(COLUMNS), batch_size=256):
        for r in batch.to_pylist():
          key = f"{pathlib.Path(f).name}:{row}"
          row += 1
          try:
            for k in ("jpg_0", "jpg_1"):
              image_decode.open_image(r[k] or b"")
            if r["caption"] is None or r["label_0"] is None:
              raise image_decode.SkipSample("missing caption or label_0")
          except image_decode.SkipSample as e:
            self.skipped.append({"file": key, "reason": e.reason})
            continue
          yield key, {"caption": r["caption"], "jpg_0": r["jpg_0"], "jpg_1": r["jpg_1"],
                      "label_0": np.float32(r["label_0"])}
