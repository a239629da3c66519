"""Latent-space training through the loop with the precompute cache (frozen VAE latents + text embeddings)."""
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_latent_cache_run_and_resume(tmp_path, tmp_path_factory):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, "-m", "launch.main", "--config=experiments/sd_shapes.py:smoke_latent",
         f"--workdir={tmp_path}", "--config.total_steps=5", "--config.ckpt_every=2", "--config.sample_every=5"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  done = json.load(open(tmp_path / "cache" / "done.json"))
  assert done == {"num_batches": 2, "keys": ["cond.encoder_hidden_states", "input_ids", "latent_logvar",
                                             "latent_mean"]}
  z = np.load(tmp_path / "cache" / "000000.npz")
  assert z["latent_mean"].shape == (8, 8, 8, 4) and z["cond.encoder_hidden_states"].shape == (8, 8, 16)
  lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in lines] == [1, 2, 3, 4, 5] and all(np.isfinite(r["loss"]) for r in lines)
  assert os.path.exists(tmp_path / "samples" / "step_000005.png")
  # The cache cycles with period 2: steps 1, 3, 5 see the same batch (different noise, so different losses).
  assert lines[0]["loss"] != lines[2]["loss"]
  # Resuming a finished run from its workdir is a no-op that keeps the cache position.
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and "resumed from" in proc.stderr and "at step 5" in proc.stderr
