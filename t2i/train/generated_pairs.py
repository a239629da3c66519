"""Preference data a model generates itself, written as Pick-a-Pic-layout datasets (caption, jpg_0, jpg_1,
label_0 = 1: jpg_0 preferred) built into `data_dir` as `preference_pairs/<name>`, so that a run trains on them like
any preference data (config.data.pair):

- `build_round` (SPIN-Diffusion): the opponent (the previous iterate) samples one image for the caption of every
  real training image; pairs are (real, opponent sample).
- `build_judged` (on-policy DPO): the policy samples K images for each of a set of shapes-bench prompts, a judge
  (by default the shapes-bench scorer) marks each pass or fail, and pairs are (passing, failing) samples of the
  same prompt; prompts whose samples all pass or all fail give no pair (ties dropped). With winner="render" the
  preferred image is instead a clean render of a scene that satisfies the prompt, against each failing sample.

Each set is cached: a rerun (or a resumed run) reuses the built dataset. Its name carries the generating run's
folder, a hash of its full path and its latest checkpoint step, so another run, or the same run trained further,
gets a new set.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from typing import Any, Callable, Sequence

import numpy as np
from absl import logging

Judge = Callable[[np.ndarray, dict[str, Any]], bool]


def _set_name(kind: str, workdir: str, rest: str) -> str:
  from t2i.train.checkpoint import saved_steps
  path = os.path.normpath(os.path.abspath(os.path.expanduser(workdir)))
  tag = f"{hashlib.sha1(path.encode()).hexdigest()[:8]}_st{max(saved_steps(path), default=-1)}"
  return "".join(ch if ch.isalnum() else "_" for ch in f"{kind}_{tag}_{os.path.basename(path)}_{rest}")[:120]


def round_name(opponent_workdir: str, real_dataset: str, num: int, seed: int) -> str:
  """Dataset config name of a SPIN round: opponent run + real data + size + seed."""
  real = real_dataset.replace("/", "_").replace(":", "_")
  return _set_name("spin", opponent_workdir, f"{real}_n{num}_s{seed}")


def _builder(data_dir: str, name: str):
  from data_pipelines.tfds import common, preference_pairs as pp
  return pp.PreferencePairs(config=pp.PreferencePairsConfig(name=name, source="parquet"), data_dir=data_dir,
                            file_format=common.FILE_FORMAT,
                            parquet_files=[os.path.join(data_dir, name + ".parquet")])


def _exists(data_dir: str, name: str) -> bool:
  from data_pipelines.tfds import common
  try:
    common.dataset_dir(data_dir, f"preference_pairs/{name}")
  except FileNotFoundError:
    return False
  logging.info("generated pair set preference_pairs/%s exists; reusing it", name)
  return True


def _write(rows: dict[str, list[Any]], data_dir: str, name: str) -> str:
  """Writes the rows as `<data_dir>/<name>.parquet` and builds it; returns the dataset name."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from data_pipelines.tfds import common
  os.makedirs(data_dir, exist_ok=True)
  pq.write_table(pa.table(rows), os.path.join(data_dir, name + ".parquet"))
  common.prepare(_builder(data_dir, name))
  return f"preference_pairs/{name}"


def _sample_uint8(s, prompts: Sequence[str], seeds: Sequence[int], batch: int, num_steps: int | None,
                  guidance_scale: float | None) -> list[np.ndarray]:
  """uint8 images, one per (prompt, seed), through `t2i.sample.sample_in_batches`, with progress in the log; the
  run's own sampler, and its steps and guidance unless given."""
  from data_pipelines import image_decode
  from t2i.sample import sample_in_batches
  cfg = s.config.sample
  kw = dict(num_steps=int(num_steps or cfg.num_steps), sampler=cfg.get("sampler", "ddim"),
            guidance_scale=float(cfg.guidance_scale if guidance_scale is None else guidance_scale))
  out: list[np.ndarray] = []
  for imgs in sample_in_batches(s, list(prompts), list(seeds), batch, **kw):
    out.extend(image_decode.to_uint8(im) for im in imgs)
    logging.info("generated pairs: %d / %d samples", len(out), len(prompts))
  return out


def build_round(opponent_workdir: str, data_dir: str, real_dataset: str, num: int, image_size: int, seed: int = 0,
                batch: int = 32, num_steps: int | None = None, guidance_scale: float | None = None) -> str:
  """Builds (once) a SPIN round's pair dataset from the first `num` real records; returns its `cfg.dataset`."""
  from data_pipelines.pipeline import resize_crop
  from data_pipelines.shapes.rendering import png_bytes
  from data_pipelines import image_decode
  from data_pipelines.tfds import common
  name = round_name(opponent_workdir, real_dataset, num, seed)
  if _exists(data_dir, name):
    return f"preference_pairs/{name}"
  from t2i.sample import Sampler
  source = common.load_source(data_dir, real_dataset, "train")
  n = min(int(num), len(source))
  real = [source[i] for i in range(n)]
  captions = [common.text(r["caption"]) for r in real]
  gen = _sample_uint8(Sampler(opponent_workdir), captions, [seed * 1_000_003 + i for i in range(n)], batch,
                      num_steps, guidance_scale)
  rows: dict[str, list[Any]] = {"caption": captions, "jpg_0": [], "jpg_1": [png_bytes(im) for im in gen],
                                "label_0": [1.0] * n}
  for r in real:
    rows["jpg_0"].append(png_bytes(resize_crop(image_decode.decode_rgb(r["image"]), (image_size, image_size))))
  return _write(rows, data_dir, name)


def judged_prompts(num_per_family: int, seed: int, image_size: int) -> list[dict[str, Any]]:
  """shapes-bench prompts {"prompt", "spec", "family"} for on-policy pairs: the eval prompt generator at its own
  seed, without any prompt that names a held-out (colour, shape) pair, so those stay unseen in training. Grounding
  points are in pixels of `image_size`, at least 32 (the smallest shapes-bench canvas; smoke runs are smaller)."""
  from data_pipelines.shapes import palette
  from data_pipelines.shapes.evalset import eval_prompts
  return [p for p in eval_prompts(num_per_family, seed, None, max(32, int(image_size)))
          if not any((o["color"], o["shape"]) in palette.HELD_OUT for o in p["spec"]["objects"])]


def pass_fail_pairs(passed: Sequence[bool], max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
  """(winner, loser) sample indices of one prompt: a random choice of at most `max_pairs` of the
  (passing, failing) combinations; none when all samples pass or all fail."""
  combos = list(itertools.product([i for i, p in enumerate(passed) if p], [i for i, p in enumerate(passed) if not p]))
  order = rng.permutation(len(combos))[:max_pairs]
  return [combos[k] for k in sorted(order)]


def judged_name(policy_workdir: str, num_per_family: int, samples: int, max_pairs: int, seed: int,
                winner: str = "sample") -> str:
  rest = f"f{num_per_family}_k{samples}_m{max_pairs}_s{seed}" + ("" if winner == "sample" else f"_{winner}")
  return _set_name("judged", policy_workdir, rest)


def build_judged(policy_workdir: str, data_dir: str, num_per_family: int, samples: int = 4, max_pairs: int = 4,
                 seed: int = 0, batch: int = 40, num_steps: int | None = None, guidance_scale: float | None = None,
                 judge: Judge | None = None, winner: str = "sample") -> tuple[str, dict[str, Any]]:
  """Builds (once) an on-policy pair dataset; returns its `cfg.dataset` name and statistics (prompts, samples,
  pass rate per family, pairs per family; also written next to it as `<name>.stats.json`).

  Prompts: `judged_prompts(num_per_family, seed)`; sample j of prompt i starts from noise seed
  `seed * 1_000_003 + i * samples + j`, with the run's own sampler, steps and guidance unless given. `judge(image,
  spec)` defaults to the shapes-bench scorer's pass/fail (`data_pipelines.shapes.scoring.score`). `winner`:
  "sample" pairs (passing, failing) samples (`pass_fail_pairs`); "render" pairs a clean render of the prompt's
  ground-truth scene (the eval generator's `scene`) with each of up to `max_pairs` failing samples.
  """
  import json
  from data_pipelines.shapes.rendering import png_bytes, render_clean
  if winner not in ("sample", "render"):
    raise ValueError(f"winner must be 'sample' or 'render' (config.data.winner), got {winner!r}")
  name = judged_name(policy_workdir, num_per_family, samples, max_pairs, seed, winner)
  stats_file = os.path.join(data_dir, name + ".stats.json")
  if _exists(data_dir, name):
    with open(stats_file) as f:
      return f"preference_pairs/{name}", json.load(f)
  if judge is None:
    from data_pipelines.shapes.scoring import score
    judge = lambda image, spec: score(image, spec)["passed"]
  from t2i.sample import Sampler
  s = Sampler(policy_workdir)
  canvas = max(32, int(s.config.image_size))  # the prompts' (and their scenes') canvas, as in judged_prompts
  prompts = judged_prompts(num_per_family, seed, canvas)
  jobs = [(i, j) for i in range(len(prompts)) for j in range(samples)]
  images = _sample_uint8(s, [prompts[i]["prompt"] for i, _ in jobs],
                         [seed * 1_000_003 + i * samples + j for i, j in jobs], batch, num_steps, guidance_scale)
  rng = np.random.default_rng(seed)
  rows: dict[str, list[Any]] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
  stats: dict[str, Any] = {"prompts": len(prompts), "samples": len(images), "passed": {}, "pairs": {}}
  for i, p in enumerate(prompts):
    imgs = images[i * samples:(i + 1) * samples]
    passed = [bool(judge(im, p["spec"])) for im in imgs]
    fam = p["family"]
    n_pass, n_all = stats["passed"].get(fam, (0, 0))
    stats["passed"][fam] = (n_pass + sum(passed), n_all + samples)
    if winner == "render":
      clean = png_bytes(render_clean(p["scene"], canvas)[0])
      fails = [j for j, ok in enumerate(passed) if not ok]
      pairs = [(clean, png_bytes(imgs[fails[k]])) for k in sorted(rng.permutation(len(fails))[:max_pairs])]
    else:
      pairs = [(png_bytes(imgs[w]), png_bytes(imgs[l])) for w, l in pass_fail_pairs(passed, max_pairs, rng)]
    stats["pairs"][fam] = stats["pairs"].get(fam, 0) + len(pairs)
    for w, l in pairs:
      rows["caption"].append(p["prompt"])
      rows["jpg_0"].append(w)
      rows["jpg_1"].append(l)
      rows["label_0"].append(1.0)
  stats["pass_rate"] = {f: a / b for f, (a, b) in stats.pop("passed").items()}
  stats["num_pairs"] = len(rows["caption"])
  logging.info("judged pairs: %s", stats)
  if not rows["caption"]:
    raise ValueError(f"{policy_workdir}: none of its {len(images)} samples for {len(prompts)} prompts gave a "
                     "(pass, fail) pair; raise config.data.samples_per_prompt or config.data.prompts_per_family")
  os.makedirs(data_dir, exist_ok=True)
  with open(stats_file, "w") as f:  # before the set: a built set always has its statistics
    json.dump(stats, f, indent=1)
  return _write(rows, data_dir, name), stats
