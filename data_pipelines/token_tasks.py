"""Multi-task SFT documents for token LMs (CM3Leon's supervised fine-tuning stage): task templates over the joint
vocabulary and a weighted task mixture as a Grain pipeline.

  it = make_train_iterator(cfg, vocab, global_batch_size=32, mesh=mesh)
  batch = next(it)  # {"tokens": int32 [B, L], "loss_mask": float32 [B, L]: 1 on response tokens only}

Every document is `<bos> prompt <break> response <eod>`; the loss mask is 1 on the response and its <eod> and 0 on
`<bos>`, the prompt, the <break> before the response and the padding (SFT trains on the response only; the "cm3"
objective takes `loss_mask` as the target mask). Templates (`TASKS`; a segment in [] is a code grid
`<image_start> codes <image_end>`):
  t2i      <bos> caption <break> | [image] <eod>                       (shapes-bench captions; with probability
           `uncond_rate` the caption is <mask>: the unconditional stream of CFG)
  caption  <bos> [image] <break> instruction <break> | caption <eod>   (canonical caption of every object)
  vqa      <bos> [image] <break> question <break> | answer <eod>
  edit     <bos> [source] <break> instruction <break> | [target] <eod>
  ground   <bos> caption with <loc_x><loc_y> per object centroid <break> | [image] <eod>
Records: "t2i" reads `dataset` ({caption, codes}, `data_pipelines.tfds.vq_tokens`); the others read the derived
code sets in `task_datasets` (`data_pipelines.tfds.vq_tasks`: "caption" serves caption and ground, "vqa", "edit").
Mixture (`tasks`, e.g. "t2i:1,caption:1,vqa:1,edit:1,ground:1"): document n of the global stream draws its task
by weight and its record uniformly (with replacement) from a generator keyed by (seed, n), so a resumed run
continues the exact stream.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import cm3
from data_pipelines.shapes import captions, palette
from data_pipelines.tfds.common import text
from t2i.text.joint_vocab import JointVocab

TASKS = ("t2i", "caption", "vqa", "edit", "ground")
TASK_SOURCE = {"caption": "caption", "ground": "caption", "vqa": "vqa", "edit": "edit"}  # task -> derived set
CAPTION_INSTRUCTIONS = ("describe the image.", "what is in this picture?", "write a caption for this image.")


def default_task_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data_dir": os.path.expanduser("~/t2i_data"),
      "dataset": "",            # "vq_tokens/<name>": caption + codes of shapes-bench images (task t2i)
      "task_datasets": {},      # derived set ("caption", "vqa", "edit") -> "vq_tasks/<name>"
      "split": "train",
      "tasks": "t2i:1,caption:1,vqa:1,edit:1,ground:1",
      "max_length": 192,        # document length L
      "uncond_rate": 0.1,       # t2i documents whose caption is <mask> (CFG's unconditional stream)
      "seed": 0,
      "read_threads": 2,
      "prefetch_buffer_size": 32,
  })


def parse_tasks(spec: str) -> dict[str, float]:
  """"t2i:1,caption:2" -> {"t2i": 1/3, "caption": 2/3} (zero weights dropped); errors name config.data.tasks."""
  out: dict[str, float] = {}
  for part in (p.strip() for p in str(spec).split(",") if p.strip()):
    name, sep, w = part.partition(":")
    name = name.strip()
    if name not in TASKS:
      raise ValueError(f"config.data.tasks={spec!r}: unknown task {name!r} (known: {TASKS})")
    try:
      weight = float(w) if sep else 1.0
    except ValueError:
      raise ValueError(f"config.data.tasks={spec!r}: weight {w!r} of {name!r} is not a number") from None
    if weight < 0 or name in out:
      raise ValueError(f"config.data.tasks={spec!r}: negative or repeated weight for {name!r}")
    if weight > 0:
      out[name] = weight
  if not out:
    raise ValueError(f"config.data.tasks={spec!r}: no task with a positive weight")
  total = sum(out.values())
  return {k: v / total for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ templates

def grounded_caption(annotation: dict[str, Any], vocab: JointVocab, canvas: float) -> str:
  """Objects left to right, each with its centroid as `<loc_x><loc_y>` (`vocab.loc_tokens`), then the background:
  "a small red circle at <loc_3><loc_9>, a large blue square at <loc_20><loc_12> on a light grey background"."""
  if vocab.num_locations < 1:
    raise ValueError("the ground task needs coordinate tokens: set config.tokenizer.num_locations > 0")
  objs = sorted(annotation["objects"], key=lambda o: (o["centroid"][0], o["centroid"][1]))
  parts = [f"a {o['size']} {o['color']} {o['shape']} at {vocab.loc_tokens(o['centroid'], canvas)}" for o in objs]
  body = ", ".join(parts) if parts else "no shapes"
  background = palette.BACKGROUNDS[annotation["background"]][1]
  return captions._articles(f"{body} on {background}")  # pylint: disable=protected-access


def _prompt(vocab: JointVocab, segments: Sequence[str | np.ndarray]) -> list[int]:
  """<bos> seg (<break> seg)* <break>: everything the model is given."""
  return vocab.encode_document(segments, bos=True, eod=False) + [vocab.special.break_id]


def _response(vocab: JointVocab, segment: str | np.ndarray) -> list[int]:
  return vocab.encode_document([segment], bos=False, eod=True)


def task_example(task: str, record: dict[str, Any], vocab: JointVocab, rng: np.random.Generator | None = None,
                 uncond: bool = False) -> tuple[list[int], list[int]]:
  """(prompt ids, response ids) of one task on a decoded record (str fields, numpy code grids).

  record keys: t2i {caption, codes}; caption {codes, caption}; vqa {codes, question, answer}; edit {codes,
  instruction, target_codes}; ground {codes, annotation (dict with "canvas": the pixel size its coordinates refer
  to)}. `rng` picks the caption instruction (None: the first).
  """
  if task == "t2i":
    if uncond:
      sp = vocab.special
      return [sp.bos, sp.mask, sp.break_id], _response(vocab, record["codes"])
    return _prompt(vocab, [record["caption"]]), _response(vocab, record["codes"])
  if task == "caption":
    k = int(rng.integers(len(CAPTION_INSTRUCTIONS))) if rng is not None else 0
    return _prompt(vocab, [record["codes"], CAPTION_INSTRUCTIONS[k]]), _response(vocab, record["caption"])
  if task == "vqa":
    return _prompt(vocab, [record["codes"], record["question"]]), _response(vocab, record["answer"])
  if task == "edit":
    return _prompt(vocab, [record["codes"], record["instruction"]]), _response(vocab, record["target_codes"])
  if task == "ground":
    ann = record["annotation"]
    if "canvas" not in ann:
      raise ValueError("task_example: the ground task needs annotation['canvas'] (the image size in px)")
    return _prompt(vocab, [grounded_caption(ann, vocab, ann["canvas"])]), _response(vocab, record["codes"])
  raise ValueError(f"task_example: unknown task {task!r} (known: {TASKS})")


def sft_document(prompt: Sequence[int], response: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32, loss_mask float32) of prompt + response; the mask is 1 exactly on the response."""
  if not response:
    raise ValueError("sft_document: empty response")
  tokens = np.asarray(list(prompt) + list(response), np.int32)
  mask = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(response), np.float32)])
  return tokens, mask


# ------------------------------------------------------------------------------------------------ records

def decode_record(raw: dict[str, Any], task: str) -> dict[str, Any]:
  """A stored record (`vq_tokens` for t2i, `vq_tasks` otherwise) -> the fields `task_example` reads."""
  if task == "t2i":
    return {"caption": text(raw["caption"]), "codes": np.asarray(raw["codes"])}
  out = {"codes": np.asarray(raw["codes"]), "caption": text(raw["caption"])}
  if task == "vqa":
    out.update(question=text(raw["text"]), answer=text(raw["answer"]))
  elif task == "edit":
    out.update(instruction=text(raw["text"]), target_codes=np.asarray(raw["target_codes"]))
  elif task == "ground":
    out["annotation"] = json.loads(text(raw["annotation"]))
  return out


def _process(pos: int, cfg: Any, weights: dict[str, float], sources: dict[str, Any], vocab: JointVocab
             ) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([cfg.seed, pos])
  names = list(weights)
  task = names[int(rng.choice(len(names), p=np.asarray([weights[n] for n in names])))]
  src = sources[task]
  record = decode_record(src[int(rng.integers(len(src)))], task)
  codes = record["codes"]
  if vocab.image_shape is not None and tuple(codes.shape) != tuple(vocab.image_shape):
    raise ValueError(f"config.data: task {task!r} codes of shape {codes.shape}, the vocabulary expects "
                     f"{vocab.image_shape} (was the code set built with another VQ run?)")
  uncond = task == "t2i" and rng.random() < cfg.uncond_rate
  prompt, response = task_example(task, record, vocab, rng, uncond)
  tokens, mask = sft_document(prompt, response)
  if len(tokens) > cfg.max_length:
    raise ValueError(f"a {task} document has {len(tokens)} tokens > config.data.max_length={cfg.max_length}; "
                     "raise config.data.max_length")
  padded, _ = cm3.pad_batch([tokens], cfg.max_length, vocab.special.pad)
  return {"tokens": padded[0], "loss_mask": np.pad(mask, (0, cfg.max_length - len(mask)))}


def make_train_iterator(cfg: ml_collections.ConfigDict, vocab: JointVocab, global_batch_size: int,
                        mesh: jax.sharding.Mesh | None = None, seed: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        sources: dict[str, Any] | None = None):
  """Infinite iterator of SFT batches (`data_pipelines.tokens.TokenIterator`: get_state / set_state).

  cfg: `default_task_config()` keys. `sources` (tests): task -> random-access records in the stored layout,
  instead of reading cfg.dataset / cfg.task_datasets.
  """
  from data_pipelines import tokens
  from data_pipelines.tfds import common
  cfg, pi, pc = tokens.resolve_config(cfg, default_task_config(), "the task mixture", global_batch_size, seed,
                                      process_index, process_count)
  weights = parse_tasks(cfg.tasks)
  if sources is None:
    sets, sources = dict(cfg.task_datasets), {}
    for task in weights:
      if task == "t2i":
        if not cfg.dataset:
          raise ValueError("config.data.dataset: the t2i task needs a vq_tokens set")
        sources[task] = common.load_source(cfg.data_dir, cfg.dataset, cfg.split)
        continue
      name = sets.get(TASK_SOURCE[task])
      if not name:
        raise ValueError(f"config.data.task_datasets has no {TASK_SOURCE[task]!r} set (task {task!r})")
      sources[task] = common.load_source(cfg.data_dir, name, "train")
  else:
    missing = sorted(set(weights) - set(sources))
    if missing:
      raise ValueError(f"make_train_iterator: no sources for tasks {missing}")
  for task, src in sources.items():
    if len(src) == 0:
      raise ValueError(f"config.data: the {task!r} records are empty")
  ds = grain.MapDataset.range(0, 2**62)[pi::pc]   # global document positions of this process
  docs = ds.map(lambda pos: _process(int(pos), cfg, weights, sources, vocab))
  return tokens.batch_documents(docs, cfg, global_batch_size // pc, mesh)
