"""The pure update step, and the abstract (shape + sharding) train state it is compiled for."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from t2i import parallel
from t2i.train import ema as ema_lib
from t2i.train import objectives
from t2i.train.init_from import PartialParams
from t2i.train.state import TrainState


def abstract_state(models: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: Any,
                   use_ema: bool) -> tuple[TrainState, TrainState, dict, dict]:
  """(state structs, state shardings, frozen structs, frozen shardings); allocates nothing."""
  repl = NamedSharding(mesh, P())
  fns = models.init_fns()
  structs, shards = {}, {}
  for name, fn in fns.items():
    structs[name], shards[name] = parallel.abstract_init(fn, mesh, rules, jax.random.PRNGKey(0))
  p_structs = {n: structs[n] for n in models.trainable}
  p_shards = {n: shards[n] for n in models.trainable}
  f_structs = {n: structs[n] for n in structs if n not in models.trainable}
  f_shards = {n: shards[n] for n in shards if n not in models.trainable}
  o_abstract, o_shards = _opt_shardings(tx, p_structs, p_shards, repl)
  o_structs = parallel.to_struct(o_abstract, o_shards)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
  state_structs = TrainState(step=step, params=p_structs, opt_state=o_structs,
                             ema_params=p_structs if use_ema else None, rng=key)
  state_shards = TrainState(step=repl, params=p_shards, opt_state=o_shards,
                            ema_params=p_shards if use_ema else None, rng=repl)
  return state_structs, state_shards, f_structs, f_shards


def _opt_shardings(tx, p_structs, p_shards, repl):
  from t2i.train.optimizer import opt_state_shardings
  plain = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), p_structs)
  return opt_state_shardings(tx, plain, p_shards, repl)


def init_state(models: Any, tx: optax.GradientTransformation, mesh: Mesh, rules: Any, seed: int,
               state_shards: TrainState, f_shards: dict, pretrained: dict[str, Any] | None = None
               ) -> tuple[TrainState, dict]:
  """Random (or pretrained) params, optimiser state, EMA and RNG, each created directly in its sharding."""
  pretrained = pretrained or {}
  fns = models.init_fns()
  rngs = dict(zip(sorted(fns), jax.random.split(jax.random.PRNGKey(seed), len(fns) + 1)[1:]))
  trees = {}
  for name, fn in sorted(fns.items(), key=lambda kv: kv[0] == "reference"):  # the reference last
    shard = state_shards.params.get(name) if name in models.trainable else f_shards[name]
    got = pretrained.get(name)
    if isinstance(got, PartialParams):  # some leaves from another run (t2i.train.init_from), the rest fresh
      want = traverse_util.flatten_dict(nn.meta.unbox(jax.eval_shape(fn, rngs[name])))
      if set(got) == set(want):  # every leaf restored (already in this run's shardings): no fresh init needed
        trees[name] = traverse_util.unflatten_dict(dict(got))
        continue
      fresh, _ = parallel.sharded_init(fn, mesh, rules, rngs[name])
      flat = traverse_util.flatten_dict(fresh)
      flat.update(got)
      trees[name] = traverse_util.unflatten_dict(flat)
    elif got is not None:
      want = nn.meta.unbox(jax.eval_shape(fn, rngs[name]))
      if jax.tree.structure(want) != jax.tree.structure(got) or any(
          tuple(w.shape) != tuple(np.shape(g)) for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got))):
        raise ValueError(f"pretrained {name} params do not match the module built from config.{name} "
                         "(tree structure or shapes differ)")
      cast = jax.tree.map(lambda g, w: np.asarray(g, w.dtype), got, want)
      trees[name] = jax.device_put(cast, shard)
    elif name == "reference" and _same_tree(fn, fns[models.denoiser_name]):
      # no source run: the reference starts as a copy of the policy's initial denoiser
      trees[name] = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shard)(trees[models.denoiser_name])
    else:
      trees[name], _ = parallel.sharded_init(fn, mesh, rules, rngs[name])
  params = {n: trees[n] for n in models.trainable}
  frozen = {n: trees[n] for n in trees if n not in models.trainable}
  opt_state = jax.jit(tx.init, out_shardings=state_shards.opt_state)(params)
  ema = None
  if state_shards.ema_params is not None:
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_shards.ema_params)(params)
  rng = jax.device_put(jax.random.PRNGKey(seed + 1), state_shards.rng)
  step = jax.device_put(jnp.zeros((), jnp.int32), state_shards.step)
  return TrainState(step=step, params=params, opt_state=opt_state, ema_params=ema, rng=rng), frozen


def _same_tree(fn_a: Callable, fn_b: Callable) -> bool:
  a, b = (jax.eval_shape(f, jax.random.PRNGKey(0)) for f in (fn_a, fn_b))
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def make_update(models: Any, loss_fn: Callable, tx: optax.GradientTransformation,
                schedule: Callable[[Any], Any], ema_cfg: Any, grad_accum: int = 1,
                post_update: Callable | None = None) -> Callable:
  """update(state, frozen, batch) -> (state, metrics): one optimiser (micro-)step, pure.

  post_update (optional, an objective's): (params, frozen, batch, rng, step, models) -> (params, metrics), a pure
  non-gradient change applied after the optimiser update (e.g. VQ dead-code restarts); step = completed steps.
  """

  def update(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_of(params):
      return loss_fn(params, frozen, batch, rng, models)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    if post_update is not None:
      params, extra = post_update(params, frozen, batch, jax.random.fold_in(rng, 1), step, models)
      metrics = dict(metrics, **extra)
    ema = ema_lib.update(state.ema_params, params, step, ema_cfg)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params), lr=schedule(state.step // grad_accum))
    return state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema), metrics

  return update


def batch_structs(models: Any, batch_size: int, mesh: Mesh, rules: Any,
                  pair: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The step's batch, sharded over the batch axis: `models.batch_shapes` (t2i: "image" [B, S, S, 3] in [-1, 1],
  "input_ids" [B, L], + "image_l" for pair objectives; tokens: see `t2i.train.token_models`)."""
  shapes = models.batch_shapes(batch_size, pair)
  return {k: jax.ShapeDtypeStruct(shape, dt, sharding=parallel.batch_sharding(mesh, rules, len(shape), shape[0]))
          for k, (shape, dt) in shapes.items()}


def compile_step(update: Callable, mesh: Mesh, rules: Any, state_structs: TrainState, state_shards: TrainState,
                 f_structs: dict, f_shards: dict, b_structs: dict) -> Any:
  """jit with in/out shardings and donate_argnums=0, lowered and compiled ahead of time."""
  b_shards = jax.tree.map(lambda s: s.sharding, b_structs)
  repl = NamedSharding(mesh, P())
  jitted = jax.jit(update, in_shardings=(state_shards, f_shards, b_shards), out_shardings=(state_shards, repl),
                   donate_argnums=0)
  with parallel.tracing_context(mesh, rules):
    return jitted.lower(state_structs, f_structs, b_structs).compile()


def get_loss_fn(name: str) -> Callable:
  return objectives.get(name).loss
