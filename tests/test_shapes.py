"""shapes-bench rendering, prompt grammar and scorer (clean renders pass, one-attribute-broken renders fail)."""
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import shapes
from data_pipelines.shapes import palette, scenes
from data_pipelines.shapes.rendering import coverage, extents


def _spec(**kw):
  base = {"family": "single", "objects": [], "count": None, "relation": None, "point": None, "background": None,
          "flaws": []}
  base.update(kw)
  return base


@pytest.mark.parametrize("size", [32, 64, 200, 512])
def test_render_sizes_and_detection(size):
  scene = {"background": "dark slate", "flaws": [], "objects": [
      {"shape": "circle", "color": "red", "size": "large", "center": (0.3 * size, 0.3 * size)},
      {"shape": "triangle", "color": "blue", "size": "small", "center": (0.75 * size, 0.75 * size)}]}
  img = shapes.render(scene, size)
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  assert tuple(img[0, 0]) == palette.BACKGROUNDS["dark slate"][0]
  found = shapes.detect(img)
  assert [(o["color"], o["shape"], o["size"]) for o in found] == [("red", "circle", "large"),
                                                                   ("blue", "triangle", "small")]
  for o, obj in zip(found, scene["objects"]):
    np.testing.assert_allclose(o["centroid"], obj["center"], atol=0.05 * size / 32 + 0.05)


def test_render_rejects_bad_input():
  with pytest.raises(ValueError, match="canvas size"):
    shapes.render({"background": "light grey", "objects": []}, 16)
  with pytest.raises(ValueError, match="colour"):
    shapes.render({"background": "light grey", "objects": [
        {"shape": "circle", "color": "pink", "size": "small", "center": (10, 10)}]}, 64)
  with pytest.raises(ValueError, match="background"):
    shapes.render({"background": "sky", "objects": []}, 64)
  with pytest.raises(ValueError, match="flaw"):
    shapes.render({"background": "off-white", "objects": [], "flaws": ["grainy"]}, 64)


def test_coverage_is_antialiased_and_exact_in_area():
  for shape, area in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)):
    cov = coverage(shape, (30.3, 29.6), 20.0, 64)
    assert abs(cov.sum() - area * 400) / (area * 400) < 0.01, shape
    assert ((cov > 0) & (cov < 1)).any(), f"{shape}: no partial (anti-aliased) pixels"
  # The triangle's centre is its centroid.
  cov = coverage("triangle", (32.0, 32.0), 24.0, 64)
  ys, xs = np.mgrid[0:64, 0:64] + 0.5
  np.testing.assert_allclose([(cov * xs).sum() / cov.sum(), (cov * ys).sum() / cov.sum()], [32, 32], atol=0.05)
  assert extents("triangle", 24.0) == (-12.0, -16.0, 12.0, 8.0)


def test_templates_round_trip_through_parser():
  rng = np.random.default_rng(0)
  seen = set()
  for family, templates in shapes.TEMPLATES.items():
    for k in range(len(templates)):
      for _ in range(6):
        spec = scenes.clean_spec(scenes.sample_spec(family, rng, palette.ALL_PAIRS, 64, name_size=0.5))
        spec["background"] = [None, *palette.BACKGROUND_NAMES][int(rng.integers(4))]
        spec["flaws"] = [] if rng.random() < 0.5 else [palette.FLAWS[int(rng.integers(4))]]
        text = shapes.text_for(spec, template=k)
        assert shapes.parse_prompt(text) == spec, text
        assert shapes.parse_prompt("  " + text.upper() + ". ") == spec
        seen.add(text.split(" on ")[0][:12])
  assert len(seen) > 15
  assert shapes.text_for(_spec(family="counting", count=3, objects=[
      {"color": "green", "shape": "triangle", "size": None}])) == "three green triangles"
  assert shapes.text_for(_spec(objects=[{"color": "orange", "shape": "circle", "size": None}])) == "an orange circle"


@pytest.mark.parametrize("text", ["a photo of a dog", "five red circles", "a red circle and", "a pink square",
                                  "an orange circle at (3, )"])
def test_parse_errors(text):
  with pytest.raises(shapes.PromptParseError, match="not a shapes-bench prompt"):
    shapes.parse_prompt(text)


def test_flipped_captions():
  from data_pipelines.shapes.captions import flipped_caption
  assert flipped_caption("a red circle placed to the left of a blue square", 32) == \
      "a red circle placed to the right of a blue square"
  assert flipped_caption("a red circle above a blue square, blurry", 32) == "a red circle below a blue square, blurry"
  assert flipped_caption("a red circle at (9, 15) on a dark background", 32) == \
      "a red circle at (23, 17) on a dark background"
  assert flipped_caption("a red circle located at x=9, y=15", 64) == "a red circle located at x=55, y=49"
  assert flipped_caption("three red circles", 32) == "three red circles"


def test_eval_prompts_cover_families_counts_and_heldout():
  prompts = shapes.eval_prompts(12, seed=3, size=64)
  assert len(prompts) == 72
  assert {p["family"] for p in prompts} == set(palette.FAMILIES)
  assert {p["spec"]["count"] for p in prompts if p["family"] == "counting"} == {1, 2, 3, 4}
  held = [p for p in prompts if p["heldout"]]
  assert 0.1 < len(held) / len(prompts) < 0.45
  for p in held:
    assert tuple(p["spec"]["objects"][0].values())[:2] in palette.HELD_OUT
  for p in prompts:
    assert shapes.parse_prompt(p["prompt"]) == p["spec"]
    if p["family"] == "grounding":
      assert all(0 <= v < 64 for v in p["spec"]["point"])
  assert [p["prompt"] for p in prompts] == [p["prompt"] for p in shapes.eval_prompts(12, seed=3, size=64)]
  assert [p["prompt"] for p in prompts] != [p["prompt"] for p in shapes.eval_prompts(12, seed=4, size=64)]


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_passes_clean_and_fails_broken(size):
  prompts = shapes.eval_prompts(40, seed=11, size=size)
  rng = np.random.default_rng(size)
  passed = [shapes.score(shapes.render(p["scene"], size), p["spec"])["passed"] for p in prompts]
  clean_rate = np.mean(passed)
  broken: dict[str, list[bool]] = {}
  for p in prompts:
    for kind in scenes.applicable_breaks(p["spec"]):
      bad = shapes.break_scene(p["spec"], p["scene"], kind, rng, size)
      if bad is not None:
        broken.setdefault(kind, []).append(shapes.score(shapes.render(bad, size), p["spec"])["passed"])
  rates = {k: (float(np.mean(v)), len(v)) for k, v in broken.items()}
  print(f"size {size}: clean pass {clean_rate:.4f} of {len(prompts)}; broken pass (rate, n) {rates}")
  assert clean_rate >= 0.99
  assert set(rates) == {"colour", "shape", "count", "position", "grounding", "size"}
  for kind, (rate, n) in rates.items():
    assert n >= 10, kind
    assert rate <= 0.01, kind
  assert np.mean([x for v in broken.values() for x in v]) <= 0.01


@pytest.mark.parametrize("size", [32, 64])
def test_scorer_tolerates_mild_blur_and_noise(size):
  """Model samples are never pixel-perfect: mild blur and grain must not change the verdict."""
  from PIL import Image, ImageFilter
  prompts = shapes.eval_prompts(10, seed=21, size=size)
  rng = np.random.default_rng(0)
  for name, degrade in [
      ("blur", lambda x: np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.0)))),
      ("noise", lambda x: np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.uint8))]:
    rate = np.mean([shapes.score(degrade(shapes.render(p["scene"], size)), p["spec"])["passed"] for p in prompts])
    print(f"size {size} {name}: pass {rate:.3f}")
    assert rate >= 0.95, name


def test_scorer_family_rules():
  size = 64
  red_circle = {"shape": "circle", "color": "red", "size": "large", "center": (16, 20)}
  blue_square = {"shape": "square", "color": "blue", "size": "small", "center": (48, 44)}
  img = shapes.render({"background": "off-white", "objects": [red_circle, blue_square]}, size)
  ok = lambda **kw: shapes.score(img, _spec(**kw))["passed"]  # noqa: E731
  rc = {"color": "red", "shape": "circle", "size": None}
  bs = {"color": "blue", "shape": "square", "size": None}
  assert not ok(family="single", objects=[rc])  # two objects in the image
  assert ok(family="two_objects", objects=[rc, bs]) and ok(family="colours", objects=[bs])
  assert not ok(family="two_objects", objects=[rc, dict(bs, color="red")])
  assert ok(family="counting", objects=[rc], count=1) and not ok(family="counting", objects=[rc], count=2)
  assert ok(family="position", objects=[rc, bs], relation="to the left of")
  assert ok(family="position", objects=[rc, bs], relation="above")
  assert not ok(family="position", objects=[rc, bs], relation="below")
  assert ok(family="grounding", objects=[rc], point=[20, 22])  # 4.5 px away: within 6 px
  assert not ok(family="grounding", objects=[rc], point=[24, 20])
  assert ok(family="colours", objects=[dict(rc, size="large")]) and not ok(family="colours",
                                                                           objects=[dict(rc, size="small")])
  r = shapes.score(img, _spec(family="colours", objects=[bs]))
  assert r["family"] == "colours" and len(r["found"]) == 2 and r["sharpness"] > 0
  assert shapes.score(np.full((64, 64, 3), 200, np.uint8), _spec(family="colours", objects=[bs]))["found"] == []
  with pytest.raises(ValueError, match="prompt spec"):
    shapes.score(img, {"background": "off-white", "objects": [red_circle]})


def test_scorer_ignores_specks_and_reads_noise_free_background():
  img = shapes.render({"background": "light grey", "objects": [
      {"shape": "square", "color": "green", "size": "small", "center": (32, 32)}]}, 64)
  img = img.copy()
  img[5:7, 5:7] = palette.COLORS["red"]  # a 4-pixel speck
  found = shapes.detect(img)
  assert [(o["color"], o["shape"]) for o in found] == [("green", "square")]


def test_summarize_and_sharpness():
  res = [{"family": "single", "passed": True, "sharpness": 2.0}, {"family": "single", "passed": False,
                                                                  "sharpness": 4.0},
         {"family": "counting", "passed": True, "sharpness": 3.0}]
  s = shapes.summarize(res)
  assert s == {"per_family": {"single": 0.5, "counting": 1.0}, "overall": 0.75, "sharpness": 3.0, "num": 3}
  flat = np.full((32, 32, 3), 100, np.uint8)
  assert shapes.sharpness(flat) == 0.0
  checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
  assert shapes.sharpness(checker) > 1e4


def test_prompts_cli(tmp_path):
  out = tmp_path / "prompts.txt"
  subprocess.run([sys.executable, "-m", "data_pipelines.shapes.prompts", "--num_per_family=3", "--seed=2",
                  "--size=32", f"--out={out}"], check=True, capture_output=True, text=True)
  lines = out.read_text().splitlines()
  assert lines == [p["prompt"] for p in shapes.eval_prompts(3, seed=2, size=32)]
  for line in lines:
    shapes.parse_prompt(line)


def test_palette_fidelity_filter_keeps_clean_and_drops_flawed():
  # The quality-filter hook of flux_shapes_sft.py:filtered, on pre-training records (32 px).
  import io
  import json
  from PIL import Image
  from data_pipelines.shapes.records import generate_records
  from data_pipelines.shapes.scoring import palette_fidelity_score
  kept = {}
  for r in generate_records("pretrain", 400, seed=0, size=32):
    flaws = json.loads(r["annotation"])["flaws"]
    img = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
    kept.setdefault(flaws[0] if flaws else "clean", []).append(palette_fidelity_score(img) >= 0.9)
  rate = {k: float(np.mean(v)) for k, v in kept.items()}
  assert rate["clean"] >= 0.9 and rate["noisy"] == 0.0
  assert rate["blurry"] <= 0.35 and rate["jpeg artifacts"] <= 0.2
