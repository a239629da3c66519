"""Scaled dot-product attention on [batch, length, heads, head_dim] tensors.

`dot_product_attention` has a hand-written backward pass (`jax.custom_vjp`):
dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − rowsum(dO ⊙ O)), dQ = dS K·s, dK = dSᵀ Q·s.
The forward works block by block over query rows (`lax.map`) and keeps each row's softmax max and
sum; the backward recomputes P from them block by block (`lax.scan`), over key blocks when rows are
long (then dK and dV contract over all queries, not over a few block rows: [8, 1024, 8, 8]
fwd+bwd 572 -> 367 ms on one core) and over query rows otherwise. Only blocks of the [b, h, q, k]
scores ever exist (see BLOCK_ELEMENTS). `reference_attention` is the plain differentiable version, kept for tests.

Unmasked attention over long key rows (self-attention in the U-Net, MMDiT and VAE) instead runs one head at a time
(`_per_head_attention`), HEAD_BLOCK_ELEMENTS of scores per block: per head its matmuls are [rows x d] @ [d x keys]
rather than a batch of b * h tiny ones. Its backward keeps every product's large operand untransposed: XLA:CPU runs
a product whose big operand is transposed outside YNNPACK, several times slower, and folds explicit transposes into
the product, so dQ is computed as (Kᵀ dS)ᵀ with `optimization_barrier` holding the transposes in place.
[8, 1024, 8, 8] fwd+bwd on one core, Intel (session 12): 444 -> 235 ms (PyTorch's `scaled_dot_product_attention`,
one thread: 162-168 ms); AMD EPYC (session 13): 156 -> 100 ms with the dQ barrier (PyTorch 390 ms).
A loop over heads would make XLA gather a sharded batch or head axis, so under a mesh (`jax.set_mesh`, logical
axis rules "batch" and "heads" in context, as the train step traces) it runs inside `jax.shard_map` on each
device's own heads; without a mesh it runs only when the process has a single device.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": a fully masked row gives a uniform row instead of NaN.


def _logits(q: jax.Array, k: jax.Array, bias: jax.Array | None) -> jax.Array:
  """[b, h, q, k] float32 logits from [b, h, q, d] / [b, h, k, d] (scale already folded into q)."""
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    s = s + bias
  return s


def _mask_to_bias(mask: jax.Array | None) -> jax.Array | None:
  if mask is None:
    return None
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise TypeError(f"attention mask must be boolean (True = attend), got dtype {mask.dtype}")
  while mask.ndim < 4:
    mask = mask[None]
  return jnp.where(mask, 0.0, _NEG).astype(jnp.float32)


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d)) as [batch, heads, q_len, k_len], softmax in float32."""
  scale = q.shape[-1] ** -0.5
  qh = jnp.swapaxes(q, 1, 2) * jnp.asarray(scale, q.dtype)
  kh = jnp.swapaxes(k, 1, 2)
  return jax.nn.softmax(_logits(qh, kh, _mask_to_bias(mask)), axis=-1)


# Largest [batch, heads, q_rows, k_len] score block materialised at once (elements). Whole score
# tensors are memory-bound on CPU; ~2 MB blocks stay in cache. Blocks only split the query rows (the
# "length" axis, never sharded), so batch/heads sharding is untouched. Measured on 2 busy cores,
# [8, 1024, 8, 8] fwd+bwd: 2^16 -> 0.85 s, 2^18 -> 0.68 s, 2^19 -> 0.51 s, 2^20 -> 1.07 s,
# 2^22 -> 3.6 s, whole tensor (custom_vjp keeping P) -> 1.8 s.
BLOCK_ELEMENTS = 2 ** 19


def _split_rows(x: jax.Array, rows: int) -> jax.Array:
  """[b, h, L, ...] -> [L / rows, b, h, rows, ...] (a size-1 L axis is kept, not split)."""
  if x.shape[2] == 1:
    return x[None]
  return jnp.moveaxis(x.reshape(x.shape[:2] + (x.shape[2] // rows, rows) + x.shape[3:]), 2, 0)


def _merge_rows(x: jax.Array) -> jax.Array:
  n, b, h, r = x.shape[:4]
  return jnp.moveaxis(x, 0, 2).reshape((b, h, n * r) + x.shape[4:])


@jax.custom_vjp
def _attention_bhld(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None) -> jax.Array:
  """softmax(q k^T + bias) v on [b, h, L, D] (scale folded into q), block by block over query rows."""
  return _attention_fwd(q, k, v, bias)[0]


def _block_len(n: int, b: int, h: int, other: int, elements: int | None = None) -> int:
  """Largest divisor of n (query rows or keys per block) with b * h * block * other <= elements (default
  BLOCK_ELEMENTS); >= 1."""
  at_most = max(1, min(n, (BLOCK_ELEMENTS if elements is None else elements) // (b * h * other)))
  return next(d for d in range(at_most, 0, -1) if n % d == 0)


def _attention_fwd(q, k, v, bias):
  """Row blocks; keeps each row's max m and sum l of exp(s - m) so the backward needs no softmax reductions."""
  b, h, lq, _ = q.shape
  rows = _block_len(lq, b, h, k.shape[2])
  per_row_bias = bias is not None and bias.shape[2] != 1
  xs = [_split_rows(q, rows)] + ([_split_rows(bias, rows)] if per_row_bias else [])

  def one(x):
    s = _logits(x[0], k, x[1] if per_row_bias else bias)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return o.astype(v.dtype), m, l

  out, m, l = (_merge_rows(a) for a in jax.lax.map(one, tuple(xs)))
  return out, (q, k, v, bias, out, m, l)


def _attention_bwd(res, d_out):
  """Blocks over keys when the score rows are long (dK, dV then contract over all queries; only dQ accumulates
  across blocks), over query rows when the keys are few (cross-attention) or everything fits in one block."""
  q, k, v, bias, out, m, l = res
  b, h, lq, _ = q.shape
  lk = k.shape[2]
  do = d_out.astype(v.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  inv_l = 1.0 / l
  rows, cols = _block_len(lq, b, h, lk), _block_len(lk, b, h, lq)

  def grads(qb, kb, vb, bias_b, dob, mb, inv_lb, deltab):
    p = jnp.exp(_logits(qb, kb, bias_b) - mb) * inv_lb
    dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(v.dtype), dob, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bhqd,bhkd->bhqk", dob, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - deltab)
    if bias_b is not None:  # a fully masked row's P is uniform whatever q, k are: no gradient (as `jnp.where`)
      ds = jnp.where(bias_b < 0.5 * _NEG, 0.0, ds)
    ds = ds.astype(q.dtype)
    dk = jnp.einsum("bhqk,bhqd->bhkd", ds, qb, preferred_element_type=jnp.float32)
    dq = jnp.einsum("bhqk,bhkd->bhqd", ds, kb, preferred_element_type=jnp.float32)
    return dq, dk, dv

  if rows < lq and 2 * cols > rows:  # key blocks
    per_col_bias = bias is not None and bias.shape[3] != 1
    xs = [_split_rows(k, cols), _split_rows(v, cols)]
    if per_col_bias:
      xs.append(jnp.moveaxis(bias.reshape(bias.shape[:3] + (lk // cols, cols)), 3, 0))

    def key_step(dq, x):
      dqb, dk, dv = grads(q, x[0], x[1], x[2] if per_col_bias else bias, do, m, inv_l, delta)
      return dq + dqb, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_step, jnp.zeros(q.shape, jnp.float32), tuple(xs))
    return dq.astype(q.dtype), _merge_rows(dk).astype(k.dtype), _merge_rows(dv).astype(v.dtype), None

  per_row_bias = bias is not None and bias.shape[2] != 1
  xs = [_split_rows(a, rows) for a in (q, do, m, inv_l, delta)]
  if per_row_bias:
    xs.append(_split_rows(bias, rows))

  def row_step(carry, x):
    dqb, dk, dv = grads(x[0], k, v, x[5] if per_row_bias else bias, *x[1:5])
    return (carry[0] + dk, carry[1] + dv), dqb.astype(q.dtype)

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(row_step, (zeros, zeros), tuple(xs))
  return _merge_rows(dq), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_bhld.defvjp(_attention_fwd, _attention_bwd)


# Scores per block of the per-head path (one head, a block of query rows, all keys): [128, 1024] at 1,024 keys.
# [8, 1024, 8, 8] fwd+bwd on one core (measured before the backward took transposed scores): 2^17 -> 304 ms,
# 2^18 -> 335 ms, one head at a time with all rows -> 529 ms.
HEAD_BLOCK_ELEMENTS = 2 ** 17
# Keys from which unmasked attention takes the per-head path (shorter rows fit the row-block path's few blocks).
PER_HEAD_MIN_KEYS = 256


@jax.custom_vjp
def _per_head_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v on [n, L, D] (n = batch x heads, scale folded into q), head by head, rows in blocks."""
  return _per_head_fwd(q, k, v)[0]


def _per_head_fwd(q, k, v):
  n, lq, d = q.shape
  rows = _block_len(lq, 1, 1, k.shape[1], HEAD_BLOCK_ELEMENTS)

  def head(x):
    qh, kh, vh = x

    def block(qb):
      s = jnp.einsum("qd,kd->qk", qb, kh, preferred_element_type=jnp.float32)
      m = jnp.max(s, axis=-1, keepdims=True)
      e = jnp.exp(s - m)
      l = jnp.sum(e, axis=-1, keepdims=True)
      o = jnp.einsum("qk,kd->qd", e.astype(vh.dtype), vh, preferred_element_type=jnp.float32) / l
      return o.astype(vh.dtype), m, l

    return tuple(a.reshape(lq, -1) for a in jax.lax.map(block, qh.reshape(lq // rows, rows, d)))

  out, m, l = jax.lax.map(head, (q, k, v))
  return out, (q, k, v, out, m, l)


def _per_head_bwd(res, d_out):
  q, k, v, out, m, l = res
  n, lq, d = q.shape
  rows = _block_len(lq, 1, 1, k.shape[1], HEAD_BLOCK_ELEMENTS)
  do = d_out.astype(v.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)

  def head(x):
    qh, kh, vh, doh, mh, inv_lh, deltah = x
    blocks = lambda a: a.reshape((lq // rows, rows) + a.shape[1:])
    kh_t = jax.lax.optimization_barrier(kh.T)  # [d, keys], once per head

    def block(carry, xb):
      # Scores transposed, [keys, rows], so that dV and dK take them untransposed ([8, 1024, 8, 8] fwd+bwd 324 ->
      # 235 ms, Intel), and dQ = (Kᵀ dS)ᵀ behind barriers, or XLA folds it back into dSᵀ K (156 -> 100 ms, AMD).
      qb, dob, mb, inv_lb, deltab = xb
      p = jnp.exp(jnp.einsum("kd,dq->kq", kh, qb.T, preferred_element_type=jnp.float32) - mb.T) * inv_lb.T
      dv = jnp.einsum("kq,qd->kd", p.astype(v.dtype), dob, preferred_element_type=jnp.float32)
      dp = jnp.einsum("kd,dq->kq", vh, dob.T, preferred_element_type=jnp.float32)
      ds = (p * (dp - deltab.T)).astype(q.dtype)
      dk = jnp.einsum("kq,qd->kd", ds, qb, preferred_element_type=jnp.float32)
      dq = jax.lax.optimization_barrier(
          jnp.einsum("dk,kq->dq", kh_t, ds, preferred_element_type=jnp.float32)).T
      return (carry[0] + dk, carry[1] + dv), dq.astype(q.dtype)

    zeros = jnp.zeros(kh.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), tuple(blocks(a) for a in (qh, doh, mh, inv_lh, deltah)))
    return dq.reshape(lq, d), dk.astype(k.dtype), dv.astype(v.dtype)

  return jax.lax.map(head, (q, k, v, do, m, 1.0 / l, delta))


_per_head_attention.defvjp(_per_head_fwd, _per_head_bwd)


def _per_head_bhld(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  b, h = q.shape[:2]
  flat = lambda a: a.reshape((b * h,) + a.shape[2:])
  return _per_head_attention(flat(q), flat(k), flat(v)).reshape(q.shape[:3] + (v.shape[-1],))


def _local_spec(mesh: jax.sharding.AbstractMesh, shape: tuple[int, ...]) -> jax.sharding.PartitionSpec | None:
  """The [batch, heads, length, head_dim] PartitionSpec under `mesh` and the logical axis rules in context, or None
  when nothing maps to it or a sharded axis does not divide evenly (callers then keep the row-block path, which
  never loops over a sharded axis)."""
  spec = nn.logical_to_mesh_axes(("batch", "heads", None, None))
  if spec is None or all(s is None for s in spec):
    return None
  for dim, axes in zip(shape, spec):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    if dim % math.prod(mesh.shape[a] for a in axes):
      return None
  return spec


def _unmasked_long(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array | None:
  """The per-head path on [b, h, L, D], on each device's shard under a mesh; None when it does not apply: under a
  mesh without rules for it, or with no mesh in context and several devices (the inputs may then be sharded)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _per_head_bhld(q, k, v) if jax.device_count() == 1 else None
  spec = _local_spec(mesh, q.shape)  # k and v share q's batch and heads
  if spec is None:
    return None
  return jax.shard_map(_per_head_bhld, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Returns softmax(q k^T / sqrt(d)) v as [batch, q_len, heads, head_dim].

  q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, heads, head_dim].
  mask: optional boolean, broadcastable to [batch, heads, q_len, k_len]; True = attend.
  Softmax and the backward's rowsum run in float32; matmuls in the input dtype.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"attention expects [batch, length, heads, head_dim]; got q{q.shape} k{k.shape} v{v.shape}")
  scale = q.shape[-1] ** -0.5
  qh = jnp.swapaxes(q, 1, 2) * jnp.asarray(scale, q.dtype)
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  out = None
  if mask is None and k.shape[1] >= PER_HEAD_MIN_KEYS:
    out = _unmasked_long(qh, kh, vh)
  if out is None:
    out = _attention_bhld(qh, kh, vh, _mask_to_bias(mask))
  return jnp.swapaxes(out, 1, 2)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        mask: jax.Array | None = None) -> jax.Array:
  """Plain einsum attention differentiated by JAX (slow on CPU; for tests)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, _NEG)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", w, v)
