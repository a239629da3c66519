"""CM3 transform: spans stay inside modality segments, reconstruct inverts transform, image-first flip."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.cm3 import (choose_spans, cm3_transform, flip_image_first, maskable_runs, pad_batch,
                                reconstruct, split_segments)
from t2i.text.joint_vocab import SpecialIds

TEXT, CODES = 100, 50  # ids [0, 100) text, [100, 150) image codes
IDS = SpecialIds(*range(150, 158))


def random_doc(rs: np.random.RandomState) -> np.ndarray:
  out = [IDS.bos]
  for i in range(rs.randint(1, 5)):
    if i:
      out.append(IDS.break_id)
    if rs.rand() < 0.5:
      out += rs.randint(0, TEXT, rs.randint(1, 12)).tolist()
    else:
      out += [IDS.image_start, *rs.randint(TEXT, TEXT + CODES, 16).tolist(), IDS.image_end]
  return np.asarray(out + ([IDS.eod] if rs.rand() < 0.8 else []), np.int32)


def _segment_of(doc: np.ndarray) -> np.ndarray:
  return np.cumsum(doc == IDS.break_id)


def test_spans_never_cross_break_or_touch_structure():
  rs, rng = np.random.RandomState(0), np.random.default_rng(0)
  counts = []
  for _ in range(500):
    doc = random_doc(rs)
    spans = choose_spans(doc, IDS, rng, span_rate=1.5)
    counts.append(len(spans))
    seg = _segment_of(doc)
    for s, e in spans:
      assert e > s and seg[s] == seg[e - 1]
      assert not np.isin(doc[s:e], IDS.structural).any()
    flat = [i for s, e in spans for i in range(s, e)]
    assert len(flat) == len(set(flat))  # disjoint
  assert min(counts) >= 1 and max(counts) > 1


def test_reconstruct_inverts_transform():
  rs, rng = np.random.RandomState(1), np.random.default_rng(1)
  for _ in range(1000):
    doc = random_doc(rs)
    masked = cm3_transform(doc, IDS, rng, span_rate=1.0)
    n = int((masked == IDS.mask).sum())
    assert n >= 1 and (masked == IDS.infill).sum() == n and masked[-1] == IDS.eod
    assert len(masked) == len(doc) + 2 * n + 1
    np.testing.assert_array_equal(reconstruct(masked, IDS), doc)


def test_layout_of_a_single_span():
  doc = np.array([IDS.bos, 1, 2, 3, IDS.break_id, IDS.image_start, 120, 121, IDS.image_end, IDS.eod])
  rng = np.random.default_rng(0)
  masked = cm3_transform(doc, IDS, rng, span_rate=0.0)  # exactly one span
  k = int(np.flatnonzero(masked == IDS.mask)[0])
  i = int(np.flatnonzero(masked == IDS.infill)[0])
  span = masked[i + 1:-1]
  assert masked[i - 1] == IDS.eod  # the document's own <eod> stays in place before <infill>
  np.testing.assert_array_equal(np.concatenate([masked[:k], span, masked[k + 1:i]]), doc)


def test_no_maskable_tokens_and_errors():
  doc = np.array([IDS.bos, IDS.break_id, IDS.eod])
  np.testing.assert_array_equal(cm3_transform(doc, IDS, np.random.default_rng(0)), doc)
  with pytest.raises(ValueError, match="already contains"):
    cm3_transform(np.array([1, IDS.mask, 2]), IDS, np.random.default_rng(0))
  with pytest.raises(ValueError, match="1 <mask> tokens but 2"):
    reconstruct(np.array([1, IDS.mask, IDS.infill, 3, IDS.infill, 4, IDS.eod]), IDS)
  assert maskable_runs(np.array([IDS.bos, 1, 2, IDS.break_id, 3]), IDS) == [(1, 3), (4, 5)]


def test_image_first_flip():
  caption, image = [5, 6, 7], [IDS.image_start, 110, 111, 112, 113, IDS.image_end]
  doc = np.array([IDS.bos, *caption, IDS.break_id, *image, IDS.eod])
  flipped = flip_image_first(doc, IDS, np.random.default_rng(0), p=1.0)
  np.testing.assert_array_equal(flipped, [IDS.bos, *image, IDS.break_id, *caption, IDS.eod])
  np.testing.assert_array_equal(flip_image_first(doc, IDS, np.random.default_rng(0), p=0.0), doc)
  # only (text, image) pairs flip; image-first or longer documents are left alone
  np.testing.assert_array_equal(flip_image_first(flipped, IDS, np.random.default_rng(0), p=1.0), flipped)
  rng = np.random.default_rng(3)
  share = np.mean([flip_image_first(doc, IDS, rng, p=0.5)[1] == IDS.image_start for _ in range(400)])
  assert 0.4 < share < 0.6
  head, segs, tail = split_segments(flipped, IDS)
  assert head == [IDS.bos] and tail == [IDS.eod] and segs == [image, caption]
  masked = cm3_transform(flipped, IDS, rng)
  np.testing.assert_array_equal(reconstruct(masked, IDS), flipped)


def test_pad_batch():
  tokens, mask = pad_batch([np.array([1, 2, 3]), np.array([4])], 4, IDS.pad)
  np.testing.assert_array_equal(tokens, [[1, 2, 3, IDS.pad], [4, IDS.pad, IDS.pad, IDS.pad]])
  np.testing.assert_array_equal(mask.sum(1), [3, 1])
  with pytest.raises(ValueError, match="document 0 has 3"):
    pad_batch([np.array([1, 2, 3])], 2, 0)
