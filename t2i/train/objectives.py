"""Objective registry: config.objective -> pure loss (and the matching sampler for validation / t2i.sample).

loss(params, frozen, batch, rng, models) -> (scalar loss, metrics dict); params are the trainable groups,
frozen the others; both are dicts keyed by module name ("unet", "text_encoder", "vae", ...).
sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps, guidance_scale, sampler, x_T=None)
-> images in [-1, 1], NHWC (x_T: optional starting noise, so each image can have its own seed).
A new method registers its functions here (and adds an experiment file); it does not add a loop.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
  loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  sample: Callable[..., jax.Array] | None = None


def diffusion_loss(params, frozen, batch, rng, models):
  from t2i.objectives import diffusion
  cfg = models.config.diffusion
  p = {**frozen, **params}
  r_drop, r_lat, r_loss = jax.random.split(rng, 3)
  ids = batch["input_ids"]
  drop = None
  if cfg.get("cond_dropout", 0.0) > 0:
    drop = jax.random.bernoulli(r_drop, cfg.cond_dropout, (ids.shape[0],))
  if "encoder_hidden_states" in batch:  # cached embeddings of frozen text encoders (t2i.train.cache)
    cond = models.cond_from_embeddings(batch["encoder_hidden_states"], batch.get("text_embeds"),
                                       batch.get("time_ids"))
    if drop is not None:
      uncond = models.cond(p, jnp.asarray(models.uncond_ids)[None])
      cond = jax.tree.map(lambda c, u: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), u, c), cond,
                          {k: uncond[k] for k in cond})
  else:
    if drop is not None:
      ids = jnp.where(drop[:, None], jnp.asarray(models.uncond_ids)[None], ids)
    cond = models.cond(p, ids, batch.get("time_ids"))
  if "latent_mean" in batch:  # cached VAE moments
    x0 = models.latents_from_moments(batch["latent_mean"], batch["latent_logvar"], r_lat)
  else:
    x0 = models.to_latents(p, batch["image"], r_lat)
  return diffusion.diffusion_loss(
      lambda x, t, c: models.denoise(p["unet"], x, t, c), x0, cond, r_loss, models.schedule,
      prediction_type=cfg.prediction_type, snr_gamma=cfg.get("snr_gamma") or None,
      noise_offset=float(cfg.get("noise_offset", 0.0)), loss_type=cfg.get("loss_type", "l2"))


def diffusion_sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps: int,
                     guidance_scale: Any, sampler: str = "ddim", x_T: jax.Array | None = None):
  from t2i.sampling import diffusion as sampling
  p = {**frozen, **params}
  cond = models.cond(p, input_ids)
  uncond = models.cond(p, uncond_ids)
  shape = (input_ids.shape[0],) + models.latent_shape
  z = sampling.sample(lambda x, t, c: models.denoise(p["unet"], x, t, c), shape, cond, uncond, rng,
                      models.schedule, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                      prediction_type=models.config.diffusion.prediction_type, x_T=x_T)
  return jnp.clip(models.to_image(p, z).astype(jnp.float32), -1.0, 1.0)


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective(loss=diffusion_loss, sample=diffusion_sample),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}: unknown (registered: {sorted(OBJECTIVES)})")
  return OBJECTIVES[name]


def register(name: str, objective: Objective) -> None:
  OBJECTIVES[name] = objective
