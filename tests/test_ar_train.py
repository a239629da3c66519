"""The autoregressive family through the one loop: VQ stage, code dataset, CM3 stage (frozen VQ, resume), sampler."""
import json
import os

import jax
import numpy as np
import pytest

from experiments import cm3_shapes, vq_shapes
from t2i.train.loop import train


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("ar")
  data, vq, cm3 = str(base / "data"), str(base / "vq"), str(base / "cm3")
  c = vq_shapes.get_config("smoke")
  c.data.data_dir = data
  train(c, vq)
  c = cm3_shapes.get_config("smoke")
  c.data.data_dir = data
  c.init_from.workdir = vq
  c.total_steps = 2
  train(c, cm3)
  first = _metrics(cm3)
  c.total_steps = 4  # rerun with a longer schedule: resumes at step 2
  train(c, cm3)
  return {"data": data, "vq": vq, "cm3": cm3, "first": first}


def test_vq_stage_trains(runs):
  rows = _metrics(runs["vq"])
  assert [r["step"] for r in rows] == list(range(1, 7))
  psnr = [r["psnr"] for r in rows]
  assert np.all(np.isfinite(psnr)) and all(np.isfinite(r["perplexity"]) for r in rows)
  assert np.mean(psnr[-2:]) > psnr[0]
  assert sum(r["restarted_codes"] for r in rows) > 0   # dead-code restarts at steps 2 and 4
  from PIL import Image
  grid = np.asarray(Image.open(os.path.join(runs["vq"], "samples", "step_000006.png")))
  assert grid.shape == (2 * 32, 8 * 32, 3)   # batch images over their reconstructions


def test_code_dataset_matches_the_vq_encoder(runs):
  from data_pipelines.tfds import common
  from t2i.train import token_data
  ds = [d for d in os.listdir(os.path.join(runs["data"], "vq_tokens")) if not d.startswith(".")]
  assert len(ds) == 1 and "_s6_raw_" in ds[0]   # VQ run at step 6, raw params (the run has no EMA)
  src = common.load_source(runs["data"], "vq_tokens/" + ds[0], "train")
  assert len(src) == 64
  rec = src[0]
  assert np.asarray(rec["codes"]).shape == (4, 4)
  module, params, step, _ = token_data.load_vq(runs["vq"])
  assert step == 6
  shapes = common.load_source(runs["data"], "shapes_bench/train_32px_n64_seed0", "train")
  match = [r for r in (shapes[i] for i in range(len(shapes))) if common.text(r["id"]) == common.text(rec["id"])]
  from data_pipelines import image_decode
  x = image_decode.decode_rgb(match[0]["image"]).astype(np.float32)[None] / 127.5 - 1.0
  codes = module.apply({"params": params}, x, method="encode")
  np.testing.assert_array_equal(np.asarray(codes)[0], np.asarray(rec["codes"]))


def test_documents_and_prompts(runs):
  from data_pipelines import cm3 as cm3_lib, tokens
  from t2i.train import token_models
  c = cm3_shapes.get_config("smoke")
  tok = token_models.load_tokenizer(c, runs["cm3"])
  v = tok.vocab
  sp = v.special
  codes = np.arange(16).reshape(4, 4)
  cfg = tokens.default_token_config()
  cfg.update(max_length=64, uncond_rate=1.0)
  doc = tokens.document("a red circle", codes, v, cfg, np.random.default_rng(0))
  assert doc[:4].tolist() == [sp.bos, sp.mask, sp.break_id, sp.image_start]
  assert cm3_lib.reconstruct(doc, sp).tolist() == v.encode_document(["a red circle", codes])
  ids = tok(["a red circle", ""])
  assert ids.shape == (2, c.tokenizer.max_length)
  assert ids[1, -4:].tolist() == [sp.bos, sp.mask, sp.break_id, sp.image_start] and ids[1, 0] == sp.pad
  assert ids[0, -2:].tolist() == [sp.break_id, sp.image_start]
  ds = "vq_tokens/" + next(d for d in os.listdir(os.path.join(runs["data"], "vq_tokens")) if not d.startswith("."))
  dcfg = tokens.default_token_config()
  dcfg.update(data_dir=runs["data"], dataset=ds, max_length=64, read_threads=1, prefetch_buffer_size=2)
  it = tokens.make_train_iterator(dcfg, v, 8)
  b = next(it)
  assert b["tokens"].shape == (8, 64) and b["tokens"].dtype == np.int32
  assert np.all(b["tokens"][b["loss_mask"] == 0] == sp.pad) and np.all(b["tokens"][:, 0] == sp.bos)
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(2)]
  it2 = tokens.make_train_iterator(dcfg, v, 8)
  it2.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(np.stack([next(it2)["tokens"] for _ in range(2)]), np.stack(want))


def test_cm3_stage_frozen_vq_resume_and_sampler(runs):
  rows = _metrics(runs["cm3"])
  assert [r["step"] for r in runs["first"]] == [1, 2]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]           # the rerun resumed at step 2
  assert rows[:2] == runs["first"]
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows)
  assert os.path.exists(os.path.join(runs["cm3"], "tokenizer", "joint_vocab.json"))
  assert os.path.exists(os.path.join(runs["cm3"], "samples", "step_000004.png"))
  from t2i.sample import Sampler
  from t2i.train import token_data
  s = Sampler(runs["cm3"])
  assert s.step == 4
  _, vq_params, _, _ = token_data.load_vq(runs["vq"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s.frozen["vq"], vq_params)
  imgs = s(["a red circle", "a blue square"], [0, 1], guidance_scale=2.0, sampler="top_p", num_steps=0)
  assert imgs.shape == (2, 32, 32, 3) and imgs.min() >= -1.0 and imgs.max() <= 1.0
  swapped = s(["a blue square", "a red circle"], [1, 0], guidance_scale=2.0, sampler="top_p", num_steps=0)
  np.testing.assert_allclose(swapped[::-1], imgs, atol=1e-5)   # image i depends on its own seed only
