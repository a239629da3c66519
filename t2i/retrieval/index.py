"""Exact maximum-inner-product (MIPS) index over unit-norm document embeddings, with CM3Leon's retrieval filters,
plus dual-encoder scoring helpers (best-of-N re-ranking, CLIP-style score).

  index = build_index(lambda recs: embed_docs(recs), records, batch=256)   # records: dicts with "id"
  rows, scores = search(index, query_emb, k=2, exclude_sim_above=0.95, dedupe_sim_above=0.98,
                        exclude_ids=query_record_ids)                      # [Q, k] row numbers, -1 = none
  hit_ids = index.ids[rows[rows >= 0]]
  index.save("index.npz"); index = Index.load("index.npz")
  order = rerank(model, params, prompt_ids, candidate_images)             # best candidate first
  s = clip_score(model, params, ids, images)                              # 100 * max(cos, 0) per pair

Search is brute force: the database is scanned in blocks of `block_size` rows (jnp matmul + lax.top_k, a running
top-C merged across blocks) and queries in chunks of `query_block`, so memory stays O(query_block * block_size).
Filters: hits whose similarity to the query exceeds `exclude_sim_above` are near-duplicates of the query and are
skipped (CM3Leon keeps candidates with score <= 0.9: pass 0.9 to match the paper); a hit whose similarity to a
higher-ranked kept hit exceeds `dedupe_sim_above` is dropped; `exclude_ids` removes given records (e.g. the query's
own document during training). When the filters leave fewer than k of the C candidates, C doubles, so results
equal filtering the full sorted list.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from t2i.retrieval.dual_encoder import DualEncoder, embed_images, embed_texts

_NEG = -np.inf


@dataclasses.dataclass(frozen=True)
class Index:
  """embeddings: float32 [N, D], unit rows; ids: [N] record ids (int or str)."""
  embeddings: np.ndarray
  ids: np.ndarray

  def __post_init__(self):
    e = self.embeddings
    if e.ndim != 2 or e.dtype != np.float32:
      raise ValueError(f"Index.embeddings must be float32 [N, D], got {e.dtype} {e.shape}")
    if self.ids.shape != (e.shape[0],):
      raise ValueError(f"Index.ids must be [N={e.shape[0]}], got shape {self.ids.shape}")

  def __len__(self) -> int:
    return self.embeddings.shape[0]

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  def save(self, path: str | pathlib.Path) -> None:
    np.savez(path, embeddings=self.embeddings, ids=self.ids)

  @classmethod
  def load(cls, path: str | pathlib.Path) -> "Index":
    with np.load(path, allow_pickle=False) as f:
      if "embeddings" not in f or "ids" not in f:
        raise ValueError(f"{path}: not an Index file (needs 'embeddings' and 'ids', has {sorted(f.files)})")
      return cls(np.asarray(f["embeddings"], np.float32), np.asarray(f["ids"]))


def normalize_rows(x: Any) -> np.ndarray:
  """float32 copy of `x` [..., D] with unit rows (zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-12)


def build_index(embed_fn: Callable[[list[Any]], Any], records: Iterable[Any], batch: int = 256,
                id_key: str = "id") -> Index:
  """Embeds `records` `batch` at a time with `embed_fn(list_of_records) -> [b, D]` and returns their Index
  (rows normalised). Ids are `record[id_key]` for mappings holding it, else the running record number."""
  if batch < 1:
    raise ValueError(f"build_index: batch={batch} must be >= 1")
  chunks: list[np.ndarray] = []
  ids: list[Any] = []
  buf: list[Any] = []

  def flush():
    out = np.asarray(embed_fn(list(buf)), np.float32)
    if out.ndim != 2 or out.shape[0] != len(buf) or (chunks and out.shape[1] != chunks[0].shape[1]):
      want = f"[{len(buf)}, {chunks[0].shape[1] if chunks else 'D'}]"
      raise ValueError(f"build_index: embed_fn returned shape {out.shape} for {len(buf)} records, expected {want}")
    chunks.append(normalize_rows(out))
    buf.clear()

  for rec in records:
    ids.append(rec[id_key] if isinstance(rec, dict) and id_key in rec else len(ids))
    buf.append(rec)
    if len(buf) == batch:
      flush()
  if buf:
    flush()
  if not chunks:
    raise ValueError("build_index: records is empty")
  return Index(np.concatenate(chunks), np.asarray(ids))


@functools.partial(jax.jit, static_argnames=("c",))
def _merge_block(q, block, n_valid, offset, best_s, best_i, thr, c: int):
  """Scores a database block, masks padding rows and near-duplicates of the query, merges into the running top-c."""
  s = jnp.dot(q, block.T, precision=jax.lax.Precision.HIGHEST)  # [Q, B]
  rows = jnp.arange(block.shape[0])
  s = jnp.where((rows < n_valid)[None] & (s <= thr), s, -jnp.inf)
  all_s = jnp.concatenate([best_s, s], axis=1)
  all_i = jnp.concatenate([best_i, jnp.broadcast_to(offset + rows, s.shape).astype(best_i.dtype)], axis=1)
  top_s, pos = jax.lax.top_k(all_s, c)
  top_i = jnp.take_along_axis(all_i, pos, axis=1)
  return top_s, jnp.where(jnp.isfinite(top_s), top_i, -1)


def _candidates(db: np.ndarray, q: np.ndarray, c: int, thr: float, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-c rows by score among rows with score <= thr: ([Q, c] scores, -inf when none; [Q, c] rows, -1)."""
  n = db.shape[0]
  bs = min(block_size, n)
  best_s = jnp.full((q.shape[0], c), -jnp.inf, jnp.float32)
  best_i = jnp.full((q.shape[0], c), -1, jnp.int32)
  qj = jnp.asarray(q)
  for start in range(0, n, bs):
    block = db[start:start + bs]
    n_valid = block.shape[0]
    if n_valid < bs:  # keep one compiled shape: pad the last block
      block = np.concatenate([block, np.zeros((bs - n_valid, db.shape[1]), np.float32)])
    best_s, best_i = _merge_block(qj, jnp.asarray(block), n_valid, start, best_s, best_i,
                                  jnp.float32(thr), c)
  return np.asarray(best_s), np.asarray(best_i)


def _filter(db: np.ndarray, ids: np.ndarray, cand_s: np.ndarray, cand_i: np.ndarray, k: int,
            dedupe: float | None, excl: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies exclude_ids and greedy de-duplication in rank order; returns ([Q, k] rows, [Q, k] scores, found [Q])."""
  valid = cand_i >= 0
  safe = np.where(valid, cand_i, 0)
  if excl is not None:
    valid &= ~np.any(ids[safe][:, :, None] == excl[:, None, :], axis=-1)
  keep = np.zeros_like(valid)
  if dedupe is None:
    keep = valid
  else:
    emb = db[safe]  # [Q, C, D]
    sim = np.einsum("qcd,qed->qce", emb, emb)
    for j in range(cand_i.shape[1]):
      dup = np.any(keep[:, :j] & (sim[:, j, :j] > dedupe), axis=1)
      keep[:, j] = valid[:, j] & ~dup
  found = keep.sum(1)
  rank = np.cumsum(keep, axis=1) - 1
  out_i = np.full((cand_i.shape[0], k), -1, np.int64)
  out_s = np.full((cand_i.shape[0], k), _NEG, np.float32)
  qq, cc = np.nonzero(keep & (rank < k))
  out_i[qq, rank[qq, cc]] = cand_i[qq, cc]
  out_s[qq, rank[qq, cc]] = cand_s[qq, cc]
  return out_i, out_s, found


def search(index: Index, queries: Any, k: int, exclude_sim_above: float | None = 0.95,
           dedupe_sim_above: float | None = 0.98, exclude_ids: Any = None, block_size: int = 65536,
           query_block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k inner-product search of `queries` [Q, D] (normalised here) in `index`.

  Returns (rows int64 [Q, k] into the index, best first, -1 where fewer than k hits survive the filters;
  scores float32 [Q, k] = cosine similarity to the query, -inf at padding). `exclude_ids`: None, [Q] or [Q, m]
  record ids to skip per query (pad ragged rows with a value that is no id). Thresholds None disable a filter.
  """
  q = normalize_rows(queries)
  if q.ndim != 2 or q.shape[1] != index.dim:
    raise ValueError(f"search: queries must be [Q, {index.dim}], got shape {np.shape(queries)}")
  if k < 1:
    raise ValueError(f"search: k={k} must be >= 1")
  if block_size < 1 or query_block < 1:
    raise ValueError(f"search: block_size={block_size} and query_block={query_block} must be >= 1")
  excl = None
  if exclude_ids is not None:
    excl = np.asarray(exclude_ids)
    excl = excl[:, None] if excl.ndim == 1 else excl
    if excl.ndim != 2 or excl.shape[0] != q.shape[0]:
      raise ValueError(f"search: exclude_ids must be [Q={q.shape[0]}] or [Q, m], got shape {np.shape(exclude_ids)}")
  thr = np.inf if exclude_sim_above is None else float(exclude_sim_above)
  db, n = index.embeddings, len(index)
  out_i = np.full((q.shape[0], k), -1, np.int64)
  out_s = np.full((q.shape[0], k), _NEG, np.float32)
  for start in range(0, q.shape[0], query_block):
    rows = np.arange(start, min(start + query_block, q.shape[0]))
    c = min(n, k + (0 if excl is None else excl.shape[1]) + max(k, 8))
    while rows.size:
      cand_s, cand_i = _candidates(db, q[rows], c, thr, block_size)
      sub_excl = None if excl is None else excl[rows]
      oi, os_, found = _filter(db, index.ids, cand_s, cand_i, k, dedupe_sim_above, sub_excl)
      out_i[rows], out_s[rows] = oi, os_
      # A row may be missing hits only if its candidate list was full (more rows exist beyond it).
      more = (found < k) & (cand_i[:, -1] >= 0)
      if c >= n:
        break
      rows, c = rows[more], min(n, 2 * c)
  return out_i, out_s


def clip_score(model: DualEncoder, params: Any, ids: Any, images: Any, weight: float = 100.0) -> np.ndarray:
  """weight * max(cos(text, image), 0) for matching pairs ids [B, L], images [B, H, W, 3] in [-1, 1] -> [B]."""
  ids, images = jnp.asarray(ids), jnp.asarray(images)
  if ids.ndim != 2 or images.ndim != 4 or ids.shape[0] != images.shape[0]:
    raise ValueError(f"clip_score: need ids [B, L] and images [B, H, W, 3] with the same B, got {ids.shape} and "
                     f"{images.shape}")
  img, txt = embed_images(model, params, images), embed_texts(model, params, ids)
  return np.asarray(weight * jnp.maximum(jnp.sum(img * txt, -1), 0.0))


def rerank(model: DualEncoder, params: Any, prompt_ids: Any, candidate_images: Any) -> np.ndarray:
  """Best-of-N re-ranking: candidate order (best first) by text-image cosine similarity.

  prompt_ids [L] with candidate_images [N, H, W, 3] -> order [N]; or prompt_ids [B, L] with candidate_images
  [B, N, H, W, 3] -> order [B, N].
  """
  ids, imgs = np.asarray(prompt_ids), np.asarray(candidate_images)
  single = ids.ndim == 1
  if single:
    ids, imgs = ids[None], imgs[None]
  if ids.ndim != 2 or imgs.ndim != 5 or imgs.shape[0] != ids.shape[0]:
    raise ValueError(f"rerank: need prompt_ids [L] with candidate_images [N, H, W, 3], or [B, L] with "
                     f"[B, N, H, W, 3]; got {np.shape(prompt_ids)} and {np.shape(candidate_images)}")
  b, n = imgs.shape[:2]
  txt = embed_texts(model, params, jnp.asarray(ids))  # [B, D]
  img = embed_images(model, params, jnp.asarray(imgs.reshape((b * n,) + imgs.shape[2:]))).reshape(b, n, -1)
  scores = np.asarray(jnp.einsum("bnd,bd->bn", img, txt))
  order = np.argsort(-scores, axis=1, kind="stable")
  return order[0] if single else order


__all__ = ("Index", "build_index", "search", "rerank", "clip_score", "normalize_rows")
