"""Device mesh over the named axes (data, fsdp, tensor)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves the mesh shape from `cfg` (mapping or ConfigDict with data/fsdp/tensor; one may be -1)."""
  get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
  unknown = set(dict(cfg).keys()) - set(MESH_AXES) if hasattr(cfg, "keys") else set()
  if unknown:
    raise ValueError(f"config.mesh: unknown axes {sorted(unknown)}; expected {MESH_AXES}")
  sizes = [int(get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                       f"({num_devices} is not divisible by {known})")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
                     f"{num_devices} are available; set one axis to -1 to fill the rest")
  return tuple(sizes)


def make_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a `Mesh` with axes (data, fsdp, tensor) from `cfg` over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  try:
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Topology-unaware fallback (e.g. odd shapes on fake CPU devices).
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)
