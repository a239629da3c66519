"""CM3 causal-masked documents (CM3 / CM3Leon objective) as pure numpy functions on token sequences.

  doc = vocab.encode_document([caption, codes])                       # <bos> text <break> image <eod>
  doc = flip_image_first(doc, vocab.special, rng, p=0.5)              # Chameleon: image-first half the time
  masked = cm3_transform(doc, vocab.special, rng)                     # train with plain next-token NLL
  assert reconstruct(masked, vocab.special).tolist() == doc.tolist()

Masked layout: the body with each span replaced in place by <mask>, then `<infill> span` per span in order, then
<eod>:   <bos> a <mask> circle <break> <image_start> ... <eod> <infill> red <eod>
Spans never contain a structural token (<break>, <bos>, <eod>, <image_start>, <image_end>, <mask>, <infill>,
<pad>), so they never cross a modality boundary (CM3Leon) and an image never starts mid-way. The number of spans is
max(1, Poisson(span_rate)) (mostly 1, as in CM3), capped by the maskable runs available.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from t2i.text.joint_vocab import SpecialIds


def maskable_runs(tokens: np.ndarray, ids: SpecialIds) -> list[tuple[int, int]]:
  """Maximal [start, end) runs of tokens that are not structural."""
  ok = ~np.isin(np.asarray(tokens), np.asarray(ids.structural))
  runs, start = [], None
  for i, v in enumerate(ok.tolist() + [False]):
    if v and start is None:
      start = i
    elif not v and start is not None:
      runs.append((start, i))
      start = None
  return runs


def choose_spans(tokens: np.ndarray, ids: SpecialIds, rng: np.random.Generator, span_rate: float = 1.0,
                 max_span_len: int | None = None) -> list[tuple[int, int]]:
  """Sorted disjoint [start, end) spans inside maskable runs: the run is picked in proportion to its length, the
  length uniformly in [1, min(run, max_span_len)], the start uniformly. Empty when nothing is maskable."""
  runs = maskable_runs(tokens, ids)
  n = max(1, int(rng.poisson(span_rate)))
  spans = []
  for _ in range(n):
    if not runs:
      break
    lens = np.array([e - s for s, e in runs], np.float64)
    s, e = runs.pop(int(rng.choice(len(runs), p=lens / lens.sum())))
    length = int(rng.integers(1, min(e - s, max_span_len or e - s) + 1))
    start = int(rng.integers(s, e - length + 1))
    spans.append((start, start + length))
    runs += [r for r in ((s, start), (start + length, e)) if r[1] > r[0]]
  return sorted(spans)


def apply_spans(tokens: np.ndarray, spans: Sequence[tuple[int, int]], ids: SpecialIds) -> np.ndarray:
  """The CM3 layout for given spans (see the module docstring)."""
  tokens = np.asarray(tokens)
  body, tail, pos = [], [], 0
  for s, e in spans:
    body += [tokens[pos:s], [ids.mask]]
    tail += [[ids.infill], tokens[s:e]]
    pos = e
  body.append(tokens[pos:])
  return np.concatenate([np.asarray(p, tokens.dtype) for p in body + tail + [[ids.eod]]])


def cm3_transform(tokens: np.ndarray, ids: SpecialIds, rng: np.random.Generator, span_rate: float = 1.0,
                  max_span_len: int | None = None) -> np.ndarray:
  """Masks span(s) of a single document (1-D ids) and moves them to the end after <infill>. A document without
  maskable tokens is returned unchanged."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"cm3_transform: expected one document [length], got shape {tokens.shape}")
  if np.isin(tokens, [ids.mask, ids.infill]).any():
    raise ValueError("cm3_transform: the document already contains <mask> or <infill>")
  spans = choose_spans(tokens, ids, rng, span_rate, max_span_len)
  return apply_spans(tokens, spans, ids) if spans else tokens.copy()


def reconstruct(masked: np.ndarray, ids: SpecialIds) -> np.ndarray:
  """Inverse of `cm3_transform`: puts every span back in place of its <mask>."""
  masked = np.asarray(masked)
  where = np.flatnonzero(masked == ids.infill)
  if where.size == 0:
    return masked.copy()
  body, tail = masked[:where[0]].tolist(), masked[where[0]:].tolist()
  if tail[-1] != ids.eod:
    raise ValueError("reconstruct: the infill part does not end with <eod>")
  spans, cur = [], None
  for t in tail[:-1]:
    if t == ids.infill:
      cur = []
      spans.append(cur)
    else:
      cur.append(t)
  if body.count(ids.mask) != len(spans):
    raise ValueError(f"reconstruct: {body.count(ids.mask)} <mask> tokens but {len(spans)} <infill> spans")
  out, k = [], 0
  for t in body:
    if t == ids.mask:
      out += spans[k]
      k += 1
    else:
      out.append(t)
  return np.asarray(out, masked.dtype)


def split_segments(tokens: np.ndarray, ids: SpecialIds) -> tuple[list[int], list[list[int]], list[int]]:
  """(prefix [<bos>] or [], segments split at <break>, suffix [<eod>] or [])."""
  t = np.asarray(tokens).tolist()
  head = t[:1] if t[:1] == [ids.bos] else []
  tail = t[-1:] if t[-1:] == [ids.eod] else []
  body = t[len(head):len(t) - len(tail)]
  segs, cur = [], []
  for v in body:
    if v == ids.break_id:
      segs.append(cur)
      cur = []
    else:
      cur.append(v)
  return head, segs + [cur], tail


def flip_image_first(tokens: np.ndarray, ids: SpecialIds, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """With probability p, a (text, image) document becomes (image, text); other documents are returned as is."""
  tokens = np.asarray(tokens)
  head, segs, tail = split_segments(tokens, ids)
  is_pair = (len(segs) == 2 and segs[0][:1] != [ids.image_start] and segs[1][:1] == [ids.image_start])
  if not is_pair or rng.random() >= p:
    return tokens.copy()
  return np.asarray(head + segs[1] + [ids.break_id] + segs[0] + tail, tokens.dtype)


def pad_batch(docs: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n, length] right-padded with pad_id, mask float32 [n, length]); raises on a longer doc."""
  out = np.full((len(docs), length), pad_id, np.int32)
  mask = np.zeros((len(docs), length), np.float32)
  for i, d in enumerate(docs):
    if len(d) > length:
      raise ValueError(f"pad_batch: document {i} has {len(d)} tokens, more than length={length}")
    out[i, :len(d)] = d
    mask[i, :len(d)] = 1.0
  return out, mask
