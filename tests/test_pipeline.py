"""Grain input pipeline: shapes, determinism, dropout, bucketing, process shards, resume, corrupt skips, mesh."""
import collections
import io
import json
import zlib

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline

L = 8


def hash_tokenizer(captions: list[str]) -> np.ndarray:
  ids = np.zeros((len(captions), L), np.int32)
  for i, c in enumerate(captions):
    words = c.split()[:L]
    ids[i, :len(words)] = [zlib.crc32(w.encode()) % 997 + 1 for w in words]
  return ids


def _png(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def make_records(n: int, shapes=((24, 24),), corrupt_every: int = 0) -> list[dict]:
  """Record i: a random image of shapes[i % len(shapes)] with caption "item i hxw" (or corrupt bytes)."""
  rng = np.random.default_rng(123)
  out = []
  for i in range(n):
    h, w = shapes[i % len(shapes)]
    if corrupt_every and i % corrupt_every == corrupt_every - 1:
      out.append({"image": b"\x89PNG broken", "caption": f"corrupt {i}".encode()})
    else:
      out.append({"image": _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
                  "caption": f"item {i} {h}x{w}".encode()})
  return out


def config(**kw):
  cfg = pipeline.default_data_config()
  cfg.update(dict(image_size=16, max_length=L, caption_dropout=0.0, read_threads=1, prefetch_buffer_size=8))
  cfg.update(kw)
  return cfg


def take(it, n):
  out = []
  for _ in range(n):
    b = next(it)
    out.append({**{k: np.asarray(v) for k, v in b.items()}, "caption": list(it.last_host_batch["caption"])})
  return out


def test_shapes_dtypes_and_range():
  records = make_records(12, shapes=((24, 24), (20, 40), (40, 20)))
  it = pipeline.make_train_iterator(config(), hash_tokenizer, 4, source=records)
  for b in take(it, 4):
    assert set(b) == {"image", "input_ids", "caption"}
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["input_ids"].shape == (4, L) and b["input_ids"].dtype == np.int32
    assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
    np.testing.assert_array_equal(b["input_ids"], hash_tokenizer(b["caption"]))


def test_center_crop_of_resized_image():
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, 10:30] = 255  # centre 20x20 white
  out = pipeline.resize_crop(img, (10, 10))
  assert out.shape == (10, 10, 3) and out[:, 1:-1].min() >= 250 and out.min() > 200
  left = pipeline.resize_crop(img, (10, 10), offset=(0.0, 0.0))
  assert left[:, :4].max() < 5  # left crop shows the black border


def test_determinism_and_repeat_forever():
  records = make_records(10)
  a = take(pipeline.make_train_iterator(config(), hash_tokenizer, 4, source=records, seed=3), 6)
  b = take(pipeline.make_train_iterator(config(), hash_tokenizer, 4, source=records, seed=3), 6)
  c = take(pipeline.make_train_iterator(config(), hash_tokenizer, 4, source=records, seed=4), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert x["caption"] == y["caption"]
  assert [x["caption"] for x in a] != [x["caption"] for x in c]
  captions = [cap for x in a for cap in x["caption"]]  # 24 samples = 2.4 epochs of 10
  assert sorted(captions[:10]) == sorted(r["caption"].decode() for r in records)  # epoch 1: a permutation
  assert captions[:10] != captions[10:20] and sorted(captions[:10]) == sorted(captions[10:20])  # reshuffled


def test_caption_dropout_rate():
  records = make_records(50)
  for p, lo, hi in ((0.0, 0, 0), (0.25, 0.18, 0.32), (1.0, 1, 1)):
    it = pipeline.make_train_iterator(config(caption_dropout=p), hash_tokenizer, 10, source=records)
    caps = [cap for b in take(it, 40) for cap in b["caption"]]
    rate = np.mean([cap == "" for cap in caps])
    assert lo <= rate <= hi, (p, rate)
  # Dropped captions tokenise to the empty-prompt ids.
  it = pipeline.make_train_iterator(config(caption_dropout=1.0), hash_tokenizer, 2, source=records)
  assert not next(it)["input_ids"].any()


def test_caption_tag_shuffle_keeps_leading_tags_and_prefix():
  records = [{"image": r["image"], "caption": f"subject {i}, red, large, left, plain background".encode()}
             for i, r in enumerate(make_records(8))]
  cfg = config(caption_shuffle=True, keep_tokens=1, caption_prefix="sks, ")
  caps = [c for b in take(pipeline.make_train_iterator(cfg, hash_tokenizer, 4, source=records, seed=1), 8)
          for c in b["caption"]]
  again = [c for b in take(pipeline.make_train_iterator(cfg, hash_tokenizer, 4, source=records, seed=1), 8)
           for c in b["caption"]]
  assert caps == again  # keyed by (seed, position): a resumed run sees the same captions
  for c in caps:
    tags = c.split(", ")
    assert tags[0] == "sks" and tags[1].startswith("subject ")  # prefix, then the kept leading tag
    assert sorted(tags[2:]) == ["large", "left", "plain background", "red"]
  orders = {tuple(c.split(", ")[2:]) for c in caps}
  assert len(orders) > 4  # 32 draws of 24 orders: really shuffled
  # An epoch's second visit of a record draws another order (the position, not the record, keys it).
  by_subject = collections.defaultdict(set)
  for c in caps:
    by_subject[c.split(", ")[1]].add(c)
  assert max(len(v) for v in by_subject.values()) > 1
  # Dropout still empties the whole caption, trigger word included.
  it = pipeline.make_train_iterator(config(caption_dropout=1.0, caption_prefix="sks, "), hash_tokenizer, 2,
                                    source=records)
  assert take(it, 1)[0]["caption"] == ["", ""]


def test_mixed_sources_repeat_and_prefix_per_source(tmp_path):
  small, large = make_records(3), make_records(7)[3:]  # 3 "subject" and 4 "class" records
  cfg = config(sources=[{"dataset": "subject", "repeats": 4, "caption_prefix": "sks "},
                        {"dataset": "class", "caption_prefix": ""}])
  mixed = pipeline.MixedSource([small, large], [4, 1])
  assert len(mixed) == 16 and mixed[11]["_source"] == 0 and mixed[12]["caption"] == large[0]["caption"]
  it = pipeline.make_train_iterator(cfg, hash_tokenizer, 4, source=mixed, seed=2)
  caps = [c for b in take(it, 8) for c in b["caption"]]  # 32 samples = 2 epochs of 16
  for epoch in (caps[:16], caps[16:]):
    counts = collections.Counter(epoch)
    assert all(counts[f"sks item {i} 24x24"] == 4 for i in range(3))  # each subject image 4x per epoch
    assert all(counts[f"item {i} 24x24"] == 1 for i in range(3, 7))  # class images once, without the prefix
  assert caps[:16] != caps[16:]  # reshuffled per epoch
  # Resume mid-epoch gives the same following batches.
  it = pipeline.make_train_iterator(cfg, hash_tokenizer, 4, source=mixed, seed=2)
  take(it, 3)
  state = it.get_state()
  rest = take(it, 3)
  it2 = pipeline.make_train_iterator(cfg, hash_tokenizer, 4, source=mixed, seed=2)
  it2.set_state(state)
  assert [b["caption"] for b in take(it2, 3)] == [b["caption"] for b in rest]
  # Bad entries name the key.
  with pytest.raises(ValueError, match=r"sources\[1\]: unknown key\(s\) \['repeat'\]"):
    pipeline.make_train_iterator(config(sources=[{"dataset": "a"}, {"dataset": "b", "repeat": 2}]),
                                 hash_tokenizer, 2, source=mixed)
  with pytest.raises(ValueError, match=r"sources\[0\].repeats=0"):
    pipeline.make_train_iterator(config(sources=[{"dataset": "a", "repeats": 0}]), hash_tokenizer, 2, source=mixed)
  with pytest.raises(ValueError, match="keep_tokens"):
    pipeline.make_train_iterator(config(keep_tokens=-1), hash_tokenizer, 2, source=small)


def test_mixed_sources_read_two_ingested_folders(tmp_path):
  from data_pipelines import ingest
  for name, n in (("subject", 2), ("class", 3)):
    src = tmp_path / name
    src.mkdir()
    for i in range(n):
      Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
      (src / f"{i}.txt").write_text(f"{name} {i}")
    ingest.ingest_folder(src, tmp_path / f"data_{name}", verbose=False)
  cfg = config(sources=[{"dataset": "image_folder", "data_dir": str(tmp_path / "data_subject"), "repeats": 3,
                         "caption_prefix": "sks "},
                        {"dataset": "image_folder", "data_dir": str(tmp_path / "data_class")}])
  it = pipeline.make_train_iterator(cfg, hash_tokenizer, 3, seed=0)
  caps = collections.Counter(c for b in take(it, 3) for c in b["caption"])  # one epoch: 2 x 3 + 3
  assert caps == {"sks subject 0": 3, "sks subject 1": 3, "class 0": 1, "class 1": 1, "class 2": 1}


def test_alpha_mask_is_cropped_and_flipped_like_the_image():
  """The mask rides with its image through resize, random crop and flip; records without one train everywhere."""
  rng = np.random.default_rng(0)
  records = []
  for i in range(6):
    h, w = (24, 40) if i % 2 else (40, 24)
    grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
    records.append({"image": _png(np.repeat(grey[..., None], 3, -1)), "caption": f"item {i}".encode(),
                    "mask": _png(grey) if i < 5 else b""})
  cfg = config(alpha_mask=True, random_crop=True, flip=True)
  for b in take(pipeline.make_train_iterator(cfg, hash_tokenizer, 3, source=records, seed=4), 4):
    assert b["mask"].shape == (3, 16, 16, 1) and b["mask"].dtype == np.float32
    for img, mask, cap in zip(b["image"], b["mask"], b["caption"]):
      if cap == "item 5":
        assert (mask == 1.0).all()
      else:
        np.testing.assert_allclose(mask[..., 0], (img[..., 0] + 1) / 2, atol=1 / 255 + 1e-6)
  assert "mask" not in next(pipeline.make_train_iterator(config(), hash_tokenizer, 3, source=records))
  with pytest.raises(ValueError, match="alpha_mask"):
    pipeline.make_train_iterator(config(alpha_mask=True, pair=True), hash_tokenizer, 2, source=records)


def test_flip_option():
  records = make_records(4)
  ref = take(pipeline.make_train_iterator(config(), hash_tokenizer, 4, source=records), 5)
  flip = take(pipeline.make_train_iterator(config(flip=True), hash_tokenizer, 4, source=records), 5)
  n_flipped = 0
  for r, f in zip(ref, flip):
    assert r["caption"] == f["caption"]
    for x, y in zip(r["image"], f["image"]):
      same, mirrored = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
      assert same or mirrored
      n_flipped += mirrored and not same
  assert 3 <= n_flipped <= 17  # about half of 20


def test_buckets():
  buckets = pipeline.aspect_buckets(32, step=8, max_aspect=2.0)
  assert (32, 32) in buckets and all(abs(h * w - 1024) <= 256 for h, w in buckets)
  assert all(max(h / w, w / h) <= 2.0 for h, w in buckets)
  assert pipeline.choose_bucket(100, 50, buckets) == buckets.index((48, 24))
  # Downscale only: a 40x32 image may not go to 48x24 (taller than the image); 32x32 fits.
  assert buckets[pipeline.choose_bucket(40, 33, [(48, 24), (32, 32)])] == (32, 32)

  shapes = ((64, 32), (32, 64), (36, 36), (60, 40))
  records = make_records(40, shapes=shapes)
  it = pipeline.make_train_iterator(config(buckets=buckets), hash_tokenizer, 4, source=records)
  seen = collections.Counter()
  for b in take(it, 20):
    hw = b["image"].shape[1:3]
    seen[hw] += 1
    for cap in b["caption"]:
      h, w = map(int, cap.split()[-1].split("x"))
      assert buckets[pipeline.choose_bucket(h, w, buckets)] == hw, (cap, hw)
  assert len(seen) >= 3


def test_process_shards_are_disjoint():
  records = make_records(24)
  shards = []
  for pi in range(3):
    it = pipeline.make_train_iterator(config(), hash_tokenizer, 6, source=records, process_index=pi,
                                      process_count=3)
    batches = take(it, 4)  # 4 x 2 per process x 3 processes = one epoch
    assert all(b["image"].shape[0] == 2 for b in batches)
    shards.append({cap for b in batches for cap in b["caption"]})
  assert all(len(s) == 8 for s in shards)
  assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
  assert set().union(*shards) == {r["caption"].decode() for r in records}


def test_resume_gives_identical_batches(tmp_path):
  shapes = ((64, 32), (32, 64), (36, 36))
  records = make_records(30, shapes=shapes, corrupt_every=7)
  cfg = config(buckets=pipeline.aspect_buckets(24, step=8), random_crop=True, flip=True, caption_dropout=0.2)
  it = pipeline.make_train_iterator(cfg, hash_tokenizer, 3, source=records, seed=5)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # must survive JSON (grain's checkpoint format)
  assert state["buffers"], "test should restore partly filled bucket buffers"
  skipped_at_save = it.skipped
  expected = take(it, 5)

  fresh = pipeline.make_train_iterator(cfg, hash_tokenizer, 3, source=records, seed=5)
  fresh.set_state(state)
  assert fresh.skipped == skipped_at_save
  for x, y in zip(expected, take(fresh, 5)):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    assert x["caption"] == y["caption"]
  assert fresh.skipped == it.skipped

  # Through grain's orbax checkpoint handler (JSON file per process).
  handler = grain.checkpoint.CheckpointHandler()
  import etils.epath
  handler.save(etils.epath.Path(tmp_path), item=fresh)
  after = take(fresh, 2)
  again = pipeline.make_train_iterator(cfg, hash_tokenizer, 3, source=records, seed=5)
  handler.restore(etils.epath.Path(tmp_path), item=again)
  for x, y in zip(after, take(again, 2)):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_corrupt_samples_skipped_and_counted():
  records = make_records(20, corrupt_every=4)  # 5 corrupt, 15 good
  it = pipeline.make_train_iterator(config(), hash_tokenizer, 5, source=records, seed=1)
  batches = take(it, 6)  # 30 good samples: all of epoch 1 was read
  assert not any(cap.startswith("corrupt") for b in batches for cap in b["caption"])
  last_pos = int(it.last_host_batch["pos"].max())
  order = grain.MapDataset.source(records).shuffle(seed=1).repeat(None)
  expected = sum(order[p]["caption"].startswith(b"corrupt") for p in range(last_pos + 1))
  assert 5 <= it.skipped == expected <= 10
  assert it.skip_counts == {"unreadable image": expected}


def test_quality_filter_skips_and_counts():
  # The hook sees the decoded image; samples below quality_min are skipped and counted by reason "quality".
  rng = np.random.default_rng(0)
  flat = lambda i: _png(np.full((24, 24, 3), (200, 200, 200), np.uint8))
  noisy = lambda i: _png(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
  kind = lambda i: "noisy" if i % 3 == 2 else "flat"
  records = [{"image": (noisy if kind(i) == "noisy" else flat)(i), "caption": f"{kind(i)} {i}".encode()}
             for i in range(24)]
  cfg = config(quality_filter="data_pipelines.shapes.scoring.palette_fidelity_score", quality_min=0.9)
  it = pipeline.make_train_iterator(cfg, hash_tokenizer, 4, source=records, seed=0)
  batches = take(it, 6)
  assert all(cap.startswith("flat") for b in batches for cap in b["caption"])
  assert it.skipped > 0 and set(it.skip_counts) == {"quality"}


def test_global_array_on_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  records = make_records(16)
  it = pipeline.make_train_iterator(config(), hash_tokenizer, 8, mesh=mesh, source=records)
  ref = pipeline.make_train_iterator(config(), hash_tokenizer, 8, source=records)
  batch, ref_batch = next(it), next(ref)
  for k in ("image", "input_ids"):
    assert isinstance(batch[k], jax.Array) and batch[k].shape[0] == 8
    assert batch[k].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    assert batch[k].sharding.mesh.shape == mesh.shape
    assert len(batch[k].addressable_shards) == 8
    assert batch[k].addressable_shards[0].data.shape[0] == 2  # 8 rows over data*fsdp = 4 (tensor replicates)
    np.testing.assert_array_equal(np.asarray(batch[k]), ref_batch[k])
  with pytest.raises(ValueError, match="data\\*fsdp"):
    pipeline.make_train_iterator(config(), hash_tokenizer, 6, mesh=mesh, source=records)


def test_bad_config_errors():
  records = make_records(4)
  with pytest.raises(ValueError, match="max_length"):
    next(pipeline.make_train_iterator(config(max_length=5), hash_tokenizer, 2, source=records))
  with pytest.raises(ValueError, match="process count"):
    pipeline.make_train_iterator(config(), hash_tokenizer, 3, source=records, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="buckets"):
    pipeline.make_train_iterator(config(buckets=[(16,)]), hash_tokenizer, 2, source=records)
  with pytest.raises(KeyError, match="image_key"):
    next(pipeline.make_train_iterator(config(image_key="jpg"), hash_tokenizer, 2, source=records))


WORKER_SCRIPT = '''
import json, sys
import numpy as np
from absl import app
from data_pipelines import pipeline
sys.path.insert(0, {tests!r})
from test_pipeline import config, hash_tokenizer, make_records, take


def main(_):
  records = make_records(12, corrupt_every=5)
  out = {{}}
  for workers in (0, 1):
    it = pipeline.make_train_iterator(config(worker_count=workers), hash_tokenizer, 4, source=records)
    take(it, 3)
    state = it.get_state()
    out[workers] = [b["caption"] for b in take(it, 2)]
    fresh = pipeline.make_train_iterator(config(worker_count=workers), hash_tokenizer, 4, source=records)
    fresh.set_state(state)
    out[f"resumed{{workers}}"] = [b["caption"] for b in take(fresh, 2)]
  print("RESULT", json.dumps(out))


if __name__ == "__main__":
  app.run(main)
'''


def test_worker_processes_match_in_process(tmp_path):
  """worker_count=1 (a grain process; needs absl flags, hence app.run in a subprocess) == worker_count=0."""
  import pathlib
  import subprocess
  import sys
  tests = pathlib.Path(__file__).resolve().parent
  script = tmp_path / "workers.py"
  script.write_text(WORKER_SCRIPT.format(tests=str(tests)))
  out = subprocess.run([sys.executable, str(script)], cwd=tests.parent, capture_output=True, text=True,
                       timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ", 1)[1])
  assert result["0"] == result["1"] == result["resumed0"] == result["resumed1"]


def test_negative_caption_hook():
  """config.negative_caption: batches carry the negatives' token ids and a mask of the rows it changed; an empty
  (dropped) caption has none; a name that does not import fails naming the key."""
  captions = ["a red circle to the left of a blue square", "a red circle", "a red circle at (3, 4)", "three squares"]
  records = [{"image": _png(np.full((16, 16, 3), 9 * i, np.uint8)), "caption": captions[i % 4].encode()}
             for i in range(8)]
  it = pipeline.make_train_iterator(config(negative_caption="data_pipelines.shapes.captions.flipped_caption"),
                                    hash_tokenizer, 8, source=records, seed=0)
  b = take(it, 1)[0]
  for cap, ids, neg, m in zip(b["caption"], b["input_ids"], b["neg_input_ids"], b["neg_mask"]):
    changed = "left of" in cap or "(" in cap
    assert m == float(changed)
    want = cap.replace("left", "right").replace("(3, 4)", "(13, 12)")  # mirrored in the 16-px frame
    np.testing.assert_array_equal(neg, hash_tokenizer([want])[0])
    assert (neg != ids).any() == changed
  dropped = pipeline.make_train_iterator(config(negative_caption="data_pipelines.shapes.captions.flipped_caption",
                                                caption_dropout=1.0), hash_tokenizer, 8, source=records, seed=0)
  assert not np.asarray(next(dropped)["neg_mask"]).any()
  with pytest.raises(ValueError, match="config.data.negative_caption='no.such.fn'"):
    pipeline.make_train_iterator(config(negative_caption="no.such.fn"), hash_tokenizer, 8, source=records)
