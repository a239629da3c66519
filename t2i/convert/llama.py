"""transformers `LlamaForCausalLM.save_pretrained` folder -> (t2i Transformer, params).

  module, params = load_transformers_llama("path/to/folder")
  logits = module.apply({"params": params}, input_ids)

Tensor names (torch Linear weights [out, in] are transposed to Dense kernels [in, out]):
  model.embed_tokens.weight                          -> embed_tokens.embedding
  model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias} -> layers_{i}.self_attn.{q,k,v,o}_proj.dense.*
  model.layers.{i}.mlp.{gate,up,down}_proj.{weight,bias}  -> layers_{i}.mlp.*_proj.dense.*
  model.layers.{i}.{input,post_attention}_layernorm.weight -> layers_{i}.*_layernorm.scale
  model.norm.weight                                  -> norm.scale
  lm_head.weight                                     -> lm_head.dense.kernel (absent / ignored when tied)
Only safetensors are read (never pickles). A bare `LlamaModel` folder (names without "model.") is accepted when
the embeddings are tied.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i.convert.common import CheckpointError, TensorReader, check_param_tree, read_config, read_safetensors
from t2i.models.transformer import Transformer

_MODEL_TYPES = ("llama",)
_IGNORED_TENSORS = ("model.rotary_emb.", "rotary_emb.")  # inv_freq buffers written by old versions


def llama_from_config(config: dict[str, Any], source: str = "config", **kwargs) -> Transformer:
  """Transformer from a transformers LlamaConfig dict, with clear errors naming `source`."""
  if config.get("model_type", "llama") not in _MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type={config['model_type']!r}, expected one of {_MODEL_TYPES}")
  if config.get("pretraining_tp", 1) != 1:
    raise CheckpointError(f"{source}: pretraining_tp={config['pretraining_tp']} is not supported")
  try:
    return Transformer.from_config(config, source, **kwargs)
  except ValueError as e:
    raise CheckpointError(str(e)) from e


def llama_params_from_torch(model: Transformer, r: TensorReader, prefix: str) -> dict[str, Any]:
  """Maps transformers Llama tensor names (model part after `prefix`) onto the t2i param tree (numpy arrays)."""
  d, hd = model.hidden_size, model.dim_per_head
  q_out, kv_out, ff = model.num_attention_heads * hd, model.kv_heads * hd, model.intermediate_size

  def lin(key: str, out_in: tuple[int, int], bias: bool) -> dict[str, Any]:
    dense = {"kernel": r.take(key + ".weight", out_in).T}
    if bias:
      dense["bias"] = r.take(key + ".bias", (out_in[0],))
    return {"dense": dense}

  emb = r.take(prefix + "embed_tokens.weight", (model.vocab_size, d))
  params: dict[str, Any] = {"embed_tokens": {"embedding": emb},
                            "norm": {"scale": r.take(prefix + "norm.weight", (d,))}}
  for i in range(model.num_hidden_layers):
    p = f"{prefix}layers.{i}."
    ab, mb = model.attention_bias, model.mlp_bias
    params[f"layers_{i}"] = {
        "self_attn": {"q_proj": lin(p + "self_attn.q_proj", (q_out, d), ab),
                      "k_proj": lin(p + "self_attn.k_proj", (kv_out, d), ab),
                      "v_proj": lin(p + "self_attn.v_proj", (kv_out, d), ab),
                      "o_proj": lin(p + "self_attn.o_proj", (d, q_out), ab)},
        "mlp": {"gate_proj": lin(p + "mlp.gate_proj", (ff, d), mb), "up_proj": lin(p + "mlp.up_proj", (ff, d), mb),
                "down_proj": lin(p + "mlp.down_proj", (d, ff), mb)},
        "input_layernorm": {"scale": r.take(p + "input_layernorm.weight", (d,))},
        "post_attention_layernorm": {"scale": r.take(p + "post_attention_layernorm.weight", (d,))},
    }
  if model.tie_word_embeddings:
    if r.has("lm_head.weight"):
      r.take("lm_head.weight", (model.vocab_size, d))  # a tied copy of the embedding
  else:
    params["lm_head"] = {"dense": {"kernel": r.take("lm_head.weight", (model.vocab_size, d)).T}}
  return params


def load_transformers_llama(folder: str | pathlib.Path, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                            **overrides) -> tuple[Transformer, dict[str, Any]]:
  """Reads config.json + *.safetensors of a LlamaForCausalLM; returns (module, unboxed params) after checking
  that every tensor was consumed and the tree matches the module. `overrides`: extra Transformer fields (remat,
  precision, ...)."""
  folder = pathlib.Path(folder)
  config = read_config(folder)
  tensors = read_safetensors(folder)
  prefix = "model." if "model.embed_tokens.weight" in tensors else ""
  if prefix + "embed_tokens.weight" not in tensors:
    raise CheckpointError(f"{folder}: no 'model.embed_tokens.weight' tensor; not a Llama checkpoint (found e.g. "
                          f"{sorted(tensors)[:3]})")
  model = llama_from_config(config, str(folder / "config.json"), dtype=dtype, param_dtype=param_dtype, **overrides)
  if not model.tie_word_embeddings and "lm_head.weight" not in tensors:
    raise CheckpointError(f"{folder}: tie_word_embeddings is false but there is no 'lm_head.weight' tensor")
  reader = TensorReader(tensors, str(folder))
  params = llama_params_from_torch(model, reader, prefix)
  reader.check_consumed(ignore=_IGNORED_TENSORS)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]
  check_param_tree(abstract, params, str(folder))
  return model, jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v), param_dtype), params)
