"""Objective registry: config.objective -> pure loss (and the matching sampler for validation / t2i.sample).

loss(params, frozen, batch, rng, models) -> (scalar loss, metrics dict); params are the trainable groups,
frozen the others; both are dicts keyed by group name ("unet" or "transformer", "text_encoder", "vae",
"reference", ...).
sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps, guidance_scale, sampler, x_T=None)
-> images in [-1, 1], NHWC (x_T: optional starting noise, so each image can have its own seed; rng: one key, or
one key per image for samplers that draw noise along the way, e.g. the diffusion sampler "ddpm").

Registered: "diffusion" (eps / v / x0 U-Net), "flow" (rectified flow), "flow_guidance_distill" (a
guidance-embedded student regresses the CFG output of the frozen "reference" teacher), and the pairwise
"diffusion_dpo", "flow_dpo", "diffusion_spin", "flow_spin" (batch["image"] preferred / real, batch["image_l"]
rejected / the opponent's sample; the frozen "reference" group is the DPO reference or the SPIN opponent), and
for the "tokens" family (`t2i.train.token_models`): "vq" (VQ-VAE image tokenizer; dead-code restarts as its
post_update; validation writes reconstructions) and "cm3" (CM3 next-token NLL + z-loss on token documents; the
sampler decodes image codes with `t2i.sampling.ar` and the frozen VQ decoder) and "contrastive" (the retrieval
dual encoder, InfoNCE with query-token dropout).
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
  # (params, frozen, batch, rng, step, models) -> (params, metrics): pure non-gradient change after each update
  post_update: Callable[..., tuple[Any, dict[str, jax.Array]]] | None = None
  # (params, frozen, images, models) -> images: validation writes reconstructions of batch images (autoencoders)
  reconstruct: Callable[..., jax.Array] | None = None
  static_guidance: bool = False   # the sampler needs guidance_scale as a Python float (one compile per value)


# ------------------------------------------------------------------------------------------------ shared pieces

def cond_drop(rng: jax.Array, dropout: float, n: int) -> jax.Array:
  """bool [n]: the rows `conditioning` makes unconditional for the same `rng` and `dropout`."""
  return jax.random.bernoulli(rng, dropout, (n,))


def conditioning(p: dict, batch: dict, rng: jax.Array, models, dropout: float = 0.0) -> dict:
  """The denoiser's conditioning for the batch; with `dropout` > 0 that fraction of rows becomes unconditional.

  Cached embeddings (t2i.train.cache: keys "cond.<name>") are used when the batch has them.
  """
  ids = batch["input_ids"]
  drop = cond_drop(rng, dropout, ids.shape[0]) if dropout > 0 else None
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


def latent_mask(batch: dict, x0: jax.Array) -> jax.Array | None:
  """batch["mask"] [B, H, W, 1] (config.data.alpha_mask) average-pooled to the latents' [B, h, w, 1], or None."""
  mask = batch.get("mask")
  if mask is None:
    return None
  (b, hh, ww, _), (h, w) = mask.shape, x0.shape[1:3]
  if hh % h or ww % w:
    raise ValueError(f"mask {mask.shape[1:3]} is not a multiple of the latents' {(h, w)}")
  return mask.reshape(b, h, hh // h, w, ww // w, 1).mean(axis=(2, 4))


def _denoise_fn(p: dict, models, reference: bool = False) -> Callable:
  """The denoiser (or the frozen reference) as fn(x, t, cond), wrapped in the x0 skip preconditioning when
  config.diffusion.sigma_data (U-Net) or config.flow.sigma_data (MMDiT, returns velocity) is set."""
  if reference:
    fn = lambda x, t, c: models.denoise(p["reference"], x, t, c, module=models.reference)
  else:
    fn = lambda x, t, c: models.denoise(p[models.denoiser_name], x, t, c)
  if models.schedule is None:  # rectified flow: the wrapped network predicts x0, the wrapper returns velocity
    sigma_data = (models.config.get("flow") or {}).get("sigma_data")
    if sigma_data:
      from t2i.objectives import flow
      fn = flow.skip_preconditioning(fn, float(sigma_data))
    return fn
  sigma_data = models.config.diffusion.get("sigma_data")
  if sigma_data:
    from t2i.objectives import diffusion
    if models.config.diffusion.prediction_type != "sample":
      raise ValueError("config.diffusion.sigma_data (skip preconditioning) needs "
                       f"config.diffusion.prediction_type='sample', got {models.config.diffusion.prediction_type!r}")
    fn = diffusion.skip_preconditioning(fn, models.schedule, float(sigma_data))
  return fn


def _with_guidance(cond: dict, models, value: Any) -> dict:
  """Adds cond["guidance"] [B] for a guidance-embedded MMDiT (ignored by other denoisers)."""
  if not models.is_mmdit or not models.denoiser.guidance_embeds:
    return cond
  b = cond["encoder_hidden_states"].shape[0]
  return {**cond, "guidance": jnp.broadcast_to(jnp.asarray(value, jnp.float32), (b,))}


def _t_kw(models, section: str, default: str) -> dict:
  """t_sampler / logit_mean / logit_std of config.<section>, the sampler name checked against flow.T_KINDS."""
  from t2i.objectives import flow
  cfg = models.config[section]
  kind = cfg.get("t_sampler", default)
  if kind not in flow.T_KINDS:
    raise ValueError(f"config.{section}.t_sampler must be one of {flow.T_KINDS}, got {kind!r}")
  return dict(t_sampler=kind, logit_mean=float(cfg.get("logit_mean", 0.0)),
              logit_std=float(cfg.get("logit_std", 1.0)))


def _flow_t_kw(models) -> dict:
  from t2i.objectives import flow
  cfg = models.config.flow
  mu = None
  if cfg.get("shift", True):
    h, w = models.latent_shape[:2]
    mu = flow.flux_mu((h // 2) * (w // 2), base_shift=float(cfg.get("base_shift", 0.5)),
                      max_shift=float(cfg.get("max_shift", 1.15)))
  return dict(_t_kw(models, "flow", "logit_normal"), shift_mu=mu)


# ------------------------------------------------------------------------------------------------ diffusion

def diffusion_loss(params, frozen, batch, rng, models):
  """Denoising loss (config.diffusion); config.diffusion.contrast = {weight, scale, rows} adds caption-contrastive
  denoising against batch["neg_input_ids"] (config.data.negative_caption) on the rows not dropped for CFG;
  config.diffusion.hola = {weight, resolutions} adds attention grounding (`_hola_kw`); config.diffusion.layout =
  {weight, channels} adds text-side layout grounding (`_layout_term`)."""
  from t2i.objectives import diffusion
  cfg = models.config.diffusion
  p = {**frozen, **params}
  r_drop, r_lat, r_loss = jax.random.split(rng, 3)
  dropout = float(cfg.get("cond_dropout", 0.0))
  cond = conditioning(p, batch, r_drop, models, dropout)
  x0 = latents(p, batch, r_lat, models)
  contrast, hola = dict(cfg.get("contrast") or {}), dict(cfg.get("hola") or {})
  kw = {}
  # rows conditioning() kept conditional (same key and rate): the only rows the extra terms count
  kept = 1.0 - cond_drop(r_drop, dropout, batch["input_ids"].shape[0]).astype(jnp.float32)
  if float(contrast.get("weight", 0.0)) > 0:
    if "neg_input_ids" not in batch:
      raise ValueError("config.diffusion.contrast.weight > 0 needs negative captions: set "
                       "config.data.negative_caption (e.g. data_pipelines.shapes.captions.flipped_caption)")
    neg_mask = batch["neg_mask"] * kept
    rows = diffusion.contrast_rows(neg_mask, int(contrast.get("rows", 0)))  # encode only the rows the term uses
    take = lambda a: None if a is None else jnp.take(a, rows, axis=0)  # noqa: E731
    kw = dict(neg_cond=models.cond(p, take(batch["neg_input_ids"]), take(batch.get("time_ids"))),
              neg_mask=take(neg_mask), neg_rows=rows, contrast_weight=float(contrast["weight"]),
              contrast_scale=float(contrast.get("scale", 10.0)))
  if float(hola.get("weight", 0.0)) > 0:
    kw.update(_hola_kw(p, batch, models, hola, kept))
  loss, metrics = diffusion.diffusion_loss(
      _denoise_fn(p, models), x0, cond, r_loss, models.schedule,
      prediction_type=cfg.prediction_type, snr_gamma=cfg.get("snr_gamma") or None,
      weight_floor=float(cfg.get("weight_floor") or 0.0), noise_offset=float(cfg.get("noise_offset", 0.0)),
      loss_type=cfg.get("loss_type", "l2"), self_condition=models.self_condition,
      mask=latent_mask(batch, x0), sample_weight=batch.get("loss_weight"), **_t_kw(models, "diffusion", "uniform"),
      **kw)
  layout = dict(cfg.get("layout") or {})
  _check_layout_splat(models, layout)
  if float(layout.get("weight", 0.0)) > 0:
    term, extra = _layout_term(cond, batch, models, layout, kept)
    loss, metrics = loss + term, {**metrics, **extra}
  return loss, metrics


def _check_layout_splat(models, layout: dict) -> None:
  """A U-Net with layout_splat_channels reads the places config.diffusion.layout trains on those channels (and,
  with layout_splat_object_channel / layout_splat_spread_channel, the object logit / footprint width it trains)."""
  splat = tuple(int(c) for c in getattr(models.denoiser, "layout_splat_channels", ()) or ())
  if splat and (float(layout.get("weight", 0.0)) <= 0 or splat != tuple(int(c) for c in layout.get("channels", (0, 1)))):
    raise ValueError(f"config.unet.config.layout_splat_channels={splat} reads places that config.diffusion.layout "
                     f"trains: set config.diffusion.layout.weight > 0 and config.diffusion.layout.channels={splat}")
  for name, what in (("object", "an object logit"), ("spread", "a footprint width")):
    c = int(getattr(models.denoiser, f"layout_splat_{name}_channel", -1))
    if splat and c >= 0 and c != int(layout.get(f"{name}_channel", -1)):
      raise ValueError(f"config.unet.config.layout_splat_{name}_channel={c} reads {what} that "
                       f"config.diffusion.layout does not train: set config.diffusion.layout.{name}_channel={c}")


def _layout_term(cond: dict, batch: dict, models, layout: dict, kept: jax.Array) -> tuple[jax.Array, dict]:
  """Weighted `t2i.objectives.layout.layout_loss` on the first text encoder's output states in `cond`
  (config.diffusion.layout = {weight, channels, per_token, object_channel, spread_channel, placed_only}), counted on
  the rows `kept` [B]."""
  from t2i.objectives import layout as layout_lib
  if "group_tokens" not in batch:
    raise ValueError("config.diffusion.layout.weight > 0 needs attribute groups: set config.data.token_groups "
                     "(e.g. data_pipelines.shapes.groups.token_groups)")
  if "text_encoder" not in models.trainable or any(k.startswith("cond.") for k in batch):
    raise ValueError("config.diffusion.layout trains the text encoder's states: it needs "
                     "config.text_encoder.trainable=True and no cached text embeddings (config.cache)")
  channels = tuple(int(c) for c in layout.get("channels", (0, 1)))
  if len(channels) != 2:
    raise ValueError(f"config.diffusion.layout.channels must name 2 state channels (x, y), got {channels}")
  states = cond["encoder_hidden_states"][:, :batch["group_tokens"].shape[-1]]
  term, metrics = layout_lib.layout_loss(states, batch["group_tokens"], batch["group_masks"], kept, channels,
                                         per_token=bool(layout.get("per_token", False)),
                                         object_channel=int(layout.get("object_channel", -1)),
                                         spread_channel=int(layout.get("spread_channel", -1)),
                                         placed=batch["group_placed"] if layout.get("placed_only") else None)
  return float(layout["weight"]) * term, metrics


def _hola_kw(p: dict, batch: dict, models, hola: dict, kept: jax.Array) -> dict:
  """diffusion_loss arguments adding CosmicMan's HOLA attention-grounding term (config.diffusion.hola = {weight,
  resolutions}) on the batch's group_tokens / group_masks (config.data.token_groups), counted on the rows `kept`
  [B] (1 = not made unconditional by condition dropout)."""
  from t2i.objectives import attention
  if "group_tokens" not in batch:
    raise ValueError("config.diffusion.hola.weight > 0 needs attribute groups: set config.data.token_groups "
                     "(e.g. data_pipelines.shapes.groups.token_groups)")
  if models.is_mmdit or models.config.diffusion.get("sigma_data"):
    raise ValueError("config.diffusion.hola: the U-Net's cross-attention maps are supervised; not with an MMDiT "
                     "or config.diffusion.sigma_data")
  weight, res = float(hola["weight"]), tuple(int(r) for r in hola.get("resolutions") or ())

  def aux_loss(maps):
    term, metrics = attention.hola_loss(maps, batch["group_tokens"], batch["group_masks"], kept, res)
    return weight * term, metrics

  return dict(denoise_aux_fn=lambda x, t, c: models.denoise(p[models.denoiser_name], x, t, c, attention_maps=True),
              aux_loss=aux_loss)


def diffusion_sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps: int,
                     guidance_scale: Any, sampler: str = "ddim", x_T: jax.Array | None = None,
                     clip_sample_range: float | None = None, dynamic_threshold: float | None = None,
                     guidance_rescale: float | None = None, guidance_interval: tuple[float, float] | None = None):
  """Options of `t2i.sampling.diffusion.sample`, None = the run's config.sample value (default off): x0 processing
  (clip_sample_range / dynamic_threshold, with config.sample.sample_max_value) and the CFG variants
  guidance_rescale / guidance_interval ((lo, hi) in timesteps)."""
  from t2i.sampling import diffusion as sampling
  scfg = models.config.get("sample") or {}
  pick = lambda value, key, default: scfg.get(key, default) if value is None else value
  x0_kw = dict(clip_sample_range=float(pick(clip_sample_range, "clip_sample_range", 0.0)),
               dynamic_threshold=float(pick(dynamic_threshold, "dynamic_threshold", 0.0)),
               sample_max_value=float(scfg.get("sample_max_value", 1.0)),
               guidance_rescale=float(pick(guidance_rescale, "guidance_rescale", 0.0)),
               guidance_interval=sampling.guidance_interval_tuple(pick(guidance_interval, "guidance_interval", None)))
  p = {**frozen, **params}
  cond = models.cond(p, input_ids)
  uncond = models.cond(p, uncond_ids)
  shape = (input_ids.shape[0],) + models.latent_shape
  z = sampling.sample(_denoise_fn(p, models), shape, cond, uncond, rng,
                      models.schedule, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                      prediction_type=models.config.diffusion.prediction_type, x_T=x_T,
                      self_condition=bool(models.self_condition), **x0_kw)
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
                        mask=latent_mask(batch, x0), weighting=batch.get("loss_weight"), **_flow_t_kw(models))


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


def _anchor_kw(pcfg) -> dict[str, float]:
  """The pair losses' anchors from config.preference: the SFT term on the winners (SPIN: real images) and the
  opponent anchor (DPO: against the frozen reference); 0 or absent = off."""
  return dict(sft_weight=float(pcfg.get("sft_weight", 0.0)), opponent_anchor=float(pcfg.get("opponent_anchor", 0.0)))


def diffusion_pair_loss(params, frozen, batch, rng, models, spin: bool = False):
  """Diffusion-DPO (spin=False) or SPIN-Diffusion (spin=True) on the U-Net (config.preference)."""
  from t2i.objectives import preference
  dcfg, pcfg = models.config.diffusion, models.config.preference
  p, cond, x_w, x_l, r = _pair_inputs(params, frozen, batch, rng, models)
  kw = dict(beta=float(pcfg.beta), prediction_type=dcfg.prediction_type, snr_gamma=dcfg.get("snr_gamma") or None,
            noise_offset=float(dcfg.get("noise_offset", 0.0)), loss_kind=pcfg.get("loss_kind", "sigmoid"),
            weight_floor=float(dcfg.get("weight_floor") or 0.0), **_t_kw(models, "diffusion", "uniform"))
  policy, ref = _denoise_fn(p, models), _denoise_fn(p, models, reference=True)
  if spin:
    return preference.spin_loss(policy, ref, x_w, x_l, cond, r, models.schedule, **_anchor_kw(pcfg), **kw)
  return preference.diffusion_dpo_loss(policy, ref, x_w, x_l, cond, r, models.schedule,
                                       sft_on_winners=bool(pcfg.get("sft_on_winners", False)), **_anchor_kw(pcfg),
                                       **kw)


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
    return preference.flow_spin_loss(policy, ref, x_w, x_l, cond, r, **_anchor_kw(pcfg), **kw)
  return preference.flow_dpo_loss(policy, ref, x_w, x_l, cond, r,
                                  sft_on_winners=bool(pcfg.get("sft_on_winners", False)), **_anchor_kw(pcfg), **kw)


# ------------------------------------------------------------------------------------------------ tokens family

def vq_loss(params, frozen, batch, rng, models):
  """VQ-VAE loss of group "vq" on batch["image"]; metrics psnr, perplexity, used_codes, recon_mse, ..."""
  from t2i.models import vq
  return vq.vq_loss(params["vq"], batch["image"], rng, model=models.vq)


def vq_restart(params, frozen, batch, rng, step, models):
  """Dead-code restart (config.vq_train): every `restart_every` completed steps up to `restart_until` (0: always),
  codes used fewer than `restart_min_count` times in this batch are re-initialised from random encoder outputs
  of the batch (`t2i.models.vq.restart_dead_codes`); live codes are untouched. Metric: restarted_codes."""
  from t2i.models import vq
  cfg = models.config.get("vq_train") or {}
  every = int(cfg.get("restart_every", 0))
  if every <= 0:
    return params, {}
  until = int(cfg.get("restart_until", 0))
  m = models.vq

  def restart(p):
    z = m.apply({"params": p}, batch["image"], method="encode_latent")
    _, codes, _ = m.apply({"params": p}, z, method="quantize")
    new, n = vq.restart_dead_codes(p, vq.code_counts(codes, m.num_codes), z, rng,
                                   min_usage=float(cfg.get("restart_min_count", 1.0)))
    return new, n.astype(jnp.float32)

  due = (step % every == 0) & ((step <= until) if until > 0 else True)
  p, n = jax.lax.cond(due, restart, lambda p: (p, jnp.zeros((), jnp.float32)), params["vq"])
  return {**params, "vq": p}, {"restarted_codes": n}


def vq_reconstruct(params, frozen, images, models):
  p = {**frozen, **params}
  recon, _ = models.vq.apply({"params": p["vq"]}, images)
  return jnp.clip(recon.astype(jnp.float32), -1.0, 1.0)


def cm3_loss(params, frozen, batch, rng, models):
  """CM3: next-token NLL over every real token of the (CM3-transformed) documents batch["tokens"] with
  batch["loss_mask"] (0 = padding), + config.cm3.z_loss_weight * log²Z (Chameleon)."""
  from t2i.objectives.autoregressive import cm3_lm_loss, next_token_batch
  del frozen, rng
  inputs, targets, mask = next_token_batch(batch["tokens"], batch["loss_mask"])
  logits = models.lm.apply({"params": params["lm"]}, inputs)
  return cm3_lm_loss(logits, targets, mask, z_loss_weight=float(models.config.cm3.get("z_loss_weight", 0.0)))


def contrastive_loss(params, frozen, batch, rng, models):
  """Dual encoder (retriever stage of the tokens family): symmetric InfoNCE over the batch's image-caption pairs
  (`t2i.retrieval.contrastive_loss`), the caption (query) side with config.dual_encoder_train.query_dropout
  token dropout (default 0.2, CM3Leon)."""
  from t2i.retrieval import dual_encoder
  del frozen
  rate = float((models.config.get("dual_encoder_train") or {}).get("query_dropout", 0.2))
  return dual_encoder.contrastive_loss(params["dual_encoder"], {"images": batch["image"], "ids": batch["input_ids"]},
                                       rng, models.dual_encoder, query_dropout=rate)


AR_SAMPLERS = {"top_p": "sample", "greedy": "greedy", "cd_k": "cd_k"}


def cm3_sample(params, frozen, input_ids, uncond_ids, rng, models, *, num_steps: int = 0, guidance_scale: float = 1.0,
               sampler: str = "top_p", x_T: jax.Array | None = None):
  """Caption -> image: prompts `<bos> text <break> <image_start>` (input_ids, left-padded with <pad>; uncond_ids:
  text replaced by <mask>) continue with h*w tokens restricted to the image-code range (`t2i.sampling.ar`:
  "top_p" with config.sample.temperature / top_p, "greedy" or "cd_k"), decoded by the frozen VQ decoder to
  images in [-1, 1]. CFG `uncond + g (cond - uncond)` when guidance_scale != 1 (and always for cd_k).
  guidance_scale must be a Python float; x_T: PRNG keys [B, 2] per row (`models.noise`), else split from rng.
  num_steps is unused (the number of tokens is fixed by the code grid)."""
  from t2i.sampling import ar
  del num_steps
  if sampler not in AR_SAMPLERS:
    raise ValueError(f"config.sample.sampler={sampler!r}: the cm3 objective samples with {sorted(AR_SAMPLERS)}")
  cfg = models.config.sample
  g = float(guidance_scale)
  mode = AR_SAMPLERS[sampler]
  two = g != 1.0 or mode == "cd_k"
  vocab = models.vocab
  pad = vocab.special.pad
  h, w = models.code_shape
  dcfg = ar.DecodeConfig(num_tokens=h * w, mode=mode, temperature=float(cfg.get("temperature", 1.0)),
                         top_p=float(cfg.get("top_p", 0.9)), guidance=(g,) if two else (),
                         cd_alpha=float(cfg.get("cd_alpha", 0.1)), cd_k=int(cfg.get("cd_k", 5)),
                         cd_sample=bool(cfg.get("cd_sample", False)), allowed=vocab.image_range, pad_id=pad)
  p = {**frozen, **params}
  keys = x_T if x_T is not None else jax.random.split(rng, input_ids.shape[0])

  def one(ids, u, key):  # one row per call (vmapped): image i depends on its own key only
    streams = [(ids[None], (ids != pad)[None])] + ([(u[None], (u != pad)[None])] if two else [])
    return ar.generate(models.lm, p["lm"], streams, key, dcfg)[0]

  toks = jax.vmap(one)(input_ids, uncond_ids, keys)
  codes = jnp.clip(toks - vocab.image_offset, 0, vocab.num_image_codes - 1).reshape(-1, h, w)
  images = models.vq.apply({"params": p["vq"]}, codes, method="decode")
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective(loss=diffusion_loss, sample=diffusion_sample),
    "flow": Objective(loss=flow_loss, sample=flow_sample),
    "flow_guidance_distill": Objective(loss=flow_guidance_distill_loss, sample=flow_sample),
    "diffusion_dpo": Objective(loss=diffusion_pair_loss, sample=diffusion_sample, pair=True),
    "diffusion_spin": Objective(loss=lambda *a: diffusion_pair_loss(*a, spin=True), sample=diffusion_sample,
                                pair=True),
    "flow_dpo": Objective(loss=flow_pair_loss, sample=flow_sample, pair=True),
    "flow_spin": Objective(loss=lambda *a: flow_pair_loss(*a, spin=True), sample=flow_sample, pair=True),
    "vq": Objective(loss=vq_loss, post_update=vq_restart, reconstruct=vq_reconstruct),
    "cm3": Objective(loss=cm3_loss, sample=cm3_sample, static_guidance=True),
    "contrastive": Objective(loss=contrastive_loss),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"config.objective={name!r}: unknown (registered: {sorted(OBJECTIVES)})")
  return OBJECTIVES[name]


def register(name: str, objective: Objective) -> None:
  OBJECTIVES[name] = objective
