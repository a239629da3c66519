"""diffusers `UNet2DConditionModel.save_pretrained` folder -> (t2i U-Net module, float32 params)."""
from __future__ import annotations

import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from t2i.convert.common import CheckpointError, TensorReader, load_folder, params_from_reader
from t2i.models.unet import BLOCK_KINDS, UNet2DConditionModel, dummy_inputs
from t2i.nn.scan import stack_layers

_BLOCK = re.compile(r"^(down_blocks|up_blocks)_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)$")
_MID = re.compile(r"^mid_block_(resnets|attentions)_(\d+)$")
_INDEXED = re.compile(r"^(transformer_blocks)_(\d+)$")


def _torch_prefix(path: tuple[str, ...]) -> str:
  """Flax module path (without the leaf and the Dense/Conv wrapper) -> diffusers module prefix."""
  out = []
  for i, name in enumerate(path):
    parent = path[i - 1] if i else None
    if m := _BLOCK.match(name):
      out.append(".".join(m.groups()))
    elif m := _MID.match(name):
      out.append("mid_block." + ".".join(m.groups()))
    elif m := _INDEXED.match(name):
      out.append(".".join(m.groups()))
    elif name == "to_out":
      out.append("to_out.0")
    elif parent == "ff" and name == "proj_in":
      out.append("net.0.proj")
    elif parent == "ff" and name == "proj_out":
      out.append("net.2")
    else:
      out.append(name)
  return ".".join(out)


def _take(reader: TensorReader, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
  leaf = path[-1]
  mods = path[:-1]
  wrapper = mods[-1] if mods and mods[-1] in ("dense", "conv") else None
  prefix = _torch_prefix(mods[:-1] if wrapper else mods)
  if leaf == "scale":
    key, value = prefix + ".weight", None
  elif leaf == "bias":
    key, value = prefix + ".bias", None
  elif leaf == "kernel":
    key = prefix + ".weight"
    value = reader.take(key)
    value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  else:
    raise CheckpointError(f"no diffusers name for parameter {'/'.join(path)}")
  if value is None:
    value = reader.take(key)
  if tuple(value.shape) != tuple(shape):
    raise CheckpointError(f"tensor {key!r}: shape {value.shape} after layout change, expected {shape} "
                          f"for {'/'.join(path)}")
  return np.ascontiguousarray(value, dtype=np.float32)


def abstract_params(module: UNet2DConditionModel) -> Any:
  """Unboxed ShapeDtypeStruct tree of `module.init` (no computation)."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(module)))
  return nn.meta.unbox(variables)["params"]


def convert_unet_state(module: UNet2DConditionModel, reader: TensorReader) -> dict[str, Any]:
  """Builds the params tree of `module` from diffusers tensors; every tensor must be consumed. A module with
  `scan_layers=True` gets its transformer blocks stacked (`t2i.nn.scan.stack_layers`)."""
  params = params_from_reader(abstract_params(module.clone(scan_layers=False)), reader, _take)
  return stack_layers(params, BLOCK_KINDS) if module.scan_layers else params


def load_diffusers_unet(folder: str | pathlib.Path, **module_overrides) -> tuple[UNet2DConditionModel, dict]:
  """Reads config.json + *.safetensors of a diffusers U-Net folder.

  Returns (module, params): params is a plain nested dict of float32 numpy arrays with exactly the
  structure of `module.init(...)["params"]` after unboxing. `module_overrides` (e.g. dtype, remat)
  are passed to the module constructor.
  """
  config, reader = load_folder(folder)
  try:
    module = UNet2DConditionModel.from_config(config, **module_overrides)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{pathlib.Path(folder) / 'config.json'}: {e}") from e
  return module, convert_unet_state(module, reader)
