"""T5 encoder: parity with transformers' T5EncoderModel (tiny, random, saved with save_pretrained) and loader checks."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from t2i.convert.common import CheckpointError
from t2i.convert.t5 import load_transformers_t5_encoder
from t2i.models.t5 import T5_PRESETS, T5Encoder, relative_position_buckets, t5_encoder

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, dropout_rate=0.0)


def _save(tmp_path, feed_forward_proj, seed=0, **extra):
  torch.manual_seed(seed)
  cfg = transformers.T5Config(**{**TINY, **extra}, feed_forward_proj=feed_forward_proj)
  ref = transformers.T5EncoderModel(cfg).eval()
  with torch.no_grad():  # non-trivial norm scales (they initialise to ones)
    for name, p in ref.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  folder = tmp_path / feed_forward_proj
  ref.save_pretrained(folder, safe_serialization=True)
  return ref, folder


def _inputs(batch=2, length=13, seed=1):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, TINY["vocab_size"], (batch, length))
  mask = np.ones((batch, length), np.int64)
  mask[1, 9:] = 0  # right padding on the second row
  mask[0, :2] = 0  # left padding on the first row
  return ids, mask


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("feed_forward_proj,scan", [("relu", False), ("gated-gelu", False), ("gated-gelu", True)])
def test_parity_with_transformers(tmp_path, feed_forward_proj, scan):
  ref, folder = _save(tmp_path, feed_forward_proj)
  model, params = load_transformers_t5_encoder(folder, scan_layers=scan, remat=scan)
  assert model.feed_forward_proj == feed_forward_proj and model.num_layers == 2
  assert ("block_stack" in params) == scan and ("block_0" in params) != scan  # scanned: blocks stacked
  ids, mask = _inputs()
  with torch.no_grad():
    want_nomask = ref(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    want_mask = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  apply = jax.jit(model.apply)
  with jax.default_matmul_precision("highest"):
    got_nomask = apply({"params": params}, jnp.asarray(ids, jnp.int32))
    got_mask = apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  assert got_nomask.shape == (2, 13, 32)
  assert _rel(got_nomask, want_nomask) <= 1e-5
  assert _rel(got_mask, want_mask) <= 1e-5
  assert _rel(got_mask, got_nomask) > 1e-2  # the mask matters


def test_relative_buckets_match_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  for nb, md, n in ((32, 128, 512), (8, 20, 64), (16, 64, 300)):
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = bucket(rel, bidirectional=True, num_buckets=nb, max_distance=md).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, n, nb, md), want)


def test_embedding_tie_variants(tmp_path):
  """Only encoder.embed_tokens.weight, only shared.weight, or both: every tensor consumed; shared wins."""
  from safetensors.numpy import load_file, save_file

  ref, folder = _save(tmp_path, "gated-gelu")
  tensors = load_file(str(folder / "model.safetensors"))
  emb = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
  (folder / "model.safetensors").unlink()
  rest = {k: v for k, v in tensors.items() if k not in ("shared.weight", "encoder.embed_tokens.weight")}
  for keys in (("shared.weight",), ("encoder.embed_tokens.weight",), ("shared.weight", "encoder.embed_tokens.weight")):
    save_file({**rest, **{k: emb for k in keys}}, str(folder / "model.safetensors"))
    _, params = load_transformers_t5_encoder(folder)
    np.testing.assert_array_equal(np.asarray(params["shared"]["embedding"]), emb)
  # A stray tensor is reported, a missing one too.
  save_file({**rest, "shared.weight": emb, "encoder.extra.weight": emb[:1]}, str(folder / "model.safetensors"))
  with pytest.raises(CheckpointError, match="unexpected tensors"):
    load_transformers_t5_encoder(folder)
  save_file({k: v for k, v in rest.items() if "block.1.layer.1" not in k} | {"shared.weight": emb},
            str(folder / "model.safetensors"))
  with pytest.raises(CheckpointError, match="missing tensor"):
    load_transformers_t5_encoder(folder)
  cfg = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "umt5"}))
  with pytest.raises(CheckpointError, match="model_type"):
    load_transformers_t5_encoder(folder)


def test_params_structure_axes_and_bf16(tmp_path):
  _, folder = _save(tmp_path, "gated-gelu")
  model, params = load_transformers_t5_encoder(folder, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  assert jax.tree.structure(nn_unbox(boxed)) == jax.tree.structure(params)
  names = nn_names(boxed)
  assert names["shared"]["embedding"] == ("vocab", "embed")
  assert names["block_0"]["attn"]["q"]["dense"]["kernel"] == ("embed", "heads")
  assert names["block_1"]["mlp"]["wo"]["dense"]["kernel"] == ("mlp", "embed")
  out = jax.jit(model.apply)({"params": params}, jnp.ones((1, 5), jnp.int32))
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


def test_xxl_preset_shapes():
  model = t5_encoder("t5_v1_1_xxl")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  n = sum(int(np.prod(v.value.shape)) for v in jax.tree.leaves(shapes, is_leaf=lambda v: hasattr(v, "names")))
  assert n == 4_762_310_656  # google/t5-v1_1-xxl encoder incl. the 32128 x 4096 embedding
  assert T5_PRESETS["t5_v1_1_xxl"]["feed_forward_proj"] == "gated-gelu"
  with pytest.raises(ValueError, match="feed_forward_proj"):
    T5Encoder(**TINY, feed_forward_proj="swish-gelu").init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))


def test_remat_and_grad():
  model = T5Encoder(**TINY, feed_forward_proj="gated-gelu", remat=True)
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
  params = nn_unbox(jax.jit(model.init)(jax.random.key(0), ids)["params"])
  plain = T5Encoder(**TINY, feed_forward_proj="gated-gelu")
  loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ids) ** 2)
  g1, g2 = jax.jit(lambda p: (jax.grad(loss(model))(p), jax.grad(loss(plain))(p)))(params)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tokenizer_from_local_unigram_model(tmp_path, make_t5_tokenizer):
  """A T5TokenizerFast built offline from a tiny locally trained unigram model tokenises a caption."""
  fast = transformers.AutoTokenizer.from_pretrained(make_t5_tokenizer(tmp_path / "tok"))
  enc = fast(["a red circle", "two green triangles next to a star"], padding="max_length", max_length=40,
             truncation=True)
  ids, mask = np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])
  assert ids.shape == (2, 40) and ids.max() < 60
  assert ids[0, mask[0].sum() - 1] == fast.eos_token_id and ids[0, -1] == fast.pad_token_id
  assert fast.decode(ids[0], skip_special_tokens=True) == "a red circle"
  model = T5Encoder(**{**TINY, "vocab_size": 60}, feed_forward_proj="gated-gelu")
  params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(ids))["params"]
  assert jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).shape == (2, 40, 32)


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def nn_names(tree):
  return jax.tree.map(lambda v: tuple(v.names), tree, is_leaf=lambda v: hasattr(v, "names"))


def test_sharded_apply_matches(tmp_path):
  """Params placed by their logical axes on a 2x2x2 mesh; activation constraints active; same output."""
  import flax.linen as nn
  from jax.sharding import PartitionSpec as P

  from experiments.common import AXIS_RULES
  from t2i.parallel import flax_rules, logical_shardings, make_mesh

  _, folder = _save(tmp_path, "gated-gelu")
  model, params = load_transformers_t5_encoder(folder)
  ids, mask = _inputs(batch=4, length=8)
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  sharded = jax.device_put(params, logical_shardings(boxed, mesh, AXIS_RULES))
  assert sharded["block_0"]["mlp"]["wi_0"]["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
  with jax.default_matmul_precision("highest"):
    want = jax.jit(model.apply)({"params": params}, ids, mask)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(AXIS_RULES)):
      got = jax.jit(model.apply)({"params": sharded}, ids, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
