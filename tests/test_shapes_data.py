"""shapes-bench records (splits, determinism, held-out pairs, flaws, noise) and derived tasks."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shapes
from data_pipelines.shapes import palette

N = 60


def _records(split, num=N, seed=0, size=64, **kw):
  return list(shapes.generate_records(split, num, seed=seed, size=size, **kw))


def _gray(data):
  return np.asarray(Image.open(io.BytesIO(data)))


def _clean_scene(ann):
  return {"background": ann["background"], "flaws": [], "objects": [
      {"shape": o["shape"], "color": o["color"], "size": o["size"], "center": tuple(o["centroid"])}
      for o in ann["objects"]]}


@pytest.mark.parametrize("split", palette.SPLITS)
def test_record_fields_and_determinism(split):
  a = _records(split, 12, seed=5)
  assert a == _records(split, 12, seed=5)  # byte-identical
  other = _records(split, 12, seed=6)
  assert [r["image"] for r in a] != [r["image"] for r in other]
  for r in a:
    assert set(r) == {"id", "image", "caption", "family", "annotation", "mask"}
    assert r["family"] in palette.FAMILIES and r["id"].startswith(split)
    img = shapes.decode_image(r["image"])
    assert img.shape == (64, 64, 3)
    ann = json.loads(r["annotation"])
    assert set(ann) >= {"background", "flaws", "objects"}
    mask = _gray(r["mask"])
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == set(range(len(ann["objects"]) + 1))
    for i, o in enumerate(ann["objects"], start=1):
      assert set(o) >= {"shape", "color", "size", "bbox", "centroid"}
      ys, xs = np.nonzero(mask == i)
      np.testing.assert_allclose([xs.mean() + 0.5, ys.mean() + 0.5], o["centroid"], atol=1.0)
      x0, y0, x1, y1 = o["bbox"]
      assert x0 - 1 <= xs.min() and xs.max() <= x1 and y0 - 1 <= ys.min() and ys.max() <= y1
  assert len({r["id"] for r in a}) == 12


@pytest.mark.parametrize("size", [32, 64])
def test_held_out_pairs_only_in_heldout_split(size):
  for split in ("pretrain", "curated", "train"):
    for r in _records(split, 150, seed=1, size=size):
      ann = json.loads(r["annotation"])
      assert not any((o["color"], o["shape"]) in palette.HELD_OUT for o in ann["objects"]), r
      spec = shapes.parse_prompt(r["caption"])  # noisy captions use the same grammar
      assert not any((o["color"], o["shape"]) in palette.HELD_OUT for o in spec["objects"]), r["caption"]
      found = shapes.detect(shapes.decode_image(r["image"])) if not ann["flaws"] else []
      assert not any((o["color"], o["shape"]) in palette.HELD_OUT for o in found), r
  pairs = set()
  for r in _records("heldout", 60, size=size):
    ann = json.loads(r["annotation"])
    assert ann["objects"] and all((o["color"], o["shape"]) in palette.HELD_OUT for o in ann["objects"])
    pairs |= {(o["color"], o["shape"]) for o in ann["objects"]}
  assert pairs == set(palette.HELD_OUT)
  # Each held-out colour and shape still appears in training data in other bindings.
  train = [json.loads(r["annotation"]) for r in _records("train", 150, seed=1, size=size)]
  colors = {o["color"] for a in train for o in a["objects"]}
  shapes_ = {o["shape"] for a in train for o in a["objects"]}
  assert colors == set(palette.COLORS) and shapes_ == set(palette.SHAPES)


@pytest.mark.parametrize("split,size", [("curated", 64), ("train", 32), ("train", 64), ("heldout", 32),
                                        ("pretrain", 64)])
def test_clean_captions_parse_and_pass_the_scorer(split, size):
  recs = _records(split, 120, seed=2, size=size)
  checked = 0
  for r in recs:
    ann = json.loads(r["annotation"])
    if ann["flaws"] or ann["caption_noise"]:
      assert split == "pretrain"
      continue
    spec = shapes.parse_prompt(r["caption"])
    assert spec["family"] == r["family"]
    res = shapes.score(shapes.decode_image(r["image"]), spec)
    assert res["passed"], (r["caption"], res["found"])
    checked += 1
  assert checked >= (50 if split == "pretrain" else 120)


def test_pretrain_flaws_and_caption_noise():
  recs = _records("pretrain", 300, seed=3, flaw_rate=0.3, caption_noise=0.2)
  anns = [json.loads(r["annotation"]) for r in recs]
  flawed = [(r, a) for r, a in zip(recs, anns) if a["flaws"]]
  noisy = [(r, a) for r, a in zip(recs, anns) if a["caption_noise"]]
  assert 0.2 < len(flawed) / 300 < 0.4 and 0.12 < len(noisy) / 300 < 0.28
  assert {a["flaws"][0] for _, a in flawed} == set(palette.FLAWS)
  for r, a in flawed:
    flaw = a["flaws"][0]
    assert r["caption"].endswith(", " + flaw)
    assert shapes.parse_prompt(r["caption"])["flaws"] == [flaw]
    img = shapes.decode_image(r["image"]).astype(np.float32)
    clean = shapes.render(_clean_scene(a), 64).astype(np.float32)
    if flaw == "blurry":
      assert shapes.sharpness(img) < 0.5 * shapes.sharpness(clean)
    elif flaw == "washed out":
      assert img.std() < 0.6 * clean.std()
    elif flaw == "noisy":
      assert np.abs(img - clean).mean() > 8.0
    else:  # jpeg artifacts: strong errors around edges
      assert np.percentile(np.abs(img - clean).max(-1), 99) > 40
  for r, a in zip(recs, anns):
    if not a["flaws"]:
      assert not any(r["caption"].endswith(", " + f) for f in palette.FLAWS)
      np.testing.assert_array_equal(shapes.decode_image(r["image"]), shapes.render(_clean_scene(a), 64))
  # Noisy captions contradict their own (flawless) image; clean ones do not.
  bad = [shapes.score(shapes.decode_image(r["image"]), shapes.parse_prompt(r["caption"]))["passed"]
         for r, a in noisy if not a["flaws"]]
  assert len(bad) > 20 and np.mean(bad) <= 0.05
  clean = _records("pretrain", 40, seed=3, flaw_rate=0.0, caption_noise=0.0)
  assert not any(json.loads(r["annotation"])["flaws"] or json.loads(r["annotation"])["caption_noise"] for r in clean)


def test_bad_split_and_size():
  with pytest.raises(ValueError, match="split must be one of"):
    next(shapes.generate_records("validation", 1))
  with pytest.raises(ValueError, match="canvas size"):
    next(shapes.generate_records("train", 1, size=1024))


def test_preference_pairs():
  recs = list(shapes.preference_pairs(150, seed=0, size=64))
  assert recs == list(shapes.preference_pairs(150, seed=0, size=64))
  assert [r["jpg_0"] for r in recs[:10]] != [r["jpg_0"] for r in shapes.preference_pairs(10, seed=1, size=64)]
  labels = [r["label_0"] for r in recs]
  assert set(labels) == {0.0, 0.5, 1.0}
  assert 0.01 <= labels.count(0.5) / len(labels) <= 0.12
  assert 0.3 < labels.count(1.0) / len(labels) < 0.7
  for r in recs:
    assert set(r) >= {"caption", "jpg_0", "jpg_1", "label_0"}
    spec = shapes.parse_prompt(r["caption"])
    imgs = [shapes.decode_image(r["jpg_0"]), shapes.decode_image(r["jpg_1"])]
    good = [shapes.score(im, spec)["passed"] for im in imgs]
    for k, im in enumerate(imgs):  # a deliberately flawed (e.g. blurred) image may be misread: skip it
      if r["rejected"].startswith("flaw: ") and k == int(r["label_0"] == 1.0):
        continue
      assert not any((o["color"], o["shape"]) in palette.HELD_OUT for o in shapes.detect(im))
    if r["label_0"] == 0.5:
      assert good == [True, True]
    elif r["rejected"].startswith("flaw: "):
      k = 0 if r["label_0"] == 1.0 else 1
      assert good[k]
      assert not np.array_equal(imgs[0], imgs[1])
    else:
      assert good == ([True, False] if r["label_0"] == 1.0 else [False, True]), r["caption"]


def test_edit_triplets():
  recs = list(shapes.edit_triplets(60, seed=0, size=64))
  assert recs == list(shapes.edit_triplets(60, seed=0, size=64))
  assert {r["edit"] for r in recs} == {"recolour", "reshape", "remove", "add", "background"}
  for r in recs:
    assert set(r) >= {"source", "instruction", "target"}
    assert r["source"] != r["target"] and r["source_caption"] != r["target_caption"]
    src, tgt = shapes.detect(shapes.decode_image(r["source"])), shapes.detect(shapes.decode_image(r["target"]))
    if r["edit"] == "recolour":
      assert r["instruction"].split()[-1] in palette.COLORS and len(src) == len(tgt)
      assert r["instruction"].split()[-1] in {o["color"] for o in tgt}
    if r["edit"] == "remove":
      assert len(tgt) == len(src) - 1
    if r["edit"] == "add":
      assert len(tgt) == len(src) + 1
  assert any(r["instruction"].startswith("make the ") and len(r["instruction"].split()) == 4 for r in recs)


def test_vqa_and_caption_targets():
  recs = list(shapes.vqa_pairs(80, seed=0, size=64))
  assert recs == list(shapes.vqa_pairs(80, seed=0, size=64))
  assert {r["kind"] for r in recs} == {"count_shape", "count_color", "color_of", "shape_of", "exists"}
  for r in recs:
    found = shapes.detect(shapes.decode_image(r["image"]))
    q, a = r["question"], r["answer"]
    if r["kind"] == "count_shape":
      shape = q.split()[2][:-1]
      assert a == palette.NUMBER_WORDS[sum(o["shape"] == shape for o in found)]
    elif r["kind"] == "count_color":
      assert a == palette.NUMBER_WORDS[sum(o["color"] == q.split()[2] for o in found)]
    elif r["kind"] == "color_of":
      assert [o["color"] for o in found if o["shape"] == q.split()[-1][:-1]] == [a]
    elif r["kind"] == "shape_of":
      assert [o["shape"] for o in found if o["color"] == q.split()[4]] == [a]
    else:
      c, s = q.split()[-2], q.split()[-1][:-1]
      assert a == ("yes" if any(o["color"] == c and o["shape"] == s for o in found) else "no")
  caps = list(shapes.caption_targets(30, seed=0, size=32))
  assert caps == list(shapes.caption_targets(30, seed=0, size=32))
  for r in caps:
    assert set(r) >= {"image", "caption", "annotation"}
    ann = json.loads(r["annotation"])
    assert r["caption"].endswith("background")
    for o in ann["objects"]:
      assert o["color"] in r["caption"] and o["shape"] in r["caption"]


def test_human_figures():
  recs = list(shapes.human_figures(12, seed=0, size=64))
  assert recs == list(shapes.human_figures(12, seed=0, size=64))
  for r in recs:
    img = shapes.decode_image(r["image"])
    mask = _gray(r["mask"])
    ann = json.loads(r["annotation"])
    assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
    assert set(range(1, 6)) <= set(np.unique(mask))
    assert [p.split(":")[0] for p in r["caption"].rstrip(".").split(". ")] == ["hair", "head", "top", "bottom",
                                                                              "shoes"]
    attrs = r["attributes"]
    assert f"top: {attrs['top_color']} {attrs['top']}" in r["caption"]
    for k, part in enumerate(("hair", "head", "top", "bottom", "shoes"), start=1):
      pm = _gray(r["part_masks"][part]) > 0
      np.testing.assert_array_equal(pm, mask == k)
      assert ann["parts"][part]["mask_label"] == k and ann["parts"][part]["bbox"] is not None
    # The top's pixels are the top's colour.
    from data_pipelines.shapes.humans import CLOTH_COLORS
    top = img[mask == 3].astype(np.float32)
    assert np.abs(np.median(top, 0) - CLOTH_COLORS[attrs["top_color"]]).max() <= 2
  assert len({r["caption"] for r in recs}) == 12
  small = next(shapes.human_figures(1, seed=0, size=32))
  assert _gray(small["mask"]).shape == (32, 32)
