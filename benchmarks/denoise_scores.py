"""Where does a trained denoiser break? Scores its one-step clean estimates of noised shapes-bench renders.

  python -m benchmarks.denoise_scores --workdirs=W1,W2 [--levels=0.05,0.2,0.35,0.5,0.65,0.8] [--family=single]
      [--num=64] [--step=N] [--out=F]

Renders `num` clean images of one prompt family (their captions are the prompts), noises them to each level, lets
the model predict x0 in one step with the true caption (no guidance) and scores the decoded estimates with the
shapes-bench scorer against the caption. A denoiser that has learned to draw passes nearly everything at low noise,
where the input already shows the answer; the pass rate may fall at high noise, where the prompt must supply it.
Much cheaper than sampling, and it separates "cannot draw a sharp shape" (low-noise failures) from "cannot lay
out the scene" (high-noise failures). Levels as in `benchmarks.conditioning`. One JSON line per (workdir, level):
{"workdir", "step", "family", "num", "level", "passed" (fraction), "mse" (latent x0 error), "clean_passed"}.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.eval_common import (check_level_args, clean_renders, emit, load_denoiser, pass_rates,  # noqa: E402
                                    x0_estimate)

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Train workdirs (U-Net diffusion or rectified-flow runs).")
_LEVELS = flags.DEFINE_list("levels", ["0.05", "0.2", "0.35", "0.5", "0.65", "0.8"], "Noise levels in [0, 1].")
_FAMILY = flags.DEFINE_string("family", "single", "Prompt family of the rendered images (shapes-bench families).")
_NUM = flags.DEFINE_integer("num", 64, "Images.")
_SEED = flags.DEFINE_integer("seed", 1000, "Generator seed of the renders (not a training seed) and noise seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file too.")


def denoise_scores(workdir: str, levels: Sequence[float], family: str = "single", num: int = 64, seed: int = 1000,
                   step: int | None = None) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from data_pipelines.image_decode import to_float, to_uint8

  s, p, denoise = load_denoiser(workdir, step)
  m, config = s.models, s.config
  images, texts, specs = clean_renders(family, num, int(config.image_size), seed)
  x0 = m.to_latents(p, to_float(jnp.asarray(images)), jax.random.PRNGKey(0))
  cond = m.cond(p, jnp.asarray(s.tokenize(texts)))
  noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape, x0.dtype)

  @jax.jit
  def estimate(level):  # -> (uint8 images, latent x0 error)
    x0_hat = x0_estimate(m, config, denoise, x0, noise, level, cond)
    return to_uint8(m.to_image(p, x0_hat).astype(jnp.float32)), jnp.mean((x0_hat.astype(jnp.float32) - x0) ** 2)

  out = {level: estimate(jnp.float32(level)) for level in levels}
  rates = pass_rates(lambda level: np.asarray(out[level][0]), specs, levels)
  clean = pass_rates(lambda _: images, specs, [0.0])[0]
  return [{"workdir": workdir, "step": s.step, "family": family, "num": num, "level": float(level), "passed": r,
           "mse": float(out[level][1]), "clean_passed": clean} for level, r in zip(levels, rates)]


def main(argv: Sequence[str]) -> None:
  levels = check_level_args(argv, _WORKDIRS.value, _LEVELS.value)
  for wd in _WORKDIRS.value:
    emit(denoise_scores(wd, levels, _FAMILY.value, _NUM.value, _SEED.value, _STEP.value), _OUT.value)


if __name__ == "__main__":
  app.run(main)
