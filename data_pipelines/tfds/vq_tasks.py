"""TFDS builder for derived-task code sets (multi-task SFT of token LMs): one record per shapes-bench derived
record (`data_pipelines.shapes.derived`: caption targets, VQA pairs or edit triplets) with its image(s) encoded by
a trained VQ tokenizer. `t2i.train.token_data.build_task_set` produces the records; this builder only writes them
as array_record (no TensorFlow).

Fields (one layout for every kind; unused ones are "" / zeros):
  id, kind ("caption" | "vqa" | "edit"), caption (canonical caption of the (source) image), text (VQA question /
  edit instruction), answer (VQA answer / edit kind), target_caption (edit), annotation (JSON of the (source)
  scene with "canvas": its pixel size; "{}" for edits), codes [h, w] (the (source) image), target_codes [h, w].
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

KINDS = ("caption", "vqa", "edit")
TEXT_FIELDS = ("id", "kind", "caption", "text", "answer", "target_caption", "annotation")


@dataclasses.dataclass(kw_only=True)
class VqTasksConfig(tfds.core.BuilderConfig):
  """One (VQ run checkpoint, derived kind, number, seed, canvas) tuple; `code_shape` is the (h, w) code grid."""
  code_shape: tuple[int, int] = (8, 8)
  num_codes: int = 256


class VqTasks(tfds.core.GeneratorBasedBuilder):
  """Derived-task records with VQ code grids; all records go to split "train". Pass `records=` (a callable
  returning an iterator of dicts with the module docstring's fields) to generate."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [VqTasksConfig(name="default")]

  def __init__(self, *, records: Callable[[], Iterator[dict]] | None = None, **kwargs):
    self._records = records
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    grid = tfds.features.Tensor(shape=tuple(c.code_shape), dtype=np.int32, doc="row-major code grid")
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"shapes-bench derived tasks with VQ codes ({c.num_codes} codes, grid {tuple(c.code_shape)}).",
        features=tfds.features.FeaturesDict({
            **{k: tfds.features.Text() for k in TEXT_FIELDS},
            "codes": grid,
            "target_codes": tfds.features.Tensor(shape=tuple(c.code_shape), dtype=np.int32,
                                                 doc="edit target grid (zeros for other kinds)"),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._records is None:
      raise ValueError(f"vq_tasks/{self.builder_config.name}: not built yet and no records= to build it from "
                       "(see t2i.train.token_data.build_task_set)")
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    shape = tuple(self.builder_config.code_shape)
    for r in self._records():
      if r.get("kind") not in KINDS:
        raise ValueError(f"vq_tasks: record {r.get('id')!r} has kind {r.get('kind')!r}, expected one of {KINDS}")
      out = {k: str(r.get(k, "")) for k in TEXT_FIELDS}
      out["codes"] = np.asarray(r["codes"], np.int32)
      target = r.get("target_codes")
      out["target_codes"] = np.zeros(shape, np.int32) if target is None else np.asarray(target, np.int32)
      yield out["id"], out
