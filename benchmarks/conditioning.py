"""Does a trained denoiser read its prompt? Its x0 error on one training batch at fixed noise levels, with the true
captions, the captions of other images (the batch rolled by one) and the empty prompt.

  python -m benchmarks.conditioning --workdirs=W1,W2 [--levels=0.05,0.2,0.4,0.6,0.8,0.95] [--step=N] [--out=F]
      [--family=position --num=64]

A model that ignores its prompt has the same error under all three; one that reads it is far worse with the wrong
captions at high noise, where the prompt decides colour, shape and place. Levels are fractions of the noise range:
timestep level * (T - 1) for a U-Net (DDPM schedule), t = level for rectified flow. Same noise and images for every
row. One JSON line per (workdir, level): {"workdir", "step", "level", "true", "shuffled", "empty"}.

With --family, the images are --num clean shapes-bench renders of that prompt family instead of a training batch;
for `position` and `grounding` a fourth column, "flipped", holds the error under the caption with its relation
reversed ("left of" <-> "right of", "above" <-> "below") or its point mirrored through the image centre: equal to
"true" when the model ignores where the caption puts things.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from benchmarks.eval_common import check_level_args, clean_renders, emit, load_denoiser, x0_estimate  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Train workdirs (U-Net diffusion or rectified-flow runs).")
_LEVELS = flags.DEFINE_list("levels", ["0.05", "0.2", "0.4", "0.6", "0.8", "0.95"], "Noise levels in [0, 1].")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_SEED = flags.DEFINE_integer("seed", 1, "Noise seed.")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file too.")
_FAMILY = flags.DEFINE_string("family", "", "Clean renders of this prompt family instead of a training batch.")
_NUM = flags.DEFINE_integer("num", 64, "Number of renders with --family.")


def conditioning_errors(workdir: str, levels: Sequence[float], seed: int = 1, step: int | None = None,
                        family: str = "", num: int = 64) -> list[dict]:
  import jax
  import jax.numpy as jnp

  from data_pipelines.image_decode import to_float
  from data_pipelines.shapes.captions import flipped_caption
  from t2i import parallel
  from t2i.train import loop

  s, p, denoise = load_denoiser(workdir, step)
  m, config = s.models, s.config
  flipped = None
  if family:
    renders, texts, _ = clean_renders(family, num, int(config.image_size), seed)
    image = to_float(jnp.asarray(renders))
    ids = jnp.asarray(s.tokenize(texts))
    flipped_texts = [flipped_caption(t, int(config.image_size)) for t in texts]
    if flipped_texts != texts:  # the family names a relation or a point (position, grounding)
      flipped = jnp.asarray(s.tokenize(flipped_texts))
  else:
    batch = next(loop.make_data_iterator(config, s.tokenize, s.mesh))
    image = jnp.asarray(parallel.global_to_host(batch["image"]))
    ids = jnp.asarray(parallel.global_to_host(batch["input_ids"]))
  x0 = m.to_latents(p, image, jax.random.PRNGKey(0))
  empty = jnp.broadcast_to(jnp.asarray(m.uncond_ids)[None], ids.shape)
  conds = {"true": m.cond(p, ids), "shuffled": m.cond(p, jnp.roll(ids, 1, axis=0)), "empty": m.cond(p, empty)}
  if flipped is not None:
    conds["flipped"] = m.cond(p, flipped)
  noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape, x0.dtype)

  @jax.jit
  def x0_error(level, cond):
    x0_hat = x0_estimate(m, config, denoise, x0, noise, level, cond)
    return jnp.mean((x0_hat.astype(jnp.float32) - x0) ** 2)

  return [{"workdir": workdir, "step": s.step, "level": float(level),
           **{k: float(x0_error(jnp.float32(level), c)) for k, c in conds.items()}} for level in levels]


def main(argv: Sequence[str]) -> None:
  levels = check_level_args(argv, _WORKDIRS.value, _LEVELS.value)
  for wd in _WORKDIRS.value:
    emit(conditioning_errors(wd, levels, _SEED.value, _STEP.value, _FAMILY.value, _NUM.value), _OUT.value)


if __name__ == "__main__":
  app.run(main)
