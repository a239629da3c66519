"""Reading reference checkpoints (config.json + *.safetensors folders) and building param trees."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import numpy as np


class CheckpointError(ValueError):
  """A reference checkpoint folder is missing a file or key, or has an unexpected shape."""


def read_config(folder: str | pathlib.Path) -> dict[str, Any]:
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: not found (expected a save_pretrained folder)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON: {e}") from e


def read_safetensors(folder: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of every *.safetensors file in `folder`, as float32/int numpy arrays. Never reads pickles."""
  from safetensors.numpy import load_file

  folder = pathlib.Path(folder)
  files = sorted(folder.glob("*.safetensors"))
  if not files:
    found = ", ".join(p.name for p in folder.iterdir()) if folder.is_dir() else "folder missing"
    raise CheckpointError(f"{folder}: no *.safetensors file (found: {found}); pickled .bin weights are "
                          "not loaded, re-save with safe_serialization=True")
  tensors: dict[str, np.ndarray] = {}
  for f in files:
    try:
      part = load_file(str(f))
    except Exception as e:  # safetensors raises several error types
      raise CheckpointError(f"{f}: cannot read safetensors: {e}") from e
    for k, v in part.items():
      tensors[k] = v.astype(np.float32) if v.dtype.kind == "f" or v.dtype == np.dtype("V2") else v
  return tensors


class TensorReader:
  """Pops tensors by name with clear errors; `check_consumed()` reports keys that were never used."""

  def __init__(self, tensors: dict[str, np.ndarray], source: str):
    self._t = dict(tensors)
    self._source = source

  def has(self, key: str) -> bool:
    return key in self._t

  def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self._t:
      raise CheckpointError(f"{self._source}: missing tensor {key!r}")
    v = self._t.pop(key)
    if shape is not None and tuple(v.shape) != tuple(shape):
      raise CheckpointError(f"{self._source}: tensor {key!r} has shape {v.shape}, expected {shape}")
    return v

  def linear(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """torch Linear [out, in] -> flax Dense {kernel [in, out], bias}."""
    out = {"kernel": self.take(prefix + ".weight").T}
    if bias:
      out["bias"] = self.take(prefix + ".bias")
    return out

  def conv(self, prefix: str, bias: bool = True) -> dict[str, np.ndarray]:
    """torch Conv2d [out, in, kh, kw] -> flax Conv {kernel [kh, kw, in, out], bias}."""
    out = {"kernel": self.take(prefix + ".weight").transpose(2, 3, 1, 0)}
    if bias:
      out["bias"] = self.take(prefix + ".bias")
    return out

  def norm(self, prefix: str) -> dict[str, np.ndarray]:
    """torch GroupNorm/LayerNorm {weight, bias} -> t2i norm {scale, bias}."""
    return {"scale": self.take(prefix + ".weight"), "bias": self.take(prefix + ".bias")}

  def remaining(self) -> list[str]:
    return sorted(self._t)

  def check_consumed(self, ignore: tuple[str, ...] = ()) -> None:
    left = [k for k in self._t if not any(k.startswith(p) for p in ignore)]
    if left:
      raise CheckpointError(f"{self._source}: {len(left)} unexpected tensors, e.g. {left[:5]}")


def load_folder(folder: str | pathlib.Path) -> tuple[dict[str, Any], TensorReader]:
  return read_config(folder), TensorReader(read_safetensors(folder), str(folder))


def check_param_tree(abstract: Any, params: dict[str, Any], source: str) -> None:
  """Raises CheckpointError unless `params` has exactly the (name, shape) leaves of `abstract` (boxed or not)."""
  import jax

  is_box = lambda v: hasattr(v, "value") and hasattr(v, "names")
  flat = lambda t: {jax.tree_util.keystr(k): tuple(getattr(v, "value", v).shape)
                    for k, v in jax.tree_util.tree_flatten_with_path(t, is_leaf=is_box)[0]}
  want, got = flat(abstract), flat(params)
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:5]
    raise CheckpointError(f"{source}: converted params differ from the module (name, shape), e.g. {diff}")


def params_from_reader(abstract: Any, reader: TensorReader,
                       take: Callable[[TensorReader, tuple[str, ...], tuple[int, ...]], np.ndarray]) -> dict:
  """Fills every leaf path of the (unboxed) `abstract` params tree with `take(reader, path, shape)`, then checks
  that the reader has no tensor left over."""
  import flax

  flat = flax.traverse_util.flatten_dict(abstract)
  params = {path: take(reader, path, leaf.shape) for path, leaf in flat.items()}
  reader.check_consumed()
  return flax.traverse_util.unflatten_dict(params)
