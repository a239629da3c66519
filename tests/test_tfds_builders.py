"""TFDS builders (array_record, no TensorFlow): shapes-bench, preference pairs (parquet / generator)."""
import io
import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

import data_pipelines
from data_pipelines import pipeline
from data_pipelines.tfds import common, preference_pairs, shapes_bench


def _png(value: int, size: int) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (size, size), (value % 256, 40, 90)).save(buf, "PNG")
  return buf.getvalue()


def _fake_records(split, num, seed=0, size=64, **_):
  for i in range(num):
    yield {"id": f"{split}-{seed}-{i:05d}", "image": _png(i + seed, size), "caption": f"a {split} thing {i}",
           "family": "single", "annotation": json.dumps({"objects": [{"index": i}]}), "mask": _png(0, size)}


def _fake_pairs(num, seed=0, size=64):
  for i in range(num):
    yield {"caption": f"pair {i}", "jpg_0": _png(i, size), "jpg_1": _png(i + 100, size), "label_0": float(i % 2)}


@pytest.fixture
def fake_shapes(monkeypatch):
  """Stands in for data_pipelines.shapes (the builder's contract: generate_records / preference_pairs)."""
  fake = types.ModuleType("data_pipelines.shapes")
  fake.generate_records, fake.preference_pairs = _fake_records, _fake_pairs
  monkeypatch.setitem(sys.modules, "data_pipelines.shapes", fake)
  monkeypatch.setattr(data_pipelines, "shapes", fake, raising=False)
  return fake


def test_shapes_bench_builder(tmp_path, fake_shapes):
  assert [c.name for c in shapes_bench.ShapesBench.BUILDER_CONFIGS] == ["pretrain", "curated", "train", "heldout"]
  name = pipeline.prepare_shapes(tmp_path, "curated", num=12, size=32, seed=3)
  assert name == "shapes_bench/curated_32px_n12_seed3"
  version_dir = common.dataset_dir(tmp_path, name)
  assert list(version_dir.glob("*.array_record-*"))
  source = common.load_source(tmp_path, name, "train")
  assert len(source) == 12
  expected = {r["id"]: r for r in _fake_records("curated", 12, seed=3, size=32)}
  got = {common.text(source[i]["id"]): source[i] for i in range(len(source))}
  assert set(got) == set(expected)
  for k, r in expected.items():
    assert got[k]["image"] == r["image"] and got[k]["mask"] == r["mask"]
    assert common.text(got[k]["caption"]) == r["caption"] and common.text(got[k]["family"]) == "single"
    assert json.loads(common.text(got[k]["annotation"])) == json.loads(r["annotation"])
  # Present: not regenerated (a changed generator is not called).
  fake_shapes.generate_records = lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated"))
  assert pipeline.prepare_shapes(tmp_path, "curated", num=12, size=32, seed=3) == name
  with pytest.raises(ValueError, match="split"):
    shapes_bench.shapes_config("validation")


def test_pipeline_on_shapes_bench(tmp_path, fake_shapes):
  cfg = pipeline.default_data_config()
  cfg.update(data_dir=str(tmp_path), dataset=pipeline.prepare_shapes(tmp_path, "train", num=10, size=32),
             image_size=32, max_length=3, caption_dropout=0.0)
  assert len(pipeline.make_source(cfg)) == 10
  it = pipeline.make_train_iterator(cfg, lambda c: np.zeros((len(c), 3), np.int32), global_batch_size=5)
  batch = next(it)
  assert batch["image"].shape == (5, 32, 32, 3)
  assert all(c.startswith("a train thing") for c in it.last_host_batch["caption"])
  cfg.split = "test"
  with pytest.raises(KeyError, match="no split 'test'"):
    pipeline.make_source(cfg)


def test_preference_pairs_from_shapes(tmp_path, fake_shapes):
  b = preference_pairs.PreferencePairs(config=preference_pairs.shapes_pairs_config(num=6, size=16),
                                       data_dir=str(tmp_path), file_format="array_record")
  common.prepare(b)
  source = common.load_source(tmp_path, "preference_pairs/shapes_16px_n6_seed0")
  rows = sorted((source[i] for i in range(6)), key=lambda r: common.text(r["caption"]))
  assert [common.text(r["caption"]) for r in rows] == [f"pair {i}" for i in range(6)]
  assert rows[1]["jpg_0"] == _png(1, 16) and rows[1]["jpg_1"] == _png(101, 16)
  assert [float(r["label_0"]) for r in rows] == [0.0, 1.0] * 3


def test_preference_pairs_from_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  table = pa.table({"caption": ["good one", "bad image", "tie"], "jpg_0": [_png(1, 8), b"junk", _png(3, 8)],
                    "jpg_1": [_png(2, 8), _png(2, 8), _png(4, 8)], "label_0": [1.0, 0.0, 0.5],
                    "extra": [1, 2, 3]})
  path = tmp_path / "pick.parquet"
  pq.write_table(table, path)
  b = preference_pairs.PreferencePairs(config="parquet", parquet_files=[str(path)], data_dir=str(tmp_path / "d"),
                                       file_format="array_record")
  common.prepare(b)
  assert b.skipped == [{"file": "pick.parquet:1", "reason": b.skipped[0]["reason"]}]
  assert b.skipped[0]["reason"].startswith("unreadable image")
  source = common.load_source(tmp_path / "d", "preference_pairs/parquet")
  rows = {common.text(source[i]["caption"]): source[i] for i in range(len(source))}
  assert set(rows) == {"good one", "tie"} and float(rows["tie"]["label_0"]) == 0.5
  assert rows["good one"]["jpg_0"] == _png(1, 8)

  pq.write_table(table.drop(["label_0"]), tmp_path / "bad.parquet")
  bad = preference_pairs.PreferencePairs(config="parquet", parquet_files=[str(tmp_path / "bad.parquet")],
                                         data_dir=str(tmp_path / "e"), file_format="array_record")
  with pytest.raises(KeyError, match="label_0"):
    common.prepare(bad)


def _real_shapes():
  try:
    from data_pipelines import shapes  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    pytest.skip(f"data_pipelines.shapes not importable yet: {e}")
  if not hasattr(shapes, "generate_records"):
    pytest.skip("data_pipelines.shapes.generate_records missing")
  return shapes


def test_real_shapes_generator_end_to_end(tmp_path):
  shapes = _real_shapes()
  name = pipeline.prepare_shapes(tmp_path, "train", num=16, size=32, seed=0)
  source = common.load_source(tmp_path, name)
  ref = {r["id"]: r for r in shapes.generate_records("train", 16, seed=0, size=32)}
  assert len(source) == 16
  for i in range(16):
    r = source[i]
    assert r["image"] == ref[common.text(r["id"])]["image"]
    assert common.text(r["caption"]) == ref[common.text(r["id"])]["caption"]
  cfg = pipeline.default_data_config()
  cfg.update(data_dir=str(tmp_path), dataset=name, image_size=32, max_length=2)
  batch = next(pipeline.make_train_iterator(cfg, lambda c: np.ones((len(c), 2), np.int32), 4))
  assert batch["image"].shape == (4, 32, 32, 3)


def test_real_shapes_preference_pairs(tmp_path):
  shapes = _real_shapes()
  b = preference_pairs.PreferencePairs(config=preference_pairs.shapes_pairs_config(num=4, size=32),
                                       data_dir=str(tmp_path), file_format="array_record")
  common.prepare(b)
  source = common.load_source(tmp_path, "preference_pairs/shapes_32px_n4_seed0")
  ref = sorted((r["caption"], r["jpg_0"], float(r["label_0"])) for r in shapes.preference_pairs(4, seed=0, size=32))
  got = sorted((common.text(r["caption"]), r["jpg_0"], float(r["label_0"])) for r in (source[i] for i in range(4)))
  assert got == ref


def test_concurrent_prepare_waits_then_reuses(tmp_path, fake_shapes):
  """Two runs building the same dataset at once: the second waits for the first's lock, then reuses its files."""
  import threading
  config = shapes_bench.shapes_config("train", num=6, size=16, seed=1)
  make = lambda: shapes_bench.ShapesBench(config=config, data_dir=str(tmp_path), file_format=common.FILE_FORMAT)
  version_dir = common.prepare(make())
  done = threading.Event()
  fake_shapes.generate_records = lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated"))
  with common.prepare_lock(version_dir):
    t = threading.Thread(target=lambda: (common.prepare(make()), done.set()))
    t.start()
    assert not done.wait(0.5)  # blocked on the lock held here
  t.join(10)
  assert done.is_set()


def test_prepare_lost_rename_to_complete_copy_is_success(tmp_path, fake_shapes, monkeypatch):
  """Another host finished the same dataset first (TFDS's final rename fails): reuse it; fail if it is incomplete."""
  config = shapes_bench.shapes_config("train", num=6, size=16, seed=2)
  builder = shapes_bench.ShapesBench(config=config, data_dir=str(tmp_path), file_format=common.FILE_FORMAT)

  def lose_rename(*_, **__):
    raise FileExistsError("Destination already exists")

  monkeypatch.setattr(builder, "download_and_prepare", lose_rename)
  with pytest.raises(FileExistsError):  # nothing complete there
    common.prepare(builder)
  done = common.prepare(shapes_bench.ShapesBench(config=config, data_dir=str(tmp_path),
                                                 file_format=common.FILE_FORMAT))
  assert common.prepare(builder) == done
  assert len(common.load_source(tmp_path, "shapes_bench/train_16px_n6_seed2")) == 6
