"""Repeated blocks in a `jax.lax.scan` (`scan_layers=True` on a model): params stacked on a leading "layers" axis.

A scanned run of N blocks compiles one block body, and under FSDP keeps one block's gathered weights and full-size
gradients live at a time instead of all N (docs/results.md: flux1_dev temp per device 142.3 -> 11.1 GiB). The
stack of blocks named `<kind>_0 ... <kind>_{N-1}` in the per-layer layout (the one diffusers' names map onto) is
the subtree `<kind>_stack`; `stack_layers` / `unstack_layers` convert between the two layouts.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np

STACK_SUFFIX = "_stack"


def is_layer_stacked(path: Sequence[Any]) -> bool:
  """Whether a param at `path` (keys or jax tree-path entries) lives in a layer stack (leading "layers" axis)."""
  return any(str(getattr(k, "key", k)).endswith(STACK_SUFFIX) for k in path)


@functools.lru_cache(maxsize=None)
def _as_step(block: type[nn.Module]) -> type[nn.Module]:
  """`block` as a scan step: the carry (a tuple is spread) fills its leading arguments, its output is the new carry."""

  class Step(block):  # type: ignore[valid-type, misc]
    def __call__(self, carry, *shared):  # type: ignore[override]
      return super().__call__(*(carry if isinstance(carry, tuple) else (carry,)), *shared), None

  Step.__name__ = Step.__qualname__ = block.__name__ + "Step"
  return Step


def scanned(block: type[nn.Module], length: int, remat: bool, num_broadcast: int) -> type[nn.Module]:
  """`length` copies of `block` applied by `nn.scan`, called as (carry, *shared) -> (carry, None): the carry is the
  block's leading argument(s) and its output; the last `num_broadcast` arguments are shared by every layer. Params
  are stacked on axis 0, named "layers" for the sharding rules."""
  step = _as_step(block)
  step = nn.remat(step, prevent_cse=False) if remat else step  # inside scan, CSE cannot undo the remat
  return nn.scan(step, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast,) * num_broadcast, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})


def stack_layers(params: dict[str, Any], kinds: Sequence[str]) -> dict[str, Any]:
  """Per-layer params (`<kind>_{i}` siblings, at any depth) -> the scanned layout (`<kind>_stack`, leading N)."""
  out = {}
  for key, value in params.items():
    out[key] = stack_layers(value, kinds) if isinstance(value, dict) else value
  for kind in kinds:
    keys = sorted((k for k in out if re.fullmatch(rf"{re.escape(kind)}_\d+", k)),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    if keys:
      if [int(k.rsplit("_", 1)[1]) for k in keys] != list(range(len(keys))):
        raise ValueError(f"stack_layers: {kind} blocks {keys} are not numbered 0..{len(keys) - 1}")
      out[kind + STACK_SUFFIX] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                              *[out.pop(k) for k in keys])
  return out


def unstack_layers(params: dict[str, Any]) -> dict[str, Any]:
  """Inverse of `stack_layers`: every `<kind>_stack` subtree back into `<kind>_{i}` blocks."""
  out = {}
  for key, value in params.items():
    if key.endswith(STACK_SUFFIX) and isinstance(value, dict):
      kind = key[:-len(STACK_SUFFIX)]
      n = jax.tree.leaves(value)[0].shape[0]
      out.update({f"{kind}_{i}": jax.tree.map(lambda x: x[i], value) for i in range(n)})
    else:
      out[key] = unstack_layers(value) if isinstance(value, dict) else value
  return out
