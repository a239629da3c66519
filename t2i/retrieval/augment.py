"""Retrieval-augmented token sequences for the CM3Leon-style model: retrieved documents first, then the query.

  sp = vocab.special                                              # t2i.text.joint_vocab.JointVocab
  tokens, query_start = prepend_retrieved(vocab.encode_document([caption, codes]),
                                          [vocab.encode_document(d) for d in retrieved_docs], max_len=1024,
                                          break_id=sp.break_id, bos_id=sp.bos, eod_id=sp.eod, pad_id=sp.pad)

Layout: [<bos>] r_1 <break> r_2 <break> ... r_m <break> query [<eod>] [<pad> ...], where each document loses its own
<bos> / trailing <eod> (when those ids are given) so the whole row is one document whose parts are separated by
<break> (the CM3 transform never masks across <break>). Retrieved documents are kept whole, in the given order
(best first); when the row would exceed `max_len`, the lowest-ranked retrieved documents are dropped first, so an
image is never cut. Used the same way in training (query = the training pair) and at inference (query = the
prompt, which the model continues). Pure numpy; all special ids are arguments, so any vocabulary works.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _strip(doc: Sequence[int], bos_id: int | None, eod_id: int | None, pad_id: int | None,
           keep_eod: bool) -> tuple[list[int], bool, bool]:
  """(body, had_bos, had_eod) of a document with padding, a leading <bos> and a trailing <eod> removed."""
  toks = [int(t) for t in np.asarray(doc).reshape(-1)]
  if pad_id is not None:
    while toks and toks[-1] == pad_id:
      toks.pop()
  had_bos = bool(toks) and bos_id is not None and toks[0] == bos_id
  if had_bos:
    toks = toks[1:]
  had_eod = bool(toks) and eod_id is not None and toks[-1] == eod_id
  if had_eod and not keep_eod:
    toks = toks[:-1]
  return toks, had_bos, had_eod


def prepend_retrieved(query_doc_tokens: Sequence[int], retrieved_doc_token_lists: Sequence[Sequence[int]],
                      max_len: int, break_id: int, bos_id: int | None = None, eod_id: int | None = None,
                      pad_id: int | None = None, max_docs: int | None = None) -> tuple[np.ndarray, int]:
  """Builds [<bos>] retrieved (<break>-separated) <break> query as int32 tokens.

  query_doc_tokens: the query document (training pair, or the prompt at inference), e.g. from
    `JointVocab.encode_document`; its leading <bos> (if `bos_id` is given) moves to the front of the row and its
    tail (e.g. <eod>, or nothing for an open prompt) stays.
  retrieved_doc_token_lists: retrieved documents, best first; empty documents are skipped.
  max_len: row budget; whole retrieved documents are dropped from the end of the list until the row fits.
  max_docs: keep at most this many retrieved documents (None: all that fit).
  pad_id: when given, trailing padding is removed from inputs and the row is right-padded to `max_len`.
  Returns (tokens int32 [n] (n = max_len when padded), query_start = index of the query's first body token).
  Raises ValueError when the query alone does not fit.
  """
  if max_len < 1:
    raise ValueError(f"prepend_retrieved: max_len={max_len} must be >= 1")
  if max_docs is not None and max_docs < 0:
    raise ValueError(f"prepend_retrieved: max_docs={max_docs} must be >= 0")
  query, had_bos, _ = _strip(query_doc_tokens, bos_id, eod_id, pad_id, keep_eod=True)
  head = [bos_id] if had_bos else []
  if len(head) + len(query) > max_len:
    raise ValueError(f"prepend_retrieved: the query document alone ({len(head) + len(query)} tokens) exceeds "
                     f"max_len={max_len}")
  bodies = [b for b in (_strip(d, bos_id, eod_id, pad_id, keep_eod=False)[0] for d in retrieved_doc_token_lists)
            if b]
  if max_docs is not None:
    bodies = bodies[:max_docs]
  budget = max_len - len(head) - len(query)
  while bodies and sum(len(b) + 1 for b in bodies) > budget:  # +1: the <break> after each document
    bodies.pop()
  out = list(head)
  for b in bodies:
    out += b + [break_id]
  query_start = len(out)
  out += query
  if pad_id is not None:
    out += [pad_id] * (max_len - len(out))
  return np.asarray(out, np.int32), query_start
