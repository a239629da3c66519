"""Ingest of a messy image folder: conversions kept, bad files skipped with reasons, pipeline reads the rest."""
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import image_decode, ingest, pipeline
from data_pipelines.tfds import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _rgb(h=48, w=80, seed=0) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_messy_folder(src: pathlib.Path) -> None:
  """Good, convertible and broken files; one caption per stem unless noted."""
  src.mkdir(parents=True)
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, 20:, 3] = 255  # left half transparent -> white after compositing
  files = {
      "good_jpeg.jpg": _encode(_rgb(), "JPEG", quality=90),
      "good_png.png": _encode(_rgb(seed=1), "PNG"),
      "truncated.jpg": _encode(_rgb(256, 256), "JPEG", quality=95)[:3000],
      "zero.jpg": b"",
      "garbage.png": b"this is not an image at all",
      "cmyk.jpg": _encode(_rgb(seed=2).convert("CMYK"), "JPEG"),
      "deep16.png": _encode(Image.fromarray(np.full((40, 40), 65535 // 2, np.uint16)), "PNG"),
      "grey.png": _encode(_rgb(seed=3).convert("L"), "PNG"),
      "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
      "palette.gif": _encode(_rgb(seed=4).convert("P"), "GIF"),
      "tiny.png": _encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
      "no_caption.png": _encode(_rgb(seed=5), "PNG"),
      "bad_caption.png": _encode(_rgb(seed=6), "PNG"),
  }
  for name, data in files.items():
    (src / name).write_bytes(data)
    stem = name.rsplit(".", 1)[0]
    if stem == "no_caption":
      continue
    caption = b"\xff\xfe\xfa caption" if stem == "bad_caption" else f"a picture called {stem}".encode()
    (src / f"{stem}.txt").write_bytes(caption)


EXPECTED_SKIPS = {
    "truncated.jpg": "truncated image",
    "zero.jpg": "zero-byte file",
    "garbage.png": "unreadable image",
    "tiny.png": "image too small",
    "no_caption.png": "missing caption",
    "bad_caption.png": "caption not UTF-8",
}
EXPECTED_KEPT = {"good_jpeg.jpg", "good_png.png", "cmyk.jpg", "deep16.png", "grey.png", "rgba.png", "palette.gif"}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ingest")
  make_messy_folder(tmp / "src")
  report = ingest.ingest_folder(tmp / "src", tmp / "data", verbose=False)
  return tmp, report


def test_skip_report_reasons(ingested):
  tmp, report = ingested
  got = {s["file"]: s["reason"].split(":")[0] for s in report.skipped}
  assert got == EXPECTED_SKIPS
  assert report.num_kept == len(EXPECTED_KEPT)
  assert report.skip_counts == {r: 1 for r in EXPECTED_SKIPS.values()}
  converted = {c["file"]: c["mode"] for c in report.converted}
  assert converted["cmyk.jpg"] == "CMYK" and converted["grey.png"] == "L" and converted["rgba.png"] == "RGBA"
  assert converted["deep16.png"].startswith("I") and converted["palette.gif"] == "P"
  lines = [json.loads(l) for l in (pathlib.Path(report.dataset_dir) / "skipped.jsonl").read_text().splitlines()]
  assert {l["file"]: l["reason"] for l in lines} == {s["file"]: s["reason"] for s in report.skipped}
  text = report.format()
  for f in EXPECTED_SKIPS:
    assert f"SKIP {f}:" in text


def test_kept_records_are_normalised_rgb_png(ingested):
  tmp, _ = ingested
  source = common.load_source(tmp / "data", "image_folder", "train")
  records = {common.text(source[i]["id"]): source[i] for i in range(len(source))}
  assert set(records) == EXPECTED_KEPT
  for name, r in records.items():
    img = Image.open(io.BytesIO(r["image"]))
    assert img.format == "PNG" and img.mode == "RGB", name
    assert (img.height, img.width) == (int(r["height"]), int(r["width"]))
    assert common.text(r["caption"]) == f"a picture called {name.rsplit('.', 1)[0]}"
  deep = np.asarray(Image.open(io.BytesIO(records["deep16.png"]["image"])))
  assert np.all(deep == round(32767 / 257))  # 16-bit mid grey -> 8-bit 127
  rgba = np.asarray(Image.open(io.BytesIO(records["rgba.png"]["image"])))
  np.testing.assert_array_equal(rgba[0, 0], [255, 255, 255])  # transparent -> white
  np.testing.assert_array_equal(rgba[0, 30], [200, 0, 0])
  alpha = np.asarray(Image.open(io.BytesIO(records["rgba.png"]["mask"])))  # kept for config.data.alpha_mask
  assert alpha.shape == (40, 40) and (alpha[:, :20] == 0).all() and (alpha[:, 20:] == 255).all()
  assert all(r["mask"] == b"" for n, r in records.items() if n != "rgba.png")  # no alpha: no mask
  grey = np.asarray(Image.open(io.BytesIO(records["grey.png"]["image"])))
  assert np.all(grey[..., 0] == grey[..., 1])


def test_pipeline_reads_ingested_folder(ingested):
  tmp, _ = ingested
  cfg = pipeline.default_data_config()
  cfg.update(data_dir=str(tmp / "data"), dataset="image_folder", image_size=16, max_length=4, caption_dropout=0.0)
  it = pipeline.make_train_iterator(cfg, lambda c: np.ones((len(c), 4), np.int32), global_batch_size=7)
  batch = next(it)
  assert batch["image"].shape == (7, 16, 16, 3) and batch["image"].dtype == np.float32
  assert sorted(it.last_host_batch["caption"]) == sorted(f"a picture called {f.rsplit('.', 1)[0]}"
                                                         for f in EXPECTED_KEPT)
  assert it.skipped == 0


def test_manifest(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.png").write_bytes(_encode(_rgb(seed=7), "PNG"))
  (src / "b.png").write_bytes(_encode(_rgb(seed=8), "PNG"))
  manifest = tmp_path / "m.jsonl"
  manifest.write_text("\n".join([json.dumps({"file": "a.png", "caption": "  first   image "}),
                                 json.dumps({"file": "b.png"}),
                                 json.dumps({"file": "missing.png", "caption": "x"}),
                                 "{not json"]) + "\n")
  report = ingest.ingest_folder(src, tmp_path / "data", manifest=str(manifest), verbose=False)
  reasons = {s["file"]: s["reason"].split(":")[0] for s in report.skipped}
  assert reasons == {"b.png": "missing caption", "missing.png": "unreadable file", "m.jsonl:4": "bad manifest line"}
  source = common.load_source(tmp_path / "data", "image_folder")
  assert len(source) == 1 and common.text(source[0]["caption"]) == "first image"


def test_min_size_and_bad_src(tmp_path):
  with pytest.raises(image_decode.SkipSample, match="too small"):
    image_decode.normalize_image(_encode(_rgb(8, 30), "PNG"), min_size=10)
  assert image_decode.normalize_image(_encode(_rgb(8, 30), "PNG"), min_size=8).height == 8
  with pytest.raises(FileNotFoundError, match="--src"):
    ingest.ingest_folder(tmp_path / "nope", tmp_path / "data", verbose=False)
  with pytest.raises(FileNotFoundError, match="image_folder"):
    common.load_source(tmp_path / "data", "image_folder")


def test_cli(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "x.png").write_bytes(_encode(_rgb(seed=9), "PNG"))
  (src / "x.txt").write_text("an image")
  (src / "y.png").write_bytes(b"")
  (src / "y.txt").write_text("empty file")
  out = subprocess.run([sys.executable, "-m", "data_pipelines.ingest", f"--src={src}",
                        f"--data_dir={tmp_path / 'data'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "SKIP y.png: zero-byte file" in out.stdout and "kept 1" in out.stdout


def test_folder_without_usable_image(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "a.jpg").write_bytes(b"")
  (src / "a.txt").write_text("caption")
  with pytest.raises(ValueError, match="no usable image(.|\n)*SKIP a.jpg: zero-byte file"):
    ingest.ingest_folder(src, tmp_path / "data", verbose=False)
