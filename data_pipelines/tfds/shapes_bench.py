"""TFDS builder for shapes-bench, generated locally from `data_pipelines.shapes` (no download)."""
from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from data_pipelines.tfds import common

SPLITS = ("pretrain", "curated", "train", "heldout")
DEFAULT_NUM = {"pretrain": 20_000, "curated": 1_000, "train": 10_000, "heldout": 1_000}
DEFAULT_SIZE = 64


@dataclasses.dataclass(kw_only=True)
class ShapesBenchConfig(tfds.core.BuilderConfig):
  """One shapes-bench generator split at one resolution, size and seed."""
  split: str = "train"
  num: int = 10_000
  size: int = DEFAULT_SIZE
  seed: int = 0


def shapes_config(split: str, num: int | None = None, size: int = DEFAULT_SIZE,
                  seed: int = 0) -> ShapesBenchConfig:
  """Config named after `split` for the defaults, else `{split}_{size}px_n{num}_seed{seed}`."""
  if split not in SPLITS:
    raise ValueError(f"shapes-bench split {split!r}: expected one of {SPLITS}")
  num = DEFAULT_NUM[split] if num is None else int(num)
  if num <= 0:
    raise ValueError(f"shapes-bench num must be positive, got {num}")
  default = num == DEFAULT_NUM[split] and size == DEFAULT_SIZE and seed == 0
  name = split if default else f"{split}_{size}px_n{num}_seed{seed}"
  return ShapesBenchConfig(name=name, split=split, num=num, size=size, seed=seed,
                           description=f"shapes-bench {split}: {num} images of {size}px, seed {seed}")


class ShapesBench(tfds.core.GeneratorBasedBuilder):
  """Synthetic compositional text-to-image data (see docs/shapes-bench.md). All records go to split "train"."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [shapes_config(s) for s in SPLITS]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="shapes-bench: synthetic compositional text-to-image records.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "image": common.bytes_feature("PNG bytes, RGB uint8"),
            "caption": tfds.features.Text(),
            "family": tfds.features.Text(),
            "annotation": tfds.features.Text(doc="JSON: objects, flaws, background"),
            "mask": common.bytes_feature("PNG bytes, per-object instance mask"),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    from data_pipelines import shapes  # pylint: disable=g-import-not-at-top
    c = self.builder_config
    for r in shapes.generate_records(c.split, c.num, seed=c.seed, size=c.size):
      yield r["id"], {k: r[k] for k in ("id", "image", "caption", "family", "annotation", "mask")}
