"""Pieces shared by the shapes-bench scoring scripts (`benchmarks.shapes_eval`, `benchmarks.cm3_eval`,
`benchmarks.conditioning`, `benchmarks.denoise_scores`): the eval prompt list, sample-then-score into a temporary
folder, JSON-line output, a workdir's denoiser and its one-step clean estimate, clean renders of one prompt
family and their pass rates. No flags, so any script (and any test) can import it."""
from __future__ import annotations

import json
import tempfile
from typing import Callable, Sequence

import numpy as np


def eval_prompt_texts(num_per_family: int, seed: int, image_size: int) -> list[str]:
  """The shapes-bench eval prompts (num_per_family per family, 6 families) at `image_size`."""
  from data_pipelines.shapes.evalset import eval_prompts
  return [p["prompt"] for p in eval_prompts(num_per_family, seed, None, int(image_size))]


def sample_and_score(model, prompts: Sequence[str], seed: int, batch: int, **sample_kw) -> dict:
  """Samples one image per prompt with `model` (a `t2i.sample.Sampler`; image i from seed + i; `sample_kw` go to
  its call, e.g. sampler="top_p") into a temporary folder and returns its
  `t2i.evaluate.evaluate_dir` summary ({"per_family", "overall", "sharpness", "num"}) with "prompt_seed": seed,
  which with "num" names the prompt set (`benchmarks.score_table` pools by it), and "passed": per family, one
  "0"/"1" character per sample in prompt order (what `score_table --baseline` pairs)."""
  from t2i import evaluate
  from t2i.sample import sample_prompts
  with tempfile.TemporaryDirectory() as out:
    sample_prompts(model, list(prompts), 1, seed, batch, out, **sample_kw)
    summary = evaluate.evaluate_dir(out, return_results=True)
  passed: dict[str, str] = {}
  for r in summary.pop("results"):
    passed[r["family"]] = passed.get(r["family"], "") + ("1" if r["passed"] else "0")
  return {**summary, "prompt_seed": seed, "passed": passed}


def emit(rows: Sequence[dict], out: str | None) -> None:
  """Prints each row as a JSON line (and appends it to `out` when given)."""
  for row in rows:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
      with open(out, "a") as f:
        f.write(line + "\n")


def x0_estimate(m, config, denoise, x0, noise, level, cond):
  """The denoiser's clean estimate from x0 noised to `level` (a fraction of the noise range: timestep
  level * (T - 1) for a DDPM schedule, t = level for rectified flow), its first step if self-conditioned."""
  import jax.numpy as jnp

  from t2i.objectives import diffusion, flow
  from t2i.train import objectives
  b = x0.shape[0]
  if m.schedule is None:  # rectified flow: v = eps - x0, so x0 = x_t - t v
    t = jnp.full((b,), level, jnp.float32)
    x_t = flow.interpolate(x0, noise, t)
    return x_t - level * denoise(x_t, t, objectives._with_guidance(cond, m, 1.0))
  ti = jnp.full((b,), jnp.round(level * (m.schedule.num_train_timesteps - 1)), jnp.int32)
  x_t = diffusion.add_noise(m.schedule, x0, noise, ti)
  x_in = diffusion.self_conditioned_input(x_t, jnp.zeros_like(x_t)) if m.self_condition else x_t
  out = denoise(x_in, ti.astype(jnp.float32), cond)
  return diffusion.x0_from_prediction(m.schedule, x_t, out, ti, config.diffusion.prediction_type)


def load_denoiser(workdir: str, step: int | None = None):
  """(Sampler, merged params, denoise fn) of a U-Net diffusion or rectified-flow workdir."""
  from t2i.sample import Sampler
  from t2i.train import objectives
  s = Sampler(workdir, step=step)
  if s.config.objective not in ("diffusion", "flow"):
    raise ValueError(f"{workdir}: config.objective={s.config.objective!r}; expected 'diffusion' or 'flow'")
  p = {**s.frozen, **s.params}
  return s, p, objectives._denoise_fn(p, s.models)


def check_level_args(argv: Sequence[str], workdirs: Sequence[str] | None, levels: Sequence[str]) -> list[float]:
  """Validates the command line of a per-noise-level script (`--workdirs`, `--levels` in [0, 1]); the levels."""
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not workdirs:
    raise app.UsageError("--workdirs is required")
  out = [float(x) for x in levels]
  if not all(0.0 <= x <= 1.0 for x in out):
    raise app.UsageError(f"--levels must lie in [0, 1], got {list(levels)}")
  return out


def clean_renders(family: str, num: int, size: int, seed: int) -> tuple[np.ndarray, list[str], list[dict]]:
  """`num` clean records of one family from the shapes-bench generator: (uint8 images at `size`, captions, specs).

  Rendered at `size` (at least 32 px, the generator's smallest canvas), so grounding captions name points in the
  image's own pixels, as in training data of that size."""
  from data_pipelines.pipeline import resize_crop
  from data_pipelines.shapes import captions, palette, records
  from data_pipelines.shapes.rendering import decode_image
  if family not in palette.FAMILIES:
    raise ValueError(f"--family={family!r}: expected one of {palette.FAMILIES}")
  images, texts, specs = [], [], []
  for r in records.generate_records("curated", 200 * num, seed=seed, size=max(int(size), 32)):
    spec = captions.parse_prompt(r["caption"])
    if spec["family"] == family:
      images.append(resize_crop(decode_image(r["image"]), (size, size)))
      texts.append(r["caption"])
      specs.append(spec)
      if len(images) == num:
        return np.stack(images), texts, specs
  raise ValueError(f"only {len(images)} {family!r} records in {200 * num} generated; lower --num")


def pass_rates(estimate: Callable[[float], np.ndarray], specs: Sequence[dict], levels: Sequence[float]) -> list[float]:
  """Fraction of `estimate(level)` images (uint8 [N, H, W, 3]) that pass their spec, per level."""
  from data_pipelines.shapes import scoring
  return [float(np.mean([scoring.score(im, sp)["passed"] for im, sp in zip(estimate(level), specs)]))
          for level in levels]
