"""TFDS builder for a local folder of images with captions (sidecar .txt files or a .jsonl manifest).

Every image is validated and normalised to 8-bit RGB PNG while generating (see `data_pipelines.ingest`);
skipped files are collected in `builder.skipped`. Build with `python -m data_pipelines.ingest`.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines.tfds import common


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """Images + captions from a local folder; all records go to split "train"."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": 'feature "mask": the alpha channel as greyscale PNG (b"" when none)'}

  def __init__(self, *, src: str | None = None, manifest: str | None = None, min_size: int = 2, **kwargs):
    self._src, self._manifest, self._min_size = src, manifest, min_size
    self.skipped: list[dict[str, str]] = []
    self.converted: list[dict[str, str]] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local image folder with captions, normalised to RGB PNG.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(doc="path relative to the source folder"),
            "image": common.bytes_feature("PNG bytes, RGB uint8"),
            "mask": common.bytes_feature("alpha channel as greyscale PNG bytes; empty when the image has none"),
            "caption": tfds.features.Text(),
            "height": tfds.features.Scalar(dtype=np.int32),
            "width": tfds.features.Scalar(dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._src is None:
      raise ValueError("ImageFolder needs src= (the image folder) to generate")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from data_pipelines import ingest  # pylint: disable=g-import-not-at-top
    self.skipped.clear()
    self.converted.clear()
    for item in ingest.iter_folder(self._src, manifest=self._manifest, min_size=self._min_size):
      if isinstance(item, ingest.Skip):
        self.skipped.append({"file": item.file, "reason": item.reason})
        continue
      if item.source_mode != "RGB":
        self.converted.append({"file": item.file, "mode": item.source_mode})
      yield item.file, {"id": item.file, "image": item.png, "mask": item.mask_png, "caption": item.caption,
                        "height": item.height, "width": item.width}
