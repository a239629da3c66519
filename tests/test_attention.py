"""Attention with a hand-written backward vs. plain differentiated einsum attention."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.nn import attention
from t2i.nn.attention import attention_weights, dot_product_attention, reference_attention


def _qkv(b=2, lq=36, lk=29, h=3, d=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (b, lq, h, d))
  k = jax.random.normal(ks[1], (b, lk, h, d))
  v = jax.random.normal(ks[2], (b, lk, h, d))
  g = jax.random.normal(ks[3], (b, lq, h, d))
  return q, k, v, g


def _rel(a, b):
  return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _masks(b, lq, lk):
  rng = np.random.default_rng(0)
  general = rng.uniform(size=(b, 1, lq, lk)) < 0.6
  general[..., 0] = True  # every row attends somewhere
  padding = np.arange(lk)[None, None, None, :] < np.array([lk, lk - 9])[:, None, None, None]
  return {"none": None, "general": jnp.asarray(general), "padding": jnp.asarray(padding)}


@pytest.mark.parametrize("mask_name,block,lk", [
    ("none", None, 29), ("none", 2200, 29), ("none", 300, 29), ("general", None, 29), ("general", 2200, 29),
    ("padding", 2200, 29), ("none", 2200, 32), ("general", 2200, 32), ("padding", 2200, 32)])
def test_forward_and_gradients_match_reference(mask_name, block, lk, monkeypatch):
  # Default: one block. lk 29: 2200 // (2 * 3 * 29) -> 3 blocks of 12 query rows, backward over the same rows
  # (29 keys only split into single keys); 300 -> 36 blocks of 1 row. lk 32: 2200 // (2 * 3 * 32) -> 9 rows ->
  # 4 blocks of 9 query rows forward; the backward takes 4 blocks of 8 keys (dK, dV over all queries).
  if block is not None:
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", block)
  q, k, v, g = _qkv(lk=lk)
  mask = _masks(q.shape[0], q.shape[1], k.shape[1])[mask_name]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v, mask) * g)

  with jax.default_matmul_precision("highest"):
    out = jax.jit(dot_product_attention)(q, k, v, mask)
    want = reference_attention(q, k, v, mask)
    grads = jax.jit(jax.grad(loss(dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
  assert out.shape == q.shape
  assert _rel(out, want) <= 1e-5
  for name, a, b in zip("qkv", grads, want_grads):
    assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


@pytest.mark.parametrize("block", [None, 2200])
def test_fully_masked_rows_are_uniform(block, monkeypatch):
  # A row that may attend nowhere averages all values (finite "-inf"), in the forward and the gradients alike.
  if block is not None:
    monkeypatch.setattr(attention, "BLOCK_ELEMENTS", block)
  q, k, v, g = _qkv(lk=32)
  mask = np.ones((2, 1, q.shape[1], 32), bool)
  mask[:, :, 5] = False
  mask = jnp.asarray(mask)
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v, mask) * g))
  with jax.default_matmul_precision("highest"):
    out = jax.jit(dot_product_attention)(q, k, v, mask)
    grads = jax.jit(jax.grad(loss(dot_product_attention), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out[:, 5], v.mean(1), rtol=1e-5, atol=1e-6)
  for name, a, b in zip("qkv", grads, want_grads):
    assert _rel(a, b) <= 1e-5, (name, _rel(a, b))


def test_mask_is_respected():
  q, k, v, _ = _qkv()
  mask = _masks(2, q.shape[1], k.shape[1])["padding"]
  with jax.default_matmul_precision("highest"):
    out = dot_product_attention(q, k, v, mask)
    # Changing masked-out keys/values of batch 1 changes nothing.
    v2 = v.at[1, -9:].set(100.0)
    k2 = k.at[1, -9:].set(-7.0)
    out2 = dot_product_attention(q, k2, v2, mask)
  assert _rel(out2, out) <= 1e-6
  w = attention_weights(q, k, mask)
  assert w.shape == (2, 3, q.shape[1], k.shape[1])
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  assert float(w[1, ..., -9:].max()) == 0.0


def test_bad_inputs():
  q, k, v, _ = _qkv()
  with pytest.raises(TypeError, match="boolean"):
    dot_product_attention(q, k, v, jnp.ones((1, 1, 1, k.shape[1])))
  with pytest.raises(ValueError, match="head_dim"):
    dot_product_attention(q[0], k[0], v[0])


def test_bf16_smoke():
  q, k, v, g = _qkv()
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  fn = jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(dot_product_attention(q, k, v).astype(jnp.float32) * g), argnums=(0, 1, 2)))
  out = dot_product_attention(qb, kb, vb)
  assert out.dtype == jnp.bfloat16
  assert _rel(out.astype(jnp.float32), reference_attention(q, k, v)) < 3e-2
  _, grads = fn(qb, kb, vb)
  for gr in grads:
    assert gr.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(gr.astype(jnp.float32))))


def _per_head_case(monkeypatch, lk=48):
  # Unmasked rows of >= PER_HEAD_MIN_KEYS keys take the per-head path; 48 * 12 elements -> 12 rows per block.
  monkeypatch.setattr(attention, "PER_HEAD_MIN_KEYS", 32)
  monkeypatch.setattr(attention, "HEAD_BLOCK_ELEMENTS", 48 * 12)
  calls = []  # one entry per trace through the per-head path
  per_head = attention._per_head_attention
  monkeypatch.setattr(attention, "_per_head_attention", lambda *a: calls.append(1) or per_head(*a))
  q, k, v, g = _qkv(b=4, lq=36, lk=lk, h=2)
  loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * g))
  with jax.default_matmul_precision("highest"):
    want = reference_attention(q, k, v)
    want_grads = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
  return (q, k, v), loss, want, want_grads, calls


@pytest.mark.parametrize("mesh_shape,rules", [((1, 1, 1), "t2i"), ((2, 2, 2), "t2i"), ((2, 2, 2), "none")])
def test_per_head_path_under_a_mesh_stays_on_each_devices_shard(mesh_shape, rules, monkeypatch):
  # Mesh data=2, fsdp=2, tensor=2: batch over (data, fsdp), heads over tensor. With the rules in context the
  # per-head loop runs inside shard_map on each device's 1 example x 1 head, so the step gathers nothing; without
  # rules the row-block path runs (also gather-free). On one device: the whole per-head path, 3 row blocks per
  # head. All equal the reference to 1e-5.
  import flax.linen as nn
  from jax.sharding import NamedSharding, PartitionSpec as P
  from experiments.common import AXIS_RULES
  from t2i.parallel import flax_rules
  args, loss, want, want_grads, calls = _per_head_case(monkeypatch)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:math.prod(mesh_shape)]).reshape(mesh_shape),
                           ("data", "fsdp", "tensor"))
  sharding = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
  args = jax.device_put(args, sharding)
  step = jax.jit(jax.value_and_grad(loss(dot_product_attention), argnums=(0, 1, 2)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(AXIS_RULES) if rules == "t2i" else ()):
    with jax.default_matmul_precision("highest"):
      hlo = step.lower(*args).compile().as_text()
      _, grads = step(*args)
      out = jax.jit(dot_product_attention)(*args)
  assert bool(calls) == (rules == "t2i")
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  assert _rel(out, want) <= 1e-5
  for name, a, b in zip("qkv", grads, want_grads):
    assert _rel(a, b) <= 1e-5, (name, _rel(a, b))
    assert a.sharding.is_equivalent_to(sharding, 4), name
