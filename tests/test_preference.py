"""Diffusion-DPO / SPIN losses (hand-computed values, shared noise, frozen reference) and the pair transform."""
import functools
import io
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from data_pipelines import image_decode
from data_pipelines import preference as data
from t2i.objectives import diffusion as D
from t2i.objectives import flow as F
from t2i.objectives import preference as P


def _softplus(x):  # -log sigmoid(z) = softplus(-z)
  return math.log1p(math.exp(x))


def _const_schedule(alpha_bar=0.5, n=4):
  """Every timestep has alpha_bar = 0.5 (snr = 1): an x0-guessing denoiser then has a noise-free error."""
  ac = np.full(n, alpha_bar, np.float32)
  return D.NoiseSchedule(betas=jnp.zeros(n), alphas=jnp.ones(n), alphas_cumprod=jnp.asarray(ac),
                         sqrt_alphas_cumprod=jnp.sqrt(ac), sqrt_one_minus_alphas_cumprod=jnp.sqrt(1 - ac),
                         snr=jnp.asarray(ac / (1 - ac)))


def _eps_oracle(schedule, guess):
  """Epsilon prediction implied by the guess x0 = guess: its squared error is snr_t * (x0 - guess)^2, no noise."""
  def fn(x_t, t, cond):
    del cond
    s = jnp.take(schedule.sqrt_alphas_cumprod, t)[:, None, None, None]
    sig = jnp.take(schedule.sqrt_one_minus_alphas_cumprod, t)[:, None, None, None]
    return (x_t - s * guess) / sig
  return fn


def _v_oracle(guess):
  """Velocity implied by the guess x0 = guess: (x_t - guess) / t; squared error ((x0 - guess) / t)^2."""
  return lambda x_t, t, cond: (x_t - guess) / t[:, None, None, None]


def _full(values, shape=(2, 2, 1)):
  return jnp.stack([jnp.full(shape, v, jnp.float32) for v in values])


# ------------------------------------------------------------------------------------------- from errors
ERRS = dict(err_w_policy=[0.2, 0.5, 0.4], err_l_policy=[0.6, 0.4, 0.3],
            err_w_ref=[0.3, 0.5, 0.3], err_l_ref=[0.5, 0.3, 0.3])


def test_dpo_from_errors_hand_computed():
  # beta = 10 -> z = -5 * [(ew_p - el_p) - (ew_r - el_r)]:
  #   pair 0: -5 * [(0.2 - 0.6) - (0.3 - 0.5)] = -5 * (-0.2) = 1.0
  #   pair 1: -5 * [(0.5 - 0.4) - (0.5 - 0.3)] = -5 * (-0.1) = 0.5
  #   pair 2: -5 * [(0.4 - 0.3) - (0.3 - 0.3)] = -5 * (+0.1) = -0.5
  z = [1.0, 0.5, -0.5]
  expected = np.mean([_softplus(-v) for v in z])  # (0.313262 + 0.474077 + 0.974077) / 3 = 0.587139
  assert expected == pytest.approx(0.587139, abs=1e-6)
  loss, m = P.dpo_loss_from_errors(*[jnp.array(v) for v in ERRS.values()], 10.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["implicit_acc"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["reward_margin"], 1 / 3, rtol=1e-5)
  # reward_w = -5 (ew_p - ew_r) = [0.5, 0, -0.5]; reward_l = -5 (el_p - el_r) = [-0.5, -0.5, 0]
  np.testing.assert_allclose(m["reward_w"], 0.0, atol=1e-6)
  np.testing.assert_allclose(m["reward_l"], -1 / 3, rtol=1e-5)
  np.testing.assert_allclose(m["mse_w_policy"], 1.1 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["mse_l_ref"], 1.1 / 3, rtol=1e-6)
  # timestep weights [2, 1, 0] -> z = [2, 0.5, 0]; hinge: mean(relu(1 - z)) = (0 + 0.5 + 1) / 3
  w = jnp.array([2.0, 1.0, 0.0])
  loss_w, m_w = P.dpo_loss_from_errors(*[jnp.array(v) for v in ERRS.values()], 10.0, timestep_weight=w)
  np.testing.assert_allclose(loss_w, (_softplus(-2) + _softplus(-0.5) + math.log(2)) / 3, rtol=1e-6)
  np.testing.assert_allclose(m_w["implicit_acc"], 2 / 3)  # z = 0 is not counted as a win
  loss_h, _ = P.dpo_loss_from_errors(*[jnp.array(v) for v in ERRS.values()], 10.0, timestep_weight=w,
                                     loss_kind="hinge")
  np.testing.assert_allclose(loss_h, 0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="shape"):
    P.dpo_loss_from_errors(jnp.ones(3), jnp.ones(2), jnp.ones(3), jnp.ones(3), 1.0)
  with pytest.raises(ValueError, match="loss_kind"):
    P.dpo_loss_from_errors(jnp.ones(3), jnp.ones(3), jnp.ones(3), jnp.ones(3), 1.0, loss_kind="ipo")


def test_beta_to_zero_limit():
  errs = [jnp.array(v) for v in ERRS.values()]
  d = np.array([-0.2, -0.1, 0.1])  # (ew_p - el_p) - (ew_r - el_r)
  for beta in (1e-2, 1e-3):
    loss, m = P.dpo_loss_from_errors(*errs, beta)
    # -log sigmoid(-(beta/2) d) = log 2 + beta d / 4 + O(beta^2)
    np.testing.assert_allclose((float(loss) - math.log(2)) / beta, d.mean() / 4, rtol=2e-2)
    np.testing.assert_allclose(m["implicit_acc"], 2 / 3)  # the sign of z does not depend on beta > 0
    g = jax.grad(lambda e: P.dpo_loss_from_errors(e, *errs[1:], beta)[0])(errs[0])
    np.testing.assert_allclose(g / beta, np.full(3, 1 / 12), rtol=1e-2)  # d loss / d ew_p -> beta / (4 B)
  loss0, _ = P.dpo_loss_from_errors(*errs, 0.0)
  np.testing.assert_allclose(loss0, math.log(2), rtol=1e-7)


# ------------------------------------------------------------------------------------------- epsilon DPO
def test_diffusion_dpo_hand_computed_and_jittable():
  s = _const_schedule()  # snr = 1 everywhere: errors are (x0 - guess)^2
  x_w, x_l = _full([0.0, 0.5]), _full([1.0, 1.0])
  pol, ref = _eps_oracle(s, 0.3), _eps_oracle(s, 0.6)
  # pair 0: ew_p = 0.09, el_p = 0.49, ew_r = 0.36, el_r = 0.16 -> d = -0.4 - 0.2 = -0.6; beta = 2 -> z = 0.6
  # pair 1: ew_p = 0.04, el_p = 0.49, ew_r = 0.01, el_r = 0.16 -> d = -0.45 + 0.15 = -0.3 -> z = 0.3
  expected = (_softplus(-0.6) + _softplus(-0.3)) / 2  # = 0.495922
  assert expected == pytest.approx(0.495922, abs=1e-6)
  rng = jax.random.PRNGKey(3)
  loss, m = P.diffusion_dpo_loss(pol, ref, x_w, x_l, None, rng, s, beta=2.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m["implicit_acc"], 1.0)
  np.testing.assert_allclose(m["mse_w_policy"], 0.065, rtol=1e-5)
  np.testing.assert_allclose(m["mse_l_ref"], 0.16, rtol=1e-5)
  # (0.3 - 0.6)^2 * snr on both images -> gap 0.09
  np.testing.assert_allclose(m["policy_ref_gap"], 0.09, rtol=1e-4)
  jitted = jax.jit(lambda a, b, k: P.diffusion_dpo_loss(pol, ref, a, b, None, k, s, beta=2.0)[0])
  np.testing.assert_allclose(jitted(x_w, x_l, rng), expected, rtol=1e-5)
  loss2, _ = P.diffusion_dpo_loss(pol, ref, x_w, x_l, None, rng, s, beta=2.0, concat_pair=False)
  np.testing.assert_allclose(loss2, expected, rtol=1e-5)


def test_dpo_matches_numpy_on_real_schedule():
  s = D.make_schedule("scaled_linear", 1000)
  r = np.random.RandomState(0)
  x_w, x_l = (jnp.asarray(r.randn(3, 4, 4, 2), jnp.float32) for _ in range(2))
  cond = jnp.asarray(r.randn(3, 2), jnp.float32)
  pol = lambda x, t, c: 0.9 * x + c[:, None, None, :]
  ref = lambda x, t, c: 0.5 * x
  rng = jax.random.PRNGKey(7)
  for pt in ("epsilon", "v_prediction"):
    loss, _ = P.diffusion_dpo_loss(pol, ref, x_w, x_l, cond, rng, s, beta=50.0, prediction_type=pt)
    noise, t = D.sample_noise_and_t(rng, x_w.shape, s)  # the documented draw: one (noise, t) for the pair
    e = {}
    for name, x0 in (("w", x_w), ("l", x_l)):
      xt = np.asarray(D.add_noise(s, x0, noise, t))
      tgt = np.asarray(D.target(s, x0, noise, t, pt))
      e["p" + name] = ((0.9 * xt + np.asarray(cond)[:, None, None, :] - tgt) ** 2).mean((1, 2, 3))
      e["r" + name] = ((0.5 * xt - tgt) ** 2).mean((1, 2, 3))
    z = -25.0 * ((e["pw"] - e["pl"]) - (e["rw"] - e["rl"]))
    np.testing.assert_allclose(loss, np.mean(np.logaddexp(0, -z)), rtol=1e-4)


def test_shared_noise_and_t():
  s = D.make_schedule("scaled_linear", 1000)
  r = np.random.RandomState(1)
  x_w, x_l = (jnp.asarray(r.randn(4, 3, 3, 2), jnp.float32) for _ in range(2))
  calls = []
  def recording(x, t, c):
    calls.append((np.asarray(x), np.asarray(t)))
    return jnp.zeros_like(x)
  rng = jax.random.PRNGKey(11)
  P.diffusion_dpo_loss(recording, lambda x, t, c: jnp.zeros_like(x), x_w, x_l, None, rng, s, beta=1.0)
  (xt, t), = calls  # one 2B call for the policy
  ref_noise, ref_t = D.sample_noise_and_t(rng, x_w.shape, s)  # the one documented draw, applied to both
  np.testing.assert_array_equal(t, np.concatenate([ref_t, ref_t]))
  np.testing.assert_allclose(xt[:4], D.add_noise(s, x_w, ref_noise, ref_t), atol=1e-6)
  np.testing.assert_allclose(xt[4:], D.add_noise(s, x_l, ref_noise, ref_t), atol=1e-6)
  # SPIN with independent noise: t still shared, the loser's noise differs
  calls.clear()
  P.spin_loss(recording, lambda x, t, c: jnp.zeros_like(x), x_w, x_l, None, rng, s, beta=1.0, shared_noise=False)
  (xt, t), = calls
  np.testing.assert_array_equal(t, np.concatenate([ref_t, ref_t]))
  np.testing.assert_allclose(xt[:4], D.add_noise(s, x_w, ref_noise, ref_t), atol=1e-6)
  assert np.abs(xt[4:] - np.asarray(D.add_noise(s, x_l, ref_noise, ref_t))).max() > 0.1
  # flow: x_t = (1 - t) x0 + t noise
  calls.clear()
  P.flow_dpo_loss(recording, lambda x, t, c: jnp.zeros_like(x), x_w, x_l, None, rng, beta=1.0)
  (xt, t), = calls
  np.testing.assert_array_equal(t[:4], t[4:])
  f_noise, f_t = F.sample_noise_and_t(rng, x_w.shape, "uniform")
  np.testing.assert_array_equal(t, np.concatenate([f_t, f_t]))
  np.testing.assert_allclose(xt[:4], F.interpolate(x_w, f_noise, f_t), atol=1e-6)
  np.testing.assert_allclose(xt[4:], F.interpolate(x_l, f_noise, f_t), atol=1e-6)


def _linear_denoiser(params, x, t, cond):
  del t
  return params["a"] * x + params["b"] * cond[:, None, None, :]


def test_gradient_reaches_only_the_policy():
  s = D.make_schedule("linear", 100, 1e-4, 0.02)
  r = np.random.RandomState(2)
  x_w, x_l = (jnp.asarray(r.randn(3, 4, 4, 2), jnp.float32) for _ in range(2))
  cond = jnp.asarray(r.randn(3, 2), jnp.float32)
  policy = {"a": jnp.array(0.7), "b": jnp.array(0.2)}
  ref = {"a": jnp.array(0.4), "b": jnp.array(-0.1)}
  def loss(pp, rp, kind):
    pf, rf = functools.partial(_linear_denoiser, pp), functools.partial(_linear_denoiser, rp)
    k = jax.random.PRNGKey(5)
    if kind == "dpo":
      return P.diffusion_dpo_loss(pf, rf, x_w, x_l, cond, k, s, beta=100.0)[0]
    if kind == "spin":
      return P.spin_loss(pf, rf, x_w, x_l, cond, k, s, beta=100.0, sft_weight=0.5)[0]
    return P.flow_dpo_loss(pf, rf, x_w, x_l, cond, k, beta=100.0)[0]
  for kind in ("dpo", "spin", "flow"):
    g_pol, g_ref = jax.grad(loss, argnums=(0, 1))(policy, ref, kind)
    assert all(float(v) == 0.0 for v in jax.tree.leaves(g_ref)), kind
    assert all(np.isfinite(float(v)) and float(v) != 0.0 for v in jax.tree.leaves(g_pol)), kind
  # the reference may even share the policy's params (e.g. LoRA off): it still gets no gradient of its own
  g_same = jax.grad(lambda p: P.diffusion_dpo_loss(
      functools.partial(_linear_denoiser, p), functools.partial(_linear_denoiser, p), x_w, x_l, cond,
      jax.random.PRNGKey(5), s, beta=100.0)[0])(policy)
  g_frozen = jax.grad(lambda p: P.diffusion_dpo_loss(
      functools.partial(_linear_denoiser, p), functools.partial(_linear_denoiser, policy), x_w, x_l, cond,
      jax.random.PRNGKey(5), s, beta=100.0)[0])(policy)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), g_same, g_frozen)


def test_implicit_accuracy_on_constructed_cases():
  s = D.make_schedule("scaled_linear", 1000)  # snr > 0 at every t
  x_w, x_l = _full([-0.5] * 4), _full([0.5] * 4)
  ref = lambda x, t, c: jnp.zeros_like(x)
  rng = jax.random.PRNGKey(0)
  _, m_good = P.diffusion_dpo_loss(_eps_oracle(s, -0.5), ref, x_w, x_l, None, rng, s, beta=10.0)
  _, m_bad = P.diffusion_dpo_loss(_eps_oracle(s, 0.5), ref, x_w, x_l, None, rng, s, beta=10.0)
  _, m_same = P.diffusion_dpo_loss(ref, ref, x_w, x_l, None, rng, s, beta=10.0)
  assert float(m_good["implicit_acc"]) == 1.0 and float(m_good["reward_margin"]) > 0
  assert float(m_bad["implicit_acc"]) == 0.0 and float(m_bad["reward_margin"]) < 0
  assert float(m_same["implicit_acc"]) == 0.0 and float(m_same["reward_margin"]) == 0.0
  np.testing.assert_allclose(m_good["mse_w_policy"], 0.0, atol=1e-4)
  _, m_flow = P.flow_dpo_loss(_v_oracle(-0.5), lambda x, t, c: jnp.zeros_like(x), x_w, x_l, None, rng, beta=1.0,
                              t_sampler=lambda k, b: jax.random.uniform(k, (b,), minval=0.1, maxval=1.0))
  assert float(m_flow["implicit_acc"]) == 1.0


def test_sft_switch_is_plain_diffusion_loss_on_winners():
  s = D.make_schedule("scaled_linear", 1000)
  r = np.random.RandomState(4)
  x_w, x_l = (jnp.asarray(r.randn(3, 4, 4, 2), jnp.float32) for _ in range(2))
  cond = jnp.asarray(r.randn(3, 2), jnp.float32)
  pol = functools.partial(_linear_denoiser, {"a": jnp.array(0.3), "b": jnp.array(1.0)})
  never = lambda *a: (_ for _ in ()).throw(AssertionError("reference evaluated in SFT mode"))
  rng = jax.random.PRNGKey(9)
  for pt, gamma in (("epsilon", None), ("v_prediction", 5.0)):
    sft, m = P.diffusion_dpo_loss(pol, never, x_w, x_l, cond, rng, s, beta=5000.0, prediction_type=pt,
                                  sft_on_winners=True, snr_gamma=gamma)
    plain, _ = D.diffusion_loss(pol, x_w, cond, rng, s, prediction_type=pt, snr_gamma=gamma)
    np.testing.assert_allclose(sft, plain, rtol=1e-7)
    assert set(m) >= {"loss", "mse_w_policy"}
  # and the DPO arm sees the same (noise, t): its unweighted winner error is the epsilon SFT loss
  _, m_dpo = P.diffusion_dpo_loss(pol, pol, x_w, x_l, cond, rng, s, beta=5000.0)
  plain, _ = D.diffusion_loss(pol, x_w, cond, rng, s)
  np.testing.assert_allclose(m_dpo["mse_w_policy"], plain, rtol=1e-6)
  # ... also under the run's own timestep density and min-SNR floor (both arms, and SPIN, draw t alike)
  d_kw = dict(t_sampler="logit_normal", logit_mean=1.0, logit_std=1.0, weight_floor=1.0)
  sft, m_sft = P.diffusion_dpo_loss(pol, never, x_w, x_l, cond, rng, s, beta=1.0, sft_on_winners=True,
                                    snr_gamma=5.0, prediction_type="sample", **d_kw)
  plain, m_plain = D.diffusion_loss(pol, x_w, cond, rng, s, snr_gamma=5.0, prediction_type="sample", **d_kw)
  np.testing.assert_allclose(sft, plain, rtol=1e-7)
  for loss_fn in (P.diffusion_dpo_loss, P.spin_loss):
    _, m_pair = loss_fn(pol, pol, x_w, x_l, cond, rng, s, beta=1.0, snr_gamma=5.0, prediction_type="sample",
                        **d_kw)
    np.testing.assert_allclose(m_pair["mse_w_policy"], m_plain["mse"], rtol=1e-6)
    np.testing.assert_allclose(m_pair["weight_mean"], m_plain["weight_mean"], rtol=1e-6)
  assert float(m_plain["weight_mean"]) >= 1.0  # the floor
  _, m_uniform = D.diffusion_loss(pol, x_w, cond, rng, s, snr_gamma=5.0, prediction_type="sample")
  assert float(m_uniform["mse"]) != float(m_plain["mse"])  # another t: the density reached the draw
  # flow SFT arm: flow.flow_loss on winners, under the same (t, noise) as the flow DPO arm
  t_kw = dict(t_sampler="logit_normal", logit_mean=0.5, shift_mu=1.15)
  sft_f, m_sft = P.flow_dpo_loss(pol, never, x_w, x_l, cond, rng, beta=1.0, sft_on_winners=True, **t_kw)
  plain_f, m_plain = F.flow_loss(pol, x_w, cond, rng, **t_kw)
  np.testing.assert_allclose(sft_f, plain_f, rtol=1e-7)
  _, m_f = P.flow_dpo_loss(pol, pol, x_w, x_l, cond, rng, beta=1.0, **t_kw)
  np.testing.assert_allclose(m_f["mse_w_policy"], plain_f, rtol=1e-6)
  np.testing.assert_allclose(m_f["t_mean"], m_plain["t_mean"], rtol=1e-7)
  sft_e, _ = P.flow_dpo_loss(pol, never, x_w, x_l, cond, rng, beta=1.0, sft_on_winners=True, weighting="epsilon")
  plain_e, _ = F.flow_loss(pol, x_w, cond, rng, weighting=lambda t: (1 - t) ** 2)
  np.testing.assert_allclose(sft_e, plain_e, rtol=1e-6)


# ------------------------------------------------------------------------------------------- flow
def test_flow_dpo_hand_computed():
  x_w, x_l = _full([0.0, 0.0]), _full([1.0, 1.0])
  fixed_t = lambda k, b: jnp.array([0.5, 0.25])
  # errors ((x0 - guess) / t)^2 with policy guess 0.2, reference guess 0.5:
  #   pair 0 (t=0.5):  ew_p = 0.16, el_p = 2.56,  ew_r = el_r = 1 -> d = -2.4; beta = 0.5 -> z = 0.6
  #   pair 1 (t=0.25): ew_p = 0.64, el_p = 10.24, ew_r = el_r = 4 -> d = -9.6 -> z = 2.4
  loss, m = P.flow_dpo_loss(_v_oracle(0.2), _v_oracle(0.5), x_w, x_l, None, jax.random.PRNGKey(0), beta=0.5,
                            t_sampler=fixed_t)
  expected = (_softplus(-0.6) + _softplus(-2.4)) / 2  # = 0.262162
  assert expected == pytest.approx(0.262162, abs=1e-6)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(m["mse_l_policy"], (2.56 + 10.24) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["implicit_acc"], 1.0)
  jitted = jax.jit(lambda k: P.flow_spin_loss(_v_oracle(0.2), _v_oracle(0.5), x_w, x_l, None, k, beta=0.5,
                                              t_sampler=fixed_t)[0])
  np.testing.assert_allclose(jitted(jax.random.PRNGKey(0)), expected, rtol=1e-5)
  # "epsilon" weighting multiplies by (1 - t)^2 = [0.25, 0.5625] -> z = [0.15, 1.35]
  loss_e, m_e = P.flow_dpo_loss(_v_oracle(0.2), _v_oracle(0.5), x_w, x_l, None, jax.random.PRNGKey(0),
                                beta=0.5, t_sampler=fixed_t, weighting="epsilon")
  np.testing.assert_allclose(loss_e, (_softplus(-0.15) + _softplus(-1.35)) / 2, rtol=1e-5)
  np.testing.assert_allclose(m_e["weight_mean"], (0.25 + 0.5625) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match="weighting"):
    P.flow_weights(jnp.ones(2), "snr")


# ------------------------------------------------------------------------------------------- SPIN
def test_spin_hand_computed():
  s = _const_schedule()
  x_real, x_gen = _full([0.0, 0.5]), _full([1.0, 1.0])
  pol, opp = _eps_oracle(s, 0.3), _eps_oracle(s, 0.6)
  rng = jax.random.PRNGKey(1)
  # real = winner, opponent sample = loser, opponent = reference (same numbers as the DPO example):
  #   z = [0.6, 0.3] at beta = 2; policy errors on real = [0.09, 0.04]
  loss, m = P.spin_loss(pol, opp, x_real, x_gen, None, rng, s, beta=2.0)
  np.testing.assert_allclose(loss, (_softplus(-0.6) + _softplus(-0.3)) / 2, rtol=1e-5)
  np.testing.assert_allclose(m["implicit_acc"], 1.0)
  # with an SFT anchor: + 0.1 * mean([0.09, 0.04])
  loss_s, m_s = P.spin_loss(pol, opp, x_real, x_gen, None, rng, s, beta=2.0, sft_weight=0.1)
  np.testing.assert_allclose(loss_s, (_softplus(-0.6) + _softplus(-0.3)) / 2 + 0.0065, rtol=1e-5)
  np.testing.assert_allclose(m_s["pair_loss"], loss, rtol=1e-6)
  # hinge: mean(relu(1 - z)) = (0.4 + 0.7) / 2; errors are noise-free here so independent noise changes nothing
  loss_h, _ = P.spin_loss(pol, opp, x_real, x_gen, None, rng, s, beta=2.0, loss_kind="hinge", shared_noise=False)
  np.testing.assert_allclose(loss_h, 0.55, rtol=1e-5)
  # flow SPIN: same structure as the flow DPO example
  loss_f, _ = P.flow_spin_loss(_v_oracle(0.2), _v_oracle(0.5), _full([0.0, 0.0]), _full([1.0, 1.0]), None, rng,
                               beta=0.5, t_sampler=lambda k, b: jnp.array([0.5, 0.25]))
  np.testing.assert_allclose(loss_f, (_softplus(-0.6) + _softplus(-2.4)) / 2, rtol=1e-5)


def test_spin_opponent_anchor():
  """The anchor adds (beta/2) w relu(e_pol(gen) - e_opp(gen)): nothing while the policy denoises the opponent's
  samples at least as well as the opponent; at 1 the total loss can no longer fall by raising that error."""
  s = _const_schedule()
  x_real, x_gen = _full([0.0, 0.5]), _full([1.0, 1.0])
  rng = jax.random.PRNGKey(1)
  # x0 guesses 0.6 / 0.3: squared errors on x_gen = 1 are 0.16 / 0.49 (snr 1 at this constant schedule)
  good_on_gen, bad_on_gen = _eps_oracle(s, 0.6), _eps_oracle(s, 0.3)
  plain, _ = P.spin_loss(good_on_gen, bad_on_gen, x_real, x_gen, None, rng, s, beta=2.0)
  anchored, m = P.spin_loss(good_on_gen, bad_on_gen, x_real, x_gen, None, rng, s, beta=2.0, opponent_anchor=1.0)
  np.testing.assert_allclose(anchored, plain, rtol=1e-6)
  assert float(m["anchor"]) == 0.0
  plain, m0 = P.spin_loss(bad_on_gen, good_on_gen, x_real, x_gen, None, rng, s, beta=2.0)
  anchored, m = P.spin_loss(bad_on_gen, good_on_gen, x_real, x_gen, None, rng, s, beta=2.0, opponent_anchor=0.5)
  gap = float(m0["mse_l_policy"] - m0["mse_l_ref"])  # both rows of x_gen are equal, so their errors are too
  np.testing.assert_allclose(gap, 0.49 - 0.16, rtol=1e-5)
  np.testing.assert_allclose(m["anchor"], gap, rtol=1e-5)  # beta / 2 = 1, w = 1
  np.testing.assert_allclose(anchored, plain + 0.5 * gap, rtol=1e-5)
  np.testing.assert_allclose(m["pair_loss"], plain, rtol=1e-6)
  loss_f, m_f = P.flow_spin_loss(_v_oracle(0.2), _v_oracle(0.5), _full([0.0, 0.0]), _full([1.0, 1.0]), None, rng,
                                 beta=0.5, t_sampler=lambda k, b: jnp.array([0.5, 0.25]), opponent_anchor=1.0)
  assert float(m_f["anchor"]) > 0 and float(loss_f) > float(m_f["pair_loss"])
  errs = (jnp.array([0.1, 0.2]), jnp.array([0.5, 0.3]), jnp.array([0.1, 0.2]), jnp.array([0.2, 0.1]))
  pair_loss = P._pair_loss  # pylint: disable=protected-access
  total = lambda e_l: pair_loss((errs[0], e_l, errs[2], errs[3]), jnp.zeros(()), jnp.ones(2), 100.0, "sigmoid", 0.0,
                                1.0)[0]
  assert bool(jnp.all(jax.grad(total)(errs[1]) >= 0))  # raising a loser error above the opponent's never pays


def test_dpo_anchors_equal_spin_with_the_reference_as_opponent():
  """DPO takes SPIN's two anchors (SFT term on the winners, anchor on the losers against the frozen reference):
  with winner = real, loser = generated and reference = opponent, both losses are the same function."""
  s = _const_schedule()
  x_w, x_l = _full([0.0, 0.5]), _full([1.0, 0.8])
  rng = jax.random.PRNGKey(3)
  policy, ref = _eps_oracle(s, 0.3), _eps_oracle(s, 0.6)
  kw = dict(beta=2.0, sft_weight=0.3, opponent_anchor=0.5)
  dpo, m_dpo = P.diffusion_dpo_loss(policy, ref, x_w, x_l, None, rng, s, **kw)
  spin, _ = P.spin_loss(policy, ref, x_w, x_l, None, rng, s, **kw)
  np.testing.assert_allclose(dpo, spin, rtol=1e-6)
  plain, _ = P.diffusion_dpo_loss(policy, ref, x_w, x_l, None, rng, s, beta=2.0)
  assert float(m_dpo["anchor"]) > 0 and float(dpo) > float(plain)
  np.testing.assert_allclose(m_dpo["pair_loss"], plain, rtol=1e-6)
  t_kw = dict(beta=0.5, t_sampler=lambda k, b: jnp.array([0.5, 0.25]), sft_weight=0.3, opponent_anchor=0.5)
  dpo_f, _ = P.flow_dpo_loss(_v_oracle(0.2), _v_oracle(0.5), x_w, x_l, None, rng, **t_kw)
  spin_f, _ = P.flow_spin_loss(_v_oracle(0.2), _v_oracle(0.5), x_w, x_l, None, rng, **t_kw)
  np.testing.assert_allclose(dpo_f, spin_f, rtol=1e-6)


def test_refresh_reference():
  ref, pol = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  f = jax.jit(P.refresh_reference, static_argnums=3)
  assert float(f(ref, pol, jnp.int32(0), 5)["w"].sum()) == 0.0
  assert float(f(ref, pol, jnp.int32(7), 5)["w"].sum()) == 0.0
  assert float(f(ref, pol, jnp.int32(10), 5)["w"].sum()) == 3.0
  assert P.refresh_reference(ref, pol, jnp.int32(10), 0) is ref


# ------------------------------------------------------------------------------------------- data
def _encode(color, fmt, size=(6, 8)):
  out = io.BytesIO()
  Image.new("RGB", (size[1], size[0]), color).save(out, format=fmt)
  return out.getvalue()


RED_PNG, BLUE_JPG = _encode((255, 0, 0), "PNG"), _encode((0, 0, 255), "JPEG")


def _records():
  return [
      {"caption": b"red wins", "jpg_0": RED_PNG, "jpg_1": BLUE_JPG, "label_0": 1.0},
      {"caption": "blue wins", "jpg_0": RED_PNG, "jpg_1": BLUE_JPG, "label_0": np.float32(0.0)},
      {"caption": "tie", "jpg_0": RED_PNG, "jpg_1": BLUE_JPG, "label_0": 0.5},
      {"caption": "no label", "jpg_0": RED_PNG, "jpg_1": BLUE_JPG, "label_0": float("nan")},
  ]


def test_ties_dropped_and_winner_first():
  stats = {}
  pairs = list(data.select_pairs(_records(), stats))
  assert stats == {"seen": 4, "kept": 2, "ties": 2}
  assert [p["caption"] for p in pairs] == ["red wins", "blue wins"]
  assert pairs[0]["jpg_w"] is RED_PNG and pairs[0]["jpg_l"] is BLUE_JPG
  assert pairs[1]["jpg_w"] is BLUE_JPG and pairs[1]["jpg_l"] is RED_PNG
  assert [data.is_decided(r) for r in _records()] == [True, True, False, False]
  with pytest.raises(ValueError, match="label_0"):
    data.winner_first(_records()[2])
  ex = data.decode_pair(pairs[1], 4)
  assert ex["image_w"].shape == ex["image_l"].shape == (4, 4, 3) and ex["image_w"].dtype == np.float32
  np.testing.assert_allclose(ex["image_w"].mean((0, 1)), [-1, -1, 1], atol=0.05)  # blue (JPEG)
  np.testing.assert_allclose(ex["image_l"], np.broadcast_to([1.0, -1.0, -1.0], (4, 4, 3)))  # red (PNG), exact
  assert data.to_example(_records()[0], (2, 6))["image_w"].shape == (2, 6, 3)


def test_grain_filter_map_and_bad_bytes():
  ds = grain.MapDataset.source(_records()).filter(data.is_decided).map(functools.partial(data.to_example, size=4))
  out = [e for e in ds if e is not None]
  assert [e["caption"] for e in out] == ["red wins", "blue wins"]
  np.testing.assert_allclose(out[0]["image_w"][0, 0], [1, -1, -1])
  bad = {"caption": "x", "jpg_0": b"", "jpg_1": RED_PNG, "label_0": 1}
  assert data.to_example(bad, 4, skip_bad=True) == {"skip": "zero-byte file"}
  with pytest.raises(image_decode.SkipSample):
    data.to_example(bad, 4)


def test_shapes_preference_pairs_end_to_end():
  from data_pipelines import shapes  # pylint: disable=g-import-not-at-top
  records = list(shapes.preference_pairs(24, seed=0, size=32))
  stats = {}
  pairs = list(data.select_pairs(records, stats))
  assert stats["ties"] == sum(r["rejected"] == "tie" for r in records) and stats["kept"] == len(pairs)
  for r, p in zip([r for r in records if r["rejected"] != "tie"], pairs):
    assert p["jpg_w"] is (r["jpg_0"] if r["label_0"] == 1 else r["jpg_1"])
  ex = data.to_example(records[0] if records[0]["rejected"] != "tie" else records[1], 16)
  assert ex["image_w"].shape == (16, 16, 3) and -1 <= ex["image_w"].min() and ex["image_w"].max() <= 1


def test_argument_validation():
  x = jnp.zeros((2, 2, 2, 1))
  s = _const_schedule()
  with pytest.raises(ValueError, match="prediction_type"):
    P.diffusion_dpo_loss(None, None, x, x, None, jax.random.PRNGKey(0), s, beta=1.0, prediction_type="flow")
  with pytest.raises(ValueError, match="same shape"):
    P.spin_loss(None, None, x, x[:1], None, jax.random.PRNGKey(0), s, beta=1.0)
