"""Rectified flow: shift formulas, t samplers, loss, guidance distillation, FLUX schedule and Euler sampler."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.objectives import flow
from t2i.objectives.flow import (flow_loss, flux_mu, guidance_distillation_loss, interpolate, per_example_error,
                                 sample_noise_and_t, sample_t, time_shift, velocity_target)
from t2i.sampling.flow import default_num_image_tokens, flux_schedule, sample, sample_jit


# ---------------------------------------------------------------------------------------------------- shift / t
def test_flux_mu_and_time_shift_known_points():
  assert flux_mu(256) == pytest.approx(0.5, abs=1e-12)
  assert flux_mu(4096) == pytest.approx(1.15, abs=1e-12)
  assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840, abs=1e-12)
  # 1024x1024 image -> 128x128 latent -> 64x64 = 4096 tokens; t = 0.5 -> e^1.15 / (e^1.15 + 1).
  assert default_num_image_tokens((1, 128, 128, 16)) == 4096
  got = float(time_shift(flux_mu(4096), 1.0, 0.5))
  assert got == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1.0), rel=1e-6)
  assert got == pytest.approx(0.7595, abs=1e-4)
  t = jnp.linspace(0.0, 1.0, 101)
  np.testing.assert_allclose(time_shift(0.0, 1.0, t), t, atol=1e-6)  # identity at mu = 0
  shifted = np.asarray(time_shift(1.15, 1.0, t))
  assert shifted[0] == 0.0 and shifted[-1] == 1.0
  assert np.all(np.diff(shifted) > 0) and np.all(shifted[1:-1] > np.asarray(t)[1:-1])  # monotone, towards noise
  mus = np.asarray([time_shift(m, 1.0, 0.3) for m in (-1.0, 0.0, 0.5, 1.15, 2.0)])
  assert np.all(np.diff(mus) > 0)  # monotone in mu
  s = 3.0  # SD3's shift s t / (1 + (s - 1) t) is the same map with mu = log s
  np.testing.assert_allclose(time_shift(math.log(s), 1.0, t), s * t / (1 + (s - 1) * t), rtol=1e-6, atol=1e-7)


def test_t_samplers():
  rng = jax.random.key(0)
  n = 200_000
  u = np.asarray(sample_t(rng, n, "uniform"))
  assert u.shape == (n,) and u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 5e-3 and abs(u.std() - 1 / math.sqrt(12)) < 5e-3
  for mean, std in ((0.0, 1.0), (0.5, 0.8), (-1.0, 1.5)):
    t = np.asarray(sample_t(rng, n, "logit_normal", mean, std), np.float64)
    assert t.min() > 0.0 and t.max() < 1.0
    logit = np.log(t) - np.log1p(-t)
    assert abs(logit.mean() - mean) < 0.01 and abs(logit.std() - std) / std < 0.01
  # The shift is applied to the same draw.
  np.testing.assert_allclose(sample_t(rng, 64, "logit_normal", shift=1.15),
                             time_shift(1.15, 1.0, sample_t(rng, 64, "logit_normal")), rtol=1e-6)
  with pytest.raises(ValueError, match="kind"):
    sample_t(rng, 4, "cosine")


# ---------------------------------------------------------------------------------------------------- losses
def _toy_velocity(x, t, cond):
  return jnp.tanh(x) * cond["w"][:, None, None, None] + t[:, None, None, None]


def test_flow_loss_matches_numpy():
  rng = jax.random.key(3)
  x0 = jax.random.normal(jax.random.key(1), (4, 5, 6, 3))
  cond = {"w": jnp.array([0.5, -1.0, 2.0, 0.0])}
  wfn = lambda t: 1.0 + t
  loss, metrics = flow_loss(_toy_velocity, x0, cond, rng, t_sampler="logit_normal", logit_mean=0.3, logit_std=0.9,
                            shift_mu=0.7, weighting=wfn)
  # Hand computation from the same (noise, t) draw.
  noise, t = (np.asarray(a, np.float64) for a in sample_noise_and_t(rng, x0.shape, "logit_normal", 0.3, 0.9, 0.7))
  t_ref = np.asarray(time_shift(0.7, 1.0, sample_t(jax.random.split(rng)[1], 4, "logit_normal", 0.3, 0.9)))
  np.testing.assert_allclose(t, t_ref, rtol=1e-6)
  x = np.asarray(x0, np.float64)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x + tb * noise
  pred = np.tanh(x_t) * np.asarray(cond["w"])[:, None, None, None] + tb
  err = ((pred - (noise - x)) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(float(loss), np.mean((1 + t) * err), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["mse"]), err.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["t_mean"]), t.mean(), rtol=1e-6)
  # The perfect predictor (given noise) has zero loss: pieces compose as in the module docstring.
  n32, t32 = sample_noise_and_t(rng, x0.shape)
  zero = per_example_error(velocity_target(x0, n32), velocity_target(x0, n32))
  assert float(jnp.max(zero)) == 0.0
  np.testing.assert_allclose(interpolate(x0, n32, jnp.ones(4)), n32, atol=1e-7)
  np.testing.assert_allclose(interpolate(x0, n32, jnp.zeros(4)), x0, atol=1e-7)


def test_flow_loss_grad_and_jit():
  x0 = jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
  fn = lambda p: flow_loss(lambda x, t, c: p * x, x0, None, jax.random.key(0), t_sampler="uniform")[0]
  g = jax.jit(jax.grad(fn))(2.0)
  eps = 1e-3
  np.testing.assert_allclose(float(g), (fn(2.0 + eps) - fn(2.0 - eps)) / (2 * eps), rtol=1e-3)
  # A callable t sampler.
  loss, m = flow_loss(lambda x, t, c: x, x0, None, jax.random.key(0), t_sampler=lambda r, b: jnp.full((b,), 0.25))
  assert float(m["t_mean"]) == pytest.approx(0.25)
  # A guidance-embedded model gets g as [B].
  seen = []
  loss_g, _ = flow_loss(lambda x, t, g, c: seen.append(g.shape) or g[:, None, None, None] * x, x0, None,
                        jax.random.key(0), guidance=1.0)
  assert seen == [(2,)]
  np.testing.assert_allclose(loss_g, flow_loss(lambda x, t, c: x, x0, None, jax.random.key(0))[0], rtol=1e-6)


def _teacher(x, t, cond):
  return x * cond["a"][:, None, None, None] + cond["b"][:, None, None, None] * t[:, None, None, None]


def test_guidance_distillation_loss():
  b = 3
  x0 = jax.random.normal(jax.random.key(1), (b, 4, 4, 2))
  cond = {"a": jnp.array([1.0, 2.0, -1.0]), "b": jnp.array([0.5, 0.0, 1.0])}
  uncond = {"a": jnp.array([0.3]), "b": jnp.array([-0.2])}  # leading dim 1, broadcast
  calls = []

  def teacher(x, t, c):
    calls.append(x.shape[0])
    return _teacher(x, t, c)

  def exact_student(x, t, g, c):  # the teacher's CFG combination itself
    gb = g[:, None, None, None]
    u = {k: jnp.broadcast_to(v, (b,)) for k, v in uncond.items()}
    return _teacher(x, t, u) + gb * (_teacher(x, t, c) - _teacher(x, t, u))

  rng = jax.random.key(7)
  loss, m = guidance_distillation_loss(exact_student, teacher, x0, cond, uncond, rng, guidance_range=(1.0, 5.0))
  assert calls == [2 * b]  # one batched teacher call
  assert float(loss) < 1e-10 and 1.0 <= float(m["g_mean"]) <= 5.0 and float(m["guidance_gap"]) > 0

  # A wrong student: loss equals the numpy hand computation; the teacher gets no gradient.
  def student(x, t, g, c):
    return 0.5 * x + g[:, None, None, None]

  loss, m = guidance_distillation_loss(student, teacher, x0, cond, uncond, rng, guidance_range=(2.0, 4.0))
  k_nt, k_g = jax.random.split(rng)
  noise, t = (np.asarray(a, np.float64) for a in sample_noise_and_t(k_nt, x0.shape))
  g = np.asarray(jax.random.uniform(k_g, (b,), jnp.float32, 2.0, 4.0), np.float64)
  tb, gb = t[:, None, None, None], g[:, None, None, None]
  x_t = (1 - tb) * np.asarray(x0, np.float64) + tb * noise
  a_c, b_c = (np.asarray(cond[k], np.float64)[:, None, None, None] for k in "ab")
  v_c, v_u = x_t * a_c + b_c * tb, x_t * 0.3 - 0.2 * tb
  want = np.mean(((0.5 * x_t + gb) - (v_u + gb * (v_c - v_u))) ** 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["g_mean"]), g.mean(), rtol=1e-6)

  def through_teacher(scale):
    t_fn = lambda x, t, c: scale * _teacher(x, t, c)
    return guidance_distillation_loss(student, t_fn, x0, cond, uncond, rng)[0]
  assert float(jax.grad(through_teacher)(1.0)) == 0.0


# ---------------------------------------------------------------------------------------------------- schedule
def test_flux_schedule_endpoints_and_diffusers():
  diffusers = pytest.importorskip("diffusers")
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  for n, tokens in ((4, 256), (28, 4096), (50, 1024)):
    ts = flux_schedule(n, tokens)
    assert ts.shape == (n + 1,) and ts.dtype == np.float32
    assert ts[0] == 1.0 and ts[-1] == 0.0 and np.all(np.diff(ts) < 0)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                      base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert mu == pytest.approx(flux_mu(tokens), abs=1e-12)
    # FluxPipeline's explicit sigma grid linspace(1, 1/N, N) == linspace(1, 0, N + 1)[:-1].
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    np.testing.assert_allclose(ts, sched.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ts[:-1] * 1000, sched.timesteps.numpy(), rtol=1e-6)  # timesteps: no final 0
    # Without explicit sigmas diffusers' grid ends at 1/1000 (shifted) rather than 1/N: not the FLUX grid.
    sched.set_timesteps(num_inference_steps=n, mu=mu)
    assert abs(float(sched.sigmas[-2]) - ts[-2]) > 1e-3
  np.testing.assert_allclose(flux_schedule(10, shift=False), np.linspace(1, 0, 11), atol=1e-7)
  with pytest.raises(ValueError, match="num_image_tokens"):
    flux_schedule(10, None, shift=True)


# ---------------------------------------------------------------------------------------------------- sampler
def test_sampler_matches_diffusers_euler_loop():
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  from diffusers.pipelines.flux.pipeline_flux import calculate_shift

  shape, n, tokens = (2, 16, 8), 12, 16
  x_T = np.asarray(jax.random.normal(jax.random.key(0), shape))
  w = np.linspace(-1, 1, 8).astype(np.float32)
  v_np = lambda x, t: np.sin(x) * w + t  # t in [0, 1]
  sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
  sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(tokens))
  x = torch.tensor(x_T)
  for ts in sched.timesteps:
    out = torch.tensor(v_np(x.numpy(), float(ts) / 1000))
    x = sched.step(out, ts, x, return_dict=False)[0]
  got = sample(lambda x, t, c: jnp.sin(x) * w + t[:, None, None], shape, None, None, jax.random.key(0),
               num_steps=n, num_image_tokens=tokens, x_T=jnp.asarray(x_T))
  want = x.numpy()
  assert float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))) <= 1e-5


def test_euler_reaches_analytic_solutions():
  shape = (3, 8, 8, 4)
  x_T = jax.random.normal(jax.random.key(1), shape)
  # Point-mass data: the exact velocity (x - x0) / t is constant along the straight path, so Euler is exact.
  x0 = jax.random.normal(jax.random.key(2), shape)
  got = sample(lambda x, t, c: (x - c) / t[:, None, None, None], shape, x0, None, jax.random.key(0), num_steps=7,
               x_T=x_T)
  np.testing.assert_allclose(got, x0, atol=2e-5)
  # Gaussian data N(m, s^2): exact field v = -m + (t - (1-t) s^2) / sig_t^2 (x - (1-t) m), flow map x_0 = m + s x_1.
  m, s = 0.7, 0.3

  def v(x, t, c):
    tb = t[:, None, None, None]
    var = (1 - tb) ** 2 * s * s + tb * tb
    return -m + (tb - (1 - tb) * s * s) / var * (x - (1 - tb) * m)
  want = m + s * np.asarray(x_T)
  errs = [float(np.max(np.abs(sample(v, shape, None, None, jax.random.key(0), num_steps=k, x_T=x_T) - want)))
          for k in (50, 400)]
  assert errs[1] < 1e-2 and 6.0 < errs[0] / errs[1] < 10.0  # first-order convergence to the analytic answer


def _np_euler(x, ts, vfn):
  for i in range(len(ts) - 1):
    x = x + (ts[i + 1] - ts[i]) * vfn(x, ts[i])
  return x


def test_cfg_and_guidance_embed_modes():
  b, shape, n = 2, (2, 6, 4), 5
  x_T = np.asarray(jax.random.normal(jax.random.key(4), shape), np.float64)
  cond, uncond = jnp.array([1.0, -2.0]), jnp.array([0.5])
  ts = flux_schedule(n, 6).astype(np.float64)
  seen = []

  def vel(x, t, c):
    seen.append(x.shape[0])
    return jnp.cos(x) * c[:, None, None] + t[:, None, None]
  got = sample(vel, shape, cond, uncond, jax.random.key(0), num_steps=n, guidance_scale=3.0, x_T=jnp.asarray(x_T))
  assert seen == [2 * b]  # traced once, cond + uncond in one call
  c_np, u_np = np.asarray(cond)[:, None, None], 0.5

  def cfg(x, t):
    v_c, v_u = np.cos(x) * c_np + t, np.cos(x) * u_np + t
    return v_u + 3.0 * (v_c - v_u)
  np.testing.assert_allclose(got, _np_euler(x_T, ts, cfg), rtol=1e-5, atol=1e-6)
  # guidance_scale 1 -> plain cond, batch B.
  seen.clear()
  got = sample(vel, shape, cond, uncond, jax.random.key(0), num_steps=n, guidance_scale=1.0, x_T=jnp.asarray(x_T))
  assert seen == [b]
  np.testing.assert_allclose(got, _np_euler(x_T, ts, lambda x, t: np.cos(x) * c_np + t), rtol=1e-5, atol=1e-6)

  # Guidance embedding: one pass, the model gets g.
  def vel_g(x, t, g, c):
    seen.append(("g", x.shape[0]))
    return jnp.cos(x) * c[:, None, None] * g[:, None, None] + t[:, None, None]
  seen.clear()
  got = sample(vel_g, shape, cond, None, jax.random.key(0), num_steps=n, guidance_embed=3.5, x_T=jnp.asarray(x_T))
  assert seen == [("g", b)]
  np.testing.assert_allclose(got, _np_euler(x_T, ts, lambda x, t: np.cos(x) * c_np * 3.5 + t), rtol=1e-5, atol=1e-6)
  # Both: true CFG over a guidance-embedded model.
  seen.clear()
  got = sample(vel_g, shape, cond, uncond, jax.random.key(0), num_steps=n, guidance_scale=2.0, guidance_embed=3.5,
               x_T=jnp.asarray(x_T))
  assert seen == [("g", 2 * b)]
  both = lambda x, t: np.cos(x) * 3.5 * u_np + t + 2.0 * np.cos(x) * 3.5 * (c_np - u_np)
  np.testing.assert_allclose(got, _np_euler(x_T, ts, both), rtol=1e-5, atol=1e-6)


def test_sample_jit_traces_once():
  traces = []

  def vel(x, t, g, c):
    traces.append(1)
    return -x * c[:, None] * g[:, None]
  shape = (4, 8)
  cond, uncond = jnp.ones((4,)), jnp.zeros((1,))
  outs = [sample_jit(vel, shape, cond, uncond, jax.random.key(0), num_steps=6, guidance_scale=gs, guidance_embed=ge,
                     num_image_tokens=64) for gs, ge in ((2.0, 1.0), (3.0, 2.0), (4.5, 0.5))]
  assert len(traces) == 1  # one trace: loop body traced once, guidance values do not recompile
  assert not np.allclose(outs[0], outs[1])
  assert all(o.shape == shape and np.all(np.isfinite(o)) for o in outs)
  # The same numbers as the eager call.
  np.testing.assert_allclose(outs[1], sample(vel, shape, cond, uncond, jax.random.key(0), num_steps=6,
                                             guidance_scale=3.0, guidance_embed=2.0, num_image_tokens=64),
                             rtol=1e-6)


def test_skip_preconditioning_velocity():
  """The returned velocity is (x_t - x0_hat) / t with x0_hat = c_skip x_t + c_out F (EDM coefficients for
  x_t / (1 - t)); a network predicting the right F gives the exact velocity; t = 0 stays finite."""
  rng = np.random.default_rng(0)
  x0, noise, f = rng.normal(size=(3, 4, 2, 2, 3)).astype(np.float32)
  t = np.array([0.05, 0.3, 0.7, 0.98], np.float32)
  x_t = np.asarray(flow.interpolate(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)))
  for sd in (0.2, 0.5, 1.0):
    v = np.asarray(flow.skip_preconditioning(lambda x, tt, c: jnp.asarray(f), sd)(jnp.asarray(x_t), t, None))
    tb = t[:, None, None, None].astype(np.float64)
    s = tb / (1 - tb)                                   # EDM noise level of x_t / (1 - t)
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2)
    x0_hat = c_skip * x_t / (1 - tb) + c_out * f
    np.testing.assert_allclose(v, (x_t - x0_hat) / tb, rtol=1e-4, atol=1e-4)
    # The F that reproduces x0 gives the true velocity eps - x0.
    f_star = (x0 - c_skip * x_t / (1 - tb)) / c_out
    v_star = flow.skip_preconditioning(lambda x, tt, c: jnp.asarray(f_star, jnp.float32), sd)(
        jnp.asarray(x_t), t, None)
    np.testing.assert_allclose(np.asarray(v_star), noise - x0, rtol=1e-3, atol=1e-3)
  v0 = flow.skip_preconditioning(lambda x, tt, c: jnp.asarray(f), 0.5)(jnp.asarray(x0), np.zeros(4, np.float32), None)
  assert np.all(np.isfinite(np.asarray(v0)))
  with pytest.raises(ValueError, match="sigma_data"):
    flow.skip_preconditioning(lambda x, tt, c: x, -1.0)
