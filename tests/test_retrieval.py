"""Retrieval for the CM3Leon-style model: dual-encoder embeddings, query-token dropout, exact MIPS search with
near-duplicate / de-dup filters, save/load, a short contrastive run on shapes-bench, retrieved-document prepending."""
from __future__ import annotations

import io
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from t2i.retrieval import (DualEncoder, Index, build_index, clip_score, contrastive_loss, embed_documents,
                           embed_images, embed_texts, prepend_retrieved, rerank, search, token_dropout)

BOS, EOS = 98, 99  # toy vocabulary of 100 ids; EOS doubles as padding like the CLIP tokenizer


def _toy_model() -> DualEncoder:
  return DualEncoder(vocab_size=100, max_length=12, bos_id=BOS, eos_id=EOS, pad_id=EOS, embed_dim=16, text_width=32,
                     text_layers=1, text_heads=2, image_channels=(8, 16), image_width=32)


def _toy_ids(rs: np.random.RandomState, b: int, n: int = 12) -> np.ndarray:
  ids = np.full((b, n), EOS, np.int32)
  for i in range(b):
    m = rs.randint(1, n - 1)
    ids[i, 0], ids[i, 1:m + 1] = BOS, rs.randint(0, 98, m)
  return ids


def test_embeddings_unit_norm_and_document_formula():
  rs = np.random.RandomState(0)
  model = _toy_model()
  images = jnp.asarray(rs.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  ids = jnp.asarray(_toy_ids(rs, 4))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images, ids)
  assert isinstance(variables["params"]["logit_scale"], nn.LogicallyPartitioned)  # logical axis names carried
  kernel = variables["params"]["image_proj"]["dense"]["kernel"]
  assert kernel.names == ("embed", None)
  params = nn.meta.unbox(variables)["params"]
  np.testing.assert_allclose(float(params["logit_scale"]), np.log(1 / 0.07), rtol=1e-6)
  img, txt = embed_images(model, params, images), embed_texts(model, params, ids)
  doc = embed_documents(model, params, images, ids)
  for e in (img, txt, doc):
    assert e.shape == (4, 16)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-5)
  mean = (img + txt) / 2
  np.testing.assert_allclose(doc, mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-5)
  # Text tower pools at the first EOS (causal): whatever follows it does not matter.
  after = np.cumsum(np.asarray(ids) == EOS, axis=1) > 1
  noisy = np.where(after, 7, np.asarray(ids))
  np.testing.assert_allclose(embed_texts(model, params, jnp.asarray(noisy)), txt, atol=1e-5)
  loss, metrics = jax.jit(contrastive_loss, static_argnums=3)(params, {"images": images, "ids": ids},
                                                              jax.random.PRNGKey(1), model)
  assert np.isfinite(float(loss)) and set(metrics) >= {"loss", "i2t_top1", "t2i_top1"}
  np.testing.assert_allclose(float(metrics["logit_scale"]), 1 / 0.07, rtol=1e-5)
  order = rerank(model, params, ids[0], images)  # one prompt, N candidates -> [N]
  assert sorted(order.tolist()) == [0, 1, 2, 3]
  np.testing.assert_array_equal(order, np.argsort(-(np.asarray(img) @ np.asarray(txt[0])), kind="stable"))
  with pytest.raises(KeyError, match="ids"):
    contrastive_loss(params, {"images": images}, jax.random.PRNGKey(1), model)


def test_token_dropout_rate_specials_and_determinism():
  rs = np.random.RandomState(1)
  ids = _toy_ids(rs, 400, 12)
  key = jax.random.PRNGKey(3)
  replaced = np.asarray(token_dropout(jnp.asarray(ids), key, 0.2, pad_id=EOS, keep_special=(BOS,), replace_id=-5))
  droppable = (ids != EOS) & (ids != BOS)
  dropped = replaced == -5
  assert not np.any(dropped & ~droppable)  # never BOS, EOS or padding
  rate = dropped.sum() / droppable.sum()
  assert 0.17 < rate < 0.23, rate
  np.testing.assert_array_equal(replaced[~dropped], ids[~dropped])
  # Default mode removes the dropped tokens and compacts the row; same rng -> same drops.
  removed = np.asarray(token_dropout(jnp.asarray(ids), key, 0.2, pad_id=EOS, keep_special=(BOS,)))
  for row, rep, orig in zip(removed, replaced, ids):
    kept = orig[(rep != -5) & (orig != EOS)]
    np.testing.assert_array_equal(row[:len(kept)], kept)
    assert np.all(row[len(kept):] == EOS) and row[0] == BOS
  np.testing.assert_array_equal(removed, np.asarray(token_dropout(jnp.asarray(ids), key, 0.2, pad_id=EOS,
                                                                  keep_special=(BOS,))))
  other = np.asarray(token_dropout(jnp.asarray(ids), jax.random.PRNGKey(4), 0.2, pad_id=EOS, keep_special=(BOS,)))
  assert not np.array_equal(other, removed)
  np.testing.assert_array_equal(token_dropout(jnp.asarray(ids), key, 0.0, pad_id=EOS), ids)
  jitted = jax.jit(lambda x, k: token_dropout(x, k, 0.2, pad_id=EOS, keep_special=(BOS,)))
  np.testing.assert_array_equal(jitted(jnp.asarray(ids), key), removed)
  with pytest.raises(ValueError, match="rate"):
    token_dropout(jnp.asarray(ids), key, 1.0, pad_id=EOS)


def test_search_matches_brute_force_top_k():
  rs = np.random.RandomState(2)
  db = rs.randn(300, 8).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  index = Index(db, np.arange(300) + 1000)
  q = rs.randn(13, 8).astype(np.float32)
  rows, scores = search(index, q, k=7, exclude_sim_above=None, dedupe_sim_above=None, block_size=64,
                        query_block=5)
  sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ db.T
  want = np.argsort(-sims, axis=1)[:, :7]
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_allclose(scores, np.take_along_axis(sims, want, 1), atol=1e-5)
  # Threshold filter == brute force over rows with similarity <= threshold.
  rows, scores = search(index, q, k=5, exclude_sim_above=0.5, dedupe_sim_above=None, block_size=64)
  masked = np.where(sims <= 0.5, sims, -np.inf)
  np.testing.assert_array_equal(rows, np.argsort(-masked, axis=1)[:, :5])
  assert np.all(scores <= 0.5)


def test_search_filters_padding_and_save_load(tmp_path):
  e = np.eye(4, dtype=np.float32)
  near = np.array([1.0, 0.6, 0, 0], np.float32)
  db = np.stack([e[0], e[0], near / np.linalg.norm(near), e[1], e[1], e[2]])  # rows 0/1 = query, 3/4 twins
  index = Index(db, np.array(["a", "b", "c", "d", "e", "f"]))
  q = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0]], np.float32)
  rows, scores = search(index, q, k=4, exclude_sim_above=0.95, dedupe_sim_above=0.98)
  # Rows 0 and 1 equal the query (skipped); 2 is kept (sim 0.857); of the identical 3/4 only 3 survives; then 5.
  np.testing.assert_array_equal(rows, [[2, 3, 5, -1], [2, 3, 5, -1]])
  assert np.isneginf(scores[:, 3]).all() and np.allclose(scores[:, 0], 1 / np.sqrt(1.36))
  rows, _ = search(index, q, k=2, exclude_ids=["c", "d"])  # per-query id exclusion
  np.testing.assert_array_equal(rows, [[3, 5], [2, 4]])  # 4 stays: its twin 3 was not kept
  rows, _ = search(index, q, k=3, exclude_sim_above=None, dedupe_sim_above=0.98)
  np.testing.assert_array_equal(rows, [[0, 2, 3]] * 2)  # only the filters decide
  # Many duplicates ahead of the answer: the candidate list grows until k distinct hits are found.
  dup = Index(np.concatenate([np.tile(e[1], (40, 1)), e[2:3], e[3:4]]), np.arange(42))
  rows, _ = search(dup, np.array([[0.0, 1, 0.5, 0.4]], np.float32), k=3, block_size=16)
  np.testing.assert_array_equal(rows, [[0, 40, 41]])
  path = tmp_path / "index.npz"
  index.save(path)
  back = Index.load(path)
  np.testing.assert_array_equal(back.embeddings, index.embeddings)
  np.testing.assert_array_equal(back.ids, index.ids)
  built = build_index(lambda recs: np.stack([r["x"] for r in recs]) * 3.0,
                      [{"id": i, "x": rs_row} for i, rs_row in enumerate(db)], batch=4)
  np.testing.assert_allclose(built.embeddings, db, atol=1e-6)
  np.testing.assert_array_equal(built.ids, np.arange(6))
  with pytest.raises(ValueError, match="queries"):
    search(index, np.ones((2, 3)), k=1)
  with pytest.raises(ValueError, match="embed_fn"):
    build_index(lambda recs: np.ones((1, 4)), [{"id": 0}, {"id": 1}], batch=2)


def _shapes_arrays(split_seed: int, num: int, tok) -> tuple[np.ndarray, np.ndarray]:
  from data_pipelines.shapes import generate_records
  from t2i.text.tokenizer import tokenize

  recs = list(generate_records("train", num, seed=split_seed, size=32))
  images = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in recs])
  ids = tokenize(tok, [r["caption"] for r in recs], max_length=32)  # shapes captions: <= 23 tokens with EOS
  return images.astype(np.float32) / 127.5 - 1.0, ids


def test_dual_encoder_learns_shapes_retrieval(tmp_path):
  """150 adam steps (lr 5e-4, 20 % query-token dropout), batch 32, 1024 train records at 32 px. Measured on 256
  held-out pairs (another seed; chance 0.004 top-1 / 0.020 top-5): text->image top-1 0.094, top-5 0.297 (via
  build_index + search), image->text top-1 0.098; loss 3.86 -> 1.49; best-of-4 re-ranking picks the true image for
  0.88 of prompts (chance 0.25). About 25 s on 2 busy CPU cores."""
  from t2i.text.tokenizer import build_clip_tokenizer, default_shapes_corpus

  t0 = time.time()
  tok = build_clip_tokenizer(default_shapes_corpus(), tmp_path / "tok")
  train_x, train_ids = _shapes_arrays(0, 1024, tok)
  test_x, test_ids = _shapes_arrays(1, 256, tok)
  model = DualEncoder(vocab_size=len(tok), max_length=32, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id, embed_dim=64, text_width=64, text_layers=2, text_heads=4)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(train_x[:2]), jnp.asarray(train_ids[:2]))
  params = nn.meta.unbox(params)["params"]
  opt = optax.adam(5e-4)  # 2e-3 barely moved the loss in 150 steps
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, images, ids, rng):
    (_, metrics), grads = jax.value_and_grad(contrastive_loss, has_aux=True)(
        params, {"images": images, "ids": ids}, rng, model)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  rs = np.random.RandomState(0)
  key = jax.random.PRNGKey(1)
  first = None
  for i in range(150):
    idx = rs.choice(len(train_x), 32, replace=False)
    params, opt_state, metrics = step(params, opt_state, train_x[idx], train_ids[idx], jax.random.fold_in(key, i))
    first = float(metrics["loss"]) if first is None else first
  last = float(metrics["loss"])

  img, txt = np.asarray(embed_images(model, params, test_x)), np.asarray(embed_texts(model, params, test_ids))
  index = build_index(lambda recs: img[recs], np.arange(256), batch=64)
  rows, _ = search(index, txt, k=5, exclude_sim_above=None, dedupe_sim_above=None)
  truth = np.arange(256)[:, None]
  t2i_top1, t2i_top5 = float(np.mean(rows[:, 0] == truth[:, 0])), float(np.mean(np.any(rows == truth, 1)))
  i2t_top1 = float(np.mean(np.argmax(img @ txt.T, axis=1) == truth[:, 0]))
  elapsed = time.time() - t0
  print(f"loss {first:.3f} -> {last:.3f}; held-out t2i top-1 {t2i_top1:.3f} top-5 {t2i_top5:.3f}, "
        f"i2t top-1 {i2t_top1:.3f}; {elapsed:.1f} s")
  assert last < first - 1.0
  assert t2i_top1 > 0.04 and t2i_top5 > 0.15 and i2t_top1 > 0.04  # 10x / 7x chance (0.004 / 0.020)
  # Best-of-4 re-ranking with the same towers: the true image (candidate 0) wins far above chance (25 %).
  cands = np.stack([test_x[(np.arange(4) + 4 * j) % 256] for j in range(64)])  # 256 images: shape already compiled
  order = rerank(model, params, test_ids[4 * np.arange(64)], cands)
  best = float(np.mean(order[:, 0] == 0))
  print(f"re-rank: true image first in {best:.2f} of 64 prompts")
  assert order.shape == (64, 4) and best > 0.5
  s, s_wrong = clip_score(model, params, test_ids, test_x), clip_score(model, params, test_ids, test_x[::-1])
  assert s.shape == (256,) and s.mean() > s_wrong.mean() + 5


def test_prepend_retrieved_layout_and_truncation():
  brk, bos, eod, pad = 90, 91, 92, 93
  query = [bos, 1, 2, brk, 3, 4, 5, eod]
  r1, r2, r3 = [bos, 10, brk, 11, 12, eod], [bos, 20, 21, eod, pad, pad], [bos, 30, eod]
  tokens, start = prepend_retrieved(query, [r1, r2, r3], max_len=32, break_id=brk, bos_id=bos, eod_id=eod)
  assert tokens.dtype == np.int32
  assert tokens.tolist() == [bos, 10, brk, 11, 12, brk, 20, 21, eod, pad, pad, brk, 30, brk, 1, 2, brk, 3, 4, 5,
                             eod]  # r2's padding is kept: no pad_id was given
  assert start == 14 and tokens[start:].tolist() == query[1:]
  tokens, start = prepend_retrieved(query, [r1, r2, r3], max_len=20, break_id=brk, bos_id=bos, eod_id=eod,
                                    pad_id=pad)
  # Budget 20: query (8) + r1 (5) + r2 (3) + r3 (2) = 18 fits once r2's padding is removed.
  assert tokens.tolist() == [bos, 10, brk, 11, 12, brk, 20, 21, brk, 30, brk, 1, 2, brk, 3, 4, 5, eod, pad, pad]
  tokens, start = prepend_retrieved(query, [r1, r2, r3], max_len=14, break_id=brk, bos_id=bos, eod_id=eod,
                                    pad_id=pad)
  assert tokens.tolist() == [bos, 10, brk, 11, 12, brk, 1, 2, brk, 3, 4, 5, eod, pad]  # lowest-ranked docs dropped
  assert start == 6
  tokens, start = prepend_retrieved(query, [r1, r2], max_len=9, break_id=brk, bos_id=bos, eod_id=eod)
  assert tokens.tolist() == query and start == 1  # no room for any retrieved document
  tokens, _ = prepend_retrieved(query, [r1, r2, r3], max_len=32, break_id=brk, bos_id=bos, eod_id=eod, max_docs=1)
  assert tokens.tolist() == [bos, 10, brk, 11, 12, brk] + query[1:]
  # Inference: an open prompt (no <eod>) stays open at the end of the row for the model to continue.
  prompt = [bos, 1, 2, brk]
  tokens, start = prepend_retrieved(prompt, [r3], max_len=16, break_id=brk, bos_id=bos, eod_id=eod)
  assert tokens.tolist() == [bos, 30, brk, 1, 2, brk]
  with pytest.raises(ValueError, match="max_len"):
    prepend_retrieved(query, [r1], max_len=5, break_id=brk)


def test_prepend_retrieved_with_joint_vocab(tmp_path):
  from t2i.text.joint_vocab import JointVocab, train_text_tokenizer
  from t2i.text.tokenizer import default_shapes_corpus

  train_text_tokenizer(default_shapes_corpus(), tmp_path, vocab_size=400)
  vocab = JointVocab.from_folder(tmp_path, num_image_codes=16, image_shape=(2, 2))
  sp = vocab.special
  rs = np.random.RandomState(0)
  docs = [["a red circle", rs.randint(0, 16, (2, 2))], ["two blue squares", rs.randint(0, 16, (2, 2))]]
  query = ["a small red circle", rs.randint(0, 16, (2, 2))]
  tokens, start = prepend_retrieved(vocab.encode_document(query), [vocab.encode_document(d) for d in docs],
                                    max_len=128, break_id=sp.break_id, bos_id=sp.bos, eod_id=sp.eod, pad_id=sp.pad)
  segs = vocab.decode_document(tokens)
  assert len(segs) == 6 and segs[0] == docs[0][0] and segs[2] == docs[1][0] and segs[4] == query[0]
  np.testing.assert_array_equal(segs[5], query[1])
  assert vocab.decode_document(tokens[start:])[0] == query[0]
