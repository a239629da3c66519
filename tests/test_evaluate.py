"""t2i.evaluate: scoring a folder of samples (index.jsonl + PNGs) on shapes-bench."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipelines import shapes
from data_pipelines.shapes import palette, scenes
from t2i.evaluate import EvaluationError, evaluate_dir


def _write(folder, prompts, images, names=None):
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, (p, img) in enumerate(zip(prompts, images)):
    name = names[i] if names else f"{i:05d}.png"
    Image.fromarray(img).save(folder / name)
    lines.append(json.dumps({"file": name, "prompt": p["prompt"], "seed": i}))
  (folder / "index.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def prompts():
  return shapes.eval_prompts(8, seed=7, size=64)


def test_ground_truth_folder_scores_high(tmp_path, prompts):
  _write(tmp_path, prompts, [shapes.render(p["scene"], 64) for p in prompts])
  out = evaluate_dir(tmp_path, return_results=True)
  print("evaluate_dir on ground truth:", {k: v for k, v in out.items() if k != "results"})
  assert out["num"] == 48 and set(out["per_family"]) == set(palette.FAMILIES)
  assert out["overall"] >= 0.99 and out["sharpness"] > 0
  assert [r["prompt"] for r in out["results"]] == [p["prompt"] for p in prompts]


def test_resized_samples(tmp_path, prompts):
  """128 px samples scored at --size=64 (grounding points are in 64 px units)."""
  big = [np.asarray(Image.fromarray(shapes.render(p["scene"], 64)).resize((128, 128), Image.BICUBIC))
         for p in prompts]
  _write(tmp_path, prompts, big)
  assert evaluate_dir(tmp_path, size=64)["overall"] >= 0.99


def test_broken_samples_lower_the_score(tmp_path, prompts):
  rng = np.random.default_rng(0)
  images, broken = [], 0
  for i, p in enumerate(prompts):
    scene = p["scene"]
    if i % 2:
      bad = scenes.break_scene(p["spec"], scene, "colour", rng, 64)
      if bad is not None:
        scene, broken = bad, broken + 1
    images.append(shapes.render(scene, 64))
  _write(tmp_path, prompts, images)
  out = evaluate_dir(tmp_path)
  assert broken >= 20
  assert out["overall"] == pytest.approx(np.mean([
      np.mean([not (i % 2) for i, p in enumerate(prompts) if p["family"] == f]) for f in palette.FAMILIES]), abs=0.02)


def test_cli_prints_json(tmp_path, prompts):
  _write(tmp_path, prompts[:12], [shapes.render(p["scene"], 64) for p in prompts[:12]])
  proc = subprocess.run([sys.executable, "-m", "t2i.evaluate", f"--samples={tmp_path}"], check=True,
                        capture_output=True, text=True)
  out = json.loads(proc.stdout)
  assert set(out) == {"per_family", "overall", "sharpness", "num"} and out["num"] == 12
  assert out["overall"] >= 0.99
  bad = subprocess.run([sys.executable, "-m", "t2i.evaluate", f"--samples={tmp_path / 'missing'}"],
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "index.jsonl" in bad.stderr


def test_errors_name_file_and_line(tmp_path, prompts):
  _write(tmp_path, prompts[:3], [shapes.render(p["scene"], 64) for p in prompts[:3]])
  index = tmp_path / "index.jsonl"
  lines = index.read_text().splitlines()
  lines[1] = json.dumps({"file": "00001.png", "prompt": "a photo of a cat", "seed": 1})
  index.write_text("\n".join(lines) + "\n")
  with pytest.raises(EvaluationError, match=r"index.jsonl:2: cannot parse prompt 'a photo of a cat'"):
    evaluate_dir(tmp_path)
  lines[1] = json.dumps({"file": "nope.png", "prompt": prompts[1]["prompt"]})
  index.write_text("\n".join(lines) + "\n")
  with pytest.raises(EvaluationError, match=r"index.jsonl:2: image file .*nope.png not found"):
    evaluate_dir(tmp_path)
  lines[1] = "{not json"
  index.write_text("\n".join(lines) + "\n")
  with pytest.raises(EvaluationError, match=r"index.jsonl:2: invalid JSON"):
    evaluate_dir(tmp_path)
  with pytest.raises(EvaluationError, match="not found"):
    evaluate_dir(tmp_path / "nothing")
