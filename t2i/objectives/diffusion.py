"""DDPM noise schedules and the denoising (diffusion) training loss.

Conventions: images/latents are NHWC (any rank >= 2 works, batch first), training timesteps are int32 in
[0, num_train_timesteps), and the forward process is variance preserving:
  x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise,   snr_t = alpha_bar_t / (1 - alpha_bar_t).
Schedules reproduce diffusers' DDPMScheduler betas/alphas_cumprod for the same arguments (float32).

The loss is split into pieces so that preference objectives (Diffusion-DPO) can evaluate the per-example error of
several images under one shared (noise, t):
  noise, t = sample_noise_and_t(rng, x0.shape, schedule, noise_offset)
  pred = denoise_fn(add_noise(schedule, x0, noise, t), t, cond)
  err = per_example_error(pred, target(schedule, x0, noise, t, kind), loss_weights(schedule, t, kind, gamma))
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
DenoiseFn = Callable[[jax.Array, jax.Array, PyTree], jax.Array]

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_TYPES = ("l2", "l1", "huber")


@flax.struct.dataclass
class NoiseSchedule:
  """Discrete VP noise schedule; every field is a float32 array of shape [num_train_timesteps]."""
  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  snr: jax.Array

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
  """float32 linspace rounded like torch.linspace (fused multiply-add from both ends), for bitwise parity."""
  lo, hi = np.float32(start), np.float32(stop)
  step = np.float32((hi - lo) / np.float32(num - 1))
  i = np.arange(num)
  from_lo = np.float64(lo) + np.float64(step) * i
  from_hi = np.float64(hi) - np.float64(step) * (num - 1 - i)
  return np.where(i < num // 2, from_lo, from_hi).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the squared-cosine ("squaredcos_cap_v2") alpha_bar, computed in float64."""
  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  n = num_train_timesteps
  return np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shifts/scales sqrt(alpha_bar) so the last timestep has SNR exactly 0 (Lin et al. 2023, Alg. 1)."""
  sqrt_ac = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))
  first, last = sqrt_ac[0].copy(), sqrt_ac[-1].copy()
  sqrt_ac = (sqrt_ac - last) * (first / (first - last))
  ac = sqrt_ac ** 2
  alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
  return (1.0 - alphas).astype(np.float32)


def make_schedule(kind: str = "scaled_linear", num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, rescale_zero_terminal_snr: bool = False) -> NoiseSchedule:
  """Builds a schedule; kinds "linear", "scaled_linear" (Stable Diffusion) and "cosine" (squaredcos_cap_v2)."""
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
  if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
  n = int(num_train_timesteps)
  if kind == "linear":
    betas = _linspace_f32(beta_start, beta_end, n)
  elif kind == "scaled_linear":
    root = _linspace_f32(beta_start ** 0.5, beta_end ** 0.5, n)
    betas = root * root
  else:
    betas = _cosine_betas(n).astype(np.float32)
  if rescale_zero_terminal_snr:
    betas = _rescale_zero_terminal_snr(betas)
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  # Accumulate in float64 (as torch.cumprod does for float32 inputs on CPU), then round once.
  ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  one_minus = (np.float32(1.0) - ac).astype(np.float32)
  with np.errstate(divide="ignore"):
    snr = np.where(one_minus > 0, ac / np.maximum(one_minus, np.float32(1e-30)), np.inf).astype(np.float32)
  return NoiseSchedule(
      betas=jnp.asarray(betas), alphas=jnp.asarray(alphas), alphas_cumprod=jnp.asarray(ac),
      sqrt_alphas_cumprod=jnp.asarray(np.sqrt(ac)), sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(one_minus)),
      snr=jnp.asarray(snr))


def _per_example(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
  """Gathers values[t] ([B]) and reshapes to [B, 1, ..., 1] broadcastable against `like`."""
  v = jnp.take(values, t, axis=0).astype(like.dtype)
  return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """Forward process q(x_t | x0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; t int [B]."""
  return (_per_example(schedule.sqrt_alphas_cumprod, t, x0) * x0
          + _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v-prediction target: sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
  return (_per_example(schedule.sqrt_alphas_cumprod, t, x0) * noise
          - _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def skip_preconditioning(denoise_fn: DenoiseFn, schedule: NoiseSchedule, sigma_data: float) -> DenoiseFn:
  """x0-prediction with EDM's skip connection (Karras et al. 2022), written for the VP process.

  The wrapped denoiser returns c_skip(t) x_t + c_out(t) F(x_t, t, cond), with alpha = sqrt(alpha_bar_t), sigma =
  sqrt(1 - alpha_bar_t) and sd = sigma_data:
    c_skip = sd^2 alpha / (sigma^2 + alpha^2 sd^2),   c_out = sigma sd / sqrt(sigma^2 + alpha^2 sd^2).
  This is EDM's (c_skip, c_out) for x_t / alpha. At low noise the output is mostly the input, so the network only
  corrects the noise; at high noise it is mostly F, plain x0-prediction. sigma_data = 1 gives v-prediction
  (F = -v); sigma_data -> 0 gives plain x0-prediction. Use with prediction_type="sample": losses, weights and
  samplers see the wrapped x0 prediction. Timesteps may be fractional (alpha_bar is interpolated).
  """
  sd = float(sigma_data)
  if not sd > 0:
    raise ValueError(f"sigma_data must be positive, got {sigma_data!r}")
  grid = jnp.arange(schedule.num_train_timesteps, dtype=jnp.float32)

  def wrapped(x: jax.Array, t: jax.Array, cond: PyTree) -> jax.Array:
    ab = jnp.interp(jnp.asarray(t, jnp.float32), grid, schedule.alphas_cumprod.astype(jnp.float32))
    ab = ab.reshape(ab.shape + (1,) * (x.ndim - ab.ndim))
    alpha, var = jnp.sqrt(ab), 1.0 - ab
    denom = var + ab * sd * sd
    c_skip = sd * sd * alpha / denom
    c_out = jnp.sqrt(var) * sd / jnp.sqrt(denom)
    out = denoise_fn(x, t, cond)
    return (c_skip * x.astype(jnp.float32) + c_out * out.astype(jnp.float32)).astype(out.dtype)
  return wrapped


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array,
           prediction_type: str = "epsilon") -> jax.Array:
  """Regression target of the denoiser for `prediction_type` ("epsilon", "v_prediction", "sample")."""
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "v_prediction":
    return velocity(schedule, x0, noise, t)
  return x0


def loss_weights(schedule: NoiseSchedule, t: jax.Array, prediction_type: str = "epsilon",
                 snr_gamma: float | None = None, weight_floor: float = 0.0) -> jax.Array:
  """Per-example loss weights [B] (float32): ones, or min-SNR-gamma (Hang et al. 2023) when snr_gamma is set.

  epsilon: min(snr, g) / snr;  v_prediction: min(snr, g) / (snr + 1);  sample: min(snr, g).
  At snr = 0 (zero terminal SNR) the epsilon weight is taken as its limit, 1.
  `weight_floor` > 0 bounds the min-SNR weight from below: min-SNR gives the high-noise steps, where the prompt
  decides colour, shape and layout, almost no weight (x0 weight min(snr, g) is 0.005 at t = 950 on a cosine
  schedule), which slows how fast a model learns to read its conditioning.
  """
  _check_prediction_type(prediction_type)
  if snr_gamma is None:
    return jnp.ones(t.shape, jnp.float32)
  if not isinstance(snr_gamma, jax.Array) and snr_gamma <= 0:
    raise ValueError(f"snr_gamma must be positive or None, got {snr_gamma!r}")
  snr = jnp.take(schedule.snr, t, axis=0).astype(jnp.float32)
  clipped = jnp.minimum(snr, snr_gamma)
  if prediction_type == "epsilon":
    w = jnp.where(snr > 0, clipped / jnp.where(snr > 0, snr, 1.0), 1.0)
  elif prediction_type == "v_prediction":
    w = clipped / (snr + 1.0)
  else:
    w = clipped
  if weight_floor:
    w = jnp.maximum(w, weight_floor)
  return jax.lax.stop_gradient(w)


def sample_noise_and_t(rng: jax.Array, shape: tuple[int, ...], schedule: NoiseSchedule,
                       noise_offset: float = 0.0, t_sampler: str = "uniform", logit_mean: float = 0.0,
                       logit_std: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Draws noise ~ N(0, I) of `shape` (plus offset * N(0,1)[B,1,..,1,C]) and int32 timesteps t in [0, T).

  t_sampler "uniform": t ~ U{0, .., T-1}; "logit_normal": t = floor(T * sigmoid(N(logit_mean, logit_std^2)))
  (SD3's density, `flow.sample_t`, on the index axis), which spends more steps on the middle of the schedule.
  """
  if len(shape) < 2:
    raise ValueError(f"shape must be (batch, ..., channels), got {shape!r}")
  k_noise, k_offset, k_t = jax.random.split(rng, 3)
  noise = jax.random.normal(k_noise, shape, jnp.float32)
  if not (isinstance(noise_offset, (int, float)) and noise_offset == 0):
    offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
    noise = noise + noise_offset * jax.random.normal(k_offset, offset_shape, jnp.float32)
  n = schedule.num_train_timesteps
  if t_sampler == "uniform":
    t = jax.random.randint(k_t, (shape[0],), 0, n, dtype=jnp.int32)
  else:
    from t2i.objectives import flow
    u = flow.sample_t(k_t, shape[0], t_sampler, logit_mean, logit_std)
    t = jnp.clip(jnp.floor(u * n), 0, n - 1).astype(jnp.int32)
  return noise, t


def elementwise_error(pred: jax.Array, target_: jax.Array, loss_type: str = "l2",
                      huber_c: float = 0.1) -> jax.Array:
  """Elementwise error in float32: squared, absolute, or pseudo-Huber 2c (sqrt(d^2 + c^2) - c) (~d^2 near 0)."""
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
  d = pred.astype(jnp.float32) - target_.astype(jnp.float32)
  if loss_type == "l2":
    return d * d
  if loss_type == "l1":
    return jnp.abs(d)
  return 2.0 * huber_c * (jnp.sqrt(d * d + huber_c * huber_c) - huber_c)


def per_example_error(pred: jax.Array, target_: jax.Array, weights: jax.Array | None = None,
                      mask: jax.Array | None = None, *, loss_type: str = "l2", huber_c: float = 0.1) -> jax.Array:
  """Weighted mean error per example, shape [B].

  Args:
    pred, target_: [B, ...] model output and target.
    weights: [B] per-example weights (e.g. `loss_weights`), or None for ones.
    mask: optional array broadcastable to pred (e.g. [B, H, W, 1]); the mean runs over masked elements only.
    loss_type: "l2", "l1" or "huber" (pseudo-Huber with parameter huber_c).
  """
  if pred.shape != target_.shape:
    raise ValueError(f"pred and target_ shapes differ: {pred.shape} vs {target_.shape}")
  err = elementwise_error(pred, target_, loss_type, huber_c)
  axes = tuple(range(1, err.ndim))
  if mask is None:
    per_ex = jnp.mean(err, axis=axes)
  else:
    try:
      m = jnp.broadcast_to(mask.astype(jnp.float32), err.shape)
    except ValueError as e:
      raise ValueError(f"mask of shape {mask.shape} does not broadcast to pred shape {pred.shape}") from e
    per_ex = jnp.sum(err * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)
  if weights is not None:
    if weights.shape != per_ex.shape:
      raise ValueError(f"weights must have shape {per_ex.shape}, got {weights.shape}")
    per_ex = per_ex * weights.astype(jnp.float32)
  return per_ex


def x0_and_eps(out: jax.Array, x: jax.Array, alpha: jax.Array, sigma: jax.Array,
               prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) predictions from a `prediction_type` model output at VP state x = alpha x0 + sigma eps."""
  if prediction_type == "epsilon":
    return (x - sigma * out) / alpha, out
  if prediction_type == "v_prediction":
    return alpha * x - sigma * out, alpha * out + sigma * x
  return out, (x - alpha * out) / sigma


def x0_from_prediction(schedule: NoiseSchedule, x_t: jax.Array, pred: jax.Array, t: jax.Array,
                       prediction_type: str = "epsilon") -> jax.Array:
  """The clean estimate x0 implied by a `prediction_type` output at integer timesteps t [B]."""
  _check_prediction_type(prediction_type)
  return x0_and_eps(pred, x_t, _per_example(schedule.sqrt_alphas_cumprod, t, x_t),
                    _per_example(schedule.sqrt_one_minus_alphas_cumprod, t, x_t), prediction_type)[0]


def self_conditioned_input(x_t: jax.Array, x0_estimate: jax.Array) -> jax.Array:
  """The self-conditioned denoiser's input: [x_t, previous x0 estimate] along channels (Chen et al. 2022)."""
  return jnp.concatenate([x_t, x0_estimate.astype(x_t.dtype)], axis=-1)


def diffusion_loss(denoise_fn: DenoiseFn, x0: jax.Array, cond: PyTree, rng: jax.Array, schedule: NoiseSchedule, *,
                   prediction_type: str = "epsilon", snr_gamma: float | None = None, weight_floor: float = 0.0,
                   noise_offset: float = 0.0, loss_type: str = "l2", huber_c: float = 0.1,
                   mask: jax.Array | None = None, self_condition: float = 0.0, t_sampler: str = "uniform",
                   logit_mean: float = 0.0, logit_std: float = 1.0,
                   sample_weight: jax.Array | None = None, neg_cond: PyTree | None = None,
                   neg_mask: jax.Array | None = None, contrast_weight: float = 0.0, contrast_scale: float = 10.0,
                   neg_rows: jax.Array | None = None, denoise_aux_fn: Callable | None = None,
                   aux_loss: Callable | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Denoising loss: mean over the batch of `per_example_error` at timesteps drawn per `t_sampler`.

  Args:
    denoise_fn: (x_t, t int32 [B], cond) -> prediction with x_t's shape; with self-conditioning its input is
      `self_conditioned_input(x_t, x0_estimate)` (twice x_t's channels).
    x0: clean images/latents [B, H, W, C].
    cond: conditioning pytree passed through to denoise_fn.
    rng: PRNG key for noise, noise offset, t and the self-conditioning draw.
    self_condition: 0 = off; p > 0: self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits"). On a share p
      of steps the denoiser first runs on [x_t, 0] without gradient, and its x0 estimate replaces the zeros of
      the trained pass; otherwise the trained pass sees [x_t, 0]. The sampler feeds each step the previous step's
      x0 estimate, so the network learns to refine its own estimate.
    t_sampler, logit_mean, logit_std: the timestep density (`sample_noise_and_t`).
    sample_weight: optional [B] factors on each example's loss (e.g. DreamBooth's prior-preservation weight).
    neg_cond, neg_mask, contrast_weight, contrast_scale, neg_rows: caption-contrastive denoising
      (`caption_contrast`), added with `contrast_weight` > 0: the denoiser runs again on batch rows `neg_rows`
      (int [R], e.g. from `contrast_rows`; None = all B rows) under their negative captions `neg_cond` (R rows),
      counting those where neg_mask [R] is 1.
    denoise_aux_fn, aux_loss: a loss on what the trained pass sees besides its prediction (e.g. attention maps
      for `t2i.objectives.attention.hola_loss`): the trained pass runs `denoise_aux_fn(x, t, cond) -> (pred,
      aux)` instead of denoise_fn, and `aux_loss(aux) -> (term, metrics)` is added to the loss.
  Returns:
    (scalar loss, metrics) where metrics holds "loss", "mse" (unweighted) and "weight_mean"; with the contrast
    also "contrast" (its term) and "contrast_acc" (share of negative rows whose error exceeds the true one).
  """
  _check_prediction_type(prediction_type)
  rng, sc_rng = jax.random.split(rng) if self_condition else (rng, None)
  noise, t = sample_noise_and_t(rng, x0.shape, schedule, noise_offset, t_sampler, logit_mean, logit_std)
  noise = noise.astype(x0.dtype)
  x_t = add_noise(schedule, x0, noise, t)
  inp = x_t
  if self_condition:
    zeros = jnp.zeros_like(x_t)

    def estimate():
      first = denoise_fn(self_conditioned_input(x_t, zeros), t, cond)
      return jax.lax.stop_gradient(x0_from_prediction(schedule, x_t, first, t, prediction_type).astype(x_t.dtype))
    use = jax.random.uniform(sc_rng) < self_condition
    inp = self_conditioned_input(x_t, jax.lax.cond(use, estimate, lambda: zeros))
  aux_term, aux_metrics = 0.0, {}
  if aux_loss is not None:
    pred, aux = denoise_aux_fn(inp, t, cond)
    aux_term, aux_metrics = aux_loss(aux)
  else:
    pred = denoise_fn(inp, t, cond)
  tgt = target(schedule, x0, noise, t, prediction_type)
  w = loss_weights(schedule, t, prediction_type, snr_gamma, weight_floor)
  per_ex = per_example_error(pred, tgt, w, mask, loss_type=loss_type, huber_c=huber_c)
  loss = jnp.mean(per_ex if sample_weight is None else per_ex * sample_weight) + aux_term
  mse = jnp.mean(per_example_error(jax.lax.stop_gradient(pred), tgt, None, mask, loss_type="l2"))
  metrics = {"mse": mse, "weight_mean": jnp.mean(w), **aux_metrics}
  if contrast_weight > 0:
    if neg_cond is None or neg_mask is None:
      raise ValueError("contrast_weight > 0 needs neg_cond and neg_mask (config.data.negative_caption)")
    rows = jnp.arange(x0.shape[0]) if neg_rows is None else neg_rows
    take = lambda a: jnp.take(a, rows, axis=0)  # noqa: E731
    pred_neg = denoise_fn(take(inp), take(t), neg_cond)
    err_neg = per_example_error(pred_neg, take(tgt), take(w), None if mask is None else take(mask),
                                loss_type=loss_type, huber_c=huber_c)
    term, acc = caption_contrast(take(per_ex), err_neg, neg_mask, jax.lax.stop_gradient(jnp.mean(per_ex)),
                                 contrast_scale)
    loss = loss + contrast_weight * term
    metrics.update(contrast=term, contrast_acc=acc)
  return loss, {"loss": loss, **metrics}


def contrast_rows(neg_mask: jax.Array, n: int) -> jax.Array:
  """Indices of at most `n` rows for the contrast pass (all rows if n <= 0), those with a negative first."""
  rows = jnp.argsort(1.0 - neg_mask.astype(jnp.float32), stable=True)
  return rows[:n] if 0 < n < rows.shape[0] else rows


def caption_contrast(err_true: jax.Array, err_neg: jax.Array, neg_mask: jax.Array, norm: jax.Array,
                     scale: float) -> tuple[jax.Array, jax.Array]:
  """Caption-contrastive denoising: mean over rows with a negative caption of softplus(-scale * margin),
  margin = (err_neg - err_true) / norm.

  Treats the denoiser as a classifier between the true caption and a negative one that the image contradicts
  only in, say, a spatial relation (logits -error / norm), in the spirit of diffusion classifiers and of
  Diffusion-DPO's pairwise form. The plain denoising loss rewards knowing a relation only through the small error
  reduction it buys at high noise; this term asks for it directly and saturates once the margin is about
  3 / scale. `norm` (the batch's mean true error, no gradient) keeps low-noise rows, whose errors are tiny,
  from dominating. Returns (term, share of negative rows with err_neg > err_true).
  Measured (docs/results.md, session 20): at weight 1 on shapes-bench the model learns to spoil its estimate when
  the caption disagrees with x_t, which ruins sampling; use small weights.
  """
  m = neg_mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  margin = (err_neg - err_true) / jnp.maximum(norm, 1e-12)
  term = jnp.sum(jax.nn.softplus(-scale * margin) * m) / n
  acc = jnp.sum((margin > 0).astype(jnp.float32) * m) / n
  return term, acc
