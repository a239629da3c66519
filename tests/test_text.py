"""CLIPTextModel: parity with tiny random transformers CLIP text encoders, loader tree, errors."""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.convert.clip import load_transformers_clip_text
from t2i.convert.common import CheckpointError
from t2i.models.text import CLIPTextModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, MAX_LEN, LEN = 1000, 16, 12


def _randomize(model, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * noise)
      elif "embedding" in name:
        p.copy_(noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _ids(eos: int, pad: int) -> np.ndarray:
  """[bos, words..., eos, pad...] rows with EOS at different positions; words may exceed the EOS id."""
  rng = np.random.default_rng(eos)
  ids = rng.integers(6, VOCAB - 2, (3, LEN))
  ids[:, 0] = VOCAB - 2  # bos
  for row, pos in enumerate((3, 7, LEN - 1)):
    ids[row, pos] = eos
    ids[row, pos + 1:] = pad
  return ids.astype(np.int64)


# name -> (model class, hidden_act, config eos_token_id, eos id in input_ids, pad id)
CASES = {
    "legacy_eos2_quick_gelu": ("CLIPTextModel", "quick_gelu", 2, VOCAB - 1, VOCAB - 1),
    "eos5_gelu": ("CLIPTextModel", "gelu", 5, 5, 0),
    "projection_eos5": ("CLIPTextModelWithProjection", "quick_gelu", 5, 5, 5),
}
_CACHE = {}


def _reference(name, tmp_path_factory):
  if name not in _CACHE:
    cls, act, eos, _, _ = CASES[name]
    cfg = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=MAX_LEN, hidden_act=act,
                                      eos_token_id=eos, bos_token_id=VOCAB - 2, pad_token_id=0, projection_dim=24)
    ref = getattr(transformers, cls)(cfg).eval()
    _randomize(ref, seed=len(name))
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder, safe_serialization=True)
    _CACHE[name] = ref, folder
  return _CACHE[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity(name, tmp_path_factory):
  ref, folder = _reference(name, tmp_path_factory)
  _, _, eos_cfg, eos, pad = CASES[name]
  model, params = load_transformers_clip_text(folder)
  assert model.with_projection == name.startswith("projection") and model.eos_token_id == eos_cfg
  ids = _ids(eos, pad)
  mask = (np.arange(LEN)[None] <= np.array([3, 7, LEN - 1])[:, None]).astype(np.int64)
  with torch.no_grad():
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
    out_m = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  pooled_key = "text_embeds" if model.with_projection else "pooler_output"

  @jax.jit
  def run(p, ids, mask):
    return (model.apply({"params": p}, ids, output_hidden_states=True),
            model.apply({"params": p}, ids, attention_mask=mask))

  with jax.default_matmul_precision("highest"):
    (last, pooled, hidden), (last_m, pooled_m) = run(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
  assert last.shape == (3, LEN, 32) and len(hidden) == 3
  assert _rel(last, out.last_hidden_state) <= 1e-5
  assert _rel(pooled, out[pooled_key]) <= 1e-5
  for h, h_ref in zip(hidden, out.hidden_states, strict=True):
    assert _rel(h, h_ref) <= 1e-5
  assert _rel(last_m, out_m.last_hidden_state) <= 1e-5
  assert _rel(pooled_m, out_m[pooled_key]) <= 1e-5


def test_loaded_tree_matches_init_and_axes(tmp_path_factory):
  _, folder = _reference("projection_eos5", tmp_path_factory)
  model, params = load_transformers_clip_text(folder)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 4), jnp.int32))["params"]
  want = flax.core.meta.unbox(boxed)
  assert jax.tree_util.tree_structure(want) == jax.tree_util.tree_structure(params)
  for w, p in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(params)):
    assert (w.shape, w.dtype) == (p.shape, p.dtype)
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, flax.core.meta.Partitioned))
  assert all(isinstance(v, flax.core.meta.Partitioned) and len(v.names) == v.value.ndim for v in leaves)
  assert boxed["token_embedding"]["embedding"].names == ("vocab", "embed")
  assert boxed["layers_0"]["fc1"]["dense"]["kernel"].names == ("embed", "mlp")
  assert boxed["layers_0"]["self_attn"]["q_proj"]["dense"]["kernel"].names == ("embed", "heads")


def test_remat_and_dtypes(tmp_path_factory):
  _, folder = _reference("eos5_gelu", tmp_path_factory)
  model, params = load_transformers_clip_text(folder)
  ids = jnp.asarray(_ids(5, 0), jnp.int32)
  remat = model.clone(remat=True)

  @jax.jit
  def run(p):
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ids)[1] ** 2)
    return jax.grad(loss(model))(p), jax.grad(loss(remat))(p)

  g, g_r = run(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_r), jax.tree_util.tree_leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  out = jax.eval_shape(model.clone(dtype=jnp.bfloat16).apply, {"params": params}, ids)
  assert out[0].dtype == jnp.bfloat16
  _, p16 = load_transformers_clip_text(folder, param_dtype=jnp.bfloat16)
  assert {v.dtype for v in jax.tree_util.tree_leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_bad_inputs(tmp_path, tmp_path_factory):
  with pytest.raises(CheckpointError, match="config.json"):
    load_transformers_clip_text(tmp_path)
  _, folder = _reference("eos5_gelu", tmp_path_factory)
  # A tensor missing from the checkpoint is named in the error.
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(folder / "model.safetensors"))
  del tensors["encoder.layers.1.mlp.fc2.bias"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(CheckpointError, match="encoder.layers.1.mlp.fc2.bias"):
    load_transformers_clip_text(tmp_path)
  # A config that disagrees with the weights: shape error naming the tensor.
  cfg = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
  tensors = load_file(str(folder / "model.safetensors"))
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="fc1"):
    load_transformers_clip_text(tmp_path)
  model = CLIPTextModel(vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=4, hidden_act="relu6")
  with pytest.raises(ValueError, match="hidden_act"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="input_ids"):
    jax.eval_shape(model.clone(hidden_act="gelu").init, jax.random.key(0), jnp.zeros((1, 5), jnp.int32))


def test_legacy_layout_with_prefix_and_position_ids(tmp_path, tmp_path_factory):
  """transformers 4 wrote CLIPTextModel tensors under "text_model." with a position_ids buffer."""
  from safetensors.numpy import load_file, save_file

  import t2i.convert
  _, folder = _reference("eos5_gelu", tmp_path_factory)
  tensors = {"text_model." + k: v for k, v in load_file(str(folder / "model.safetensors")).items()}
  tensors["text_model.embeddings.position_ids"] = np.arange(MAX_LEN, dtype=np.int64)[None]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  cfg = json.loads((folder / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": cfg}))
  model, params = t2i.convert.load_transformers_clip_text(tmp_path)
  model_ref, params_ref = load_transformers_clip_text(folder)
  assert model == model_ref
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_ref)
  tensors["text_model.embeddings.extra_buffer"] = np.zeros(3, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="extra_buffer"):
    load_transformers_clip_text(tmp_path)


def test_sharded_forward_matches(tmp_path_factory):
  import flax.linen as nn

  from experiments.common import AXIS_RULES
  from jax.sharding import PartitionSpec as P

  from t2i.parallel import flax_rules, logical_shardings, make_mesh
  _, folder = _reference("projection_eos5", tmp_path_factory)
  model, params = load_transformers_clip_text(folder)
  ids = jnp.asarray(_ids(5, 5)[:2], jnp.int32)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  boxed = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  sharded = jax.device_put(params, logical_shardings(boxed, mesh, AXIS_RULES))
  assert sharded["layers_0"]["fc1"]["dense"]["kernel"].sharding.spec == P("fsdp", "tensor")
  with jax.default_matmul_precision("highest"):
    want = jax.jit(model.apply)({"params": params}, ids)
    with jax.set_mesh(mesh), nn.logical_axis_rules(flax_rules(AXIS_RULES)):
      got = jax.jit(model.apply)({"params": sharded}, ids)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_bidirectional_mode_reads_later_tokens(tmp_path_factory):
  # causal=False: an early token's state depends on the tokens after it; causal (CLIP) it does not. Same params.
  _, folder = _reference("eos5_gelu", tmp_path_factory)
  model, params = load_transformers_clip_text(folder)
  ids = jnp.asarray(_ids(5, 0), jnp.int32)
  later = ids.at[:, 2].set(ids[:, 2] + 1)  # change token 2
  for m, early_changes in ((model, False), (model.clone(causal=False), True)):
    a, b = m.apply({"params": params}, ids)[0], m.apply({"params": params}, later)[0]
    assert bool(jnp.any(jnp.abs(a[:, :2] - b[:, :2]) > 1e-4)) == early_changes
    assert bool(jnp.all(jnp.any(jnp.abs(a[:, 2:] - b[:, 2:]) > 1e-4, axis=(1, 2))))


def test_append_token_embeddings(tmp_path_factory):
  """append_token_embeddings: the last hidden state gains each token's own embedding row after its hidden_size
  channels (no position, no context); the first half and the pooled output are those of the plain model."""
  _, folder = _reference("eos5_gelu", tmp_path_factory)
  model, params = load_transformers_clip_text(folder)
  ids = jnp.asarray(_ids(5, 0), jnp.int32)
  last, pooled = model.apply({"params": params}, ids)
  wide, wide_pooled = model.clone(append_token_embeddings=True).apply({"params": params}, ids)
  h = last.shape[-1]
  assert wide.shape == (*last.shape[:2], 2 * h)
  np.testing.assert_array_equal(wide[..., :h], last)
  np.testing.assert_array_equal(wide_pooled, pooled)
  table = np.asarray(flax.core.meta.unbox(params)["token_embedding"]["embedding"])
  np.testing.assert_array_equal(wide[..., h:], table[np.asarray(ids)])
