"""Decoder transformer: parity with transformers' LlamaForCausalLM (tiny, random, save_pretrained), GQA, tied
embeddings, loader errors, logical axes, Chameleon switches (qk-norm, swin order, non-affine LN) and the LM loss.

Measured (float32, matmul precision "highest"): max |ours - torch| / max |torch| ~ 3e-7 on the MHA and GQA configs.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from t2i.convert.common import CheckpointError
from t2i.convert.llama import load_transformers_llama
from t2i.models.transformer import Transformer, z_loss
from t2i.objectives.autoregressive import cm3_lm_loss, next_token_batch

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            rope_theta=500.0, rms_norm_eps=1e-5)


def _save(tmp_path, name, **extra):
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **extra})).eval()
  with torch.no_grad():  # non-trivial norm scales (they initialise to ones)
    for n, p in ref.named_parameters():
      if "norm" in n:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  folder = tmp_path / name
  ref.save_pretrained(folder, safe_serialization=True)
  return ref, folder


def _rel_err(ref, model, params, ids):
  with torch.no_grad():
    want = ref(torch.tensor(ids)).logits.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, jnp.asarray(ids)))
  assert got.shape == want.shape
  return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("name,extra", [
    ("mha", {}),
    ("gqa", {"num_key_value_heads": 2}),
    ("gqa_tied_bias", {"num_key_value_heads": 1, "tie_word_embeddings": True, "attention_bias": True,
                       "mlp_bias": True}),
])
def test_llama_parity(tmp_path, name, extra):
  ref, folder = _save(tmp_path, name, **extra)
  model, params = load_transformers_llama(folder)
  assert model.kv_heads == extra.get("num_key_value_heads", 4) and model.rope_theta == 500.0
  ids = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 33))
  err = _rel_err(ref, model, params, ids)
  print(f"llama parity [{name}]: max relative error {err:.2e}")
  assert err <= 1e-5, err


def test_loader_errors(tmp_path):
  _, folder = _save(tmp_path, "bad")
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
  with pytest.raises(CheckpointError, match="model.layers.2"):
    load_transformers_llama(folder)
  (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
  with pytest.raises(CheckpointError, match="config.json: hidden_act"):
    load_transformers_llama(folder)
  (folder / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "linear",
                                                                             "rope_theta": 1.0, "factor": 2.0}}))
  with pytest.raises(CheckpointError, match="rope_type='linear'"):
    load_transformers_llama(folder)
  with pytest.raises(CheckpointError, match="config.json: not found"):
    load_transformers_llama(tmp_path / "missing")


def test_params_carry_logical_axes():
  m = Transformer(**{k: v for k, v in TINY.items()}, qk_norm=True)
  boxed = jax.eval_shape(m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: hasattr(v, "names"))
  assert leaves and all(hasattr(v, "names") for v in leaves)
  names = {jax.tree_util.keystr(k): v.names for k, v in
           jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda v: hasattr(v, "names"))[0]}
  assert names["['embed_tokens']['embedding']"] == ("vocab", "embed")
  assert names["['layers_0']['mlp']['down_proj']['dense']['kernel']"] == ("mlp", "embed")
  assert names["['lm_head']['dense']['kernel']"] == ("embed", "vocab")


def test_from_config_rejects_bad_fields():
  with pytest.raises(ValueError, match="norm_order='post'"):
    Transformer(**TINY, norm_order="post").init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="not a multiple"):
    Transformer(**{**TINY, "num_key_value_heads": 3}).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_segment_ids_isolate_packed_documents():
  m = Transformer(**TINY)
  params = m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  a, b = np.arange(5, 11)[None], np.arange(20, 26)[None]
  packed = np.concatenate([a, b], 1)
  seg = np.array([[0] * 6 + [1] * 6])
  pos = np.array([list(range(6)) * 2])
  apply = jax.jit(lambda *x, **k: m.apply({"params": params}, *x, **k))
  out = apply(jnp.asarray(packed), positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
  np.testing.assert_allclose(out[0, 6:], apply(jnp.asarray(b))[0], atol=1e-5)
  np.testing.assert_allclose(out[0, :6], apply(jnp.asarray(a))[0], atol=1e-5)


@pytest.mark.parametrize("norm_kind", ["rms", "layernorm_nonaffine"])
def test_chameleon_config_trains(norm_kind):
  """qk-norm + swin norm order (+ CM3Leon's parameter-free LN): loss falls on a fixed batch; remat runs."""
  m = Transformer(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, qk_norm=True, norm_order="swin", norm_kind=norm_kind, remat=True)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 17)))
  inputs, targets, mask = next_token_batch(tokens)
  params = m.init(jax.random.key(0), inputs)["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    (loss, metrics), g = jax.value_and_grad(
        lambda p: cm3_lm_loss(m.apply({"params": p}, inputs), targets, mask, z_loss_weight=1e-4), has_aux=True)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, metrics

  losses = []
  for _ in range(25):
    params, state, metrics = step(params, state)
    losses.append(float(metrics["nll"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses
  if norm_kind == "layernorm_nonaffine":
    assert not any("norm" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def test_lm_loss_and_z_loss_values():
  logits = jnp.asarray([[[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
  targets = jnp.asarray([[0, 2]])
  loss, m = cm3_lm_loss(logits, targets, jnp.asarray([[1.0, 0.0]]), z_loss_weight=0.5)
  lz = np.log(np.exp(2) + 2)
  np.testing.assert_allclose(float(m["nll"]), lz - 2, rtol=1e-6)
  np.testing.assert_allclose(float(m["z_loss"]), lz ** 2, rtol=1e-6)
  np.testing.assert_allclose(float(loss), lz - 2 + 0.5 * lz ** 2, rtol=1e-6)
  assert float(m["accuracy"]) == 1.0 and float(m["tokens"]) == 1.0
  np.testing.assert_allclose(np.asarray(z_loss(logits))[0, 1], np.log(3) ** 2, rtol=1e-6)
