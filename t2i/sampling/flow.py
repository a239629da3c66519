"""Euler sampler for rectified-flow models (FLUX.1 convention), compiled as one `lax.fori_loop`.

Conventions (see `t2i.objectives.flow`): t = 1 is noise, t = 0 data, the model predicts v = eps - x0, and a step
from t to t_prev < t is  x <- x + (t_prev - t) v(x, t).  The model receives t in [0, 1] as float32 [batch].

Schedule (`flux_schedule`): linspace(1, 0, num_steps + 1), then, if `shift`, `time_shift(flux_mu(L), 1, t)` with L the
number of image tokens, as FLUX's `get_schedule`. diffusers' `FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=
True)` gives the same sigmas when FluxPipeline's `sigmas = linspace(1, 1/N, N)` and `mu = calculate_shift(L)` are
passed to `set_timesteps` (its `timesteps` are sigmas * 1000 without the final 0; its `sigmas` end with the appended 0).
Without explicit sigmas, diffusers spaces timesteps from 1000 to 1, i.e. the last sigma before 0 is 1/1000 shifted,
not 1/N shifted: a different (non-FLUX) grid.

Guidance, both usable at once:
  * true CFG (guidance_scale != 1 and uncond given): [uncond; cond] in one batched model call, combined as
    v_u + guidance_scale (v_c - v_u); uncond is the empty or negative prompt;
  * guidance embedding (guidance_embed not None, FLUX.1-dev / distilled students): the model is called as
    velocity_fn(x, t, g, cond) with g = guidance_embed as float32 [batch]; otherwise velocity_fn(x, t, cond).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from t2i.objectives.flow import concat_uncond_cond, flux_mu

PyTree = Any


def _is_one(g: Any) -> bool:
  return isinstance(g, (int, float, np.integer, np.floating)) and float(g) == 1.0


def default_num_image_tokens(shape: tuple[int, ...], patch_size: int = 2) -> int:
  """Image tokens of a latent `shape`: L for packed tokens [B, L, D]; (H/p)(W/p) for NHWC latents [B, H, W, C]."""
  if len(shape) == 3:
    return int(shape[1])
  if len(shape) == 4:
    return (int(shape[1]) // patch_size) * (int(shape[2]) // patch_size)
  raise ValueError(f"cannot infer the number of image tokens of shape {shape}; pass num_image_tokens")


def flux_schedule(num_steps: int, num_image_tokens: int | None = None, shift: bool = True, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> np.ndarray:
  """t values [num_steps + 1] (float32) from 1 down to 0: linspace, then FLUX's resolution-dependent shift."""
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  t = np.linspace(1.0, 0.0, int(num_steps) + 1, dtype=np.float64)
  if shift:
    if num_image_tokens is None:
      raise ValueError("flux_schedule: shift=True needs num_image_tokens")
    mu = flux_mu(float(num_image_tokens), base_shift=base_shift, max_shift=max_shift)
    with np.errstate(divide="ignore"):
      t = np.exp(mu) / (np.exp(mu) + (1.0 / t - 1.0))
  return t.astype(np.float32)


def _guided_fn(velocity_fn: Callable, cond: PyTree, uncond: PyTree | None, guidance_scale: Any,
               guidance_embed: Any, batch: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """model(x, t_scalar) -> float32 velocity with optional batched CFG and optional guidance embedding."""
  def call(x, t, c, n):
    tt = jnp.full((n,), t, jnp.float32)
    if guidance_embed is None:
      return velocity_fn(x, tt, c)
    return velocity_fn(x, tt, jnp.full((n,), guidance_embed, jnp.float32), c)

  if uncond is None or _is_one(guidance_scale):
    return lambda x, t: call(x, t, cond, batch).astype(jnp.float32)

  both = concat_uncond_cond(uncond, cond)

  def model(x, t):
    out = call(jnp.concatenate([x, x], axis=0), t, both, 2 * batch)
    v_u, v_c = jnp.split(out.astype(jnp.float32), 2, axis=0)
    return v_u + guidance_scale * (v_c - v_u)
  return model


def sample(velocity_fn: Callable, shape: tuple[int, ...], cond: PyTree, uncond: PyTree | None, rng: jax.Array, *,
           num_steps: int = 28, guidance_scale: Any = 1.0, guidance_embed: Any = None, shift: bool = True,
           num_image_tokens: int | None = None, base_shift: float = 0.5, max_shift: float = 1.15,
           timesteps: np.ndarray | None = None, x_T: jax.Array | None = None) -> jax.Array:
  """Integrates dx/dt = v from t = 1 (x_T ~ N(0, I)) to t = 0 with Euler steps; returns x at t = 0 (float32).

  Traceable inside an outer `jax.jit` with shape, num_steps, shift, num_image_tokens, base/max_shift and
  `timesteps` static; cond/uncond/rng/x_T/guidance_scale/guidance_embed may be traced (a traced guidance_scale
  always runs the batched CFG path).

  Args:
    velocity_fn: (x, t float32 [n], cond) -> v, or (x, t, g float32 [n], cond) -> v when guidance_embed is set.
    shape: output shape (batch first), e.g. packed tokens [B, L, 64] or latents [B, H, W, C].
    cond / uncond: conditioning pytrees (uncond leading dim B or 1, or None).
    rng: PRNG key for x_T when it is not given.
    num_image_tokens: for the shift; default `default_num_image_tokens(shape)` (FLUX's 2x2 patches for NHWC).
    timesteps: optional explicit decreasing t grid [num_steps + 1] (overrides the FLUX schedule).
  """
  shape = tuple(int(s) for s in shape)
  if timesteps is None:
    if shift and num_image_tokens is None:
      num_image_tokens = default_num_image_tokens(shape)
    ts_np = flux_schedule(num_steps, num_image_tokens, shift, base_shift, max_shift)
  else:
    ts_np = np.asarray(timesteps, np.float32)
    if ts_np.ndim != 1 or len(ts_np) < 2 or np.any(np.diff(ts_np) >= 0):
      raise ValueError(f"timesteps must be a strictly decreasing 1-D grid of >= 2 values, got {ts_np}")
  if x_T is None:
    x_T = jax.random.normal(rng, shape, jnp.float32)
  elif tuple(x_T.shape) != shape:
    raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
  model = _guided_fn(velocity_fn, cond, uncond, guidance_scale, guidance_embed, shape[0])
  ts = jnp.asarray(ts_np)

  def body(i, x):
    t, t_prev = ts[i], ts[i + 1]
    return x + (t_prev - t) * model(x, t)
  return jax.lax.fori_loop(0, len(ts_np) - 1, body, x_T.astype(jnp.float32))


_STATIC = ("shape", "num_steps", "shift", "num_image_tokens", "base_shift", "max_shift", "use_cfg", "use_embed")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_jit(velocity_fn, cond, uncond, rng, x_T, guidance_scale, guidance_embed, *, shape, num_steps, shift,
                num_image_tokens, base_shift, max_shift, use_cfg, use_embed):
  return sample(velocity_fn, shape, cond, uncond if use_cfg else None, rng, num_steps=num_steps,
                guidance_scale=guidance_scale if use_cfg else 1.0,
                guidance_embed=guidance_embed if use_embed else None, shift=shift,
                num_image_tokens=num_image_tokens, base_shift=base_shift, max_shift=max_shift, x_T=x_T)


def sample_jit(velocity_fn: Callable, shape: tuple[int, ...], cond: PyTree, uncond: PyTree | None, rng: jax.Array,
               *, num_steps: int = 28, guidance_scale: float = 1.0, guidance_embed: float | None = None,
               shift: bool = True, num_image_tokens: int | None = None, base_shift: float = 0.5,
               max_shift: float = 1.15, x_T: jax.Array | None = None) -> jax.Array:
  """`sample` compiled with jax.jit and cached per (velocity_fn, shapes, static options).

  guidance_scale and guidance_embed are traced (changing them does not recompile); guidance_scale == 1 (or no
  uncond) selects the cond-only program. Pass parameters through a `jax.tree_util.Partial` so they are traced, not
  baked in; a plain callable is cached by identity.
  """
  fn = velocity_fn if isinstance(velocity_fn, jax.tree_util.Partial) else jax.tree_util.Partial(velocity_fn)
  shape = tuple(int(s) for s in shape)
  use_cfg = uncond is not None and not _is_one(guidance_scale)
  if shift and num_image_tokens is None:
    num_image_tokens = default_num_image_tokens(shape)
  return _sample_jit(fn, cond, uncond if use_cfg else None, rng, x_T, jnp.asarray(guidance_scale, jnp.float32),
                     jnp.asarray(0.0 if guidance_embed is None else guidance_embed, jnp.float32), shape=shape,
                     num_steps=int(num_steps), shift=bool(shift),
                     num_image_tokens=None if num_image_tokens is None else int(num_image_tokens),
                     base_shift=float(base_shift), max_shift=float(max_shift), use_cfg=use_cfg,
                     use_embed=guidance_embed is not None)
