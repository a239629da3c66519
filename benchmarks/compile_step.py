"""AOT-compiles an experiment's train step for a fake CPU mesh and prints parameter counts, compile time and the
per-device memory from `compiled.memory_analysis()`. Nothing is allocated and no weights or data are read.

  python benchmarks/compile_step.py --config=experiments/sdxl.py [--mesh=fsdp=8] [--batch=8] [--fast_compile]
      [--cache]
  python benchmarks/compile_step.py --config=experiments/flux1_dev.py --mesh=fsdp=4,tensor=2 --cache
  python benchmarks/compile_step.py --config=experiments/flux1_dev.py --optimizer=adafactor --nocompile

--mesh gives the mesh axes (data, fsdp, tensor; unnamed axes are 1); the fake device count is their product.
--config may carry a variant (`experiments/sdxl.py:small`). --cache compiles the step on cached VAE latents and
text embeddings (no frozen encoders in the step), as `--config.cache.enabled=True` trains. --optimizer replaces
`config.optimizer.name` (adamw, lion, adafactor, ...); --nocompile reports only the parameter counts and each
device's bytes of parameters, optimiser state and EMA (seconds instead of minutes).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys


def parse_mesh(text: str) -> dict[str, int]:
  mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  for part in filter(None, text.split(",")):
    name, _, size = part.partition("=")
    if name not in mesh or not size.isdigit():
      raise SystemExit(f"--mesh={text!r}: expected e.g. fsdp=8 or fsdp=4,tensor=2 (axes data, fsdp, tensor)")
    mesh[name] = int(size)
  return mesh


def load_config(spec: str):
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"--config={spec}: file {path} not found")
  mod_spec = importlib.util.spec_from_file_location("experiment_config", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  return mod.get_config(variant or None)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="experiments/sdxl.py")
  ap.add_argument("--mesh", default="fsdp=8")
  ap.add_argument("--batch", type=int, default=None, help="global batch (default: one per device)")
  ap.add_argument("--fast_compile", action="store_true", help="XLA CPU backend at -O0 (faster compile)")
  ap.add_argument("--cache", action="store_true", help="step on cached latents + text embeddings")
  ap.add_argument("--optimizer", default=None, help="config.optimizer.name (default: the experiment's)")
  ap.add_argument("--nocompile", action="store_true", help="state sizes only, no compile")
  args = ap.parse_args()
  mesh = parse_mesh(args.mesh)
  devices = math.prod(mesh.values())
  flags = f"--xla_force_host_platform_device_count={devices}"
  if args.fast_compile:
    flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from t2i.train import aot
  cfg = load_config(args.config)
  cfg.mesh = mesh
  cfg.batch_size = args.batch or devices
  cfg.cache.enabled = args.cache
  if args.optimizer:
    cfg.optimizer.name = args.optimizer
  report = aot.compile_report(cfg, do_compile=not args.nocompile)
  report.pop("compiled", None)
  for k, v in report.items():
    print(f"{k}: {v}", flush=True)


if __name__ == "__main__":
  main()
