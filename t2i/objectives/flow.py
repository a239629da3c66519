"""Rectified-flow (flow matching) training loss, FLUX.1 convention, and guidance distillation.

Conventions: t in [0, 1] is a float32 array [B]; t = 0 is data, t = 1 is noise, and
  x_t = (1 - t) x0 + t eps,    velocity target v = dx_t/dt = eps - x0.
A sampler integrates dx/dt = v from t = 1 to t = 0 (see `t2i.sampling.flow`). The model receives t in [0, 1]
(FLUX multiplies by 1000 inside its timestep embedding).

Timesteps: "uniform" U[0, 1), or "logit_normal" sigmoid(N(mean, std^2)) (SD3); optionally shifted towards noise by
`time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1)`, FLUX's resolution-dependent shift with mu = `flux_mu(L)`.
The SD3 "shift s" map s t / (1 + (s - 1) t) is the same map with mu = log(s).

The loss is split into pieces so preference objectives (Diffusion-DPO on velocity errors) can evaluate several
images under one shared (noise, t):
  noise, t = sample_noise_and_t(rng, x0.shape, kind, ...)
  err = per_example_error(velocity_fn(interpolate(x0, noise, t), t, cond), velocity_target(x0, noise), w)
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from t2i.objectives.diffusion import per_example_error

PyTree = Any
VelocityFn = Callable[[jax.Array, jax.Array, PyTree], jax.Array]
GuidedVelocityFn = Callable[[jax.Array, jax.Array, jax.Array, PyTree], jax.Array]
TSampler = Callable[[jax.Array, int], jax.Array]

T_KINDS = ("uniform", "logit_normal")

__all__ = ["T_KINDS", "flux_mu", "time_shift", "sample_t", "sample_noise_and_t", "interpolate", "velocity_target",
           "per_example_error", "skip_preconditioning", "flow_loss", "concat_uncond_cond", "guidance_distillation_loss"]


def flux_mu(num_image_tokens: Any, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> Any:
  """FLUX's shift mu, linear in the number of image tokens through (base_seq_len, base_shift) and
  (max_seq_len, max_shift) (not clipped outside). Works on Python numbers and arrays."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return base_shift + slope * (num_image_tokens - base_seq_len)


def time_shift(mu: Any, sigma: Any, t: Any) -> Any:
  """e^mu / (e^mu + (1/t - 1)^sigma): maps 0 -> 0 and 1 -> 1, the identity when mu = 0 and sigma = 1, and moves
  t towards 1 (noise) for mu > 0."""
  t = jnp.asarray(t, jnp.float32)
  e = jnp.exp(jnp.asarray(mu, jnp.float32))
  return e / (e + (1.0 / t - 1.0) ** sigma)


def sample_t(rng: jax.Array, batch: int, kind: str = "uniform", mean: float = 0.0, std: float = 1.0,
             shift: Any = None) -> jax.Array:
  """Training timesteps [batch] in [0, 1] (float32): "uniform" U[0, 1) or "logit_normal" sigmoid(N(mean, std^2)),
  then `time_shift(shift, 1, t)` if `shift` (a mu, scalar or [batch]) is not None."""
  if kind not in T_KINDS:
    raise ValueError(f"kind must be one of {T_KINDS}, got {kind!r}")
  if kind == "uniform":
    t = jax.random.uniform(rng, (batch,), jnp.float32)
  else:
    t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,), jnp.float32))
  if shift is not None:
    t = time_shift(shift, 1.0, t)
  return t


def _draw_t(rng: jax.Array, batch: int, t_sampler: str | TSampler, logit_mean: float, logit_std: float,
            shift_mu: Any) -> jax.Array:
  if callable(t_sampler):
    t = jnp.asarray(t_sampler(rng, batch), jnp.float32)
    if t.shape != (batch,):
      raise ValueError(f"t_sampler must return shape ({batch},), got {t.shape}")
    return t if shift_mu is None else time_shift(shift_mu, 1.0, t)
  return sample_t(rng, batch, t_sampler, logit_mean, logit_std, shift_mu)


def sample_noise_and_t(rng: jax.Array, shape: tuple[int, ...], t_sampler: str | TSampler = "uniform",
                       logit_mean: float = 0.0, logit_std: float = 1.0,
                       shift_mu: Any = None) -> tuple[jax.Array, jax.Array]:
  """Draws noise ~ N(0, I) of `shape` (float32) and t [B] (see `sample_t`; `t_sampler` may be a kind or a
  callable (rng, batch) -> t)."""
  if len(shape) < 2:
    raise ValueError(f"shape must be (batch, ...), got {shape!r}")
  k_noise, k_t = jax.random.split(rng)
  noise = jax.random.normal(k_noise, shape, jnp.float32)
  return noise, _draw_t(k_t, shape[0], t_sampler, logit_mean, logit_std, shift_mu)


def _bcast(t: jax.Array, like: jax.Array) -> jax.Array:
  t = jnp.asarray(t).astype(like.dtype)
  return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def skip_preconditioning(velocity_fn: VelocityFn, sigma_data: float) -> VelocityFn:
  """Velocity of an x0-predicting network with EDM's skip connection (Karras et al. 2022), for the flow process.

  With sd = sigma_data and D = t^2 + (1 - t)^2 sd^2, the network output F gives
    x0_hat = c_skip x_t + c_out F,   c_skip = sd^2 (1 - t) / D,   c_out = t sd / sqrt(D)
  (EDM's coefficients for x_t / (1 - t), whose noise level is t / (1 - t)), and the returned velocity is
    v = (x_t - x0_hat) / t = (t - (1 - t) sd^2) / D * x_t - sd / sqrt(D) * F,
  finite at t = 0. At low noise x0_hat is mostly x_t; at high noise mostly F (x-prediction). Losses, samplers and
  preference objectives use the returned velocity unchanged.
  """
  sd = float(sigma_data)
  if not sd > 0:
    raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")

  def wrapped(x: jax.Array, t: jax.Array, cond: PyTree) -> jax.Array:
    tt = _bcast(jnp.asarray(t, jnp.float32), x)
    d = tt * tt + (1.0 - tt) ** 2 * sd * sd
    out = velocity_fn(x, t, cond)
    v = (tt - (1.0 - tt) * sd * sd) / d * x.astype(jnp.float32) - sd / jnp.sqrt(d) * out.astype(jnp.float32)
    return v.astype(out.dtype)
  return wrapped


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t noise, t [B]."""
  tb = _bcast(t, x0)
  return (1.0 - tb) * x0 + tb * noise.astype(x0.dtype)


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """Rectified-flow regression target eps - x0 (= d x_t / dt)."""
  return noise.astype(x0.dtype) - x0


def _weights(weighting: Any, t: jax.Array) -> jax.Array | None:
  if weighting is None:
    return None
  w = weighting(t) if callable(weighting) else weighting
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), t.shape)
  return jax.lax.stop_gradient(w)


def flow_loss(velocity_fn: VelocityFn, x0: jax.Array, cond: PyTree, rng: jax.Array, *,
              t_sampler: str | TSampler = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0,
              shift_mu: Any = None, weighting: Callable[[jax.Array], jax.Array] | jax.Array | None = None,
              loss_type: str = "l2", huber_c: float = 0.1, mask: jax.Array | None = None,
              guidance: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Rectified-flow loss: mean over the batch of w(t) * mean ||v_theta(x_t, t, cond) - (eps - x0)||^2.

  Args:
    velocity_fn: (x_t, t float32 [B] in [0, 1], cond) -> velocity with x_t's shape.
    x0: clean latents/tokens [B, ...].
    cond: conditioning pytree passed through.
    rng: PRNG key for noise and t.
    t_sampler: "uniform", "logit_normal" (with logit_mean / logit_std) or a callable (rng, batch) -> t.
    shift_mu: optional time shift mu (scalar or [B]; e.g. `flux_mu(num_image_tokens)`), applied to sampled t.
    weighting: optional per-example weights: a callable t -> [B] or an array [B] (gradient stopped).
    mask: optional array broadcastable to x0; the error mean runs over masked elements only.
    guidance: for guidance-embedded models (FLUX.1-dev fine-tuning): a scalar or [B] guidance value; the model is
      then called as velocity_fn(x_t, t, g float32 [B], cond).
  Returns:
    (scalar loss, metrics) with "loss", "mse" (unweighted) and "t_mean".
  """
  noise, t = sample_noise_and_t(rng, x0.shape, t_sampler, logit_mean, logit_std, shift_mu)
  noise = noise.astype(x0.dtype)
  x_t = interpolate(x0, noise, t)
  if guidance is None:
    pred = velocity_fn(x_t, t, cond)
  else:
    pred = velocity_fn(x_t, t, jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), t.shape), cond)
  tgt = velocity_target(x0, noise)
  per_ex = per_example_error(pred, tgt, _weights(weighting, t), mask, loss_type=loss_type, huber_c=huber_c)
  loss = jnp.mean(per_ex)
  mse = jnp.mean(per_example_error(jax.lax.stop_gradient(pred), tgt, None, mask, loss_type="l2"))
  return loss, {"loss": loss, "mse": mse, "t_mean": jnp.mean(t)}


def concat_uncond_cond(uncond: PyTree, cond: PyTree) -> PyTree:
  """[uncond; cond] along the batch axis for every leaf; an uncond leaf with leading dim 1 is broadcast."""
  def cat(u, c):
    u, c = jnp.asarray(u), jnp.asarray(c)
    if u.shape[0] != c.shape[0]:
      if u.shape[0] != 1:
        raise ValueError(f"uncond leading dim {u.shape[0]} must equal cond's {c.shape[0]} or be 1")
      u = jnp.broadcast_to(u, (c.shape[0],) + u.shape[1:])
    return jnp.concatenate([u, c.astype(u.dtype)], axis=0)
  return jax.tree.map(cat, uncond, cond)


def guidance_distillation_loss(student_fn: GuidedVelocityFn, teacher_fn: VelocityFn, x0: jax.Array, cond: PyTree,
                               uncond: PyTree, rng: jax.Array, *, guidance_range: tuple[float, float] = (1.0, 5.0),
                               t_sampler: str | TSampler = "uniform", logit_mean: float = 0.0,
                               logit_std: float = 1.0, shift_mu: Any = None,
                               weighting: Callable[[jax.Array], jax.Array] | jax.Array | None = None,
                               loss_type: str = "l2", huber_c: float = 0.1,
                               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Guidance distillation (Meng et al. 2022, arXiv 2210.03142): a guidance-conditioned student regresses the
  teacher's classifier-free-guided velocity at a guidance scale g ~ U[guidance_range] per example:
    target = v_T(x_t, t, uncond) + g (v_T(x_t, t, cond) - v_T(x_t, t, uncond))   (gradient stopped)
    loss = mean_B w(t) * mean ||student_fn(x_t, t, g, cond) - target||^2,
  with x_t = (1 - t) x0 + t eps as in `flow_loss`. The teacher evaluates [uncond; cond] in one batched call.

  Args:
    student_fn: (x_t, t [B], g float32 [B], cond) -> velocity.
    teacher_fn: (x_t, t [B], cond) -> velocity (no guidance input); called once on a batch of 2B.
    uncond: same structure as cond, leading dim B or 1 (empty / negative prompt).
  Returns:
    (scalar loss, metrics) with "loss", "mse" (unweighted), "t_mean", "g_mean" and "guidance_gap" (mean squared
    cond - uncond teacher difference).
  """
  lo, hi = guidance_range
  if hi < lo:
    raise ValueError(f"guidance_range must be (low, high) with low <= high, got {guidance_range!r}")
  k_nt, k_g = jax.random.split(rng)
  noise, t = sample_noise_and_t(k_nt, x0.shape, t_sampler, logit_mean, logit_std, shift_mu)
  b = x0.shape[0]
  g = jax.random.uniform(k_g, (b,), jnp.float32, lo, hi)
  x_t = interpolate(x0, noise.astype(x0.dtype), t)

  both = teacher_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0),
                    concat_uncond_cond(uncond, cond))
  v_u, v_c = jnp.split(jax.lax.stop_gradient(both).astype(jnp.float32), 2, axis=0)
  tgt = v_u + _bcast(g, v_u) * (v_c - v_u)

  pred = student_fn(x_t, t, g, cond)
  per_ex = per_example_error(pred, tgt, _weights(weighting, t), mask, loss_type=loss_type, huber_c=huber_c)
  loss = jnp.mean(per_ex)
  mse = jnp.mean(per_example_error(jax.lax.stop_gradient(pred), tgt, None, mask, loss_type="l2"))
  gap = jnp.mean(jnp.square(v_c - v_u))
  return loss, {"loss": loss, "mse": mse, "t_mean": jnp.mean(t), "g_mean": jnp.mean(g), "guidance_gap": gap}
