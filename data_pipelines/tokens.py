"""Grain pipeline of CM3 token documents from an image-code dataset ({caption, codes [h, w], id}, e.g.
`data_pipelines.tfds.vq_tokens`), built on the host with numpy.

  it = make_train_iterator(cfg, vocab, global_batch_size=32, mesh=mesh)
  batch = next(it)  # {"tokens": int32 [B, L], "loss_mask": float32 [B, L] (1 = real token, 0 = <pad>)}
  state = it.get_state(); ...; it.set_state(state)  # exact resume (JSON-serialisable)

Per record (randomness keyed by seed and global position): the caption -> image document
`<bos> text <break> <image_start> codes <image_end> <eod>` (`JointVocab` ids); with probability `uncond_rate` the
whole caption becomes the CM3 span (`<bos> <mask> <break> image... <eod> <infill> text <eod>`: the unconditional
stream of CFG); otherwise an image-first flip with probability `image_first` (Chameleon) and the CM3 transform
with probability `cm3_rate` (`data_pipelines.cm3`: spans never cross <break>). A transformed document longer than
`max_length` falls back to the untransformed one; an untransformed one that does not fit is an error. Documents
are right-padded to `max_length` with <pad>.

Retrieval augmentation (`retrieval_k` > 0, CM3Leon): the document's retrieved neighbours — `neighbours[id]`, an
int [variants, k'] table of source rows built once by `t2i.retrieval.store.build_neighbours` (self and
near-duplicates excluded, de-duplicated, 20 % query-token dropout); one variant is picked per (seed, position) —
are encoded as untransformed caption -> image documents and put in front of the (transformed) document with
`t2i.retrieval.prepend_retrieved` (whole documents only; the lowest-ranked ones are dropped when the row would
exceed `max_length`). Their tokens weigh `retrieval_loss_weight` in loss_mask.

Order: global shuffle (reshuffled every epoch) -> repeat -> per-process stride shard -> documents -> batches ->
global `jax.Array`s on the mesh.
"""
from __future__ import annotations

import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from data_pipelines import cm3
from t2i.text.joint_vocab import JointVocab


def default_token_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data_dir": os.path.expanduser("~/t2i_data"),
      "dataset": "",          # "vq_tokens/<name>" under data_dir
      "split": "train",
      "max_length": 96,       # document length L (the step's sequence length)
      "image_first": 0.5,     # probability of an image -> caption document (Chameleon: 0.5)
      "cm3_rate": 1.0,        # probability of the CM3 span transform
      "span_rate": 1.0,       # Poisson rate of the number of spans (at least 1)
      "max_span_len": 0,      # 0: unbounded
      "uncond_rate": 0.0,     # probability that the whole caption is the span (<mask> text stream for CFG)
      "retrieval_k": 0,       # retrieved documents prepended to each document (0 = off; needs `neighbours`)
      "retrieval_loss_weight": 1.0,  # loss_mask weight of the retrieved documents' tokens
      "seed": 0,
      "read_threads": 2,
      "prefetch_buffer_size": 32,
  })


def document(caption: str, codes: np.ndarray, vocab: JointVocab, cfg: Any, rng: np.random.Generator) -> np.ndarray:
  """One training document (int32 ids, unpadded) for a caption and its code grid; see the module docstring."""
  ids = vocab.special
  text = vocab.encode_text(caption)
  doc = np.asarray(vocab.encode_document([caption, np.asarray(codes)]), np.int32)
  if len(doc) > cfg.max_length:
    raise ValueError(f"a caption -> image document has {len(doc)} tokens > config.data.max_length="
                     f"{cfg.max_length} (caption {caption!r}); raise config.data.max_length")
  if text and rng.random() < cfg.uncond_rate:
    out = cm3.apply_spans(doc, [(1, 1 + len(text))], ids)
  else:
    doc = cm3.flip_image_first(doc, ids, rng, cfg.image_first)
    out = doc
    if rng.random() < cfg.cm3_rate:
      out = cm3.cm3_transform(doc, ids, rng, cfg.span_rate, cfg.max_span_len or None)
  return out if len(out) <= cfg.max_length else doc


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _codes(record: dict[str, Any], cfg: Any, vocab: JointVocab) -> np.ndarray:
  codes = np.asarray(record["codes"])
  if vocab.image_shape is not None and tuple(codes.shape) != tuple(vocab.image_shape):
    raise ValueError(f"dataset {cfg.dataset!r}: codes of shape {codes.shape}, the vocabulary expects "
                     f"{vocab.image_shape} (was the dataset built with another VQ run?)")
  return codes


def retrieved_rows(record_id: str, global_pos: int, cfg: Any, neighbours: Any) -> list[int]:
  """Source rows of the record's first `retrieval_k` neighbours, best first: the variant (dropout draw) is chosen
  by (seed, position), from a generator separate from the document's own randomness."""
  if record_id not in neighbours:
    raise KeyError(f"dataset {cfg.dataset!r}: record {record_id!r} has no entry in the retrieval neighbour table "
                   "(built for another dataset?)")
  table = np.asarray(neighbours[record_id])
  if table.ndim != 2 or table.shape[1] < cfg.retrieval_k:
    raise ValueError(f"config.data.retrieval_k={cfg.retrieval_k}: the neighbour table has shape {table.shape} "
                     "([variants, k], k too small)")
  v = int(np.random.default_rng([cfg.seed, global_pos, 1]).integers(table.shape[0]))
  return [int(r) for r in table[v, :cfg.retrieval_k] if r >= 0]


def _process(record: dict[str, Any], global_pos: int, cfg: Any, vocab: JointVocab, source: Any = None,
             neighbours: Any = None) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([cfg.seed, global_pos])
  caption = _text(record["caption"])
  doc = document(caption, _codes(record, cfg, vocab), vocab, cfg, rng)
  if cfg.retrieval_k <= 0:
    tokens, mask = cm3.pad_batch([doc], cfg.max_length, vocab.special.pad)
    return {"tokens": tokens[0], "loss_mask": mask[0]}
  from t2i.retrieval.augment import prepend_retrieved
  sp = vocab.special
  docs = []
  for row in retrieved_rows(_text(record["id"]), global_pos, cfg, neighbours):
    r = source[row]
    docs.append(vocab.encode_document([_text(r["caption"]), _codes(r, cfg, vocab)]))
  tokens, start = prepend_retrieved(doc, docs, cfg.max_length, sp.break_id, bos_id=sp.bos, eod_id=sp.eod,
                                    pad_id=sp.pad)
  mask = (tokens != sp.pad).astype(np.float32)
  mask[:start] *= np.float32(cfg.retrieval_loss_weight)
  return {"tokens": tokens, "loss_mask": mask}


class TokenIterator:
  """Batches {"tokens", "loss_mask"} (numpy, or global jax.Arrays with a sharding); get_state / set_state."""

  def __init__(self, parent: Any, sharding: jax.sharding.Sharding | None):
    self._parent = parent
    self._sharding = sharding

  def __iter__(self) -> "TokenIterator":
    return self

  def __next__(self) -> dict[str, Any]:
    b = next(self._parent)
    batch = {"tokens": np.asarray(b["tokens"], np.int32), "loss_mask": np.asarray(b["loss_mask"], np.float32)}
    if self._sharding is not None:
      batch = {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in batch.items()}
    return batch

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def resolve_config(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict, what: str,
                   global_batch_size: int, seed: int | None, process_index: int | None, process_count: int | None
                   ) -> tuple[ml_collections.ConfigDict, int, int]:
  """(defaults updated by cfg, process index, process count); unknown keys and a bad batch size are errors."""
  full = defaults.to_dict()
  unknown = sorted(set(cfg.to_dict()) - set(full))
  if unknown:
    raise ValueError(f"config.data: unknown keys {unknown} for {what} (known: {sorted(full)})")
  full.update(cfg.to_dict())
  cfg = ml_collections.ConfigDict(full)
  cfg.seed = cfg.seed if seed is None else seed
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the process count {pc}")
  return cfg, pi, pc


def batch_documents(docs: grain.MapDataset, cfg: Any, local_batch_size: int,
                    mesh: jax.sharding.Mesh | None) -> TokenIterator:
  """Threaded reading of this process's documents, batched, as global arrays on `mesh` (numpy without one)."""
  from data_pipelines.pipeline import batch_sharding
  it_ds = docs.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                 prefetch_buffer_size=cfg.prefetch_buffer_size))
  it_ds = it_ds.batch(local_batch_size, drop_remainder=True)
  return TokenIterator(iter(it_ds), batch_sharding(mesh) if mesh is not None else None)


def make_train_iterator(cfg: ml_collections.ConfigDict, vocab: JointVocab, global_batch_size: int,
                        mesh: jax.sharding.Mesh | None = None, seed: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        source=None, neighbours: Any = None) -> TokenIterator:
  """Infinite iterator of document batches for this process (`default_token_config()` keys; see module docstring).

  neighbours: record id -> int [variants, k >= retrieval_k] source rows of its retrieved documents (-1 = none);
  required when cfg.retrieval_k > 0.
  """
  from data_pipelines.tfds import common
  cfg, pi, pc = resolve_config(cfg, default_token_config(), "token data", global_batch_size, seed, process_index,
                               process_count)
  seed = cfg.seed
  source = common.load_source(cfg.data_dir, cfg.dataset, cfg.split) if source is None else source
  if len(source) == 0:
    raise ValueError(f"dataset {cfg.dataset!r} split {cfg.split!r} is empty")
  if cfg.retrieval_k < 0:
    raise ValueError(f"config.data.retrieval_k={cfg.retrieval_k} must be >= 0")
  if cfg.retrieval_k > 0 and neighbours is None:
    raise ValueError(f"config.data.retrieval_k={cfg.retrieval_k}: no retrieval neighbour table was given (set "
                     "config.data.retrieval_workdir to a dual-encoder run)")
  ds = grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat(None)[pi::pc]
  docs = ds.map_with_index(lambda pos, r: _process(r, pos * pc + pi, cfg, vocab, source, neighbours))
  return batch_documents(docs, cfg, global_batch_size // pc, mesh)
