"""Entry point: parse the experiment config, initialise multi-process JAX if needed, train.

  python -m launch.main --config=experiments/sd_shapes.py[:variant] --workdir=DIR [--config.key=value ...]

`--config.*` overrides any existing field (an unknown key is an error naming it). Re-running the same command
resumes from the last checkpoint in DIR.
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. experiments/sd_shapes.py",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples (resumes if present).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", -1, "XLA CPU devices for a CPU-only run: -1 = one per available core (largest count that divides "
    "the batch and fits the mesh), 1 = XLA's single device. Ignored when XLA_FLAGS already sets a count; no effect "
    "on GPU/TPU. See t2i/parallel/host.py.")
flags.mark_flags_as_required(["config", "workdir"])

# Any of these means a multi-process launch whose coordinator jax.distributed.initialize() can find.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                      "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")


def multi_process_env() -> bool:
  """True when the environment describes more than one process (TPU pod slice, SLURM, MPI, explicit)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a bad `--config.*` override exits with a message naming the key and the flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"launch.main: error: {e}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:
    text = str(e).replace("\\'", "'")
    m = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    key = m.group(0) if m else text
    bad = [a for a in argv[1:] if a.startswith("--config.") and key in re.split(r"[.=]", a.split("=", 1)[0])]
    hint = re.search(r"Did you mean.*", text)
    print(f"launch.main: error: unknown config key {key!r} in {' '.join(bad) or 'a --config.* override'}"
          + (f" ({hint.group(0).rstrip(chr(39) + chr(34))})" if hint else ""), file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from t2i.parallel import host
  if multi_process_env():
    import jax
    jax.distributed.initialize()
  elif _CPU_DEVICES.value < 0:
    host.cpu_devices_for_config(_CONFIG.value)
  else:
    host.set_cpu_devices(_CPU_DEVICES.value)
  import jax
  logging.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  from t2i.train.loop import train
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
