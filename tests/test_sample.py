"""t2i.sample: restores a workdir's checkpoint and writes PNGs + index.jsonl; per-image seeds; EMA vs raw."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(cache_dir):
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(args, cache_dir):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(cache_dir), capture_output=True,
                        text=True, timeout=300)
  return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  cache = tmp_path_factory.getbasetemp() / "jax_cache"
  wd = tmp_path_factory.mktemp("run")
  rc, err = _run(["launch.main", "--config=experiments/sd_shapes.py:smoke", f"--workdir={wd}",
                  "--config.total_steps=4", "--config.ckpt_every=2"], cache)
  assert rc == 0, err[-3000:]
  return wd, cache


def _images(out):
  return [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(len(os.listdir(out)) - 1)]


def test_cfg_options_reach_the_sampler(workdir):
  """guidance_interval / guidance_rescale go through `Sampler` to the diffusion sampler: an interval that holds
  no sampling step gives the cond-only images of guidance 1; rescaling changes the guided images."""
  from t2i.sample import Sampler, parse_interval
  s = Sampler(str(workdir[0]))
  run = lambda g, **kw: s(["a red circle", "a blue square"], [3, 4], num_steps=3, guidance_scale=g, **kw)
  np.testing.assert_allclose(run(4.0, guidance_interval=(2000.0, 3000.0)), run(1.0), atol=1e-5)
  assert np.abs(run(4.0, guidance_rescale=0.7) - run(4.0)).max() > 1e-3
  assert parse_interval("0,800", "--x") == parse_interval("0:800", "--x") == (0.0, 800.0)
  assert parse_interval(None, "--x") is None
  with pytest.raises(ValueError, match="--guidance_interval='800,0'"):
    parse_interval("800,0", "--guidance_interval")
  with pytest.raises(ValueError, match="two timesteps"):
    parse_interval("5", "--guidance_interval")


def test_sample_cli_writes_images_and_index(workdir, tmp_path):
  wd, cache = workdir
  (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
  out = tmp_path / "out"
  rc, err = _run(["t2i.sample", f"--workdir={wd}", f"--prompts_file={tmp_path / 'prompts.txt'}", "--num=3",
                  "--seed=10", "--steps=3", "--guidance=2.0", "--batch=4", f"--out={out}"], cache)
  assert rc == 0, err[-3000:]
  rows = [json.loads(line) for line in open(out / "index.jsonl")]
  assert rows == [{"file": f"{i:05d}.png", "prompt": p, "seed": 10 + i}
                  for i, p in enumerate(["a red circle"] * 3 + ["a blue square"] * 3)]
  imgs = _images(out)
  assert all(im.shape == (16, 16, 3) and im.dtype == np.uint8 for im in imgs)
  assert not np.array_equal(imgs[0], imgs[1])           # different seeds, different images
  # Same seed and prompt, different batching: identical image (per-image noise).
  out2 = tmp_path / "out2"
  rc, err = _run(["t2i.sample", f"--workdir={wd}", "--prompt=a blue square", "--num=1", "--seed=13", "--steps=3",
                  "--guidance=2.0", "--batch=1", f"--out={out2}"], cache)
  assert rc == 0, err[-3000:]
  np.testing.assert_array_equal(_images(out2)[0], imgs[3])
  # Raw params differ from the EMA ones.
  out3 = tmp_path / "out3"
  rc, err = _run(["t2i.sample", f"--workdir={wd}", "--prompt=a blue square", "--num=1", "--seed=13", "--steps=3",
                  "--guidance=2.0", "--batch=1", "--noema", f"--out={out3}"], cache)
  assert rc == 0, err[-3000:]
  assert not np.array_equal(_images(out3)[0], imgs[3])
  # The ancestral sampler draws its step noise from each image's seed too: batching does not change an image.
  outs = []
  for name, args in (("out4", ["--num=3", "--batch=4", "--seed=10", f"--prompts_file={tmp_path / 'prompts.txt'}"]),
                     ("out5", ["--num=1", "--batch=1", "--seed=13", "--prompt=a blue square"])):
    rc, err = _run(["t2i.sample", f"--workdir={wd}", *args, "--steps=3", "--guidance=2.0", "--sampler=ddpm",
                    f"--out={tmp_path / name}"], cache)
    assert rc == 0, err[-3000:]
    outs.append(_images(tmp_path / name))
  np.testing.assert_array_equal(outs[1][0], outs[0][3])
  assert not np.array_equal(outs[0][3], imgs[3])  # not the deterministic DDIM image
  # x0 processing reaches the sampler: clipping every x0 estimate to [-0.05, 0.05] pulls the image's pixels in.
  rc, err = _run(["t2i.sample", f"--workdir={wd}", "--prompt=a blue square", "--num=1", "--seed=13", "--steps=3",
                  "--guidance=2.0", "--batch=1", "--clip_sample_range=0.05", f"--out={tmp_path / 'out6'}"], cache)
  assert rc == 0, err[-3000:]
  clipped = _images(tmp_path / "out6")[0].astype(int)
  assert clipped.std() < 0.9 * imgs[3].astype(int).std()


def test_sample_cli_errors(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "t2i.sample", f"--workdir={tmp_path}", "--prompt=x",
                         f"--out={tmp_path / 'o'}"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "config.json: not found" in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "t2i.sample", f"--workdir={tmp_path}", f"--out={tmp_path / 'o'}"],
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0 and "exactly one of --prompt or --prompts_file" in proc.stderr


def test_denoise_scores_pass_rates_with_an_oracle():
  # benchmarks.denoise_scores: an estimate that returns the clean renders passes all, a blank canvas none.
  from benchmarks.eval_common import clean_renders, pass_rates
  images, texts, specs = clean_renders("single", 6, 32, seed=3)
  assert images.shape == (6, 32, 32, 3) and len(texts) == len(specs) == 6
  assert all(sp["family"] == "single" for sp in specs)
  rates = pass_rates(lambda level: images if level < 0.5 else np.zeros_like(images), specs, [0.1, 0.9])
  assert rates == [1.0, 0.0]
  with pytest.raises(ValueError, match="family"):
    clean_renders("nonsense", 1, 32, 0)
  # Grounding captions name points in the render's own pixels (they were in a 64-px frame for 32-px images).
  images, _, specs = clean_renders("grounding", 6, 32, seed=3)
  assert pass_rates(lambda level: images, specs, [0.5]) == [1.0]


def test_denoise_scores_benchmark_rows(workdir, tmp_path):
  wd, cache = workdir
  out = tmp_path / "dn.jsonl"
  rc, err = _run(["benchmarks.denoise_scores", f"--workdirs={wd}", "--levels=0.1,0.9", "--num=4", f"--out={out}"],
                 cache)
  assert rc == 0, err[-3000:]
  rows = [json.loads(line) for line in open(out)]
  assert [r["level"] for r in rows] == [0.1, 0.9] and all(r["step"] == 4 and r["num"] == 4 for r in rows)
  for r in rows:
    assert 0.0 <= r["passed"] <= 1.0 and 0.0 <= r["clean_passed"] <= 1.0 and np.isfinite(r["mse"]) and r["mse"] > 0
  assert rows[0]["mse"] != rows[1]["mse"]


def test_conditioning_benchmark_rows(workdir, tmp_path):
  # benchmarks.conditioning: one row per noise level; the wrong captions change the toy model's x0 error.
  wd, cache = workdir
  out = tmp_path / "cond.jsonl"
  rc, err = _run(["benchmarks.conditioning", f"--workdirs={wd}", "--levels=0.1,0.9", f"--out={out}"], cache)
  assert rc == 0, err[-3000:]
  rows = [json.loads(line) for line in open(out)]
  assert [r["level"] for r in rows] == [0.1, 0.9] and all(r["step"] == 4 for r in rows)
  for r in rows:
    assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("true", "shuffled", "empty"))
    assert r["shuffled"] != r["true"]
  # --family=position: clean renders, plus the error under the captions with their relation reversed.
  rc, err = _run(["benchmarks.conditioning", f"--workdirs={wd}", "--levels=0.9", "--family=position", "--num=4",
                  f"--out={out}"], cache)
  assert rc == 0, err[-3000:]
  row = json.loads(open(out).read().splitlines()[-1])
  assert np.isfinite(row["flipped"]) and row["flipped"] != row["true"]
