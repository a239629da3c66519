"""Pairwise preference losses: Diffusion-DPO (Wallace et al. 2023) and SPIN-Diffusion (Yuan et al. 2024).

Both are the same logistic loss on *differences of per-example denoising errors* under a frozen reference:

  D     = (e_pol(x_w) - e_pol(x_l)) - (e_ref(x_w) - e_ref(x_l))      per pair, [B]
  z     = -(beta / 2) * w_t * D                                        the implicit reward margin
  loss  = mean(-log sigmoid(z))                                        ("sigmoid"; "hinge": mean(relu(1 - z)))

where e(x) is the per-example mean squared error of the denoiser at one (t, noise) shared by the pair, and w_t is an
optional per-example timestep weight (ones by default). Diffusion-DPO: (x_w, x_l) = (preferred, rejected) image and
ref = the frozen initial model. SPIN-Diffusion: (x_w, x_l) = (real image, opponent's own sample) and ref = the opponent
(previous iterate). The flow variants replace the epsilon/v errors by rectified-flow velocity errors.

Every function is pure and jittable; the reference/opponent is a separate params tree the caller closes over in
`ref_fn` (never updated here) and is evaluated under `jax.lax.stop_gradient`. See docs/preference.md for the choices.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from t2i.objectives import diffusion as D
from t2i.objectives import flow as F

PyTree = Any
DenoiseFn = Callable[[jax.Array, jax.Array, PyTree], jax.Array]
TSampler = Callable[[jax.Array, int], jax.Array]

LOSS_KINDS = ("sigmoid", "hinge")
FLOW_WEIGHTINGS = ("constant", "epsilon")


# ------------------------------------------------------------------------------------------------- core
def dpo_loss_from_errors(err_w_policy: jax.Array, err_l_policy: jax.Array, err_w_ref: jax.Array,
                         err_l_ref: jax.Array, beta: float | jax.Array, *,
                         timestep_weight: jax.Array | None = None,
                         loss_kind: str = "sigmoid") -> tuple[jax.Array, dict[str, jax.Array]]:
  """Diffusion-DPO loss on per-example errors (all [B], pair i = (winner i, loser i)).

    z_i  = -(beta / 2) * w_i * [(err_w_policy - err_l_policy) - (err_w_ref - err_l_ref)]_i
    loss = mean_i -log sigmoid(z_i)             (loss_kind="sigmoid", Diffusion-DPO / DPO)
         = mean_i max(0, 1 - z_i)              (loss_kind="hinge", the SPIN/SLiC hinge variant)

  Factor convention: -beta/2 on *mean-over-elements* squared errors, as in the official Diffusion-DPO training
  script (beta = 5000 for SD1.5/SDXL latents). The paper writes -beta * T * omega(lambda_t); T * omega is folded into
  beta here and the 1/2 is the Gaussian log-likelihood's, so the published beta values carry over unchanged.
  `timestep_weight` (w_i, default 1) re-introduces an omega(lambda_t)-style weight per example.

  Metrics: "loss"; "implicit_acc" = mean(z > 0), the fraction of pairs whose winner the policy improved more than
  the loser relative to the reference (z = 0 is no win; at policy == ref under jit, rounding differences between
  the two graphs make it ~0.5); "reward_margin" = mean(z); "reward_w" / "reward_l" = mean(-(beta/2) w
  (err_policy - err_ref)) on winners / losers (reward_margin = reward_w - reward_l); "mse_{w,l}_{policy,ref}" =
  batch means of the four errors.
  """
  if loss_kind not in LOSS_KINDS:
    raise ValueError(f"loss_kind must be one of {LOSS_KINDS}, got {loss_kind!r}")
  errs = [jnp.asarray(e, jnp.float32) for e in (err_w_policy, err_l_policy, err_w_ref, err_l_ref)]
  shape = errs[0].shape
  if len(shape) != 1 or any(e.shape != shape for e in errs):
    raise ValueError(f"errors must all have shape [B], got {[e.shape for e in errs]}")
  ew_p, el_p, ew_r, el_r = errs
  ew_r, el_r = jax.lax.stop_gradient(ew_r), jax.lax.stop_gradient(el_r)
  w = jnp.ones(shape, jnp.float32) if timestep_weight is None else jnp.asarray(timestep_weight, jnp.float32)
  if w.shape != shape:
    raise ValueError(f"timestep_weight must have shape {shape}, got {w.shape}")
  scale = -0.5 * jnp.asarray(beta, jnp.float32) * jax.lax.stop_gradient(w)
  reward_w = scale * (ew_p - ew_r)
  reward_l = scale * (el_p - el_r)
  z = reward_w - reward_l
  per_pair = -jax.nn.log_sigmoid(z) if loss_kind == "sigmoid" else jax.nn.relu(1.0 - z)
  loss = jnp.mean(per_pair)
  sg = jax.lax.stop_gradient
  metrics = {
      "loss": loss,
      "implicit_acc": jnp.mean((sg(z) > 0).astype(jnp.float32)),
      "reward_margin": jnp.mean(sg(z)),
      "reward_w": jnp.mean(sg(reward_w)),
      "reward_l": jnp.mean(sg(reward_l)),
      "mse_w_policy": jnp.mean(sg(ew_p)),
      "mse_l_policy": jnp.mean(sg(el_p)),
      "mse_w_ref": jnp.mean(ew_r),
      "mse_l_ref": jnp.mean(el_r),
  }
  return loss, metrics


def _concat_cond(cond: PyTree) -> PyTree:
  return jax.tree.map(lambda c: jnp.concatenate([c, c], axis=0), cond)


def _pair_predictions(fn: DenoiseFn, x_w_t: jax.Array, x_l_t: jax.Array, t: jax.Array, cond: PyTree,
                      concat_pair: bool) -> tuple[jax.Array, jax.Array]:
  """fn on both noisy images, as one 2B batch (cond leaves must be batched) or as two calls."""
  if not concat_pair:
    return fn(x_w_t, t, cond), fn(x_l_t, t, cond)
  b = x_w_t.shape[0]
  out = fn(jnp.concatenate([x_w_t, x_l_t], axis=0), jnp.concatenate([t, t], axis=0), _concat_cond(cond))
  return out[:b], out[b:]


def _pair_errors(policy_fn: DenoiseFn, ref_fn: DenoiseFn, xt_w: jax.Array, xt_l: jax.Array, t: jax.Array,
                 tgt_w: jax.Array, tgt_l: jax.Array, cond: PyTree, concat_pair: bool
                 ) -> tuple[tuple[jax.Array, ...], jax.Array]:
  """The four per-example squared errors (policy w/l, ref w/l) and mean ||policy - ref||^2 (a KL proxy)."""
  pw, pl = _pair_predictions(policy_fn, xt_w, xt_l, t, cond, concat_pair)
  rw, rl = jax.tree.map(jax.lax.stop_gradient, _pair_predictions(ref_fn, xt_w, xt_l, t, cond, concat_pair))
  errs = (D.per_example_error(pw, tgt_w), D.per_example_error(pl, tgt_l),
          D.per_example_error(rw, tgt_w), D.per_example_error(rl, tgt_l))
  sg = jax.lax.stop_gradient
  gap = 0.5 * (jnp.mean(D.per_example_error(sg(pw), rw)) + jnp.mean(D.per_example_error(sg(pl), rl)))
  return errs, gap


def _pair_loss(errs: tuple[jax.Array, ...], gap: jax.Array, w: jax.Array, beta: float | jax.Array,
               loss_kind: str, sft_weight: float, opponent_anchor: float = 0.0
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """dpo_loss_from_errors + optional sft_weight * mean(policy error on winners) + optional opponent anchor
  opponent_anchor * mean((beta/2) w relu(err_l_policy - err_l_ref)), with the extra metrics.

  The anchor is in reward units: at 1 it cancels the pair loss's push on a loser whose policy error is already
  above the reference's (that push is at most (beta/2) w), so the margin can no longer be won by making the
  losers (SPIN: the opponent's own samples) harder to denoise than the opponent finds them."""
  loss, metrics = dpo_loss_from_errors(*errs, beta, timestep_weight=w, loss_kind=loss_kind)
  metrics = {**metrics, "policy_ref_gap": gap, "weight_mean": jnp.mean(w)}
  total = loss
  if sft_weight:
    total = total + sft_weight * jnp.mean(errs[0])
  if opponent_anchor:
    scale = 0.5 * jnp.asarray(beta, jnp.float32) * jax.lax.stop_gradient(w)
    anchor = jnp.mean(scale * jax.nn.relu(errs[1] - jax.lax.stop_gradient(errs[3])))
    total = total + opponent_anchor * anchor
    metrics = {**metrics, "anchor": jax.lax.stop_gradient(anchor)}
  if sft_weight or opponent_anchor:
    metrics = {**metrics, "loss": total, "pair_loss": loss}
  return total, metrics


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in D.PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {D.PREDICTION_TYPES}, got {prediction_type!r}")


def _check_pair(x_w: jax.Array, x_l: jax.Array) -> None:
  if x_w.shape != x_l.shape:
    raise ValueError(f"x_w and x_l must have the same shape, got {x_w.shape} vs {x_l.shape}")


# --------------------------------------------------------------------------------------- epsilon / v
def _noise_pair(rng: jax.Array, x_w: jax.Array, x_l: jax.Array, schedule: D.NoiseSchedule, noise_offset: float,
                shared_noise: bool, t_kw: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(noise_w, noise_l, t): one draw per pair (shared) or independent noise with a shared t (density `t_kw`)."""
  noise_w, t = D.sample_noise_and_t(rng, x_w.shape, schedule, noise_offset, **t_kw)
  if shared_noise:
    return noise_w.astype(x_w.dtype), noise_w.astype(x_l.dtype), t
  noise_l, _ = D.sample_noise_and_t(jax.random.fold_in(rng, 1), x_l.shape, schedule, noise_offset)
  return noise_w.astype(x_w.dtype), noise_l.astype(x_l.dtype), t


def _eps_pair_loss(policy_fn, ref_fn, x_w, x_l, cond, rng, schedule, *, beta, prediction_type, snr_gamma,
                   noise_offset, shared_noise, loss_kind, sft_weight, concat_pair, opponent_anchor, weight_floor,
                   t_kw):
  _check_pair(x_w, x_l)
  noise_w, noise_l, t = _noise_pair(rng, x_w, x_l, schedule, noise_offset, shared_noise, t_kw)
  xt_w = D.add_noise(schedule, x_w, noise_w, t)
  xt_l = D.add_noise(schedule, x_l, noise_l, t)
  tgt_w = D.target(schedule, x_w, noise_w, t, prediction_type)
  tgt_l = D.target(schedule, x_l, noise_l, t, prediction_type)
  errs, gap = _pair_errors(policy_fn, ref_fn, xt_w, xt_l, t, tgt_w, tgt_l, cond, concat_pair)
  w = D.loss_weights(schedule, t, prediction_type, snr_gamma, weight_floor)
  return _pair_loss(errs, gap, w, beta, loss_kind, sft_weight, opponent_anchor)


def diffusion_dpo_loss(policy_fn: DenoiseFn, ref_fn: DenoiseFn, x_w: jax.Array, x_l: jax.Array, cond: PyTree,
                       rng: jax.Array, schedule: D.NoiseSchedule, *, beta: float | jax.Array,
                       prediction_type: str = "epsilon", sft_on_winners: bool = False,
                       snr_gamma: float | None = None, noise_offset: float = 0.0, loss_kind: str = "sigmoid",
                       sft_weight: float = 0.0, opponent_anchor: float = 0.0, concat_pair: bool = True,
                       weight_floor: float = 0.0, t_sampler: str = "uniform", logit_mean: float = 0.0,
                       logit_std: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Diffusion-DPO on an epsilon / v / sample-predicting denoiser.

  One (t, noise) is drawn per pair with `diffusion.sample_noise_and_t` and applied to both x_w and x_l; the four
  errors then go through `dpo_loss_from_errors` (formula there).

  Args:
    policy_fn, ref_fn: (x_t, t int32 [B], cond) -> prediction; ref_fn closes over the frozen reference params.
    x_w, x_l: preferred / rejected images or latents [B, ...] (same caption per row).
    cond: conditioning pytree for the B pairs (shared by both images).
    rng: PRNG key; with the same key `diffusion.diffusion_loss(policy_fn, x_w, ...)` sees the same (noise, t).
    schedule: VP noise schedule.
    beta: KL strength (5000 in the official SD1.5/SDXL runs).
    sft_on_winners: static switch; True returns `diffusion.diffusion_loss` on x_w only (the SFT baseline arm; the
      reference is not evaluated).
    snr_gamma: min-SNR-gamma weights used as the per-pair timestep weight (None: constant, as in the official code).
    noise_offset: passed to `sample_noise_and_t`.
    loss_kind: "sigmoid" (DPO) or "hinge".
    sft_weight, opponent_anchor: the anchors of `_pair_loss` (0 = off), with the frozen reference in the
      opponent's place: the anchor keeps rejected images from being made harder to denoise than the reference
      finds them.
    concat_pair: evaluate each model once on the 2B batch [x_w; x_l] (every cond leaf must have leading dim B);
      False makes two B-sized calls.
    weight_floor, t_sampler, logit_mean, logit_std: the min-SNR weight's floor and the timestep density, as in
      `diffusion.diffusion_loss` (so that a preference arm draws t as the run it starts from was trained).
  Returns:
    (loss, metrics): `dpo_loss_from_errors` metrics plus "policy_ref_gap" (mean ||pred_policy - pred_ref||^2, a
    per-step KL proxy) and "weight_mean".
  """
  _check_prediction_type(prediction_type)
  t_kw = dict(t_sampler=t_sampler, logit_mean=logit_mean, logit_std=logit_std)
  if sft_on_winners:
    loss, m = D.diffusion_loss(policy_fn, x_w, cond, rng, schedule, prediction_type=prediction_type,
                               snr_gamma=snr_gamma, noise_offset=noise_offset, weight_floor=weight_floor, **t_kw)
    return loss, {"loss": loss, "mse_w_policy": m["mse"], "weight_mean": m["weight_mean"]}
  return _eps_pair_loss(policy_fn, ref_fn, x_w, x_l, cond, rng, schedule, beta=beta,
                        prediction_type=prediction_type, snr_gamma=snr_gamma, noise_offset=noise_offset,
                        shared_noise=True, loss_kind=loss_kind, sft_weight=sft_weight, concat_pair=concat_pair,
                        opponent_anchor=opponent_anchor, weight_floor=weight_floor, t_kw=t_kw)


def spin_loss(policy_fn: DenoiseFn, opponent_fn: DenoiseFn, x_real: jax.Array, x_gen: jax.Array, cond: PyTree,
              rng: jax.Array, schedule: D.NoiseSchedule, *, beta: float | jax.Array,
              prediction_type: str = "epsilon", snr_gamma: float | None = None, noise_offset: float = 0.0,
              shared_noise: bool = True, loss_kind: str = "sigmoid", sft_weight: float = 0.0,
              opponent_anchor: float = 0.0, concat_pair: bool = True, weight_floor: float = 0.0,
              t_sampler: str = "uniform", logit_mean: float = 0.0,
              logit_std: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPIN-Diffusion (single-timestep approximation): DPO with winner = real, loser = opponent sample.

    loss = mean -log sigmoid(-(beta/2) w_t [(e_pol(x_real) - e_opp(x_real)) - (e_pol(x_gen) - e_opp(x_gen))])
           + sft_weight * mean e_pol(x_real)
           + opponent_anchor * mean (beta/2) w_t relu(e_pol(x_gen) - e_opp(x_gen))

  x_gen[i] must be the opponent's (previous iterate's) own sample for cond[i]; opponent_fn is that same iterate,
  frozen for the whole SPIN iteration. Defaults: shared (t, noise) per pair, constant timestep weight, logistic loss,
  no SFT term, no opponent anchor (see `_pair_loss`); `shared_noise=False` draws independent noise (t stays
  shared), `loss_kind="hinge"` gives the hinge variant, `snr_gamma` a min-SNR timestep weight. Metrics as in
  `diffusion_dpo_loss`, with w = real and l = gen; `weight_floor` and the timestep density as there.
  """
  _check_prediction_type(prediction_type)
  return _eps_pair_loss(policy_fn, opponent_fn, x_real, x_gen, cond, rng, schedule, beta=beta,
                        prediction_type=prediction_type, snr_gamma=snr_gamma, noise_offset=noise_offset,
                        shared_noise=shared_noise, loss_kind=loss_kind, sft_weight=sft_weight,
                        concat_pair=concat_pair, opponent_anchor=opponent_anchor, weight_floor=weight_floor,
                        t_kw=dict(t_sampler=t_sampler, logit_mean=logit_mean, logit_std=logit_std))


# ------------------------------------------------------------------------------------------- rectified flow
# Flow pieces come from t2i.objectives.flow: x_t = (1 - t) x0 + t noise, t in [0, 1] float32 [B] (t = 1 is pure
# noise), the model predicts the velocity, target = noise - x0.
FlowT = str | TSampler


def flow_weights(t: jax.Array, weighting: str | Callable[[jax.Array], jax.Array] = "constant") -> jax.Array:
  """Per-pair timestep weight [B] for velocity errors (gradient stopped).

  "constant": ones. "epsilon": (1 - t)^2, which turns a velocity error into the epsilon error of the implied
  epsilon prediction (eps_hat - eps = (1 - t)(v_hat - v)), so an epsilon-space beta transfers unchanged.
  A callable t -> [B] is used as is.
  """
  t = jnp.asarray(t, jnp.float32)
  if callable(weighting):
    w = jnp.broadcast_to(jnp.asarray(weighting(t), jnp.float32), t.shape)
  elif weighting not in FLOW_WEIGHTINGS:
    raise ValueError(f"weighting must be one of {FLOW_WEIGHTINGS} or a callable, got {weighting!r}")
  else:
    w = jnp.ones_like(t) if weighting == "constant" else (1.0 - t) ** 2
  return jax.lax.stop_gradient(w)


def _flow_pair_loss(policy_v, ref_v, x_w, x_l, cond, rng, *, beta, t_kw, weighting, shared_noise, loss_kind,
                    sft_weight, concat_pair, opponent_anchor=0.0):
  _check_pair(x_w, x_l)
  noise_w, t = F.sample_noise_and_t(rng, x_w.shape, **t_kw)
  noise_l = noise_w if shared_noise else jax.random.normal(jax.random.fold_in(rng, 1), x_l.shape, jnp.float32)
  xt_w, xt_l = F.interpolate(x_w, noise_w, t), F.interpolate(x_l, noise_l, t)
  tgt_w, tgt_l = F.velocity_target(x_w, noise_w), F.velocity_target(x_l, noise_l)
  errs, gap = _pair_errors(policy_v, ref_v, xt_w, xt_l, t, tgt_w, tgt_l, cond, concat_pair)
  loss, metrics = _pair_loss(errs, gap, flow_weights(t, weighting), beta, loss_kind, sft_weight, opponent_anchor)
  return loss, {**metrics, "t_mean": jnp.mean(t)}


def flow_dpo_loss(policy_v: DenoiseFn, ref_v: DenoiseFn, x_w: jax.Array, x_l: jax.Array, cond: PyTree,
                  rng: jax.Array, *, beta: float | jax.Array, t_sampler: FlowT = "uniform", logit_mean: float = 0.0,
                  logit_std: float = 1.0, shift_mu: Any = None,
                  weighting: str | Callable[[jax.Array], jax.Array] = "constant", sft_on_winners: bool = False,
                  loss_kind: str = "sigmoid", sft_weight: float = 0.0, opponent_anchor: float = 0.0,
                  concat_pair: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Diffusion-DPO on rectified-flow velocity errors e(x) = mean ||(noise - x0) - v(x_t, t, cond)||^2.

  One (noise, t) per pair from `flow.sample_noise_and_t(rng, x_w.shape, t_sampler, logit_mean, logit_std,
  shift_mu)` (the same draw `flow.flow_loss` makes with this key; use the flow trainer's t settings).
  policy_v / ref_v: (x_t, t float [B], cond) -> velocity; guidance-embedded models take their guidance value
  through `cond`. weighting: "constant" (beta folded, default), "epsilon" (see `flow_weights`) or a callable.
  sft_on_winners: `flow.flow_loss` on x_w with the same weighting (the SFT arm; ref not evaluated).
  sft_weight, opponent_anchor: as in `diffusion_dpo_loss`.
  This is also the stand-in for Krea's undisclosed TPO (multi-round, with `refresh_reference` between rounds).
  """
  t_kw = dict(t_sampler=t_sampler, logit_mean=logit_mean, logit_std=logit_std, shift_mu=shift_mu)
  if sft_on_winners:
    flow_weights(jnp.zeros((1,)), weighting)  # validates
    loss, m = F.flow_loss(policy_v, x_w, cond, rng, weighting=lambda t: flow_weights(t, weighting), **t_kw)
    return loss, {"loss": loss, "mse_w_policy": m["mse"], "t_mean": m["t_mean"]}
  return _flow_pair_loss(policy_v, ref_v, x_w, x_l, cond, rng, beta=beta, t_kw=t_kw, weighting=weighting,
                         shared_noise=True, loss_kind=loss_kind, sft_weight=sft_weight, concat_pair=concat_pair,
                         opponent_anchor=opponent_anchor)


def flow_spin_loss(policy_v: DenoiseFn, opponent_v: DenoiseFn, x_real: jax.Array, x_gen: jax.Array, cond: PyTree,
                   rng: jax.Array, *, beta: float | jax.Array, t_sampler: FlowT = "uniform",
                   logit_mean: float = 0.0, logit_std: float = 1.0, shift_mu: Any = None,
                   weighting: str | Callable[[jax.Array], jax.Array] = "constant", shared_noise: bool = True,
                   loss_kind: str = "sigmoid", sft_weight: float = 0.0, opponent_anchor: float = 0.0,
                   concat_pair: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SPIN on velocity errors: `flow_dpo_loss` with winner = real, loser = opponent sample, ref = opponent.

  Options as in `spin_loss` (shared_noise, loss_kind, sft_weight, opponent_anchor) and `flow_dpo_loss` (t settings,
  weighting).
  """
  t_kw = dict(t_sampler=t_sampler, logit_mean=logit_mean, logit_std=logit_std, shift_mu=shift_mu)
  return _flow_pair_loss(policy_v, opponent_v, x_real, x_gen, cond, rng, beta=beta, t_kw=t_kw,
                         weighting=weighting, shared_noise=shared_noise, loss_kind=loss_kind,
                         sft_weight=sft_weight, concat_pair=concat_pair,
                         opponent_anchor=opponent_anchor)


# ------------------------------------------------------------------------------------------- reference
def refresh_reference(ref_params: PyTree, policy_params: PyTree, step: jax.Array, every: int) -> PyTree:
  """Jittable reference refresh: returns policy_params when step > 0 and step % every == 0, else ref_params.

  every <= 0 means never (Diffusion-DPO's frozen reference). SPIN: every = steps per iteration (the opponent
  becomes the current iterate; regenerate x_gen with it). Multi-round DPO/TPO stand-in: every = steps per round.
  """
  if every <= 0:
    return ref_params
  do = jnp.logical_and(step > 0, step % every == 0)
  return jax.tree.map(lambda p, r: jnp.where(do, p.astype(r.dtype), r), policy_params, ref_params)
