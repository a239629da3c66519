"""Retrieval for the token family, wired to runs and datasets: a trained dual-encoder run (objective
"contrastive", `experiments/dual_encoder_shapes.py`), the MIPS index over a training set's documents, the
per-document neighbour table used in training, and the text retriever used at sampling time.

  module, params, step, tok, cfg = load_dual_encoder("workdirs/dual_encoder_shapes")
  path = build_document_index(de_run, data_dir, "shapes_bench/train_32px_n10000_seed0", image_size=32)
  nbrs = build_neighbours(path, de_run, k=2, variants=4, exclude_above=0.9, dedupe_above=0.98, query_dropout=0.2)
  r = TextRetriever(de_run, path, docs={id: (caption, codes)}, exclude_above=None, dedupe_above=0.98)
  rows = r.search(["a red circle"], k=2)            # index rows per prompt, best first (-1 = none)

Caching: both files live in data_dir/retrieval_index/ and are named after the encoder run (folder name + hash of
its path), its checkpoint step and the source dataset (`t2i.train.token_data.dataset_name`), so they are built
once and reused by every LM run on that retriever. The index file holds the document embeddings
(normalise(mean(normalise(image), normalise(text))), CM3Leon's key), the record ids, and for the neighbour table
the image embeddings and caption ids.

Training neighbours: the query of a training document is its own document embedding with 20 % of its caption tokens
dropped (CM3Leon's query dropout; `token_dropout`). The dropout draw is fixed per (document, variant) — `variants`
draws per document are searched once, and the data pipeline picks one variant per (seed, position) — so the
pipeline stays a pure function of (seed, position) and resumes exactly. Filters: the document itself (by id), hits
more similar to the query than `exclude_above` (near-duplicates) and hits more similar than `dedupe_above` to a
higher-ranked kept hit.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from t2i.retrieval.dual_encoder import embed_documents, embed_images, embed_texts, token_dropout
from t2i.retrieval.index import Index, normalize_rows, search

INDEX_DIR = "retrieval_index"


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """config.json of a dual-encoder run (checked to have config.dual_encoder)."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found; config.data.retrieval_workdir must be a dual-encoder train workdir")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("dual_encoder") is None:
    raise ValueError(f"{path}: the run has no config.dual_encoder (not a dual-encoder run)")
  return config


def checkpoint_step(workdir: str, step: int = -1) -> int:
  from t2i.train import init_from
  return int(os.path.basename(init_from._step_dir(workdir, step)))  # pylint: disable=protected-access


def load_dual_encoder(workdir: str, step: int = -1) -> tuple[Any, Any, int, Any, ml_collections.ConfigDict]:
  """(DualEncoder, its params on one device, checkpoint step, caption tokenizer, run config) of a trained run."""
  from flax import traverse_util
  from t2i.train import init_from, token_models
  config = run_config(workdir)
  tok = token_models.CaptionTokenizer(os.path.join(os.path.abspath(os.path.expanduser(workdir)), "tokenizer"),
                                      int(config.tokenizer.max_length))
  module = token_models.build_dual_encoder(config, tok)
  s, n = int(config.image_size), int(config.tokenizer.max_length)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                                                              jnp.zeros((1, n), jnp.int32))["params"]))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
  got = init_from.restore_groups(workdir, {"dual_encoder": ("dual_encoder", abstract)}, False, step)
  got = got.get("dual_encoder", {})
  want = traverse_util.flatten_dict(abstract)
  if set(got) != set(want):
    raise ValueError(f"{workdir}: checkpoint has {len(got)} of the {len(want)} 'dual_encoder' leaves")
  return module, traverse_util.unflatten_dict(dict(got)), checkpoint_step(workdir, step), tok, config


def index_path(de_workdir: str, data_dir: str, source_dataset: str, step: int = -1) -> str:
  """data_dir/retrieval_index/<name>.npz for this encoder run (checkpoint `step`) and source dataset."""
  from t2i.train.token_data import dataset_name
  name = dataset_name(de_workdir, checkpoint_step(de_workdir, step), False, source_dataset)
  return os.path.join(os.path.expanduser(data_dir), INDEX_DIR, name + ".npz")


def _save_npz(path: str, **arrays: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def build_document_index(de_workdir: str, data_dir: str, source_dataset: str, image_size: int, step: int = -1,
                         batch: int = 256) -> str:
  """Embeds every (image, caption) record of `source_dataset` (split "train") with the encoder run once; returns
  the cached index file (`index_path`), which `Index.load` reads."""
  path = index_path(de_workdir, data_dir, source_dataset, step)
  if os.path.exists(path):
    return path
  from data_pipelines import image_decode
  from data_pipelines.pipeline import resize_crop
  from data_pipelines.tfds import common
  module, params, ckpt, tok, config = load_dual_encoder(de_workdir, step)
  if int(config.image_size) != int(image_size):
    raise ValueError(f"config.image_size={image_size} but the dual encoder {de_workdir} was trained at "
                     f"{config.image_size} px")
  src = common.load_source(os.path.expanduser(data_dir), source_dataset, "train")
  n = len(src)
  ids, text_ids, img_e, doc_e = [], [], [], []
  for b0 in range(0, n, batch):
    rows = [src[i] for i in range(b0, min(n, b0 + batch))]
    x = np.stack([resize_crop(image_decode.decode_rgb(r["image"]), (image_size, image_size)) for r in rows])
    x = image_decode.to_float(x)
    t = tok([common.text(r["caption"]) for r in rows])
    pad = batch - len(rows)  # one compiled shape
    xp, tp = (np.concatenate([x, np.repeat(x[-1:], pad, 0)]), np.concatenate([t, np.repeat(t[-1:], pad, 0)])) \
        if pad else (x, t)
    img_e.append(np.asarray(embed_images(module, params, xp))[:len(rows)])
    doc_e.append(np.asarray(embed_documents(module, params, xp, tp))[:len(rows)])
    text_ids.append(t)
    ids += [common.text(r["id"]) for r in rows]
  if len(set(ids)) != len(ids):
    raise ValueError(f"dataset {source_dataset!r}: record ids are not unique; the index needs unique ids")
  _save_npz(path, embeddings=normalize_rows(np.concatenate(doc_e)), ids=np.asarray(ids),
            image_embeddings=np.concatenate(img_e).astype(np.float32), text_ids=np.concatenate(text_ids),
            step=np.asarray(ckpt))
  logging.info("retrieval index: %d documents of %s by %s step %d -> %s", n, source_dataset, de_workdir, ckpt, path)
  return path


def neighbours_path(index_file: str, k: int, variants: int, exclude_above: float | None, dedupe_above: float | None,
                    query_dropout: float) -> str:
  f = lambda v: "none" if v is None else f"{float(v):g}"
  return (index_file[:-len(".npz")] + f"_nbrs_k{k}_v{variants}_x{f(exclude_above)}_d{f(dedupe_above)}"
          f"_q{float(query_dropout):g}.npz")


def build_neighbours(index_file: str, de_workdir: str, k: int, variants: int = 4, exclude_above: float | None = 0.9,
                     dedupe_above: float | None = 0.98, query_dropout: float = 0.2, step: int = -1,
                     batch: int = 512) -> np.ndarray:
  """int64 [N, variants, k] index rows of each document's retrieved neighbours (best first, -1 = none), built once
  and cached next to the index (see the module docstring for the query and the filters)."""
  if k < 1 or variants < 1:
    raise ValueError(f"build_neighbours: k={k} and variants={variants} must be >= 1")
  path = neighbours_path(index_file, k, variants, exclude_above, dedupe_above, query_dropout)
  if os.path.exists(path):
    with np.load(path) as f:
      return np.asarray(f["rows"])
  module, params, _, tok, _ = load_dual_encoder(de_workdir, step)
  with np.load(index_file) as f:
    index = Index(np.asarray(f["embeddings"], np.float32), np.asarray(f["ids"]))
    img, text_ids = np.asarray(f["image_embeddings"]), np.asarray(f["text_ids"])
  n = len(index)
  out = np.full((n, variants, k), -1, np.int64)
  for v in range(variants):
    txt = []
    for b0 in range(0, n, batch):
      t = text_ids[b0:b0 + batch]
      pad = batch - len(t)
      t = np.concatenate([t, np.repeat(t[-1:], pad, 0)]) if pad else t
      key = jax.random.fold_in(jax.random.PRNGKey(v), b0)
      dropped = token_dropout(jnp.asarray(t), key, query_dropout, pad_id=tok.pad_token_id,
                              keep_special=(tok.bos_token_id, tok.eos_token_id))
      txt.append(np.asarray(embed_texts(module, params, dropped))[:batch - pad])
    query = normalize_rows(0.5 * (img + np.concatenate(txt)))
    out[:, v], _ = search(index, query, k, exclude_sim_above=exclude_above, dedupe_sim_above=dedupe_above,
                          exclude_ids=index.ids)
  _save_npz(path, rows=out)
  logging.info("retrieval neighbours: %d documents x %d variants x k=%d -> %s (%.1f %% slots empty)", n, variants, k,
               path, 100.0 * float(np.mean(out < 0)))
  return out


class TextRetriever:
  """Prompt text -> the index's best documents (text-embedding query), as (caption, codes) pairs.

  docs: record id -> (caption, codes [h, w]) of the index's documents (e.g. from the VQ code dataset).
  """

  def __init__(self, de_workdir: str, index_file: str, docs: Mapping[str, tuple[str, np.ndarray]],
               exclude_above: float | None = None, dedupe_above: float | None = 0.98, step: int = -1):
    self.module, self.params, self.step, self.tok, _ = load_dual_encoder(de_workdir, step)
    self.index = Index.load(index_file)
    missing = [i for i in self.index.ids[:1000] if str(i) not in docs]
    if missing:
      raise ValueError(f"{index_file}: index ids such as {missing[:3]} have no document in the code dataset")
    self.docs = docs
    self.exclude_above, self.dedupe_above = exclude_above, dedupe_above

  def search(self, texts: Sequence[str], k: int) -> np.ndarray:
    """int64 [n, k] index rows per text (best first, -1 = none)."""
    q = np.asarray(embed_texts(self.module, self.params, jnp.asarray(self.tok(list(texts)))))
    rows, _ = search(self.index, q, k, exclude_sim_above=self.exclude_above, dedupe_sim_above=self.dedupe_above)
    return rows

  def documents(self, texts: Sequence[str], k: int) -> list[list[tuple[str, np.ndarray]]]:
    """Per text, its k best (caption, codes) documents, best first (fewer when filters leave fewer)."""
    if k <= 0:
      return [[] for _ in texts]
    return [[self.docs[str(self.index.ids[r])] for r in row if r >= 0] for row in self.search(texts, k)]


__all__ = ("load_dual_encoder", "index_path", "build_document_index", "build_neighbours", "neighbours_path",
           "TextRetriever")
