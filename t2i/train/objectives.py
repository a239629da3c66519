"""Objective registry: config.objective -> pure loss (and the matching sampler for validation / t2i.sample).

loss(params, frozen, batch, rng, models) -> (scalar loss, metrics dict); params are the trainable groups,
frozen the others; both are dicts keyed by group name ("unet" or "transformer", "text_encoder", "vae",
"reference", ...).
sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps, guidance_scale, sampler, x_T=None)
-> images in [-1, 1], NHWC (x_T: optional starting noise, so each image can have its own seed).

Registered: "diffusion" (eps / v / x0 U-Net), "flow" (rectified flow), "flow_guidance_distill" (a
guidance-embedded student regresses the CFG output of the frozen "reference" teacher), and the pairwise
"diffusion_dpo", "flow_dpo", "diffusion_spin", "flow_spin" (batch["image"] preferred / real, batch["image_l"]
rejected / the opponent's sample; the frozen "reference" group is the DPO reference or the SPIN opponent).
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
  pair: bool = False   # the batch carries a second image, "image_l"


# ------------------------------------------------------------------------------------------------ shared pieces

def conditioning(p: dict, batch: dict, rng: jax.Array, models, dropout: float = 0.0) -> dict:
  """The denoiser's conditioning for the batch; with `dropout` > 0 that fraction of rows becomes unconditional.

  Cached embeddings (t2i.train.cache: keys "cond.<name>") are used when the batch has them.
  """
  ids = batch["input_ids"]
  drop = jax.random.bernoulli(rng, dropout, (ids.shape[0],)) if dropout > 0 else None
  cached = {k[5:]: v for k, v in batch.items() if k.startswith("cond.")}
  if cached:
    if drop is None:
      return cached
    uncond = models.cond(p, jnp.asarray(models.uncond_ids)[None])
    return jax.tree.map(lambda c, u: jnp.where(drop.reshape((-1,) + (1,) * (c.ndim - 1)), u, c), cached,
                        {k: uncond[k] for k in cached})
  if drop is not None:
    ids = jnp.where(drop[:, None], jnp.asarray(models.uncond_ids)[None], ids)
  return models.cond(p, ids, batch.get("time_ids"))


def latents(p: dict, batch: dict, rng: jax.Array, models, key: str = "image") -> jax.Array:
  """Latents of batch[key] (or of the cached VAE moments "latent_mean" / "latent_logvar")."""
  if key == "image" and "latent_mean" in batch:
    return models.latents_from_moments(batch["latent_mean"], batch["latent_logvar"], rng)
  return models.to_latents(p, batch[key], rng)


def _denoise_fn(p: dict, models, reference: bool = False) -> Callable:
  if reference:
    return lambda x, t, c: models.denoise(p["reference"], x, t, c, module=models.reference)
  return lambda x, t, c: models.denoise(p[models.denoiser_name], x, t, c)


def _with_guidance(cond: dict, models, value: Any) -> dict:
  """Adds cond["guidance"] [B] for a guidance-embedded MMDiT (ignored by other denoisers)."""
  if not models.is_mmdit or not models.denoiser.guidance_embeds:
    return cond
  b = cond["encoder_hidden_states"].shape[0]
  return {**cond, "guidance": jnp.broadcast_to(jnp.asarray(value, jnp.float32), (b,))}


def _flow_t_kw(models) -> dict:
  from t2i.objectives import flow
  cfg = models.config.flow
  mu = None
  if cfg.get("shift", True):
    h, w = models.latent_shape[:2]
    mu = flow.flux_mu((h // 2) * (w // 2), base_shift=float(cfg.get("base_shift", 0.5)),
                      max_shift=float(cfg.get("max_shift", 1.15)))
  return dict(t_sampler=cfg.get("t_sampler", "logit_normal"), logit_mean=float(cfg.get("logit_mean", 0.0)),
              logit_std=float(cfg.get("logit_std", 1.0)), shift_mu=mu)


# ------------------------------------------------------------------------------------------------ diffusion

def diffusion_loss(params, frozen, batch, rng, models):
  from t2i.objectives import diffusion
  cfg = models.config.diffusion
  p = {**frozen, **params}
  r_drop, r_lat, r_loss = jax.random.split(rng, 3)
  cond = conditioning(p, batch, r_drop, models, float(cfg.get("cond_dropout", 0.0)))
  x0 = latents(p, batch, r_lat, models)
  return diffusion.diffusion_loss(
      _denoise_fn(p, models), x0, cond, r_loss, models.schedule,
      prediction_type=cfg.prediction_type, snr_gamma=cfg.get("snr_gamma") or None,
      noise_offset=float(cfg.get("noise_offset", 0.0)), loss_type=cfg.get("loss_type", "l2"))


def diffusion_sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps: int,
                     guidance_scale: Any, sampler: str = "ddim", x_T: jax.Array | None = None):
  from t2i.sampling import diffusion as sampling
  p = {**frozen, **params}
  cond = models.cond(p, input_ids)
  uncond = models.cond(p, uncond_ids)
  shape = (input_ids.shape[0],) + models.latent_shape
  z = sampling.sample(_denoise_fn(p, models), shape, cond, uncond, rng,
                      models.schedule, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                      prediction_type=models.config.diffusion.prediction_type, x_T=x_T)
  return jnp.clip(models.to_image(p, z).astype(jnp.float32), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------ rectified flow

def flow_loss(params, frozen, batch, rng, models):
  """Rectified flow on the denoiser's velocity (config.flow: t_sampler, logit_mean/std, shift, cond_dropout,
  train_guidance = the guidance value a guidance-embedded model is trained at, loss_type)."""
  from t2i.objectives import flow
  cfg = models.config.flow
  p = {**frozen, **params}
  r_drop, r_lat, r_loss = jax.random.split(rng, 3)
  cond = conditioning(p, batch, r_drop, models, float(cfg.get("cond_dropout", 0.0)))
  cond = _with_guidance(cond, models, float(cfg.get("train_guidance", 1.0)))
  x0 = latents(p, batch, r_lat, models)
  return flow.flow_loss(_denoise_fn(p, models), x0, cond, r_loss, loss_type=cfg.get("loss_type", "l2"),
                        **_flow_t_kw(models))


def flow_sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps: int, guidance_scale: Any,
                sampler: str = "euler", x_T: jax.Array | None = None):
  """Euler on FLUX's shifted schedule. A guidance-embedded model gets `guidance_scale` as its embedded guidance
  (one pass per step; config.sample.true_cfg > 1 adds true CFG against `uncond_ids` on top); other models use
  true CFG with `guidance_scale` (two passes per step, batched; uncond_ids = empty or negative prompt)."""
  from t2i.sampling import flow as sampling
  if sampler != "euler":
    raise ValueError(f"config.sample.sampler={sampler!r}: flow objectives sample with 'euler'")
  cfg = models.config.flow
  p = {**frozen, **params}
  cond, uncond = models.cond(p, input_ids), models.cond(p, uncond_ids)
  shape = (input_ids.shape[0],) + models.latent_shape
  fn = _denoise_fn(p, models)
  h, w = models.latent_shape[:2]
  kw = dict(num_steps=num_steps, shift=bool(cfg.get("shift", True)), num_image_tokens=(h // 2) * (w // 2),
            base_shift=float(cfg.get("base_shift", 0.5)), max_shift=float(cfg.get("max_shift", 1.15)), x_T=x_T)
  if models.denoiser.guidance_embeds:
    true_cfg = float(models.config.sample.get("true_cfg", 1.0))
    z = sampling.sample(lambda x, t, g, c: fn(x, t, {**c, "guidance": g}), shape, cond,
                        uncond if true_cfg != 1.0 else None, rng, guidance_scale=true_cfg,
                        guidance_embed=guidance_scale, **kw)
  else:
    z = sampling.sample(fn, shape, cond, uncond, rng, guidance_scale=guidance_scale, **kw)
  return jnp.clip(models.to_image(p, z).astype(jnp.float32), -1.0, 1.0)


def flow_guidance_distill_loss(params, frozen, batch, rng, models):
  """Guidance distillation: the student (guidance-embedded denoiser) regresses the frozen teacher's ("reference")
  CFG velocity at g ~ U[config.distill.guidance_min, guidance_max]; text encoders should be frozen."""
  from t2i.objectives import flow
  cfg = models.config.distill
  p = {**frozen, **params}
  r_lat, r_loss = jax.random.split(rng)
  cond = models.cond(p, batch["input_ids"])
  uncond = models.cond(p, jnp.broadcast_to(jnp.asarray(models.uncond_ids)[None], batch["input_ids"].shape))
  x0 = latents(p, batch, r_lat, models)
  student = lambda x, t, g, c: models.denoise(p[models.denoiser_name], x, t, c, guidance=g)
  return flow.guidance_distillation_loss(
      student, _denoise_fn(p, models, reference=True), x0, cond, uncond, r_loss,
      guidance_range=(float(cfg.guidance_min), float(cfg.guidance_max)), **_flow_t_kw(models))


# ------------------------------------------------------------------------------------------------ preference

def _pair_inputs(params, frozen, batch, rng, models):
  p = {**frozen, **params}
  r_w, r_l, r_loss = jax.random.split(rng, 3)
  cond = conditioning(p, batch, r_w, models)
  return p, cond, latents(p, batch, r_w, models), latents(p, batch, r_l, models, key="image_l"), r_loss


def diffusion_pair_loss(params, frozen, batch, rng, models, spin: bool = False):
  """Diffusion-DPO (spin=False) or SPIN-Diffusion (spin=True) on the U-Net (config.preference)."""
  from t2i.objectives import preference
  dcfg, pcfg = models.config.diffusion, models.config.preference
  p, cond, x_w, x_l, r = _pair_inputs(params, frozen, batch, rng, models)
  kw = dict(beta=float(pcfg.beta), prediction_type=dcfg.prediction_type, snr_gamma=dcfg.get("snr_gamma") or None,
            noise_offset=float(dcfg.get("noise_offset", 0.0)), loss_kind=pcfg.get("loss_kind", "sigmoid"))
  policy, ref = _denoise_fn(p, models), _denoise_fn(p, models, reference=True)
  if spin:
    return preference.spin_loss(policy, ref, x_w, x_l, cond, r, models.schedule,
                                sft_weight=float(pcfg.get("sft_weight", 0.0)), **kw)
  return preference.diffusion_dpo_loss(policy, ref, x_w, x_l, cond, r, models.schedule,
                                       sft_on_winners=bool(pcfg.get("sft_on_winners", False)), **kw)


def flow_pair_loss(params, frozen, batch, rng, models, spin: bool = False):
  """Flow-DPO (spin=False) or flow SPIN (spin=True) on velocity errors (config.preference, config.flow)."""
  from t2i.objectives import preference
  pcfg = models.config.preference
  p, cond, x_w, x_l, r = _pair_inputs(params, frozen, batch, rng, models)
  cond = _with_guidance(cond, models, float(models.config.flow.get("train_guidance", 1.0)))
  kw = dict(beta=float(pcfg.beta), weighting=pcfg.get("weighting", "constant"),
            loss_kind=pcfg.get("loss_kind", "sigmoid"), **_flow_t_kw(models))
  policy, ref = _denoise_fn(p, models), _denoise_fn(p, models, reference=True)
  if spin:
    return preference.flow_spin_loss(policy, ref, x_w, x_l, cond, r, sft_weight=float(pcfg.get("sft_weight", 0.0)),
                                     **kw)
  return preference.flow_dpo_loss(policy, ref, x_w, x_l, cond, r,
                                  sft_on_winners=bool(pcfg.get("sft_on_winners", False)), **kw)


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective(loss=diffusion_loss, sample=diffusion_sample),
    "flow": Objective(loss=flow_loss, sample=flow_sample),
    "flow_guidance_distill": Objective(loss=flow_guidance_distill_loss, sample=flow_sample),
    "diffusion_dpo": Objective(loss=diffusion_pair_loss, sample=diffusion_sample, pair=True),
    "diffusion_spin": Objective(loss=lambda *a: diffusion_pair_loss(*a, spin=True), sample=diffusion_sample,
                                pair=True),
    "flow_dpo": Objective(loss=flow_pair_loss, sample=flow_sample, pair=True),
    "flow_spin": Objective(loss=lambda *a: flow_pair_loss(*a, spin=True), sample=flow_sample, pair=True),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}: unknown (registered: {sorted(OBJECTIVES)})")
  return OBJECTIVES[name]


def register(name: str, objective: Objective) -> None:
  OBJECTIVES[name] = objective
