"""TFDS builder for image-code datasets: {id, caption, codes int32 [h, w]}, one record per image of a source
dataset encoded by a trained VQ tokenizer (`t2i.train.token_data.build` produces the records; this builder only
writes them as array_record, no TensorFlow)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds


@dataclasses.dataclass(kw_only=True)
class VqTokensConfig(tfds.core.BuilderConfig):
  """One (VQ run checkpoint, source split) pair; `code_shape` is the (h, w) code grid."""
  code_shape: tuple[int, int] = (8, 8)
  num_codes: int = 256


class VqTokens(tfds.core.GeneratorBasedBuilder):
  """Caption + VQ code grid per image; all records go to split "train". Pass `records=` (a callable returning
  an iterator of {"id", "caption", "codes"}) to generate."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [VqTokensConfig(name="default")]

  def __init__(self, *, records: Callable[[], Iterator[dict]] | None = None, **kwargs):
    self._records = records
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"VQ image codes ({c.num_codes} codes, grid {tuple(c.code_shape)}) with captions.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "caption": tfds.features.Text(),
            "codes": tfds.features.Tensor(shape=tuple(c.code_shape), dtype=np.int32, doc="row-major code grid"),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._records is None:
      raise ValueError(f"vq_tokens/{self.builder_config.name}: not built yet and no records= to build it from "
                       "(see t2i.train.token_data.build)")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for r in self._records():
      yield r["id"], {"id": r["id"], "caption": r["caption"], "codes": np.asarray(r["codes"], np.int32)}
