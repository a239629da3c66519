"""Logical axis names -> mesh shardings, sharded init, host-local <-> global arrays.

A rules table is a sequence of (logical_name, mesh_axes) pairs where mesh_axes is a mesh axis name, a tuple of
names, or None (replicated). For each array, a mesh axis that does not divide the dimension (or that an earlier
dimension already uses) is dropped, so odd sizes are replicated on that axis instead of failing.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
  """Normalises a rules table into {logical: tuple of mesh axes}; first rule for a name wins."""
  out: dict[str, tuple[str, ...]] = {}
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"axis rule {item!r}: expected (logical_name, mesh_axes)")
    name, axes = item
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    else:
      axes = tuple(axes)
    out.setdefault(name, axes)
  return out


def flax_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """The rules table in the form `nn.logical_axis_rules` expects (tuples kept, lists made tuples)."""
  return tuple((n, tuple(a) if isinstance(a, (list, tuple)) else a) for n, a in rules)


@contextlib.contextmanager
def tracing_context(mesh: Mesh, rules: Rules):
  """The mesh and logical axis rules in context, as every jitted function of a run is traced (the train step,
  sampling, held-out loss), so that `t2i.nn.attention` can run per device inside `jax.shard_map`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(rules)):
    yield


def traced_in(fn: Callable[..., Any], mesh: Mesh, rules: Rules) -> Callable[..., Any]:
  """`fn` (a jitted function) called, and so traced, inside `tracing_context(mesh, rules)`."""
  def call(*args, **kwargs):
    with tracing_context(mesh, rules):
      return fn(*args, **kwargs)
  return call


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], rules: Rules,
                    mesh: Mesh) -> P:
  """PartitionSpec for an array of `shape` whose dims carry logical `names`."""
  if names is None:
    return P()
  if len(names) != len(shape):
    raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
  table = rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no rule in the axis rules table "
                       f"(known: {sorted(table)})")
    kept = []
    for ax in table[name]:
      if ax not in mesh.shape:
        raise ValueError(f"axis rule {name!r} -> {ax!r}: no such mesh axis (mesh axes: {mesh.axis_names})")
      size = mesh.shape[ax]
      if ax in used or dim % (math.prod(mesh.shape[a] for a in kept) * size):
        continue
      kept.append(ax)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.LogicallyPartitioned)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`) arrays or ShapeDtypeStructs.

  Unannotated leaves are replicated.
  """
  def one(x):
    if _is_boxed(x):
      return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, rules, mesh))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=_is_boxed)


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any) -> tuple[Any, Any]:
  """Runs `init_fn(*args)` directly into its sharded layout.

  `init_fn` returns a tree that may hold `nn.LogicallyPartitioned` boxes (e.g. `module.init(...)`). Shapes come
  from `jax.eval_shape`, logical names -> `NamedSharding`s via `rules`, then `jax.jit(init, out_shardings=...)`
  materialises each shard on its device. Returns (unboxed tree, tree of shardings).
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)

  def init_unboxed(*a):
    return nn.meta.unbox(init_fn(*a))

  # No rules context here: activation constraints are for the train step, and init often runs at batch 1.
  tree = jax.jit(init_unboxed, out_shardings=shardings)(*args)
  return tree, shardings


def abstract_init(init_fn: Callable[..., Any], mesh: Mesh, rules: Rules, *args: Any) -> tuple[Any, Any]:
  """Like `sharded_init` but returns (ShapeDtypeStructs carrying shardings, shardings); allocates nothing."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = logical_shardings(abstract, mesh, rules)
  unboxed = nn.meta.unbox(abstract)
  structs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
  return structs, shardings


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1, dim0: int | None = None) -> NamedSharding:
  """Sharding of an array whose leading dim is the logical "batch" (other dims replicated)."""
  names = ("batch",) + (None,) * (ndim - 1)
  shape = (dim0 if dim0 is not None else math.prod(mesh.shape.values()),) + (1,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(names, shape, rules, mesh))


def host_to_global(batch: Any, mesh: Mesh, rules: Rules) -> Any:
  """Host-local numpy batch (leading dim = this process's share) -> global jax.Arrays sharded on "batch"."""
  def one(x):
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count()
    sharding = batch_sharding(mesh, rules, x.ndim, global_b)
    return jax.make_array_from_process_local_data(sharding, x, (global_b,) + x.shape[1:])
  return jax.tree.map(one, batch)


def global_to_host(tree: Any) -> Any:
  """Fully-replicated or addressable global arrays -> numpy (gathers across processes when needed)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)


def to_struct(tree: Any, shardings: Any | None = None) -> Any:
  """ShapeDtypeStructs (with shardings) mirroring a tree of arrays, for AOT lowering."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
