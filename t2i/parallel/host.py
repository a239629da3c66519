"""One XLA CPU device per CPU core, so that a CPU-only run uses every core through the mesh's data axis.

XLA:CPU parallelises large ops across cores but runs the many small ops of a small model (and the loop bodies
of the blocked attention) mostly on one thread: the U-Net benchmark step used 1.1 of 2 cores. Data parallelism
over one XLA device per core runs the per-device programs side by side instead (measured, 2 cores, U-Net
benchmark gradient: 1 device 5.0-5.6 s, 2 devices 3.4-3.9 s; `benchmarks/train_step.py --devices`).

This only sets `--xla_force_host_platform_device_count`, which XLA reads when the CPU backend starts, so it must
run before the first `jax.devices()`. It changes nothing on a GPU/TPU host (the CPU backend is not the default).
"""
from __future__ import annotations

import math
import os
import re

_FLAG = "--xla_force_host_platform_device_count"


def available_cores() -> int:
  """CPU cores this process may run on (its affinity mask, e.g. under `taskset`), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def devices_for(cores: int, batch_size: int | None = None, fixed: int = 1) -> int:
  """Largest n <= cores that `fixed` (the product of the mesh axes that are not -1) divides and that divides
  `batch_size` (when given), so that the mesh's -1 axis can fill n devices and shard the batch; at least 1."""
  for n in range(max(1, cores), 0, -1):
    if n % fixed == 0 and (not batch_size or batch_size % n == 0):
      return n
  return 1


def set_cpu_devices(n: int) -> int:
  """Asks XLA for n CPU devices unless XLA_FLAGS already names a count (the caller's choice wins).

  Returns the device count XLA will use. Must run before the JAX backends initialise."""
  flags = os.environ.get("XLA_FLAGS", "")
  m = re.search(_FLAG + r"=(\d+)", flags)
  if m:
    return int(m.group(1))
  if n > 1:
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={n}".strip()
  return max(1, n)


def cpu_devices_for_config(config, cores: int | None = None) -> int:
  """`set_cpu_devices` with a count that fits `config` (its batch_size and mesh): only when one mesh axis is -1
  (a fully fixed mesh keeps its own device count), otherwise leaves XLA's default. Returns the count."""
  sizes = [int(config.mesh.get(a, 1)) for a in ("data", "fsdp", "tensor")] if "mesh" in config else [-1]
  if -1 not in sizes:
    return set_cpu_devices(1)
  fixed = math.prod(s for s in sizes if s != -1)
  batch = int(config.get("batch_size", 0) or 0)
  return set_cpu_devices(devices_for(cores or available_cores(), batch, fixed))
