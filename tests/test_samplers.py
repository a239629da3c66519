"""DDIM / DDPM (ancestral) / Euler / DPM-Solver++(2M) trajectories against the diffusers scheduler loops, CFG and
tracing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from t2i.objectives.diffusion import make_schedule
from t2i.sampling import diffusion as S

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

SHAPE = (2, 4, 4, 3)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
          steps_offset=1)


def f_torch(x, t, bias=0.0):
  t = torch.as_tensor(t, dtype=torch.float32)
  return 0.6 * torch.tanh(0.9 * x + t / 1000.0 + bias) + 0.25 * torch.cos(t / 150.0) * x


def f_jax(x, t, cond):
  """Same fake denoiser; t is float32 [B]; cond (if any) is {"bias": [B, 1, 1, 1]} added inside the tanh."""
  tt = t[:, None, None, None]
  bias = 0.0 if cond is None else cond["bias"]
  return 0.6 * jnp.tanh(0.9 * x + tt / 1000.0 + bias) + 0.25 * jnp.cos(tt / 150.0) * x


def diffusers_scheduler(sampler, prediction_type, spacing, rescale=False, **x0_kw):
  kw = dict(SD, prediction_type=prediction_type, timestep_spacing=spacing, rescale_betas_zero_snr=rescale)
  if sampler == "ddim":
    return DDIMScheduler(**kw, set_alpha_to_one=False, **{"clip_sample": False, **x0_kw})
  if sampler == "euler":
    return EulerDiscreteScheduler(**kw)
  return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                     lower_order_final=True, **x0_kw)


def diffusers_loop(scheduler, num_steps, noise, model=f_torch, step_noises=None, eta=0.0):
  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(noise) * scheduler.init_noise_sigma
  for i, t in enumerate(scheduler.timesteps):
    out = model(scheduler.scale_model_input(x, t), t)
    kw = {} if step_noises is None else dict(eta=eta, variance_noise=torch.from_numpy(step_noises[i]))
    x = scheduler.step(out, t, x, **kw).prev_sample
  return x.numpy()


def noise_like(seed=0, shape=SHAPE):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def assert_close(out, ref, rtol=1e-4):
  out = np.asarray(out)
  assert np.all(np.isfinite(out))
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel < rtol, rel
  np.testing.assert_allclose(out, ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@functools.lru_cache(maxsize=None)
def schedule(rescale=False):
  return make_schedule("scaled_linear", 1000, 0.00085, 0.012, rescale_zero_terminal_snr=rescale)


CASES = ([(s, p, "leading", n) for s in S.DETERMINISTIC_SAMPLERS for p in ("epsilon", "v_prediction")
          for n in (10, 25)]
         + [("ddim", "epsilon", "trailing", 10), ("ddim", "sample", "linspace", 25),
            ("euler", "v_prediction", "linspace", 25),  # fractional timesteps: interpolated sigmas
            ("euler", "epsilon", "trailing", 10), ("dpmpp_2m", "sample", "trailing", 10),
            ("dpmpp_2m", "v_prediction", "linspace", 25)])


@pytest.mark.parametrize("sampler,prediction_type,spacing,num_steps", CASES)
def test_trajectory_matches_diffusers(sampler, prediction_type, spacing, num_steps):
  noise = noise_like()
  ref = diffusers_loop(diffusers_scheduler(sampler, prediction_type, spacing), num_steps, noise)
  out = S.sample_jit(f_jax, SHAPE, None, None, jax.random.key(0), schedule(), sampler=sampler, num_steps=num_steps,
                     guidance_scale=1.0, prediction_type=prediction_type, timestep_spacing=spacing,
                     x_T=jnp.asarray(noise))
  assert_close(out, ref)


@pytest.mark.parametrize("sampler", S.DETERMINISTIC_SAMPLERS)
def test_zero_terminal_snr_trailing_v_prediction(sampler):
  noise = noise_like(1)
  ref = diffusers_loop(diffusers_scheduler(sampler, "v_prediction", "trailing", rescale=True), 10, noise)
  out = S.sample_jit(f_jax, SHAPE, None, None, jax.random.key(0), schedule(True), sampler=sampler, num_steps=10,
                     guidance_scale=1.0, prediction_type="v_prediction", timestep_spacing="trailing",
                     x_T=jnp.asarray(noise))
  assert_close(out, ref)


def test_ddim_eta_matches_diffusers_with_same_noise():
  n, eta, rng = 10, 0.7, jax.random.key(5)
  noise = noise_like(2)
  _, step_key = jax.random.split(rng)  # documented noise convention
  step_noises = [np.asarray(jax.random.normal(jax.random.fold_in(step_key, i), SHAPE)) for i in range(n)]
  ref = diffusers_loop(diffusers_scheduler("ddim", "epsilon", "leading"), n, noise, step_noises=step_noises, eta=eta)
  out = S.sample_jit(f_jax, SHAPE, None, None, rng, schedule(), sampler="ddim", num_steps=n, guidance_scale=1.0,
                     eta=eta, x_T=jnp.asarray(noise))
  assert_close(out, ref)
  det = diffusers_loop(diffusers_scheduler("ddim", "epsilon", "leading"), n, noise)
  assert np.linalg.norm(np.asarray(out) - det) > 1e-2 * np.linalg.norm(det)  # eta really adds noise


def test_ddpm_is_ancestral_ddim_with_per_image_noise():
  """"ddpm" = diffusers' DDIMScheduler with eta = 1 given the same noise; with one key per image, image b's step
  noise is normal(fold_in(split(key_b)[1], i)), so an image's sample does not depend on its batch-mates."""
  n = 10
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(SHAPE[0], dtype=jnp.uint32) + 7)
  noise = noise_like(3)
  step_keys = [jax.random.split(k)[1] for k in keys]
  step_noises = [np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, i), SHAPE[1:])) for k in step_keys])
                 for i in range(n)]
  ref = diffusers_loop(diffusers_scheduler("ddim", "sample", "leading"), n, noise, step_noises=step_noises, eta=1.0)
  kw = dict(sampler="ddpm", num_steps=n, guidance_scale=1.0, prediction_type="sample")
  out = S.sample_jit(f_jax, SHAPE, None, None, keys, schedule(), x_T=jnp.asarray(noise), **kw)
  assert_close(out, ref)
  alone = S.sample_jit(f_jax, (1,) + SHAPE[1:], None, None, keys[1:], schedule(), x_T=jnp.asarray(noise[1:]), **kw)
  np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(out)[1], rtol=1e-5, atol=1e-6)
  det = diffusers_loop(diffusers_scheduler("ddim", "sample", "leading"), n, noise)
  assert np.linalg.norm(np.asarray(out) - det) > 1e-2 * np.linalg.norm(det)  # it really adds noise
  with pytest.raises(ValueError, match="per-image keys"):
    S.sample(f_jax, SHAPE, None, None, keys[:1], schedule(), sampler="ddpm", num_steps=n)


X0_CASES = [("ddim", dict(clip_sample=True, clip_sample_range=1.5), dict(clip_sample_range=1.5)),
            ("ddim", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
             dict(dynamic_threshold=0.9, sample_max_value=2.0)),
            ("dpmpp_2m", dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=3.0),
             dict(dynamic_threshold=0.8, sample_max_value=3.0))]


@pytest.mark.parametrize("sampler,theirs,ours", X0_CASES)
def test_x0_clipping_and_dynamic_thresholding_match_diffusers(sampler, theirs, ours):
  """diffusers' clip_sample / thresholding on the x0 estimate; an epsilon model's early x0 estimates are far
  outside [-1, 1] here, so the processing changes the trajectory (checked)."""
  noise = 2.0 * noise_like(4)
  ref = diffusers_loop(diffusers_scheduler(sampler, "epsilon", "leading", **theirs), 10, noise)
  kw = dict(sampler=sampler, num_steps=10, guidance_scale=1.0, x_T=jnp.asarray(noise))
  out = S.sample_jit(f_jax, SHAPE, None, None, jax.random.key(0), schedule(), **kw, **ours)
  assert_close(out, ref)
  plain = S.sample_jit(f_jax, SHAPE, None, None, jax.random.key(0), schedule(), **kw)
  assert np.linalg.norm(np.asarray(out) - np.asarray(plain)) > 1e-2 * np.linalg.norm(np.asarray(plain))


def test_process_x0_hand_values():
  x0 = jnp.asarray([[-3.0, -0.5, 0.25, 2.0], [0.1, -0.2, 0.3, 0.9]]).reshape(2, 1, 2, 2)
  np.testing.assert_allclose(S.process_x0(x0, clip_sample_range=1.0).reshape(2, 4),
                             [[-1.0, -0.5, 0.25, 1.0], [0.1, -0.2, 0.3, 0.9]])
  # image 0: the 0.5-quantile of |x0| = (0.5, 2, 3 sorted as 0.25 0.5 2 3) -> 1.25; image 1 stays below 1 -> s = 1
  out = S.process_x0(x0, dynamic_threshold=0.5, sample_max_value=10.0).reshape(2, 4)
  np.testing.assert_allclose(out, [[-1.0, -0.4, 0.2, 1.0], [0.1, -0.2, 0.3, 0.9]], rtol=1e-6)
  out = S.process_x0(x0, dynamic_threshold=0.5, sample_max_value=1.1).reshape(2, 4)  # s capped at 1.1
  np.testing.assert_allclose(out[0], np.array([-1.1, -0.5, 0.25, 1.1]) / 1.1, rtol=1e-6)
  for bad, named in ((dict(clip_sample_range=-1.0), "clip_sample_range"), (dict(dynamic_threshold=1.0),
                     "dynamic_threshold"), (dict(dynamic_threshold=0.9, sample_max_value=0.5), "sample_max_value")):
    with pytest.raises(ValueError, match=named):
      S.sample(f_jax, SHAPE, None, None, jax.random.key(0), schedule(), num_steps=2, **bad)


def test_timesteps_match_diffusers():
  for sampler in S.DETERMINISTIC_SAMPLERS:
    for spacing in S.SPACINGS:
      for n in (1, 7, 10, 25, 50):
        sch = diffusers_scheduler(sampler, "epsilon", spacing)
        sch.set_timesteps(n)
        np.testing.assert_array_equal(S.timesteps_for(sampler, n, 1000, spacing, 1), sch.timesteps.numpy(),
                                      err_msg=f"{sampler} {spacing} {n}")


def test_cfg_combination_and_guidance_one():
  """CFG: one batched [uncond; cond] call; uncond + g (cond - uncond); g == 1 gives the cond-only result."""
  noise = noise_like(3)
  b_c = np.array([0.3, -0.2], np.float32).reshape(2, 1, 1, 1)
  b_u = np.zeros((1, 1, 1, 1), np.float32)  # leading dim 1 broadcasts over the batch
  cond, uncond = {"bias": jnp.asarray(b_c)}, {"bias": jnp.asarray(b_u)}
  calls = []

  def f_counting(x, t, c):
    calls.append((x.shape, c["bias"].shape))
    return f_jax(x, t, c)

  g = 4.0
  sch = diffusers_scheduler("dpmpp_2m", "epsilon", "leading")
  tb_c, tb_u = torch.from_numpy(b_c), torch.from_numpy(b_u)

  def guided(x, t):
    u, c = f_torch(x, t, tb_u), f_torch(x, t, tb_c)
    return u + g * (c - u)
  ref = diffusers_loop(sch, 10, noise, model=guided)
  out = S.sample_jit(f_counting, SHAPE, cond, uncond, jax.random.key(0), schedule(), sampler="dpmpp_2m",
                     num_steps=10, guidance_scale=g, x_T=jnp.asarray(noise))
  assert_close(out, ref)
  assert calls == [((4, 4, 4, 3), (4, 1, 1, 1))]  # traced once, with the doubled batch

  cond_only = S.sample_jit(f_jax, SHAPE, cond, None, jax.random.key(0), schedule(), sampler="dpmpp_2m",
                           num_steps=10, x_T=jnp.asarray(noise))
  ref1 = diffusers_loop(sch, 10, noise, model=lambda x, t: f_torch(x, t, tb_c))
  assert_close(cond_only, ref1)
  g1 = S.sample_jit(f_jax, SHAPE, cond, uncond, jax.random.key(0), schedule(), sampler="dpmpp_2m", num_steps=10,
                    guidance_scale=1.0, x_T=jnp.asarray(noise))
  np.testing.assert_array_equal(np.asarray(g1), np.asarray(cond_only))
  # A traced guidance scale of 1 takes the batched path and still equals the cond-only result.
  traced = jax.jit(lambda gs: S.sample(f_jax, SHAPE, cond, uncond, jax.random.key(0), schedule(),
                                       sampler="dpmpp_2m", num_steps=10, guidance_scale=gs,
                                       x_T=jnp.asarray(noise)))(jnp.float32(1.0))
  np.testing.assert_allclose(np.asarray(traced), np.asarray(cond_only), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_guidance_rescale_and_interval_match_a_diffusers_loop(sampler):
  """guidance_rescale = diffusers' `rescale_noise_cfg` on the guided output at every step; guidance_interval
  guides only at timesteps inside [lo, hi] and takes the cond output elsewhere."""
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
  noise = noise_like(5)
  b_c = np.array([0.3, -0.2], np.float32).reshape(2, 1, 1, 1)
  b_u = np.zeros((2, 1, 1, 1), np.float32)
  cond, uncond = {"bias": jnp.asarray(b_c)}, {"bias": jnp.asarray(b_u)}
  tb_c, tb_u = torch.from_numpy(b_c), torch.from_numpy(b_u)
  g, r, (lo, hi) = 5.0, 0.7, (300.0, 700.0)

  def guided(x, t, rescale=0.0, interval=None):
    u, c = f_torch(x, t, tb_u), f_torch(x, t, tb_c)
    out = u + g * (c - u)
    if rescale:
      out = rescale_noise_cfg(out, c, guidance_rescale=rescale)
    if interval is not None and not interval[0] <= float(t) <= interval[1]:
      out = c
    return out
  run = lambda **kw: S.sample_jit(f_jax, SHAPE, cond, uncond, jax.random.key(0), schedule(), sampler=sampler,
                                  num_steps=10, guidance_scale=g, x_T=jnp.asarray(noise), **kw)
  sch = diffusers_scheduler(sampler, "epsilon", "leading")
  for kw, ref_kw in ((dict(guidance_rescale=r), dict(rescale=r)),
                     (dict(guidance_interval=(lo, hi)), dict(interval=(lo, hi))),
                     (dict(guidance_rescale=r, guidance_interval=(lo, hi)), dict(rescale=r, interval=(lo, hi)))):
    ref = diffusers_loop(sch, 10, noise, model=functools.partial(guided, **ref_kw))
    assert_close(run(**kw), ref)
  plain = np.asarray(run())
  assert np.abs(np.asarray(run(guidance_rescale=r)) - plain).max() > 1e-3  # the options do change the samples
  np.testing.assert_array_equal(np.asarray(run(guidance_interval=(0.0, 1000.0))), plain)  # every step: plain CFG
  with pytest.raises(ValueError, match="guidance_rescale"):
    run(guidance_rescale=1.5)
  with pytest.raises(ValueError, match="guidance_interval"):
    run(guidance_interval=(700.0, 300.0))


def test_traces_once_and_works_inside_outer_jit_with_pytree_cond():
  traces = []

  def apply_fn(params, x, t, cond):
    traces.append(1)
    h = cond["encoder_hidden_states"].mean(axis=1) + cond["text_embeds"]  # [B, 3]
    return params["w"] * jnp.tanh(x + h[:, None, None, :] + t[:, None, None, None] / 1000.0)

  cond = {"encoder_hidden_states": jnp.ones((2, 5, 3)), "text_embeds": jnp.full((2, 3), 0.5)}
  uncond = jax.tree.map(jnp.zeros_like, cond)
  kw = dict(sampler="euler", num_steps=8, guidance_scale=5.0)
  fn = jax.tree_util.Partial(apply_fn, {"w": jnp.float32(0.5)})
  a = S.sample_jit(fn, SHAPE, cond, uncond, jax.random.key(0), schedule(), **kw)
  assert len(traces) == 1
  fn2 = jax.tree_util.Partial(apply_fn, {"w": jnp.float32(0.7)})  # new params: same program
  b = S.sample_jit(fn2, SHAPE, jax.tree.map(lambda v: v * 2, cond), uncond, jax.random.key(1), schedule(), **kw)
  assert len(traces) == 1
  assert a.shape == SHAPE and np.all(np.isfinite(np.asarray(b))) and not np.allclose(np.asarray(a), np.asarray(b))

  @functools.partial(jax.jit, static_argnames="steps")
  def generate(params, cond, uncond, rng, steps):
    return S.sample(jax.tree_util.Partial(apply_fn, params), SHAPE, cond, uncond, rng, schedule(),
                    sampler="ddim", num_steps=steps, guidance_scale=3.0)
  generate({"w": jnp.float32(0.5)}, cond, uncond, jax.random.key(0), steps=6)
  generate({"w": jnp.float32(0.6)}, cond, uncond, jax.random.key(2), steps=6)
  assert len(traces) == 2


def test_bad_arguments():
  args = (f_jax, SHAPE, None, None, jax.random.key(0), schedule())
  with pytest.raises(ValueError, match="sampler"):
    S.sample(*args, sampler="heun")
  with pytest.raises(ValueError, match="num_steps"):
    S.sample(*args, num_steps=0)
  with pytest.raises(ValueError, match="prediction_type"):
    S.sample(*args, prediction_type="flow")
  with pytest.raises(ValueError, match="timestep_spacing"):
    S.sample(*args, timestep_spacing="karras")
  with pytest.raises(ValueError, match="x_T"):
    S.sample(*args, x_T=jnp.zeros((1, 4, 4, 3)))


@pytest.mark.parametrize("sampler,prediction_type", [("ddim", "epsilon"), ("ddim", "sample"),
                                                     ("euler", "v_prediction")])
def test_self_conditioning_feeds_previous_x0(sampler, prediction_type):
  """Each step's model input is [x_t, the previous step's x0 estimate] (zeros first), as a diffusers loop that
  carries the scheduler's pred_original_sample into the next model call."""
  noise = noise_like(3)
  scheduler = diffusers_scheduler(sampler, prediction_type, "leading")
  scheduler.set_timesteps(10)
  x, x0_prev = torch.from_numpy(noise) * scheduler.init_noise_sigma, torch.zeros(SHAPE)
  for t in scheduler.timesteps:
    out = f_torch(scheduler.scale_model_input(x, t), t) + 0.3 * torch.tanh(x0_prev)
    step = scheduler.step(out, t, x)
    x, x0_prev = step.prev_sample, step.pred_original_sample

  def f_sc(xc, t, cond):
    x_, x0p = jnp.split(xc, 2, axis=-1)
    return f_jax(x_, t, cond) + 0.3 * jnp.tanh(x0p)
  out = S.sample_jit(f_sc, SHAPE, None, None, jax.random.key(0), schedule(), sampler=sampler, num_steps=10,
                     guidance_scale=1.0, prediction_type=prediction_type, x_T=jnp.asarray(noise),
                     self_condition=True)
  assert_close(out, x.numpy())


@pytest.mark.parametrize("sampler", S.DETERMINISTIC_SAMPLERS)
def test_self_conditioning_with_a_model_that_ignores_it_changes_nothing(sampler):
  """A model blind to the x0 channels samples as without self-conditioning, CFG included (both branches get the
  same previous x0)."""
  noise = jnp.asarray(noise_like(4))
  cond, uncond = {"bias": jnp.full((2, 1, 1, 1), 0.3)}, {"bias": jnp.zeros((1, 1, 1, 1))}
  blind = lambda xc, t, c: f_jax(jnp.split(xc, 2, axis=-1)[0], t, c)
  kw = dict(sampler=sampler, num_steps=8, guidance_scale=3.0, prediction_type="v_prediction", x_T=noise)
  plain = S.sample_jit(f_jax, SHAPE, cond, uncond, jax.random.key(0), schedule(), **kw)
  sc = S.sample_jit(blind, SHAPE, cond, uncond, jax.random.key(0), schedule(), self_condition=True, **kw)
  np.testing.assert_allclose(np.asarray(sc), np.asarray(plain), rtol=1e-6, atol=1e-6)
