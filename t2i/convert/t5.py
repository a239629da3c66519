"""transformers `T5EncoderModel.save_pretrained` folder -> (t2i T5Encoder, params).

Tensor names (torch Linear weights are [out, in] and are transposed to Dense kernels):
  shared.weight | encoder.embed_tokens.weight                        -> shared.embedding
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight -> relative_attention_bias
  encoder.block.{i}.layer.0.layer_norm.weight                        -> block_{i}.attn_norm.scale
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight           -> block_{i}.attn.{q,k,v,o}
  encoder.block.{i}.layer.1.layer_norm.weight                        -> block_{i}.mlp_norm.scale
  encoder.block.{i}.layer.1.DenseReluDense.{wi | wi_0, wi_1; wo}.weight -> block_{i}.mlp.*
  encoder.final_layer_norm.weight                                    -> final_layer_norm.scale
The two embedding names are tied in transformers (T5 always ties them, with `shared` as the source): `shared.weight`
is used when present, and `encoder.embed_tokens.weight` is then ignored; otherwise the latter is used. Decoder
tensors of a full T5 checkpoint (`decoder.*`, `lm_head.*`) are ignored.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i.convert.common import CheckpointError, TensorReader, check_param_tree, read_config, read_safetensors
from t2i.models.t5 import BLOCK_KINDS, T5Encoder, parse_feed_forward_proj
from t2i.nn.scan import stack_layers

_FIELDS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
           "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "feed_forward_proj")
_MODEL_TYPES = ("t5",)
_IGNORED_TENSORS = ("decoder.", "lm_head.")


def t5_from_config(config: dict[str, Any], source: str = "config", **kwargs) -> T5Encoder:
  """T5Encoder from a transformers T5Config dict (UMT5 / MT5-style per-layer biases are not supported)."""
  if config.get("model_type", "t5") not in _MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type={config['model_type']!r}, expected one of {_MODEL_TYPES}")
  fields = {k: config[k] for k in _FIELDS if config.get(k) is not None}
  try:
    parse_feed_forward_proj(fields.get("feed_forward_proj", "relu"))
  except ValueError as e:
    raise CheckpointError(f"{source}: {e}") from e
  return T5Encoder(**fields, **kwargs)


def t5_params_from_torch(model: T5Encoder, r: TensorReader) -> dict[str, Any]:
  """Maps transformers T5 encoder tensor names onto the t2i param tree (numpy arrays)."""
  _, gated = parse_feed_forward_proj(model.feed_forward_proj)
  d, inner = model.d_model, model.num_heads * model.d_kv
  if r.has("shared.weight"):
    emb = r.take("shared.weight", (model.vocab_size, d))
    if r.has("encoder.embed_tokens.weight"):
      r.take("encoder.embed_tokens.weight", (model.vocab_size, d))  # tied to shared.weight in transformers
  else:
    emb = r.take("encoder.embed_tokens.weight", (model.vocab_size, d))

  def lin(key, shape_out_in):
    return {"dense": {"kernel": r.take(key + ".weight", shape_out_in).T}}

  params: dict[str, Any] = {
      "shared": {"embedding": emb},
      "relative_attention_bias": r.take("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                        (model.relative_attention_num_buckets, model.num_heads)),
      "final_layer_norm": {"scale": r.take("encoder.final_layer_norm.weight", (d,))},
  }
  for i in range(model.num_layers):
    p = f"encoder.block.{i}.layer."
    ff = p + "1.DenseReluDense."
    mlp = ({"wi_0": lin(ff + "wi_0", (model.d_ff, d)), "wi_1": lin(ff + "wi_1", (model.d_ff, d))} if gated
           else {"wi": lin(ff + "wi", (model.d_ff, d))})
    mlp["wo"] = lin(ff + "wo", (d, model.d_ff))
    params[f"block_{i}"] = {
        "attn_norm": {"scale": r.take(p + "0.layer_norm.weight", (d,))},
        "attn": {**{n: lin(p + "0.SelfAttention." + n, (inner, d)) for n in ("q", "k", "v")},
                 "o": lin(p + "0.SelfAttention.o", (d, inner))},
        "mlp_norm": {"scale": r.take(p + "1.layer_norm.weight", (d,))},
        "mlp": mlp,
    }
  return params


def _check_tree(model: Any, params: dict[str, Any], source: str) -> None:
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  check_param_tree(jax.eval_shape(model.init, jax.random.key(0), ids)["params"], params, source)


def load_transformers_t5_encoder(folder: str | pathlib.Path, dtype: Any = jnp.float32,
                                 param_dtype: Any = jnp.float32, remat: bool = False, scan_layers: bool = False
                                 ) -> tuple[T5Encoder, dict[str, Any]]:
  """Reads config.json + *.safetensors of a T5EncoderModel (or a full T5 model's encoder half); returns
  (module, unboxed params) with every tensor consumed or explicitly ignored (see the module docstring);
  `scan_layers` stacks the blocks for a scanned module (`t2i.nn.scan`)."""
  folder = pathlib.Path(folder)
  config = read_config(folder)
  tensors = read_safetensors(folder)
  if "encoder.final_layer_norm.weight" not in tensors:
    raise CheckpointError(f"{folder}: no 'encoder.final_layer_norm.weight' tensor; not a T5 encoder (found e.g. "
                          f"{sorted(tensors)[:3]})")
  model = t5_from_config(config, str(folder / "config.json"), dtype=dtype, param_dtype=param_dtype, remat=remat)
  reader = TensorReader(tensors, str(folder))
  params = t5_params_from_torch(model, reader)
  reader.check_consumed(ignore=_IGNORED_TENSORS)
  _check_tree(model, params, str(folder))
  if scan_layers:
    model, params = model.clone(scan_layers=True), stack_layers(params, BLOCK_KINDS)
  return model, jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v), param_dtype), params)
