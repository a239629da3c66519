"""Preference objectives in the one train loop: pair data (ties dropped, winner first), Diffusion-DPO / flow-DPO
with a frozen, sharded reference, a SPIN round's opponent-sampled data set and judged on-policy pairs."""
import io

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline
from data_pipelines.tfds import common, preference_pairs
from experiments import flux_shapes_dpo, sd_shapes, sd_shapes_dpo, sd_shapes_spin
from t2i.train import aot
from t2i.train import loop


def _png(rgb, size=8) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), rgb).save(buf, "PNG")
  return buf.getvalue()


def _metrics(workdir):
  import json
  return [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]


def test_pair_pipeline_drops_ties_and_puts_winner_first(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  white, black = (255, 255, 255), (0, 0, 0)
  table = pa.table({"caption": ["a", "b", "tie", "c"],
                    "jpg_0": [_png(white), _png(black), _png(white), _png(white)],
                    "jpg_1": [_png(black), _png(white), _png(black), _png(black)],
                    "label_0": [1.0, 0.0, 0.5, 1.0]})
  pq.write_table(table, tmp_path / "p.parquet")
  common.prepare(preference_pairs.PreferencePairs(config="parquet", parquet_files=[str(tmp_path / "p.parquet")],
                                                  data_dir=str(tmp_path / "d"), file_format="array_record"))
  cfg = ml_collections.ConfigDict(dict(data_dir=str(tmp_path / "d"), dataset="preference_pairs/parquet",
                                       image_size=8, caption_dropout=0.0, pair=True, max_length=0))
  it = pipeline.make_train_iterator(cfg, lambda t: np.zeros((len(t), 4), np.int32), 3)
  b = next(it)
  assert b["image"].shape == b["image_l"].shape == (3, 8, 8, 3)
  np.testing.assert_allclose(b["image"], 1.0)      # the preferred image is always the white one
  np.testing.assert_allclose(b["image_l"], -1.0)
  assert sorted(it.last_host_batch["caption"]) == ["a", "b", "c"] and it.skip_counts == {"tie": 1}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  wd = tmp_path_factory.mktemp("sft")
  loop.train(sd_shapes.get_config("smoke"), str(wd))
  return wd


def test_dpo_reference_frozen_and_sharded_like_policy(read_group, sft_run, tmp_path):
  cfg = sd_shapes_dpo.get_config("smoke")
  cfg.init_from.workdir = str(sft_run)
  cfg.mesh = dict(data=2, fsdp=2, tensor=2)
  s = aot.abstract_setup(cfg)
  pol, ref = s["shards"].params["unet"], s["f_shards"]["reference"]
  assert jax.tree.structure(pol) == jax.tree.structure(ref)
  specs = [(a.spec, b.spec) for a, b in zip(jax.tree.leaves(pol), jax.tree.leaves(ref))]
  assert all(a == b for a, b in specs) and any(any(x is not None for x in a) for a, _ in specs)
  loop.train(cfg, str(tmp_path))
  before, after = read_group(sft_run, "unet"), read_group(tmp_path, "reference", kind="frozen")
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=str(k))   # bit-identical
  policy = read_group(tmp_path, "unet", key="params")
  assert any(not np.array_equal(before[k], policy[k]) for k in before)  # the policy did move
  m = _metrics(tmp_path)
  assert all(0.0 <= r["implicit_acc"] <= 1.0 and np.isfinite(r["loss"]) for r in m)
  assert abs(m[0]["reward_margin"]) < 1e-3  # policy == reference at step 1 (up to float reassociation)


def test_flow_dpo_runs(tmp_path):
  rec = loop.train(flux_shapes_dpo.get_config("smoke"), str(tmp_path))
  assert np.isfinite(rec["loss"]) and 0.0 <= rec["implicit_acc"] <= 1.0


def test_spin_round_samples_opponent_and_trains(sft_run, tmp_path):
  from t2i.train import generated_pairs
  data_dir = str(tmp_path / "data")
  real = pipeline.prepare_shapes(data_dir, "train", num=6, size=32)
  name = generated_pairs.build_round(str(sft_run), data_dir, real, num=6, image_size=16, batch=4)
  src = common.load_source(data_dir, name)
  assert len(src) == 6
  for i in range(6):
    r = src[i]
    assert float(r["label_0"]) == 1.0
    assert np.asarray(Image.open(io.BytesIO(r["jpg_1"]))).shape == (16, 16, 3)
  assert generated_pairs.build_round(str(sft_run), data_dir, real, num=6, image_size=16) == name  # cached
  cfg = sd_shapes_spin.get_config()
  sd_shapes_dpo.use_smoke_models(cfg)
  cfg.init_from.workdir = str(sft_run)
  cfg.data = ml_collections.ConfigDict(dict(name="tfds", data_dir=data_dir, dataset=name, pair=True,
                                            caption_dropout=0.0))
  rec = loop.train(cfg, str(tmp_path / "spin"))
  assert np.isfinite(rec["loss"]) and "implicit_acc" in rec


def test_spin_round_name_tells_opponents_apart(tmp_path):
  """The round cache key: same folder name in other parents, or the same run trained further, is another round."""
  from t2i.train import generated_pairs
  a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
  for d in (a, b):
    (d / "checkpoints" / "150").mkdir(parents=True)
  name = lambda w: generated_pairs.round_name(str(w), "shapes_bench/train_32px", 1200, 0)
  assert name(a) == name(a) and name(a) != name(b)
  before = name(a)
  (a / "checkpoints" / "300").mkdir()
  assert name(a) != before and "st300" in name(a)
  assert all(ch.isalnum() or ch == "_" for ch in name(a)) and len(name(a)) <= 120


def test_pass_fail_pairs_and_judged_prompts():
  from data_pipelines.shapes import palette
  from data_pipelines.shapes.evalset import eval_prompts
  from t2i.train import generated_pairs
  rng = np.random.default_rng(0)
  assert generated_pairs.pass_fail_pairs([True] * 4, 4, rng) == []        # ties: no pair
  assert generated_pairs.pass_fail_pairs([False] * 4, 4, rng) == []
  assert sorted(generated_pairs.pass_fail_pairs([True, False, True, False], 4, rng)) == [(0, 1), (0, 3), (2, 1),
                                                                                           (2, 3)]
  few = generated_pairs.pass_fail_pairs([True, False, False, False], 2, rng)
  assert len(set(few)) == 2 and all(w == 0 and l in (1, 2, 3) for w, l in few)
  prompts = generated_pairs.judged_prompts(40, 0, 32)
  assert {p["family"] for p in prompts} == set(palette.FAMILIES) and 150 < len(prompts) < 240
  assert not any((o["color"], o["shape"]) in palette.HELD_OUT for p in prompts for o in p["spec"]["objects"])
  eval_texts = {p["prompt"] for p in eval_prompts(40, 1234, None, 32)}
  assert len({p["prompt"] for p in prompts} & eval_texts) < len(prompts) / 2  # another draw than the eval set's


def test_judged_pairs_are_pass_fail_samples_and_train(sft_run, tmp_path):
  """On-policy pairs: the start run samples K images per prompt, a judge marks each; pairs are (pass, fail) of one
  prompt, winner first; the set is cached, and `sd_shapes_dpo.py:judged` trains on it through the loop."""
  from t2i.train import generated_pairs
  data_dir = str(tmp_path / "data")
  judge = lambda im, spec: int(im.astype(np.int64).sum()) % 2 == 0  # an arbitrary pass / fail that both sides hit
  name, stats = generated_pairs.build_judged(str(sft_run), data_dir, num_per_family=3, samples=4, max_pairs=3,
                                             batch=8, judge=judge)
  src = common.load_source(data_dir, name)
  assert len(src) == stats["num_pairs"] == sum(stats["pairs"].values()) > 0
  assert stats["samples"] == 4 * stats["prompts"]
  prompts = {p["prompt"] for p in generated_pairs.judged_prompts(3, 0, 16)}
  for i in range(len(src)):
    r = src[i]
    w, l = (np.asarray(Image.open(io.BytesIO(r[k])).convert("RGB")) for k in ("jpg_0", "jpg_1"))
    assert w.shape == l.shape == (16, 16, 3) and float(r["label_0"]) == 1.0
    assert judge(w, None) and not judge(l, None) and common.text(r["caption"]) in prompts

  # winner="render": a clean render of the prompt's scene (it passes the real scorer) against each failing sample
  from data_pipelines.shapes.captions import parse_prompt
  from data_pipelines.shapes.scoring import score
  r_name, r_stats = generated_pairs.build_judged(str(sft_run), data_dir, 3, 4, 3, batch=8, judge=judge,
                                                 winner="render")
  r_src = common.load_source(data_dir, r_name)
  assert r_name != name and len(r_src) == r_stats["num_pairs"] > stats["num_pairs"] // 2
  for i in range(len(r_src)):
    w, l = (np.asarray(Image.open(io.BytesIO(r_src[i][k])).convert("RGB")) for k in ("jpg_0", "jpg_1"))
    assert w.shape == (32, 32, 3) and score(w, parse_prompt(common.text(r_src[i]["caption"])))["passed"]
    assert not judge(l, None)
  with pytest.raises(ValueError, match="config.data.winner"):
    generated_pairs.build_judged(str(sft_run), data_dir, 3, winner="real")

  def no_resampling(*_):
    raise AssertionError("the cached set should be reused")
  assert generated_pairs.build_judged(str(sft_run), data_dir, 3, 4, 3, judge=no_resampling)[0] == name
  with pytest.raises(ValueError, match="gave a .pass, fail. pair"):
    generated_pairs.build_judged(str(sft_run), data_dir, 1, 2, 1, seed=5, judge=lambda *_: True)
  cfg = sd_shapes_dpo.get_config("judged")
  sd_shapes_dpo.use_smoke_models(cfg)
  cfg.init_from.workdir = str(sft_run)
  cfg.data.update(data_dir=data_dir, prompts_per_family=3, max_pairs_per_prompt=3)
  rec = loop.train(cfg, str(tmp_path / "judged"))
  assert np.isfinite(rec["loss"]) and 0.0 <= rec["implicit_acc"] <= 1.0 and "anchor" in rec
