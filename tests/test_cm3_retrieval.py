"""Retrieval-augmented CM3 through the one loop: dual-encoder stage, cached index + neighbour table (self and
near-duplicates excluded, de-duplicated), documents prepended whole and deterministically, a retrieval_k=1 smoke
run that trains and samples, and benchmarks.cm3_eval rows."""
import json
import os
import shutil

import numpy as np
import pytest

from experiments import cm3_shapes, dual_encoder_shapes, vq_shapes
from t2i.train.loop import train
from tests.test_ar_train import _metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("rar")
  data, vq, de, cm3 = (str(base / n) for n in ("data", "vq", "de", "cm3"))
  c = vq_shapes.get_config("smoke")
  c.data.data_dir = data
  c.total_steps, c.ckpt_every, c.sample_every = 2, 2, 0  # only its codes are needed here
  train(c, vq)
  c = dual_encoder_shapes.get_config("smoke")
  c.data.data_dir = data
  train(c, de)
  c = cm3_shapes.get_config("smoke_retrieval")
  c.data.data_dir = data
  c.init_from.workdir = vq
  c.data.retrieval_workdir = de
  train(c, cm3)
  return {"data": data, "vq": vq, "de": de, "cm3": cm3, "base": base}


def _real(runs):
  return "shapes_bench/train_32px_n64_seed0"


def test_dual_encoder_stage(runs):
  from t2i.retrieval import embed_documents, store
  rows = _metrics(runs["de"])
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and 0 <= r["t2i_top1"] <= 1 for r in rows)
  module, params, step, tok, _ = store.load_dual_encoder(runs["de"])
  assert step == 4
  ids = tok(["a red circle", "two blue squares"])
  assert ids.shape == (2, 32) and ids[0, 0] == tok.bos_token_id
  e = np.asarray(embed_documents(module, params, np.zeros((2, 32, 32, 3), np.float32), ids))
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="dual_encoder"):
    store.load_dual_encoder(runs["vq"])


def test_neighbours_exclude_self_near_duplicates_and_dedupe(runs, tmp_path):
  from t2i.retrieval import store
  index = store.build_document_index(runs["de"], runs["data"], _real(runs), 32)
  assert index.startswith(os.path.join(runs["data"], "retrieval_index"))
  assert store.build_document_index(runs["de"], runs["data"], _real(runs), 32) == index  # cached
  # Plant an exact twin of document 0 (id "dup0") and of document 2 (as document 3).
  with np.load(index) as f:
    arrays = {k: np.array(f[k]) for k in f.files}
  for key in ("embeddings", "image_embeddings", "text_ids"):
    arrays[key][1], arrays[key][3] = arrays[key][0], arrays[key][2]
  arrays["ids"] = arrays["ids"].astype(object)
  arrays["ids"][1] = "dup0"
  arrays["ids"] = arrays["ids"].astype(str)
  planted = str(tmp_path / "planted.npz")
  np.savez(planted, **arrays)
  thr, dedupe, k = 0.95, 0.98, 3
  table = store.build_neighbours(planted, runs["de"], k=k, variants=1, exclude_above=thr, dedupe_above=dedupe,
                                 query_dropout=0.0)[:, 0]
  assert table.shape == (64, k) and np.all(table >= 0)
  emb = arrays["embeddings"]
  sims = emb @ emb.T
  for i, row in enumerate(table):
    assert i not in row                                   # never the document itself
    assert np.all(sims[i, row] <= thr + 1e-5)             # nor a near-duplicate of it
    assert not {2, 3} <= set(row.tolist())                # twins are de-duplicated
    assert np.all(sims[np.ix_(row, row)][~np.eye(k, dtype=bool)] <= dedupe + 1e-5)
    # Brute force: best-first, greedily filtered.
    want = []
    for j in np.argsort(-sims[i], kind="stable"):
      if j != i and sims[i, j] <= thr and all(sims[j, w] <= dedupe for w in want):
        want.append(j)
    np.testing.assert_array_equal(row, want[:k])
  assert 1 not in table[0] and 0 not in table[1]          # the planted twin of the query is skipped
  # With query dropout, the variants are different draws (and the table is cached under its settings).
  t = store.build_neighbours(planted, runs["de"], k=k, variants=3, exclude_above=thr, dedupe_above=dedupe,
                             query_dropout=0.5)
  assert t.shape == (64, 3, k) and not np.array_equal(t[:, 0], t[:, 1])
  assert os.path.exists(store.neighbours_path(planted, k, 3, thr, dedupe, 0.5))
  np.testing.assert_array_equal(store.build_neighbours(planted, runs["de"], k=k, variants=3, exclude_above=thr,
                                                       dedupe_above=dedupe, query_dropout=0.5), t)


def test_documents_prepended_whole_and_deterministic(runs):
  from data_pipelines import tokens
  from data_pipelines.tfds import common
  from t2i.sample import load_config
  from t2i.train import token_models
  config = load_config(runs["cm3"])
  tok = token_models.load_tokenizer(config, runs["cm3"])
  v, sp = tok.vocab, tok.vocab.special
  ds = "vq_tokens/" + next(d for d in os.listdir(os.path.join(runs["data"], "vq_tokens")) if not d.startswith("."))
  nbrs = token_models.training_neighbours(config, _real(runs), ds)
  src = common.load_source(runs["data"], ds, "train")
  cfg = tokens.default_token_config()
  cfg.update({k: val for k, val in config.data.to_dict().items() if k in cfg})
  cfg.update(dataset=ds, read_threads=1, prefetch_buffer_size=2)
  for pos in range(12):
    rec = src[pos % len(src)]
    rid = common.text(rec["id"])
    rows = tokens.retrieved_rows(rid, pos, cfg, nbrs)
    assert len(rows) == 1 and common.text(src[rows[0]]["id"]) != rid
    out = tokens._process(rec, pos, cfg, v, src, nbrs)  # pylint: disable=protected-access
    r = src[rows[0]]
    retrieved = v.encode_document([common.text(r["caption"]), np.asarray(r["codes"])])
    prefix = [sp.bos] + retrieved[1:-1] + [sp.break_id]   # whole document (image included), then <break>
    assert out["tokens"][:len(prefix)].tolist() == prefix
    query = tokens.document(common.text(rec["caption"]), np.asarray(rec["codes"]), v, cfg,
                            np.random.default_rng([cfg.seed, pos]))
    n = len(prefix) + len(query) - 1
    assert out["tokens"][len(prefix):n].tolist() == query[1:].tolist()
    assert np.all(out["tokens"][n:] == sp.pad) and out["loss_mask"][:n].min() > 0 and out["loss_mask"][n:].max() == 0
    again = tokens._process(rec, pos, cfg, v, src, nbrs)  # pylint: disable=protected-access
    np.testing.assert_array_equal(again["tokens"], out["tokens"])
  it1 = tokens.make_train_iterator(cfg, v, 8, source=src, neighbours=nbrs)
  it2 = tokens.make_train_iterator(cfg, v, 8, source=src, neighbours=nbrs)
  next(it1), next(it2)
  state = json.loads(json.dumps(it1.get_state()))
  want = next(it1)["tokens"]
  np.testing.assert_array_equal(next(it2)["tokens"], want)
  it3 = tokens.make_train_iterator(cfg, v, 8, source=src, neighbours=nbrs)
  it3.set_state(state)
  np.testing.assert_array_equal(next(it3)["tokens"], want)   # exact resume
  assert np.sum(want == sp.image_start, axis=1).min() == 2   # retrieved image + own image in every row
  with pytest.raises(ValueError, match="retrieval_workdir"):
    tokens.make_train_iterator(cfg, v, 8, source=src)


def test_retrieval_smoke_run_trains_and_samples(runs):
  from t2i.sample import Sampler
  rows = _metrics(runs["cm3"])
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
  assert os.path.exists(os.path.join(runs["cm3"], "samples", "step_000004.png"))
  s = Sampler(runs["cm3"])
  tok = s.tokenize
  assert tok.retrieval_k == 1
  sp = tok.vocab.special
  ids, uncond = tok(["a red circle"]), tok.unconditional(["a red circle"])
  real = ids[0][ids[0] != sp.pad].tolist()
  assert real[-2:] == [sp.break_id, sp.image_start] and real.count(sp.image_start) == 2
  assert real.count(sp.image_end) == 1                      # the retrieved document's image, whole
  doc = tok.documents(["a red circle"])[0][0]
  body = tok.vocab.encode_document([doc[0], doc[1]])[1:-1]
  assert real[1:1 + len(body)] == body
  u = uncond[0][uncond[0] != sp.pad].tolist()
  assert u[:len(body) + 2] == real[:len(body) + 2] and u[-4:] == [sp.break_id, sp.mask, sp.break_id, sp.image_start]
  plain = tok.with_retrieval(0)(["a red circle"])[0]
  assert plain[plain != sp.pad].tolist() == [sp.bos] + tok.vocab.encode_text("a red circle") + [sp.break_id,
                                                                                                   sp.image_start]
  imgs = s(["a red circle", "a blue square"], [0, 1], guidance_scale=2.0, sampler="top_p", num_steps=0)
  assert imgs.shape == (2, 32, 32, 3) and np.isfinite(imgs).all()


def test_cm3_eval_rows(runs, capsys):
  from benchmarks import cm3_eval
  rows = cm3_eval.score_workdir(runs["cm3"], ["topp", "topp_nocfg", "cdk"], [0, 1], num_per_family=1, seed=0,
                                batch=6)
  assert [(r["retrieval_k"], r["setting"]) for r in rows] == [(0, "topp"), (0, "topp_nocfg"), (0, "cdk"),
                                                              (1, "topp"), (1, "topp_nocfg"), (1, "cdk")]
  for r in rows:
    assert r["num"] == 6 and 0.0 <= r["overall"] <= 1.0 and len(r["per_family"]) == 6
    assert r["step"] == 4 and r["seconds"] >= 0
    assert (r["retrieved_caption_exact"] is None) == (r["retrieval_k"] == 0)
    # per-sample outcomes in prompt order, one string per family, agreeing with the family accuracies
    assert {f: len(p) for f, p in r["passed"].items()} == {f: 1 for f in r["per_family"]}
    assert {f: float(p) for f, p in r["passed"].items()} == r["per_family"]
  assert [r["guidance"] for r in rows[:3]] == [2.0, 1.0, 2.0] and rows[2]["sampler"] == "cd_k"
  # The command line: one JSON line per (retrieval, setting), also appended to --out.
  from absl import flags
  out = str(runs["base"] / "scores.jsonl")
  flags.FLAGS([  # the script's flags, parsed as its command line would be
      "cm3_eval", f"--workdirs={runs['cm3']}", "--settings=cdk", "--retrieval=1", "--num_per_family=1", "--seed=0",
      "--batch=6", "--step=4", f"--out={out}"])
  try:
    cm3_eval.main(["cm3_eval"])
  finally:
    flags.FLAGS.unparse_flags()
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert line["setting"] == "cdk" and line["retrieval_k"] == 1 and line["num"] == 6
  assert line["overall"] == rows[5]["overall"] and line["per_family"] == rows[5]["per_family"]  # same seeds
  with open(out) as f:
    assert json.loads(f.read().strip()) == line
  with pytest.raises(ValueError, match="unknown setting"):
    cm3_eval.parse_setting("beam", 3.0)
  assert cm3_eval.parse_setting("g=1.5", 3.0) == ("top_p", 1.5)
  # A run without a retriever cannot prepend documents.
  base = str(runs["base"] / "cm3_plain")
  shutil.copytree(runs["cm3"], base)
  with open(os.path.join(base, "config.json")) as f:
    conf = json.load(f)
  conf["data"]["retrieval_workdir"], conf["data"]["retrieval_k"], conf["sample"]["retrieval_k"] = "", 0, 0
  with open(os.path.join(base, "config.json"), "w") as f:
    json.dump(conf, f)
  with pytest.raises(ValueError, match="retrieval_workdir"):
    cm3_eval.score_workdir(base, ["topp"], [1], num_per_family=1, seed=0, batch=6)


def test_random_neighbours_control(runs):
  """`retrieval_neighbours="random"` (ablation: same documents per row, no relevance): k distinct other rows per
  document, seeded, no dual encoder needed; an unknown kind is an error naming the key."""
  from t2i.sample import load_config
  from t2i.train import token_models
  table = token_models.random_neighbours(50, 2, 3, seed=0)
  assert table.shape == (50, 3, 2) and table.min() >= 0 and table.max() < 50
  assert not (table == np.arange(50)[:, None, None]).any() and not (table[..., 0] == table[..., 1]).any()
  np.testing.assert_array_equal(table, token_models.random_neighbours(50, 2, 3, seed=0))
  config = load_config(runs["cm3"])
  ds = "vq_tokens/" + next(d for d in os.listdir(os.path.join(runs["data"], "vq_tokens")) if not d.startswith("."))
  config.data.retrieval_workdir = ""  # not needed for random neighbours
  config.data.retrieval_neighbours = "random"
  nbrs = token_models.training_neighbours(config, _real(runs), ds)
  assert len(nbrs) == 64 and {v.shape for v in nbrs.values()} == {(4, 1)}
  config.data.retrieval_neighbours = "nearest"
  with pytest.raises(ValueError, match="retrieval_neighbours"):
    token_models.training_neighbours(config, _real(runs), ds)
