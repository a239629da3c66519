"""diffusers `FluxTransformer2DModel.save_pretrained` folder -> (t2i FluxTransformer, float32 params).

Name mapping (flax path without the `dense` wrapper -> diffusers prefix): `transformer_blocks_{i}` ->
`transformer_blocks.{i}`, `attn/to_out` -> `attn.to_out.0`, `ff/fc1` -> `ff.net.0.proj`, `ff/fc2` ->
`ff.net.2`, RMSNorm `scale` -> `weight`; in single-stream blocks the fused `linear1` is the concatenation
(along outputs) of `attn.to_q`, `attn.to_k`, `attn.to_v`, `proj_mlp`, `linear2` is `proj_out`, and
`norm_q`/`norm_k` are `attn.norm_q`/`attn.norm_k`. Everything else keeps its diffusers name.
"""
from __future__ import annotations

import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from t2i.convert.common import CheckpointError, TensorReader, load_folder, params_from_reader
from t2i.models.mmdit import BLOCK_KINDS, FluxTransformer, dummy_inputs
from t2i.nn.scan import stack_layers

_INDEXED = re.compile(r"^(transformer_blocks|single_transformer_blocks)_(\d+)$")
_RENAME = {("attn", "to_out"): "to_out.0", ("ff", "fc1"): "net.0.proj", ("ff", "fc2"): "net.2",
           ("ff_context", "fc1"): "net.0.proj", ("ff_context", "fc2"): "net.2"}
_SINGLE_RENAME = {"linear2": "proj_out", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}


def _torch_prefix(path: tuple[str, ...]) -> str:
  """Flax module path (without the leaf and the Dense wrapper) -> diffusers module prefix."""
  out = []
  single = False
  for i, name in enumerate(path):
    parent = path[i - 1] if i else None
    if m := _INDEXED.match(name):
      out.append(".".join(m.groups()))
      single = m.group(1) == "single_transformer_blocks"
    elif (parent, name) in _RENAME:
      out.append(_RENAME[(parent, name)])
    elif single and name in _SINGLE_RENAME:
      out.append(_SINGLE_RENAME[name])
    else:
      out.append(name)
  return ".".join(out)


def _take(reader: TensorReader, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
  leaf, mods = path[-1], path[:-1]
  if mods and mods[-1] == "dense":
    mods = mods[:-1]
  prefix = _torch_prefix(mods)
  if mods and mods[-1] == "linear1" and _INDEXED.match(mods[0] or ""):
    block = prefix.rsplit(".", 1)[0]
    parts = [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
    suffix = ".weight" if leaf == "kernel" else ".bias"
    value = np.concatenate([reader.take(p + suffix) for p in parts], axis=0)
    key = f"{block}.{{attn.to_q,attn.to_k,attn.to_v,proj_mlp}}{suffix}"
    if leaf == "kernel":
      value = value.T
  elif leaf == "kernel":
    key = prefix + ".weight"
    value = reader.take(key).T
  elif leaf in ("bias", "scale"):
    key = prefix + (".bias" if leaf == "bias" else ".weight")
    value = reader.take(key)
  else:
    raise CheckpointError(f"no diffusers name for parameter {'/'.join(path)}")
  if tuple(value.shape) != tuple(shape):
    raise CheckpointError(f"tensor {key!r}: shape {value.shape} after layout change, expected {shape} "
                          f"for {'/'.join(path)}")
  return np.ascontiguousarray(value, dtype=np.float32)


def abstract_params(module: FluxTransformer) -> Any:
  """Unboxed ShapeDtypeStruct tree of `module.init` (no computation)."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), **dummy_inputs(module)))
  return nn.meta.unbox(variables)["params"]


def convert_flux_state(module: FluxTransformer, reader: TensorReader) -> dict[str, Any]:
  """Builds the params tree of `module` from diffusers tensors; every tensor must be consumed. A module with
  `scan_layers=True` gets the blocks stacked (`t2i.nn.scan.stack_layers`)."""
  params = params_from_reader(abstract_params(module.clone(scan_layers=False)), reader, _take)
  return stack_layers(params, BLOCK_KINDS) if module.scan_layers else params


def load_diffusers_flux(folder: str | pathlib.Path, **module_overrides) -> tuple[FluxTransformer, dict]:
  """Reads config.json + *.safetensors of a diffusers FluxTransformer2DModel folder.

  Returns (module, params): params is a plain nested dict of float32 numpy arrays with exactly the
  structure of `module.init(...)["params"]` after unboxing. `module_overrides` (e.g. dtype, remat) are
  passed to the module constructor.
  """
  config, reader = load_folder(folder)
  cls = config.get("_class_name", "FluxTransformer2DModel")
  if cls != "FluxTransformer2DModel":
    raise CheckpointError(f"{pathlib.Path(folder) / 'config.json'}: _class_name={cls!r}, expected "
                          "'FluxTransformer2DModel'")
  try:
    module = FluxTransformer.from_config(config, **module_overrides)
    module._check()
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{pathlib.Path(folder) / 'config.json'}: {e}") from e
  return module, convert_flux_state(module, reader)
