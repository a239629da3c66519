"""transformers `CLIPTextModel[WithProjection].save_pretrained` folder -> (t2i CLIPTextModel, params)."""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i.convert.common import CheckpointError, TensorReader, check_param_tree, read_config, read_safetensors
from t2i.models.text import CLIPTextModel

_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "projection_dim")
_TEXT_MODEL_TYPES = ("clip_text_model", "clip")
# Buffers and heads of other CLIP parts that may sit in the same file and are not used by the text encoder.
_IGNORED_TENSORS = ("embeddings.position_ids", "vision_model.", "visual_projection.", "logit_scale")


def clip_text_from_config(config: dict[str, Any], source: str = "config", with_projection: bool = False,
                          **kwargs) -> CLIPTextModel:
  """CLIPTextModel from a transformers CLIPTextConfig dict (or a CLIPConfig with `text_config`)."""
  if config.get("model_type", "clip_text_model") not in _TEXT_MODEL_TYPES:
    raise CheckpointError(f"{source}: model_type={config['model_type']!r}, expected one of {_TEXT_MODEL_TYPES}")
  if "text_config" in config:  # a full CLIPModel: projection_dim lives at the top level
    config = {**config["text_config"], **({"projection_dim": config["projection_dim"]}
                                          if "projection_dim" in config else {})}
  fields = {k: config[k] for k in _FIELDS if config.get(k) is not None}
  return CLIPTextModel(**fields, with_projection=with_projection, **kwargs)


def clip_params_from_torch(model: CLIPTextModel, r: TensorReader, prefix: str) -> dict[str, Any]:
  """Maps transformers CLIP text tensor names (after `prefix`) onto the t2i param tree (numpy arrays)."""
  d = model.hidden_size
  p = prefix
  params: dict[str, Any] = {
      "token_embedding": {"embedding": r.take(p + "embeddings.token_embedding.weight", (model.vocab_size, d))},
      "position_embedding": r.take(p + "embeddings.position_embedding.weight", (model.max_position_embeddings, d)),
      "final_layer_norm": r.norm(p + "final_layer_norm"),
  }
  for i in range(model.num_hidden_layers):
    q = f"{p}encoder.layers.{i}."
    params[f"layers_{i}"] = {
        "layer_norm1": r.norm(q + "layer_norm1"),
        "self_attn": {n: {"dense": r.linear(q + "self_attn." + n)}
                      for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "layer_norm2": r.norm(q + "layer_norm2"),
        "fc1": {"dense": r.linear(q + "mlp.fc1")},
        "fc2": {"dense": r.linear(q + "mlp.fc2")},
    }
  if model.with_projection:
    params["text_projection"] = {"dense": r.linear("text_projection", bias=False)}
  return params


def _check_tree(model: Any, params: dict[str, Any], source: str) -> None:
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  check_param_tree(jax.eval_shape(model.init, jax.random.key(0), ids)["params"], params, source)


def load_transformers_clip_text(folder: str | pathlib.Path, dtype: Any = jnp.float32,
                                param_dtype: Any = jnp.float32) -> tuple[CLIPTextModel, dict[str, Any]]:
  """Reads config.json + *.safetensors of a CLIPTextModel / CLIPTextModelWithProjection (or a full CLIPModel's
  text half); returns (module, unboxed params). `text_projection.weight` present => `with_projection=True`."""
  folder = pathlib.Path(folder)
  config = read_config(folder)
  tensors = read_safetensors(folder)
  prefix = "text_model." if any(k.startswith("text_model.") for k in tensors) else ""
  if prefix + "embeddings.token_embedding.weight" not in tensors:
    raise CheckpointError(f"{folder}: no '{prefix}embeddings.token_embedding.weight' tensor; not a CLIP text "
                          f"encoder (found e.g. {sorted(tensors)[:3]})")
  model = clip_text_from_config(config, str(folder / "config.json"),
                                with_projection="text_projection.weight" in tensors, dtype=dtype,
                                param_dtype=param_dtype)
  reader = TensorReader(tensors, str(folder))
  params = clip_params_from_torch(model, reader, prefix)
  reader.check_consumed(ignore=tuple(prefix + k for k in _IGNORED_TENSORS) + _IGNORED_TENSORS)
  _check_tree(model, params, str(folder))
  return model, jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v), param_dtype), params)
