"""Noise schedules, forward process, min-SNR weights and the diffusion loss (against diffusers / numpy)."""
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from t2i.objectives import diffusion as D

T = 1000
CASES = [  # (our kind, diffusers beta_schedule, beta_start, beta_end, rescale)
    ("linear", "linear", 0.0001, 0.02, False),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012, False),
    ("cosine", "squaredcos_cap_v2", 0.0001, 0.02, False),
    ("scaled_linear", "scaled_linear", 0.00085, 0.012, True),
]


def _ddpm(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale=False, **kw):
  return DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=beta_start,
                       beta_end=beta_end, rescale_betas_zero_snr=rescale, **kw)


@pytest.mark.parametrize("kind,dkind,b0,b1,rescale", CASES)
def test_schedule_matches_diffusers(kind, dkind, b0, b1, rescale):
  s = D.make_schedule(kind, T, b0, b1, rescale_zero_terminal_snr=rescale)
  ref = _ddpm(dkind, b0, b1, rescale)
  ac_ref = ref.alphas_cumprod.numpy()
  if rescale:
    # torch's float32 sqrt (AVX) is not correctly rounded; the rescale's cancellation amplifies that in betas.
    np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ac_ref, atol=1e-6)
  else:  # bitwise
    np.testing.assert_array_equal(np.asarray(s.betas), ref.betas.numpy())
    np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), ac_ref)
  ac = np.asarray(s.alphas_cumprod)
  np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod), np.sqrt(ac), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - ac), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(s.snr), ac / (1 - ac), rtol=1e-5)
  assert s.num_train_timesteps == T and s.betas.dtype == jnp.float32
  if rescale:
    assert float(s.alphas_cumprod[-1]) == 0.0 and float(s.snr[-1]) == 0.0


def test_schedule_is_pytree_and_validates():
  s = D.make_schedule()
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 6
  doubled = jax.jit(lambda sc: jax.tree.map(lambda a: 2 * a, sc))(s)
  np.testing.assert_allclose(np.asarray(doubled.betas), 2 * np.asarray(s.betas))
  with pytest.raises(ValueError, match="kind"):
    D.make_schedule("quadratic")
  with pytest.raises(ValueError, match="num_train_timesteps"):
    D.make_schedule("linear", 1)


def _data(seed=0, shape=(3, 4, 4, 2)):
  r = np.random.RandomState(seed)
  return r.randn(*shape).astype(np.float32), r.randn(*shape).astype(np.float32)


def test_add_noise_velocity_target_match_diffusers():
  s = D.make_schedule()
  ref = _ddpm()
  x0, noise = _data()
  t = np.array([0, 517, 999], np.int32)
  tt = torch.from_numpy(t.astype(np.int64))
  xt_ref = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  v_ref = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
  np.testing.assert_allclose(np.asarray(D.add_noise(s, x0, noise, t)), xt_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(D.velocity(s, x0, noise, t)), v_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(D.target(s, x0, noise, t, "v_prediction")), v_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(D.target(s, x0, noise, t, "epsilon")), noise)
  np.testing.assert_array_equal(np.asarray(D.target(s, x0, noise, t, "sample")), x0)
  with pytest.raises(ValueError, match="prediction_type"):
    D.target(s, x0, noise, t, "flow")


def test_min_snr_weights_at_known_points():
  s = D.make_schedule()
  t = jnp.array([0, 500, 999])
  snr = np.asarray(s.snr)[[0, 500, 999]].astype(np.float64)
  assert snr[0] > 5 > snr[2]  # both sides of gamma
  g = 5.0
  eps = np.asarray(D.loss_weights(s, t, "epsilon", g))
  v = np.asarray(D.loss_weights(s, t, "v_prediction", g))
  x0 = np.asarray(D.loss_weights(s, t, "sample", g))
  np.testing.assert_allclose(eps, np.minimum(snr, g) / snr, rtol=1e-5)
  np.testing.assert_allclose(eps[[0, 2]], [g / snr[0], 1.0], rtol=1e-5)
  np.testing.assert_allclose(v, np.minimum(snr, g) / (snr + 1), rtol=1e-5)
  np.testing.assert_allclose(v[[0, 2]], [g / (snr[0] + 1), snr[2] / (snr[2] + 1)], rtol=1e-5)
  np.testing.assert_allclose(x0, np.minimum(snr, g), rtol=1e-5)
  # A weight floor lifts only the high-noise end (x0 weight min(snr, 5) is below 1 there).
  floored = np.asarray(D.loss_weights(s, t, "sample", g, weight_floor=1.0))
  np.testing.assert_allclose(floored, np.maximum(np.minimum(snr, g), 1.0), rtol=1e-5)
  assert floored[2] == 1.0 and floored[0] == g
  np.testing.assert_array_equal(np.asarray(D.loss_weights(s, t, "epsilon", None)), np.ones(3))
  # Zero terminal SNR: finite weights at t = T-1.
  z = D.make_schedule(rescale_zero_terminal_snr=True)
  np.testing.assert_allclose(np.asarray(D.loss_weights(z, jnp.array([999]), "epsilon", g)), [1.0])
  np.testing.assert_allclose(np.asarray(D.loss_weights(z, jnp.array([999]), "v_prediction", g)), [0.0])
  with pytest.raises(ValueError, match="snr_gamma"):
    D.loss_weights(s, t, "epsilon", 0.0)


def test_sample_noise_and_t_with_offset():
  s = D.make_schedule()
  shape = (512, 2, 3, 4)

  @jax.jit
  def draw(rng):  # one compilation for all draws
    return D.sample_noise_and_t(rng, shape, s, 0.0), D.sample_noise_and_t(rng, shape, s, 0.1)
  (n0, t0), (n1, t1) = draw(jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(t0), np.asarray(t1))
  assert t0.dtype == jnp.int32 and t0.shape == (512,)
  assert 0 <= int(t0.min()) < 20 and 980 < int(t0.max()) < T
  diff = np.asarray(n1 - n0)
  np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], shape), atol=1e-6)  # constant over H, W
  assert 0.08 < diff[:, 0, 0, :].std() < 0.12
  assert 0.9 < float(np.asarray(n0).std()) < 1.1


def test_logit_normal_timesteps_at_known_quantiles():
  """t = floor(T sigmoid(N(m, s^2))): P(t < T sigmoid(m + k s)) = Phi(k); the uniform draw is unchanged."""
  s = D.make_schedule()
  n = 20000
  for mean, std in ((0.0, 1.0), (-0.5, 0.7)):
    _, t = jax.jit(lambda r, m=mean, sd=std: D.sample_noise_and_t(r, (n, 1, 1, 1), s, t_sampler="logit_normal",
                                                                   logit_mean=m, logit_std=sd))(jax.random.key(0))
    t = np.asarray(t)
    assert t.dtype == np.int32 and 0 <= t.min() and t.max() < T
    for k, phi in ((-1.0, 0.1587), (0.0, 0.5), (1.0, 0.8413)):
      bound = T / (1.0 + np.exp(-(mean + k * std)))
      assert abs(np.mean(t < bound) - phi) < 0.012, (mean, std, k)
  _, t_default = D.sample_noise_and_t(jax.random.key(1), (64, 1, 1, 1), s)
  _, t_uniform = D.sample_noise_and_t(jax.random.key(1), (64, 1, 1, 1), s, t_sampler="uniform")
  np.testing.assert_array_equal(np.asarray(t_default), np.asarray(t_uniform))
  with pytest.raises(ValueError, match="kind must be one of"):
    D.sample_noise_and_t(jax.random.key(1), (4, 1, 1, 1), s, t_sampler="beta")


def test_per_example_error_mask_weights_and_types():
  pred = np.array([[[[1.0], [2.0]]], [[[0.0], [4.0]]]], np.float32)  # [2, 1, 2, 1]
  tgt = np.zeros_like(pred)
  np.testing.assert_allclose(np.asarray(D.per_example_error(pred, tgt)), [2.5, 8.0])
  np.testing.assert_allclose(np.asarray(D.per_example_error(pred, tgt, jnp.array([2.0, 0.5]), loss_type="l1")),
                             [3.0, 1.0])
  mask = np.array([[[[1.0], [0.0]]], [[[0.0], [1.0]]]], np.float32)
  np.testing.assert_allclose(np.asarray(D.per_example_error(pred, tgt, None, mask)), [1.0, 16.0])
  c = 0.1
  hub = np.asarray(D.per_example_error(pred, tgt, loss_type="huber", huber_c=c))
  ref = 2 * c * (np.sqrt(pred ** 2 + c * c) - c)
  np.testing.assert_allclose(hub, ref.reshape(2, -1).mean(1), rtol=1e-6)
  with pytest.raises(ValueError, match="loss_type"):
    D.per_example_error(pred, tgt, loss_type="l3")
  with pytest.raises(ValueError, match="mask"):
    D.per_example_error(pred, tgt, None, np.ones((2, 3, 1, 1)))
  with pytest.raises(ValueError, match="weights"):
    D.per_example_error(pred, tgt, jnp.ones(3))


def _toy_denoiser(x, t, cond):
  return 0.5 * x + 0.001 * t[:, None, None, None].astype(x.dtype) + cond["bias"][:, None, None, :]


LOSS_CASES = [  # (prediction_type, snr_gamma, loss_type, use_mask, per-example weights)
    ("epsilon", None, "l2", False, False),
    ("epsilon", 5.0, "l1", True, False),
    ("v_prediction", 5.0, "l2", False, True),
    ("v_prediction", None, "huber", True, False),
    ("sample", 1.0, "l2", False, False),
    ("sample", 1.0, "l2", False, True),
]
SAMPLE_WEIGHT = np.array([1.0, 0.0, 0.5, 2.0], np.float32)  # e.g. subject vs prior-preservation images


def test_diffusion_loss_against_numpy():
  s = D.make_schedule()
  ac = _ddpm().alphas_cumprod.numpy().astype(np.float64)
  x0, _ = _data(1, (4, 3, 3, 2))
  cond = {"bias": np.linspace(-1, 1, 8).reshape(4, 2).astype(np.float32)}
  mask = (np.arange(36).reshape(4, 3, 3, 1) % 3 != 0).astype(np.float32)
  rng = jax.random.key(7)

  @jax.jit
  def run(x, c, r):  # all cases in one compilation
    outs = [D.diffusion_loss(_toy_denoiser, x, c, r, s, prediction_type=pt, snr_gamma=g, noise_offset=0.05,
                             loss_type=lt, mask=mask if um else None, sample_weight=SAMPLE_WEIGHT if uw else None)
            for pt, g, lt, um, uw in LOSS_CASES]
    return outs, D.sample_noise_and_t(r, x.shape, s, 0.05)
  outs, (noise, t) = run(x0, cond, rng)
  # numpy hand computation, with the same noise and t.
  noise, t = np.asarray(noise, np.float64), np.asarray(t)
  a = ac[t][:, None, None, None]
  x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  pred = 0.5 * x_t + 0.001 * t[:, None, None, None] + cond["bias"][:, None, None, :]
  snr = ac[t] / (1 - ac[t])
  for (prediction_type, snr_gamma, loss_type, use_mask, use_weight), (loss, metrics) in zip(LOSS_CASES, outs):
    tgt = {"epsilon": noise, "v_prediction": np.sqrt(a) * noise - np.sqrt(1 - a) * x0, "sample": x0}[prediction_type]
    d = pred - tgt
    err = {"l2": d ** 2, "l1": np.abs(d), "huber": 0.2 * (np.sqrt(d ** 2 + 0.01) - 0.1)}[loss_type]
    m = np.broadcast_to(mask, err.shape) if use_mask else np.ones_like(err)
    per_ex = (err * m).sum((1, 2, 3)) / m.sum((1, 2, 3))
    if snr_gamma is None:
      w = np.ones(4)
    else:
      w = {"epsilon": np.minimum(snr, snr_gamma) / snr, "v_prediction": np.minimum(snr, snr_gamma) / (snr + 1),
           "sample": np.minimum(snr, snr_gamma)}[prediction_type]
    np.testing.assert_allclose(float(loss), (per_ex * w * (SAMPLE_WEIGHT if use_weight else 1.0)).mean(), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["mse"]), ((d ** 2 * m).sum((1, 2, 3)) / m.sum((1, 2, 3))).mean(),
                               rtol=2e-5)
    np.testing.assert_allclose(float(metrics["weight_mean"]), w.mean(), rtol=2e-5)
  assert len({round(float(l), 6) for l, _ in outs}) == len(LOSS_CASES)  # the options do change the loss


def test_diffusion_loss_gradient_and_shared_noise_pieces():
  s = D.make_schedule()
  x0, _ = _data(2, (2, 4, 4, 3))

  def loss_fn(wgt):
    return D.diffusion_loss(lambda x, t, c: x * wgt, x0, None, jax.random.key(0), s,
                            prediction_type="v_prediction", snr_gamma=5.0)[0]

  @jax.jit
  def grad_and_fd(w, eps):
    return jax.grad(loss_fn)(w), (loss_fn(w + eps) - loss_fn(w - eps)) / (2 * eps)
  g, fd = grad_and_fd(jnp.float32(0.3), jnp.float32(1e-2))
  assert np.isfinite(float(g)) and abs(float(g)) > 1e-4
  np.testing.assert_allclose(float(g), float(fd), rtol=1e-3)  # loss is quadratic in wgt: central FD is exact
  # Pieces: two images evaluated under a shared (noise, t) give the same error when identical.
  noise, t = np.asarray(np.random.RandomState(0).randn(*x0.shape), np.float32), jnp.array([3, 700])
  errs = [D.per_example_error(D.add_noise(s, x, noise, t), D.target(s, x, noise, t), D.loss_weights(s, t))
          for x in (x0, x0.copy())]
  np.testing.assert_array_equal(np.asarray(errs[0]), np.asarray(errs[1]))


def test_skip_preconditioning_at_known_points():
  """c_skip / c_out from the EDM formulas at given alpha_bar; sigma_data = 1 is v-prediction (F = -v)."""
  s = D.make_schedule("cosine")
  ac = np.asarray(s.alphas_cumprod, np.float64)
  x = np.linspace(-1, 1, 4 * 2 * 2 * 3).reshape(4, 2, 2, 3).astype(np.float32)
  f = np.cos(np.arange(x.size)).reshape(x.shape).astype(np.float32)
  t = np.array([0, 50, 400, 999], np.int32)
  for sd in (0.2, 0.5):
    out = np.asarray(D.skip_preconditioning(lambda x_, t_, c: jnp.asarray(f), s, sd)(jnp.asarray(x), t, None))
    a, var = ac[t], 1 - ac[t]
    sigma_ve = np.sqrt(var / a)                     # EDM's noise level of x_t / alpha
    c_skip = sd ** 2 / (sigma_ve ** 2 + sd ** 2)    # EDM Table 1, applied to x_t / alpha
    c_out = sigma_ve * sd / np.sqrt(sigma_ve ** 2 + sd ** 2)
    want = (c_skip / np.sqrt(a))[:, None, None, None] * x + c_out[:, None, None, None] * f
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  # sigma_data = 1: x0 = alpha x_t - sigma v, i.e. the v-prediction conversion with F = -v.
  x0, noise = np.random.default_rng(0).normal(size=(2,) + x.shape).astype(np.float32)
  tt = jnp.asarray(t)
  x_t = D.add_noise(s, jnp.asarray(x0), jnp.asarray(noise), tt)
  v = D.velocity(s, jnp.asarray(x0), jnp.asarray(noise), tt)
  got = D.skip_preconditioning(lambda x_, t_, c: -v, s, 1.0)(x_t, tt, None)
  np.testing.assert_allclose(np.asarray(got), x0, rtol=1e-4, atol=1e-4)
  # Fractional timesteps interpolate alpha_bar; bad sigma_data is refused.
  half = D.skip_preconditioning(lambda x_, t_, c: jnp.zeros_like(x_), s, 0.5)(jnp.ones((1, 1)), jnp.array([50.5]), None)
  lo, hi = [float(D.skip_preconditioning(lambda x_, t_, c: jnp.zeros_like(x_), s, 0.5)(
      jnp.ones((1, 1)), jnp.array([k]), None)[0, 0]) for k in (50, 51)]
  assert min(lo, hi) <= float(half[0, 0]) <= max(lo, hi)
  with pytest.raises(ValueError, match="sigma_data"):
    D.skip_preconditioning(lambda x_, t_, c: x_, s, 0.0)


def test_denoise_fn_wires_skip_preconditioning():
  """config.diffusion.sigma_data / config.flow.sigma_data wrap the denoiser; a U-Net needs prediction_type sample."""
  import types
  import ml_collections
  from t2i.objectives import flow
  from t2i.train.objectives import _denoise_fn
  f = jnp.asarray(np.linspace(-1, 1, 12).reshape(1, 2, 2, 3), jnp.float32)
  x = jnp.ones((1, 2, 2, 3)) * 0.3
  def models(schedule, **cfg):
    return types.SimpleNamespace(schedule=schedule, denoiser_name="unet", config=ml_collections.ConfigDict(cfg),
                                 denoise=lambda p, x_, t_, c: f)
  s = D.make_schedule("cosine")
  t = jnp.array([300])
  got = _denoise_fn({"unet": None}, models(s, diffusion=dict(prediction_type="sample", sigma_data=0.3)))(x, t, None)
  np.testing.assert_allclose(got, D.skip_preconditioning(lambda *a: f, s, 0.3)(x, t, None))
  plain = _denoise_fn({"unet": None}, models(s, diffusion=dict(prediction_type="sample", sigma_data=0.0)))(x, t, None)
  np.testing.assert_array_equal(plain, f)
  with pytest.raises(ValueError, match="prediction_type='sample'"):
    _denoise_fn({"unet": None}, models(s, diffusion=dict(prediction_type="epsilon", sigma_data=0.3)))
  tf = jnp.array([0.4])
  got = _denoise_fn({"unet": None}, models(None, flow=dict(sigma_data=0.5)))(x, tf, None)
  np.testing.assert_allclose(got, flow.skip_preconditioning(lambda *a: f, 0.5)(x, tf, None))


def test_x0_from_prediction_inverts_each_target():
  s = D.make_schedule("cosine")
  x0, noise = _data(5, (4, 2, 2, 3))
  t = jnp.array([0, 100, 500, 990])
  x_t = D.add_noise(s, x0, noise, t)
  for pt in D.PREDICTION_TYPES:
    got = D.x0_from_prediction(s, x_t, D.target(s, x0, noise, t, pt), t, pt)
    np.testing.assert_allclose(np.asarray(got), x0, rtol=1e-3, atol=2e-3 if pt == "epsilon" else 1e-5)


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon"])
def test_self_conditioning_loss_and_gradient(prediction_type):
  """p = 1: the trained pass reads [x_t, x0 estimate of a first pass on [x_t, 0]], and no gradient flows through
  the estimate; p = 0.5: each step is one of the two cases, both occur."""
  s = D.make_schedule("cosine")
  x0, _ = _data(6, (3, 4, 4, 2))

  def denoiser(params):
    w, u = params
    def f(xc, t, cond):
      x, x0p = jnp.split(xc, 2, axis=-1)
      return w * x + u * x0p
    return f

  def manual(params, key, use, est=None):  # the loss with the estimate held constant (a numpy array)
    r, _ = jax.random.split(key)
    noise, t = D.sample_noise_and_t(r, x0.shape, s)
    x_t = D.add_noise(s, x0, noise, t)
    f = denoiser(params)
    if est is None:
      est = np.asarray(D.x0_from_prediction(s, x_t, f(jnp.concatenate([x_t, 0 * x_t], -1), t, None), t,
                                            prediction_type)) if use else np.zeros(x_t.shape, np.float32)
    pred = f(jnp.concatenate([x_t, est], -1), t, None)
    return jnp.mean((pred - D.target(s, x0, noise, t, prediction_type)) ** 2), est

  params = (jnp.float32(0.7), jnp.float32(0.4))
  ours = lambda p, key, rate: D.diffusion_loss(denoiser(p), x0, None, key, s, prediction_type=prediction_type,
                                               self_condition=rate)[0]
  key = jax.random.key(3)
  want, est = manual(params, key, True)
  np.testing.assert_allclose(float(ours(params, key, 1.0)), float(want), rtol=1e-5)
  g_ours = jax.grad(ours)(params, key, 1.0)
  g_want = jax.grad(lambda p: manual(p, key, True, est)[0])(params)
  np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_want), rtol=1e-5)
  kinds = set()
  for i in range(24):
    k = jax.random.key(100 + i)
    got = float(ours(params, k, 0.5))
    with_est, without = float(manual(params, k, True)[0]), float(manual(params, k, False)[0])
    assert min(abs(got - with_est), abs(got - without)) <= 1e-5 * abs(got)
    kinds.add(abs(got - with_est) <= 1e-5 * abs(got))
  assert kinds == {True, False}


def test_self_conditioning_config_checks():
  import ml_collections
  from t2i.train.models import _check_self_condition
  unet = lambda c: type("U", (), {"in_channels": c})()
  cfg = lambda **d: ml_collections.ConfigDict(dict(objective="diffusion", diffusion=dict(
      self_condition=0.5, sigma_data=0.0), **d))
  _check_self_condition(cfg(), "unet", unet(8), (4, 4, 4))
  with pytest.raises(ValueError, match=r"config.unet.config.in_channels must be 8"):
    _check_self_condition(cfg(), "unet", unet(4), (4, 4, 4))
  c = cfg()
  c.objective = "diffusion_dpo"
  with pytest.raises(ValueError, match="objective 'diffusion' only"):
    _check_self_condition(c, "unet", unet(8), (4, 4, 4))
  c = cfg()
  c.diffusion.self_condition = 1.5
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    _check_self_condition(c, "unet", unet(8), (4, 4, 4))


def test_self_conditioning_in_the_train_loop(tmp_path):
  """config.diffusion.self_condition trains and samples through the one loop (smoke model and data)."""
  import glob
  from experiments import sd_shapes
  from t2i.train import loop
  cfg = sd_shapes.get_config("smoke")
  cfg.diffusion.self_condition = 0.5
  cfg.unet.config.in_channels = 6
  cfg.sample_every = cfg.total_steps
  rec = loop.train(cfg, str(tmp_path))
  assert np.isfinite(rec["loss"])
  assert glob.glob(str(tmp_path / "samples" / "*.png"))
  cfg.unet.config.in_channels = 3
  with pytest.raises(ValueError, match="in_channels must be 6"):
    loop.train(cfg, str(tmp_path / "bad"))


def test_timestep_density_in_the_train_loop(tmp_path):
  """config.diffusion.t_sampler reaches the loss through the one loop; a wrong name fails naming the key."""
  from experiments import sd_shapes
  from t2i.train import loop
  cfg = sd_shapes.get_config("smoke")
  cfg.diffusion.update(t_sampler="logit_normal", logit_mean=-0.5, logit_std=0.8)
  assert np.isfinite(loop.train(cfg, str(tmp_path / "ok"))["loss"])
  cfg.diffusion.t_sampler = "logitnormal"
  with pytest.raises(ValueError, match=r"config.diffusion.t_sampler must be one of"):
    loop.train(cfg, str(tmp_path / "bad"))


def test_caption_contrast_at_known_points():
  """softplus(-scale * (err_neg - err_true) / norm) averaged over the rows with a negative; accuracy = share of
  those rows where the negative caption's error is larger."""
  err_true = jnp.array([1.0, 1.0, 2.0, 0.5])
  err_neg = jnp.array([1.5, 0.5, 2.0, 9.0])
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  term, acc = D.caption_contrast(err_true, err_neg, mask, jnp.float32(0.5), 2.0)
  sp = lambda z: np.log1p(np.exp(z))
  np.testing.assert_allclose(float(term), (sp(-2.0) + sp(2.0) + sp(0.0)) / 3, rtol=1e-6)
  np.testing.assert_allclose(float(acc), 1 / 3, rtol=1e-6)
  term, acc = D.caption_contrast(err_true, err_neg, jnp.zeros(4), jnp.float32(0.5), 2.0)
  assert float(term) == 0.0 and float(acc) == 0.0  # no negatives: no term


def test_diffusion_loss_with_caption_contrast():
  """The extra pass sees the same x_t and t under the negative captions of rows `neg_rows` (all rows, or the ones
  `contrast_rows` picks: those with a negative first); its term is added with `contrast_weight` and has a
  gradient through both captions."""
  s = D.make_schedule("cosine")
  x0, _ = _data(3, (4, 3, 3, 2))
  cond = {"bias": jnp.zeros((4, 2))}
  neg = {"bias": jnp.array([[0.0, 0.0], [0.3, 0.3], [0.0, 0.0], [-0.2, 0.1]])}
  neg_mask = jnp.array([0.0, 1.0, 0.0, 1.0])
  rng = jax.random.key(5)
  fn = lambda w: (lambda x, t, c: w * x + c["bias"][:, None, None, :])  # noqa: E731

  def run(w, n):
    rows = None if n == 0 else D.contrast_rows(neg_mask, n)
    take = (lambda a: a) if rows is None else (lambda a: jnp.take(a, rows, axis=0))
    return D.diffusion_loss(fn(w), x0, cond, rng, s, prediction_type="sample", neg_cond=jax.tree.map(take, neg),
                            neg_mask=take(neg_mask), contrast_weight=0.5, contrast_scale=4.0, neg_rows=rows)
  base, _ = D.diffusion_loss(fn(0.7), x0, cond, rng, s, prediction_type="sample")
  noise, t = D.sample_noise_and_t(rng, x0.shape, s)
  x_t = D.add_noise(s, x0, noise, t)
  err_true = D.per_example_error(fn(0.7)(x_t, t, cond), x0)
  err_neg = D.per_example_error(fn(0.7)(x_t, t, neg), x0)
  want, want_acc = D.caption_contrast(err_true[1::2], err_neg[1::2], jnp.ones(2), jnp.mean(err_true), 4.0)
  np.testing.assert_array_equal(D.contrast_rows(neg_mask, 2), [1, 3])
  np.testing.assert_array_equal(D.contrast_rows(neg_mask, 3), [1, 3, 0])
  np.testing.assert_array_equal(D.contrast_rows(neg_mask, 0), [1, 3, 0, 2])
  for n in (0, 2, 3):  # all rows; the two with negatives; those and one without (not counted)
    loss, metrics = run(0.7, n)
    np.testing.assert_allclose(float(metrics["contrast"]), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(base) + 0.5 * float(want), rtol=1e-5)
    assert float(metrics["contrast_acc"]) == float(want_acc)
  assert np.isfinite(float(jax.grad(lambda w: run(w, 2)[0])(0.7)))
  with pytest.raises(ValueError, match="neg_cond and neg_mask"):
    D.diffusion_loss(fn(0.7), x0, cond, rng, s, contrast_weight=0.5)


def test_caption_contrast_in_the_train_loop(tmp_path):
  """config.data.negative_caption feeds the negatives through the pipeline; config.diffusion.contrast trains on
  them through the one loop; the contrast without negatives fails naming the data key."""
  from PIL import Image
  from data_pipelines import ingest
  from experiments import sd_shapes
  from t2i.train import loop
  folder = tmp_path / "images"
  folder.mkdir()
  for i in range(4):
    Image.fromarray(np.full((16, 16, 3), 50 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text("a red circle to the left of a blue square" if i % 2 else "a red circle")
  ingest.ingest_folder(folder, tmp_path / "data", verbose=False)
  cfg = sd_shapes.get_config("smoke")
  cfg.total_steps, cfg.eval.every = 2, 0
  cfg.data = ml_collections.ConfigDict(dict(name="tfds", dataset="image_folder", data_dir=str(tmp_path / "data"),
                                            caption_dropout=0.0))
  cfg.diffusion.contrast.update(weight=0.5, rows=2)
  with pytest.raises(ValueError, match="config.data.negative_caption"):
    loop.train(cfg, str(tmp_path / "no_negatives"))
  cfg.data.negative_caption = "data_pipelines.shapes.captions.flipped_caption"
  m = loop.train(cfg, str(tmp_path / "run"))
  assert np.isfinite(float(m["loss"])) and float(m["contrast"]) > 0, m
