"""Image-code data for token models: a trained VQ run's encoder runs once over a source image dataset (e.g. a
shapes-bench split) and the {id, caption, codes [h, w]} records are written as the array_record dataset
`vq_tokens/<name>` in `data_dir` (`data_pipelines.tfds.vq_tokens`); `data_pipelines.tokens` builds documents from it.

Multi-task SFT (`build_task_sets`) adds sibling `vq_tasks/<name>` sets: shapes-bench derived records (caption
targets, VQA pairs, edit triplets; `data_pipelines.shapes.derived`) with their image(s) encoded the same way
(`data_pipelines.tfds.vq_tasks`).

The name encodes the VQ run (folder name + a hash of its path), its checkpoint step, EMA or raw params and the
source dataset, so the set is built once and reused (a rerun, a resumed run, a second LM on the same tokenizer).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """config.json of a VQ run (checked to have config.vq)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; the VQ run (config.data.vq_workdir / config.init_from.workdir) "
                            "must be a train workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("vq") is None:
    raise ValueError(f"{path}: the run has no config.vq (not a VQ run)")
  return config


def _uses_ema(config: Any, ema: bool) -> bool:
  """Whether `init_from.restore_groups(..., ema)` reads EMA params of this run (it falls back to raw params)."""
  from t2i.train import ema as ema_lib
  return bool(ema) and ema_lib.enabled(config.get("ema"))


def load_vq(workdir: str, ema: bool = True, step: int = -1
            ) -> tuple[Any, dict[str, Any], int, ml_collections.ConfigDict]:
  """(VQModel built from the run's config.json `vq` entry, its "vq" params on one device, checkpoint step, config).

  The params are the ones `config.init_from` with the same (ema, step) puts into a token LM's frozen "vq" group.
  """
  from t2i.train import init_from
  from t2i.train.models import build_module
  config = run_config(workdir)
  module = build_module(config.vq, "vq")
  size = int(config.image_size)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.PRNGKey(0),
                                                              jnp.zeros((1, size, size, 3)))["params"]))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), abstract)
  got = init_from.restore_groups(workdir, {"vq": ("vq", abstract)}, ema, step).get("vq", {})
  want = traverse_util.flatten_dict(abstract)
  if set(got) != set(want):
    raise ValueError(f"{workdir}: checkpoint has {len(got)} of the {len(want)} 'vq' leaves of config.vq")
  ckpt = int(os.path.basename(init_from._step_dir(workdir, step)))  # pylint: disable=protected-access
  return module, traverse_util.unflatten_dict(dict(got)), ckpt, config


def dataset_name(vq_workdir: str, step: int, ema: bool, source: str) -> str:
  run = os.path.abspath(os.path.expanduser(vq_workdir))
  tag = hashlib.sha1(run.encode()).hexdigest()[:8]
  raw = f"{os.path.basename(os.path.normpath(run))}_{tag}_s{step}_{'ema' if ema else 'raw'}_{source}"
  return "".join(ch if ch.isalnum() else "_" for ch in raw)[:120]


def resolve(vq_workdir: str, source_dataset: str, ema: bool = True, step: int = -1) -> str:
  """"vq_tokens/<name>" that `build` writes for these arguments (without building; for non-main processes)."""
  from t2i.train import init_from
  ckpt = int(os.path.basename(init_from._step_dir(vq_workdir, step)))  # pylint: disable=protected-access
  return "vq_tokens/" + dataset_name(vq_workdir, ckpt, _uses_ema(run_config(vq_workdir), ema), source_dataset)


def image_encoder(vq_workdir: str, image_size: int, ema: bool, step: int, batch: int
             ) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[int, int], int, int, bool]:
  """(uint8 images [n, s, s, 3] -> codes [n, h, w] in batches of `batch`, code grid, num_codes, checkpoint step,
  whether EMA params were read) of a VQ run."""
  from data_pipelines import image_decode
  module, params, ckpt, vq_config = load_vq(vq_workdir, ema, step)
  if int(vq_config.image_size) != int(image_size):
    raise ValueError(f"config.image_size={image_size} but the VQ run {vq_workdir} was trained at "
                     f"{vq_config.image_size} px")
  encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
  shape = tuple(int(s) for s in jax.eval_shape(encode, params, jnp.zeros((1, image_size, image_size, 3))).shape[1:])

  def encode_images(imgs: np.ndarray) -> np.ndarray:
    out = []
    for b0 in range(0, len(imgs), batch):
      x = image_decode.to_float(imgs[b0:b0 + batch])
      n = len(x)
      x = np.concatenate([x, np.repeat(x[-1:], batch - n, 0)]) if n < batch else x
      out.append(np.asarray(encode(params, x))[:n])
    return np.concatenate(out)
  return encode_images, shape, int(module.num_codes), ckpt, _uses_ema(vq_config, ema)


def build(vq_workdir: str, data_dir: str, source_dataset: str, image_size: int, ema: bool = True, step: int = -1,
          batch: int = 64) -> str:
  """Builds (once) the code dataset of `source_dataset` (split "train") under the VQ run; returns "vq_tokens/<name>"."""
  from data_pipelines import image_decode
  from data_pipelines.pipeline import resize_crop
  from data_pipelines.tfds import common, vq_tokens
  encode_images, shape, num_codes, ckpt, used_ema = image_encoder(vq_workdir, image_size, ema, step, batch)
  name = dataset_name(vq_workdir, ckpt, used_ema, source_dataset)
  config = vq_tokens.VqTokensConfig(name=name, code_shape=shape, num_codes=num_codes,
                                    description=f"codes of {source_dataset} by {vq_workdir} step {ckpt}")

  def records() -> Iterator[dict[str, Any]]:
    src = common.load_source(data_dir, source_dataset, "train")
    n = len(src)
    for b0 in range(0, n, batch):
      rows = [src[i] for i in range(b0, min(n, b0 + batch))]
      imgs = np.stack([resize_crop(image_decode.decode_rgb(r["image"]), (image_size, image_size)) for r in rows])
      for r, c in zip(rows, encode_images(imgs)):
        yield {"id": common.text(r.get("id", str(b0))), "caption": common.text(r["caption"]), "codes": c}
      logging.info("vq_tokens/%s: encoded %d / %d", name, min(n, b0 + batch), n)

  builder = vq_tokens.VqTokens(config=config, data_dir=data_dir, file_format=common.FILE_FORMAT, records=records)
  common.prepare(builder)
  return f"vq_tokens/{name}"


# ------------------------------------------------------------------------------- derived-task code sets (SFT)

def _task_source(kind: str, num: int, seed: int, size: int) -> str:
  return f"derived_{kind}_n{num}_seed{seed}_{size}px"


def derived_records(kind: str, num: int, seed: int, size: int) -> Iterator[dict[str, Any]]:
  """Shapes-bench derived records of `kind` ("caption", "vqa", "edit") in the `vq_tasks` layout, images still
  as uint8 arrays under "image" (and "target_image" for edits); annotations carry "canvas": size; VQA records
  also "question_kind" (not stored)."""
  from data_pipelines import image_decode
  from data_pipelines.shapes import derived

  def ann(text: str) -> str:
    return json.dumps(dict(json.loads(text), canvas=int(size)), sort_keys=True)

  if kind == "caption":
    for r in derived.caption_targets(num, seed, size):
      yield {"id": r["id"], "kind": kind, "caption": r["caption"], "annotation": ann(r["annotation"]),
             "image": image_decode.decode_rgb(r["image"])}
  elif kind == "vqa":
    for r in derived.vqa_pairs(num, seed, size):
      yield {"id": r["id"], "kind": kind, "caption": r["caption"], "text": r["question"], "answer": r["answer"],
             "question_kind": r["kind"], "annotation": ann(r["annotation"]),
             "image": image_decode.decode_rgb(r["image"])}
  elif kind == "edit":
    for r in derived.edit_triplets(num, seed, size):
      yield {"id": r["id"], "kind": kind, "caption": r["source_caption"], "text": r["instruction"],
             "answer": r["edit"], "target_caption": r["target_caption"], "annotation": "{}",
             "image": image_decode.decode_rgb(r["source"]), "target_image": image_decode.decode_rgb(r["target"])}
  else:
    from data_pipelines.tfds.vq_tasks import KINDS
    raise ValueError(f"derived_records: kind {kind!r} is not one of {KINDS}")


def build_task_set(vq_workdir: str, data_dir: str, kind: str, num: int, seed: int, image_size: int,
                   ema: bool = True, step: int = -1, batch: int = 64) -> str:
  """Builds (once) the `vq_tasks` set of `num` derived records of `kind` (generator seed `seed`, rendered at
  image_size px) encoded by the VQ run; returns "vq_tasks/<name>"."""
  from data_pipelines.tfds import common, vq_tasks
  encode_images, shape, num_codes, ckpt, used_ema = image_encoder(vq_workdir, image_size, ema, step, batch)
  name = dataset_name(vq_workdir, ckpt, used_ema, _task_source(kind, num, seed, image_size))
  config = vq_tasks.VqTasksConfig(name=name, code_shape=shape, num_codes=num_codes,
                                  description=f"derived {kind} records (n={num}, seed={seed}, {image_size} px) "
                                              f"encoded by {vq_workdir} step {ckpt}")

  def records() -> Iterator[dict[str, Any]]:
    it = derived_records(kind, num, seed, image_size)
    while True:
      rows = [r for _, r in zip(range(batch), it)]
      if not rows:
        return
      codes = encode_images(np.stack([r.pop("image") for r in rows]))
      targets = encode_images(np.stack([r.pop("target_image") for r in rows])) if kind == "edit" else None
      for j, r in enumerate(rows):
        yield dict(r, codes=codes[j], target_codes=None if targets is None else targets[j])

  builder = vq_tasks.VqTasks(config=config, data_dir=data_dir, file_format=common.FILE_FORMAT, records=records)
  common.prepare(builder)
  return f"vq_tasks/{name}"


def build_task_sets(cfg: dict[str, Any], vq_workdir: str, image_size: int, ema: bool = True, step: int = -1
                    ) -> dict[str, Any]:
  """config.data (dict) of a "vq_tasks" run -> the `data_pipelines.token_tasks` config: pops task_num (records per
  derived set) and task_seed (their generator seed), builds (process 0) or names (others) the sets the weighted
  tasks need and puts them in "task_datasets"."""
  from data_pipelines import token_tasks
  cfg = dict(cfg)
  num, seed = int(cfg.pop("task_num", 2000)), int(cfg.pop("task_seed", 0))
  kinds = sorted({token_tasks.TASK_SOURCE[t] for t in token_tasks.parse_tasks(cfg.get("tasks", "")) if t != "t2i"})
  sets = {}
  for kind in kinds:
    if jax.process_index() == 0:
      sets[kind] = build_task_set(vq_workdir, cfg["data_dir"], kind, num, seed, image_size, ema, step)
    else:
      from t2i.train import init_from
      ckpt = int(os.path.basename(init_from._step_dir(vq_workdir, step)))  # pylint: disable=protected-access
      used_ema = _uses_ema(run_config(vq_workdir), ema)
      sets[kind] = "vq_tasks/" + dataset_name(vq_workdir, ckpt, used_ema, _task_source(kind, num, seed, image_size))
  cfg["task_datasets"] = sets
  return cfg
