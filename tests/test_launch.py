"""launch.main end to end (subprocesses): unknown config keys, SIGKILL + auto-resume, TensorBoard, held-out loss,
NaN guard."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "experiments/sd_shapes.py:smoke"
# 16 steps, checkpoint every 2, a validation grid every 8. A toy step takes tens of ms: the killed runs below
# stop by step 6, so there is ample margin before the end.
N = 16
ARGS = [f"--config.total_steps={N}", "--config.ckpt_every=2", "--config.sample_every=8"]


def run_env(cache_dir) -> dict:
  # Fast compiles (LLVM -O0) and a compilation cache shared by the runs of this session: the runs below compile
  # the same programs, so only the first pays for it.
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
              XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def launch(workdir, cache_dir, *extra, **kw) -> subprocess.Popen:
  cmd = [sys.executable, "-m", "launch.main", f"--config={SMOKE}", f"--workdir={workdir}", *ARGS, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=run_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kw)


def finish(proc, timeout=300) -> tuple[int, str]:
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def read_metrics(workdir) -> dict[int, dict]:
  """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):
        r = json.loads(line)
        out[r["step"]] = r
  return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.getbasetemp() / "jax_cache"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir):
  # With the held-out loss every 8 steps; the resume test's runs go without it, so equal losses there also show
  # that evaluating does not touch the training state or data order.
  workdir = tmp_path_factory.mktemp("full")
  rc, err = finish(launch(workdir, cache_dir, "--config.eval.every=8", "--config.eval.batches=2"))
  assert rc == 0, err[-3000:]
  return workdir


def test_unknown_config_key_fails_naming_it(tmp_path):
  for flag, key in [("--config.nosuchkey=1", "nosuchkey"), ("--config.optimizer.lrr=0.1", "lrr")]:
    proc = subprocess.run([sys.executable, "-m", "launch.main", f"--config={SMOKE}", f"--workdir={tmp_path}", flag],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert f"unknown config key '{key}' in {flag}" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_resume_after_sigkill_matches_uninterrupted(full_run, tmp_path, cache_dir):
  ref = read_metrics(full_run)
  assert sorted(ref) == list(range(1, N + 1))
  kill_after = random.Random(0).randint(3, 6)
  proc = launch(tmp_path, cache_dir)
  deadline = time.time() + 300
  while max(read_metrics(tmp_path), default=0) < kill_after:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  seen = max(read_metrics(tmp_path))
  assert seen < N, "the run finished before it was killed"
  ckpts = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  rc, err = finish(launch(tmp_path, cache_dir))
  assert rc == 0, err[-3000:]
  assert "resumed from" in err and f"at step {ckpts[-1]}" in err, err[-3000:]
  got = read_metrics(tmp_path)
  assert sorted(got) == list(range(1, N + 1))
  for step in range(1, N + 1):
    assert got[step]["loss"] == ref[step]["loss"], (step, kill_after, ckpts)
    assert got[step]["grad_norm"] == ref[step]["grad_norm"]
  # The resumed run re-did exactly the steps after its last complete checkpoint.
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, seen + 1)) + list(range(ckpts[-1] + 1, N + 1))


def test_tensorboard_events(full_run):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(full_run / "tb"), size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  tags = acc.Tags()
  for tag in ("loss", "lr", "grad_norm", "images_per_sec", "step_time"):
    assert tag in tags["scalars"], tags
    events = acc.Scalars(tag)
    assert [e.step for e in events] == list(range(1, N + 1))
    assert all(np.isfinite(e.value) for e in events)
  losses = read_metrics(full_run)
  assert [e.value for e in acc.Scalars("loss")] == pytest.approx([losses[s]["loss"] for s in range(1, N + 1)])
  for tag in ("eval_loss", "eval_loss_ema"):  # the held-out loss (config.eval.every=8), also in metrics.jsonl
    assert [e.step for e in acc.Scalars(tag)] == [8, 16], tag
    assert [e.value for e in acc.Scalars(tag)] == pytest.approx([losses[s][tag] for s in (8, 16)])
    assert all(np.isfinite(e.value) and e.value > 0 for e in acc.Scalars(tag))
  assert "eval_loss" not in losses[7]
  images = acc.Images("samples")
  assert [im.step for im in images] == [8, 16]
  assert images[0].width > 0 and images[0].height > 0
  assert sorted(os.listdir(full_run / "samples")) == ["step_000008.png", "step_000016.png"]
  assert json.load(open(full_run / "config.json"))["total_steps"] == N


def test_nan_guard_stops_naming_step_and_metric(tmp_path, cache_dir):
  rc, err = finish(launch(tmp_path, cache_dir, "--config.data.nan_batch=2"))
  assert rc != 0
  assert "NonFiniteError: step 3: metric" in err and "is not finite" in err, err[-3000:]
  assert "Last good checkpoint: step 2" in err
  assert sorted(read_metrics(tmp_path)) == [1, 2]     # the bad step is not recorded


def test_sigterm_saves_and_stops(tmp_path, cache_dir):
  proc = launch(tmp_path, cache_dir, "--config.ckpt_every=100")
  deadline = time.time() + 300
  while max(read_metrics(tmp_path), default=0) < 3:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline
    time.sleep(0.005)
  proc.send_signal(signal.SIGTERM)
  rc, err = finish(proc)
  assert rc == 0, err[-3000:]
  last = max(read_metrics(tmp_path))
  assert last < N and "saved a checkpoint at step" in err
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [last]


@pytest.mark.parametrize("flag,want", [(None, "cores"), ("--cpu_devices=1", 1)])
def test_cpu_run_uses_one_device_per_core(tmp_path, cache_dir, flag, want):
  # Without a device count in XLA_FLAGS, a CPU run gets one XLA device per available core that divides the batch
  # (t2i/parallel/host.py), and the mesh's data axis fills them.
  from experiments import sd_shapes
  from t2i.parallel import host
  if want == "cores":
    want = host.devices_for(host.available_cores(), sd_shapes.get_config("smoke").batch_size)
  env = dict(run_env(cache_dir), XLA_FLAGS="--xla_backend_optimization_level=0")
  cmd = [sys.executable, "-m", "launch.main", f"--config={SMOKE}", f"--workdir={tmp_path}",
         "--config.total_steps=2", "--config.ckpt_every=2", "--config.sample_every=0"] + ([flag] if flag else [])
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"{want} local / {want} global devices" in proc.stderr
  assert f"'data': {want}," in proc.stderr
