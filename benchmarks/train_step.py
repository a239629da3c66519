r"""U-Net train step: t2i (JAX, jit) vs diffusers (PyTorch), same config and batch, one run.

  python benchmarks/train_step.py --channels=64,128,256 --size=32 --batch=8 --steps=10 [--devices=1] [--dtype=bfloat16]

Step = forward + backward + AdamW update, loss = MSE(prediction, eps) on a fixed noised batch.
The two frameworks take turns, `--block` timed steps each (default 4; 1 = strictly interleaved), each step after
`--pause` seconds idle, so that background load hits both alike while each still runs near its steady state:
on a quiet 2-core machine (session 13) strict interleaving slowed both (ours 1,667-2,451 ms vs 1,410-1,674 in
blocks of 4, torch 2,234-2,960 vs 2,170-2,393), as switching frameworks costs each its caches and memory.
Medians are reported. Model FLOPs per step come from XLA's cost analysis
(`jax.jit(step).lower(...).cost_analysis()["flops"]`) of the same step traced with plain einsum
attention (`reference_attention`): our blocked attention runs in `lax.map`/`lax.scan` loops, whose
bodies XLA's cost analysis counts once, and recomputes P in the backward (not model FLOPs).
MFU = (model FLOPs / our step time) / measured matmul peak of the compute dtype (a timed 2048^3 `jnp.dot`).
`--dtype=bfloat16` runs both in mixed precision (float32 weights and loss): ours with the module's `dtype`, PyTorch
under `torch.autocast("cpu", torch.bfloat16)`; the script also prints both frameworks' bfloat16 matmul peak, since
on CPUs with AMX PyTorch's oneDNN uses it and XLA:CPU (jaxlib wheels) does not.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `t2i` importable from the repo root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import alternating, timed  # noqa: E402

_CHANNELS = flags.DEFINE_list("channels", ["64", "128", "256"], "block_out_channels")
_LAYERS = flags.DEFINE_integer("layers_per_block", 2, "layers_per_block")
_HEADS = flags.DEFINE_integer("heads", 8, "attention heads per block (diffusers attention_head_dim)")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 0, "if > 0: heads per block = channels / head_dim (overrides --heads)")
_SIZE = flags.DEFINE_integer("size", 32, "latent height = width")
_BATCH = flags.DEFINE_integer("batch", 8, "batch size")
_TOKENS = flags.DEFINE_integer("tokens", 77, "text tokens")
_CTX = flags.DEFINE_integer("cross_attention_dim", 256, "text embedding width")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps per framework (after one warm-up step)")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads")
_TORCH = flags.DEFINE_bool("torch", True, "also time diffusers/PyTorch")
_REMAT = flags.DEFINE_bool("remat", False, "remat resnet/transformer blocks (ours)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype of both models")
_PAUSE = flags.DEFINE_float("pause", 0.5, "seconds idle before each timed step, so that the other framework's "
                            "spin-waiting worker threads (OpenMP, Eigen) have gone to sleep")
_BLOCK = flags.DEFINE_integer("block", 4, "timed steps of one framework before switching to the other: 1 = "
                            "interleaved (background load hits both alike), larger = closer to each framework's "
                            "steady state in a training run")
_DEVICES = flags.DEFINE_integer("devices", -1, "XLA CPU devices for ours, batch sharded over them (data "
                                "parallel): -1 = one per available core that divides the batch, as launch.main "
                                "runs; 1 = a single device (t2i/parallel/host.py)")


def unet_config() -> dict:
  ch = tuple(int(c) for c in _CHANNELS.value)
  n = len(ch)
  heads = tuple(c // _HEAD_DIM.value for c in ch) if _HEAD_DIM.value > 0 else _HEADS.value
  return dict(
      sample_size=_SIZE.value, in_channels=4, out_channels=4, block_out_channels=ch,
      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
      layers_per_block=_LAYERS.value, cross_attention_dim=_CTX.value, attention_head_dim=heads,
      norm_num_groups=32)


def matmul_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = min(timed(lambda: f(a).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best


def torch_matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
  import torch
  a = torch.randn(n, n, dtype=getattr(torch, dtype))
  a @ a
  return 2 * n ** 3 / min(timed(lambda: a @ a) for _ in range(reps))


def request_cpu_devices(requested: int, batch: int) -> int:
  """Sets the XLA CPU device count before JAX starts (-1: one per available core that divides `batch`, as
  launch.main does; t2i/parallel/host.py) and returns it."""
  from t2i.parallel import host
  return host.set_cpu_devices(host.devices_for(host.available_cores(), batch) if requested < 0 else requested)


# Logical axis rules of the data-parallel benchmark steps, traced as the train step is
# (`t2i.parallel.tracing_context`), so attention runs per device.
DATA_PARALLEL_RULES = (("batch", "data"),)


def data_parallel_shardings(n_dev: int) -> tuple:
  """(replicated, split along dim 0) NamedShardings over the first `n_dev` devices on one "data" axis."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
  return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))


def main(argv):
  del argv
  n_dev = request_cpu_devices(_DEVICES.value, _BATCH.value)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from t2i import parallel
  from t2i.convert.unet import abstract_params
  from t2i.models.unet import UNet2DConditionModel

  cfg = unet_config()
  b, s = _BATCH.value, _SIZE.value
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((b, s, s, 4)).astype(np.float32)
  eps = rng.standard_normal((b, s, s, 4)).astype(np.float32)
  t = rng.integers(0, 1000, (b,)).astype(np.float32)
  abar = np.cos(t / 1000 * np.pi / 2)[:, None, None, None] ** 2
  noisy = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps).astype(np.float32)
  ctx = rng.standard_normal((b, _TOKENS.value, _CTX.value)).astype(np.float32)

  # ---- ours
  module = UNet2DConditionModel(**cfg, remat=_REMAT.value, dtype=jnp.dtype(_DTYPE.value))
  params = jax.tree.map(lambda a: jnp.asarray(0.02 * rng.standard_normal(a.shape), jnp.float32),
                        abstract_params(module))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  tx = optax.adamw(1e-4, weight_decay=1e-2)
  opt_state = tx.init(params)

  def loss_fn(p, noisy, t, ctx, eps):
    pred = module.apply({"params": p}, noisy, t, ctx).astype(jnp.float32)
    return jnp.mean(jnp.square(pred - eps))

  def step(p, o, noisy, t, ctx, eps):
    loss, g = jax.value_and_grad(loss_fn)(p, noisy, t, ctx, eps)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, loss

  batch = tuple(jnp.asarray(a) for a in (noisy, t, ctx, eps))
  if n_dev > 1:  # data parallel: params and optimiser state replicated, batch split over the devices
    replicated, split = data_parallel_shardings(n_dev)
    params, opt_state = jax.device_put((params, opt_state), replicated)
    batch = tuple(jax.device_put(a, split) for a in batch)
  t0 = time.perf_counter()
  in_mesh = lambda: parallel.tracing_context(data_parallel_shardings(n_dev)[0].mesh, DATA_PARALLEL_RULES)
  with in_mesh():
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, *batch).compile()
  compile_s = time.perf_counter() - t0
  import t2i.models.unet as unet_lib
  from t2i.nn.attention import reference_attention
  fast_attention, unet_lib.dot_product_attention = unet_lib.dot_product_attention, reference_attention
  try:
    whole = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # unsharded: FLOPs of the whole step
    # A fresh function object: `jax.jit(step)` could reuse the trace made above with the blocked attention.
    cost = jax.jit(lambda *a: step(*a)).lower(*jax.tree.map(whole, (params, opt_state, *batch))).cost_analysis()
  finally:
    unet_lib.dot_product_attention = fast_attention
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  fwd = jax.jit(lambda p, *a: module.apply({"params": p}, *a[:3]))

  state = {"p": params, "o": opt_state}

  def ours_step():
    state["p"], state["o"], loss = compiled(state["p"], state["o"], *batch)
    loss.block_until_ready()

  # ---- torch
  torch_step = None
  if _TORCH.value:
    import torch
    import diffusers
    torch.set_num_threads(_THREADS.value)
    torch.manual_seed(0)
    tmodel = diffusers.UNet2DConditionModel(**{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in cfg.items()}).train()
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4, weight_decay=1e-2)
    to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    tb = (to_nchw(noisy), torch.from_numpy(t), torch.from_numpy(ctx), to_nchw(eps))
    t_params = sum(p.numel() for p in tmodel.parameters())
    assert t_params == n_params, (t_params, n_params)

    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16")

    def torch_step():
      topt.zero_grad(set_to_none=True)
      with autocast():
        pred = tmodel(tb[0], tb[1], tb[2]).sample
      loss = torch.nn.functional.mse_loss(pred.float(), tb[3])
      loss.backward()
      topt.step()

  ours_step()
  if torch_step:
    torch_step()
  times = alternating({"ours": ours_step, **({"torch": torch_step} if torch_step else {})}, _STEPS.value,
                      _BLOCK.value, _PAUSE.value)
  ours_t, torch_t = times["ours"], times.get("torch", [])

  # Forward-only timings (where does the time go?).
  with in_mesh():
    fwd(state["p"], *batch[:3]).block_until_ready()
  ours_fwd = statistics.median(timed(lambda: fwd(state["p"], *batch[:3]).block_until_ready())
                               for _ in range(3))
  torch_fwd = None
  if torch_step:
    with torch.no_grad(), autocast():
      tmodel(tb[0], tb[1], tb[2])
      torch_fwd = statistics.median(timed(lambda: tmodel(tb[0], tb[1], tb[2])) for _ in range(3))

  peak = matmul_peak(_DTYPE.value)
  ours_ms = 1e3 * statistics.median(ours_t)
  print(f"config: {cfg}")
  print(f"batch {b}, {s}x{s}x4 latents, {_TOKENS.value} tokens x {_CTX.value}; params {n_params / 1e6:.2f} M; "
        f"ours on {n_dev} {jax.devices()[0].platform} device(s), batch split over them; "
        f"torch threads {_THREADS.value}; compute {_DTYPE.value}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print(f"ours  compile {compile_s:.1f} s")
  print(f"ours  train step {ours_ms:8.1f} ms (median of {len(ours_t)}; min {1e3 * min(ours_t):.1f}), "
        f"forward {1e3 * ours_fwd:.1f} ms")
  if torch_step:
    torch_ms = 1e3 * statistics.median(torch_t)
    print(f"torch train step {torch_ms:8.1f} ms (median of {len(torch_t)}; min {1e3 * min(torch_t):.1f}), "
          f"forward {1e3 * torch_fwd:.1f} ms")
    print(f"ratio torch/ours {torch_ms / ours_ms:.2f}x")
  print(f"model FLOPs/step (XLA cost_analysis, step with plain attention) {flops / 1e9:.1f} GFLOP")
  print(f"{_DTYPE.value} matmul peak (2048^3 jnp.dot) {peak / 1e9:.1f} GFLOP/s")
  if torch_step:
    print(f"matmul peaks (2048^3; torch on {_THREADS.value} threads): " + ", ".join(
        f"{d} jax {(peak if d == _DTYPE.value else matmul_peak(d)) / 1e9:.0f} / "
        f"torch {torch_matmul_peak(d) / 1e9:.0f} GFLOP/s"
        for d in ("float32", "bfloat16")))
  print(f"ours achieved {flops / (ours_ms / 1e3) / 1e9:.1f} GFLOP/s, MFU {flops / (ours_ms / 1e3) / peak:.1%}")


if __name__ == "__main__":
  app.run(main)
