"""AOT-compiles the SDXL train step (experiments/sdxl.py) for a fake fsdp=N CPU mesh and prints the parameter
count, compile time and per-device memory from `compiled.memory_analysis()`. Nothing is allocated.

  python benchmarks/compile_sdxl.py [--devices=8] [--variant=default|small] [--batch=8] [--fast_compile] [--cache]
"""
from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--variant", default="default")
  ap.add_argument("--batch", type=int, default=None, help="global batch (default: one per device)")
  ap.add_argument("--fast_compile", action="store_true", help="XLA CPU backend at -O0 (faster compile)")
  ap.add_argument("--cache", action="store_true", help="step on cached latents + text embeddings (no VAE/CLIP)")
  args = ap.parse_args()
  flags = f"--xla_force_host_platform_device_count={args.devices}"
  if args.fast_compile:
    flags += " --xla_backend_optimization_level=0"
  os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from experiments import sdxl
  from t2i.train import aot
  cfg = sdxl.get_config(None if args.variant == "default" else args.variant)
  cfg.batch_size = args.batch or args.devices
  cfg.cache.enabled = args.cache
  report = aot.compile_report(cfg)
  report.pop("compiled")
  for k, v in report.items():
    print(f"{k}: {v}")


if __name__ == "__main__":
  main()
