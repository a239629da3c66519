"""diffusers `AutoencoderKL.save_pretrained` folder -> (t2i AutoencoderKL, params)."""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from t2i.convert.common import CheckpointError, TensorReader, read_config, read_safetensors
from t2i.models.vae import AutoencoderKL

# config.json keys that do not change the forward computation.
_IGNORED_CONFIG = ("_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "latents_mean",
                   "latents_std")
_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
           "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor",
           "shift_factor", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def vae_from_config(config: dict[str, Any], source: str = "config", **kwargs) -> AutoencoderKL:
  """AutoencoderKL built from a diffusers config dict; unknown keys are an error naming `source`."""
  unknown = sorted(k for k in config if k not in _FIELDS and k not in _IGNORED_CONFIG)
  if unknown:
    raise CheckpointError(f"{source}: unsupported AutoencoderKL config keys {unknown}")
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    raise CheckpointError(f"{source}: _class_name={config['_class_name']!r}, expected 'AutoencoderKL'")
  fields = {k: config[k] for k in _FIELDS if k in config}
  for k in ("down_block_types", "up_block_types", "block_out_channels"):
    if k in fields:
      fields[k] = tuple(fields[k])
  if isinstance(fields.get("sample_size"), list):
    fields["sample_size"] = tuple(fields["sample_size"])
  for k in ("down_block_types", "up_block_types"):
    want = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}[k]
    bad = [t for t in fields.get(k, ()) if t != want]
    if bad:
      raise CheckpointError(f"{source}: {k} contains {bad}; only {want} is supported")
  return AutoencoderKL(**fields, **kwargs)


def _resnet(r: TensorReader, prefix: str, shortcut: bool) -> dict[str, Any]:
  out = {"norm1": r.norm(prefix + ".norm1"), "conv1": {"conv": r.conv(prefix + ".conv1")},
         "norm2": r.norm(prefix + ".norm2"), "conv2": {"conv": r.conv(prefix + ".conv2")}}
  if shortcut:
    out["conv_shortcut"] = {"conv": r.conv(prefix + ".conv_shortcut")}
  return out


def _attention(r: TensorReader, prefix: str) -> dict[str, Any]:
  out = {"group_norm": r.norm(prefix + ".group_norm")}
  for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
    out[ours] = {"dense": r.linear(f"{prefix}.{theirs}")}
  return out


def _mid(r: TensorReader, prefix: str, attention: bool) -> dict[str, Any]:
  out = {"resnets_0": _resnet(r, prefix + ".resnets.0", False), "resnets_1": _resnet(r, prefix + ".resnets.1", False)}
  if attention:
    out["attentions_0"] = _attention(r, prefix + ".attentions.0")
  return out


def vae_params_from_torch(vae: AutoencoderKL, r: TensorReader) -> dict[str, Any]:
  """Maps diffusers AutoencoderKL tensor names onto the t2i param tree (numpy float32 arrays)."""
  chans = tuple(vae.block_out_channels)
  enc: dict[str, Any] = {"conv_in": {"conv": r.conv("encoder.conv_in")}}
  prev = chans[0]
  for i, ch in enumerate(chans):
    for j in range(vae.layers_per_block):
      enc[f"down_blocks_{i}_resnets_{j}"] = _resnet(r, f"encoder.down_blocks.{i}.resnets.{j}", prev != ch)
      prev = ch
    if i < len(chans) - 1:
      enc[f"down_blocks_{i}_downsample"] = {"conv": r.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv")}
  enc["mid_block"] = _mid(r, "encoder.mid_block", vae.mid_block_add_attention)
  enc["conv_norm_out"] = r.norm("encoder.conv_norm_out")
  enc["conv_out"] = {"conv": r.conv("encoder.conv_out")}

  rev = tuple(reversed(chans))
  dec: dict[str, Any] = {"conv_in": {"conv": r.conv("decoder.conv_in")}}
  dec["mid_block"] = _mid(r, "decoder.mid_block", vae.mid_block_add_attention)
  prev = rev[0]
  for i, ch in enumerate(rev):
    for j in range(vae.layers_per_block + 1):
      dec[f"up_blocks_{i}_resnets_{j}"] = _resnet(r, f"decoder.up_blocks.{i}.resnets.{j}", prev != ch)
      prev = ch
    if i < len(rev) - 1:
      dec[f"up_blocks_{i}_upsample"] = {"conv": r.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv")}
  dec["conv_norm_out"] = r.norm("decoder.conv_norm_out")
  dec["conv_out"] = {"conv": r.conv("decoder.conv_out")}

  params: dict[str, Any] = {"encoder": enc, "decoder": dec}
  if vae.use_quant_conv:
    params["quant_conv"] = {"conv": r.conv("quant_conv")}
  if vae.use_post_quant_conv:
    params["post_quant_conv"] = {"conv": r.conv("post_quant_conv")}
  return params


def _check_shapes(module: AutoencoderKL, params: dict[str, Any], source: str) -> None:
  """Compares the converted tree against the module's own parameter shapes."""
  f = module.downsample_factor
  x = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, module.in_channels), jnp.float32)
  want = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  want = {"/".join(str(getattr(k, "key", k)) for k in p): getattr(v, "value", v).shape
          for p, v in jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda v: hasattr(v, "value"))[0]}
  got = {"/".join(str(getattr(k, "key", k)) for k in p): v.shape
         for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if want.keys() != got.keys():
    raise CheckpointError(f"{source}: converted tree differs from the module: missing "
                          f"{sorted(want.keys() - got.keys())[:5]}, extra {sorted(got.keys() - want.keys())[:5]}")
  bad = [(k, got[k], want[k]) for k in want if tuple(got[k]) != tuple(want[k])]
  if bad:
    raise CheckpointError(f"{source}: shape mismatch (name, checkpoint, module) e.g. {bad[:3]}")


def load_diffusers_vae(folder: str | pathlib.Path, dtype: Any = jnp.float32,
                       param_dtype: Any = jnp.float32) -> tuple[AutoencoderKL, dict[str, Any]]:
  """Reads config.json + *.safetensors of a diffusers AutoencoderKL; returns (module, unboxed params)."""
  config = read_config(folder)
  module = vae_from_config(config, f"{pathlib.Path(folder) / 'config.json'}", dtype=dtype, param_dtype=param_dtype)
  reader = TensorReader(read_safetensors(folder), str(folder))
  params = vae_params_from_torch(module, reader)
  reader.check_consumed()
  _check_shapes(module, params, str(folder))
  return module, jax.tree_util.tree_map(lambda v: jnp.asarray(np.asarray(v), param_dtype), params)
