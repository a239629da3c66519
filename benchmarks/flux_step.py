r"""FLUX-style MMDiT: t2i (JAX, jit) vs diffusers `FluxTransformer2DModel` (PyTorch), same weights, one run.

  python -m benchmarks.flux_step            (or: python benchmarks/flux_step.py)
  python -m benchmarks.flux_step --steps=6 --sample_rounds=2 --diagnose=off   (quicker)

On one tiny random configuration (default: 2 double + 4 single blocks, 4 heads x 32, 256 image tokens = a 32x32x16
latent packed 2x2 into 16x16x64, 32 text tokens, batch 4, guidance embedding), it
  1. builds a random diffusers model, `save_pretrained`s it to a temporary folder, loads it with
     `t2i.convert.flux.load_diffusers_flux` and prints the forward relative error (max|ours - ref| / max|ref|);
  2. times one training step (forward + backward + AdamW, rectified-flow loss x_t = (1 - t) x0 + t eps, target
     eps - x0, MSE, uniform t): ours `jax.jit` with donated params/optimizer state (`t2i.objectives.flow.flow_loss`),
     float32, vs diffusers + `torch.optim.AdamW`, float32, `torch.set_num_threads(--threads)`. The two alternate
     step by step (the order flips every round) so background load hits both; medians are reported;
  3. model FLOP utilisation: FLOPs of the step from XLA's cost analysis of the same step traced with plain einsum
     attention (`reference_attention`; the blocked attention's `lax.map`/`lax.scan` bodies are counted once by the
     cost analysis, and its backward recomputes P, which are not model FLOPs), cross-checked by an analytic matmul
     count (3x forward), divided by the step time and by the measured float32 matmul peak
     (`benchmarks.train_step.matmul_peak`, a timed 2048^3 `jnp.dot`);
  4. sampling throughput, images/s, --sample_steps Euler steps with the FLUX shifted schedule and one
     guidance-embedded model pass per step: ours `t2i.sampling.flow.sample_jit` (one compiled `fori_loop`) vs a
     Python loop of diffusers forwards under `torch.no_grad()` with the same Euler update, same x_T (the final
     latents are compared too);
  5. with --diagnose=on (or =auto and a train-step ratio, of medians or of minima, below 2): forward-only times,
     the step with attention replaced (plain einsum attention; no attention at all, out = v, on both sides), the
     step with every Dense flattened to a 2-D matmul (`dense_2d_class`, a candidate fix), attention fwd+bwd alone
     (blocked custom-VJP vs einsum vs torch SDPA through diffusers' `dispatch_attention_fn`), and jit cache sizes
     (a recompiling step would show more than one entry).
Medians are the headline figures; minima are printed too, as the machine may be shared (PyTorch's OpenMP threads
suffer more than XLA's pool when another process takes a core, which inflates torch's medians).
Prints each figure as it is measured, then a summary block.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `t2i` importable from the repo root
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import alternating  # noqa: E402
from benchmarks.train_step import (DATA_PARALLEL_RULES, data_parallel_shardings, matmul_peak,  # noqa: E402
                                   request_cpu_devices)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  a = ap.add_argument
  a("--patch_size", type=int, default=1)
  a("--in_channels", type=int, default=64, help="packed channels (16 latent channels x 2x2)")
  a("--num_layers", type=int, default=2, help="double-stream blocks")
  a("--num_single_layers", type=int, default=4, help="single-stream blocks")
  a("--attention_head_dim", type=int, default=32)
  a("--num_attention_heads", type=int, default=4)
  a("--joint_attention_dim", type=int, default=128)
  a("--pooled_projection_dim", type=int, default=64)
  a("--no_guidance_embeds", action="store_true", help="FLUX.1-schnell style (no guidance embedder)")
  a("--axes_dims_rope", default="8,12,12")
  a("--grid", type=int, default=16, help="packed image tokens per side (image tokens = grid^2)")
  a("--text_tokens", type=int, default=32)
  a("--batch", type=int, default=4)
  a("--guidance", type=float, default=3.5, help="embedded guidance value (train and sample)")
  a("--steps", type=int, default=10, help="timed train steps per framework")
  a("--warmup", type=int, default=2, help="untimed train steps per framework (after compile)")
  a("--block", type=int, default=4, help="timed train steps of one framework before the other's (1 = interleaved)")
  a("--pause", type=float, default=0.5, help="seconds idle before each timed train step")
  a("--sample_steps", type=int, default=20, help="Euler steps per sample")
  a("--sample_rounds", type=int, default=3, help="timed sampling calls per framework")
  a("--threads", type=int, default=2, help="torch intra-op threads")
  a("--devices", type=int, default=-1, help="XLA CPU devices for our train step, batch split over them (data "
    "parallel): -1 = one per available core that divides the batch, as launch.main runs; 1 = one device")
  a("--diagnose", choices=("auto", "on", "off"), default="auto",
    help="where-does-the-time-go section; auto = when torch/ours train-step ratio < 2")
  a("--diag_reps", type=int, default=5, help="timed repeats per diagnostic measurement")
  a("--seed", type=int, default=0)
  a("--scan_layers", action="store_true", help="our blocks in a jax.lax.scan (stacked params, t2i.nn.scan)")
  return ap.parse_args(argv)


def flux_config(args: argparse.Namespace) -> dict[str, Any]:
  """diffusers `FluxTransformer2DModel` constructor arguments."""
  return dict(patch_size=args.patch_size, in_channels=args.in_channels, num_layers=args.num_layers,
              num_single_layers=args.num_single_layers, attention_head_dim=args.attention_head_dim,
              num_attention_heads=args.num_attention_heads, joint_attention_dim=args.joint_attention_dim,
              pooled_projection_dim=args.pooled_projection_dim, guidance_embeds=not args.no_guidance_embeds,
              axes_dims_rope=tuple(int(x) for x in args.axes_dims_rope.split(",")))


def forward_flops(cfg: dict[str, Any], b: int, li: int, lt: int, mlp_ratio: int = 4) -> float:
  """Analytic matmul FLOPs (2 per multiply-add) of one forward on b x (li image + lt text) tokens."""
  d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
  f, n = mlp_ratio * d, li + lt
  out = cfg["patch_size"] ** 2 * cfg["in_channels"]
  per_sample = 256 * d + d * d + cfg["pooled_projection_dim"] * d + d * d  # timestep + pooled-text MLPs
  if cfg["guidance_embeds"]:
    per_sample += 256 * d + d * d
  per_sample += cfg["num_layers"] * 2 * d * 6 * d + cfg["num_single_layers"] * d * 3 * d + d * 2 * d  # AdaLN
  tokens = li * cfg["in_channels"] * d + lt * cfg["joint_attention_dim"] * d + li * d * out  # embed + proj_out
  attention = 2 * n * n * d  # q k^T and p v
  double = n * 4 * d * d + n * 2 * d * f + attention  # q, k, v, out per stream; MLP per stream
  single = n * d * (3 * d + f) + n * (d + f) * d + attention  # linear1, linear2
  return 2.0 * b * (per_sample + tokens + cfg["num_layers"] * double + cfg["num_single_layers"] * single)


def _rel(a: Any, b: Any) -> float:
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _ms(ts: list[float]) -> float:
  return 1e3 * statistics.median(ts)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def build_torch_model(cfg: dict[str, Any], seed: int):
  """Random diffusers FluxTransformer2DModel: default init plus noise, RMSNorm scales around 1."""
  import diffusers
  import torch
  torch.manual_seed(seed)
  model = diffusers.FluxTransformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm_q" in name or "norm_k" in name or "norm_added" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.add_(0.02 * torch.randn_like(p))
  return model


def dense_2d_class() -> type:
  """`t2i.nn.layers.Dense` with the leading axes flattened, [..., d] -> [n, d] @ W -> [..., f] (same parameter
  tree). Diagnostic only: the weight gradient of a [B, L, d] Dense is a dot contracting two axes, for which XLA:CPU
  emits a transposing copy into which it fuses (and re-computes) the elementwise chain producing the cotangent."""
  import flax.linen as nn
  from t2i.nn.layers import Dense

  class Dense2D(Dense):
    @nn.compact
    def __call__(self, x):
      y = nn.Dense(self.features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                   precision=self.precision, kernel_init=nn.with_logical_partitioning(self.kernel_init, self.axes),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                   name="dense")(x.reshape(-1, x.shape[-1]))
      return y.reshape(x.shape[:-1] + (self.features,))
  return Dense2D


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  n_dev = request_cpu_devices(args.devices, args.batch)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import torch
  import torch.nn.functional as F
  import diffusers.models.transformers.transformer_flux as torch_flux

  import t2i.models.mmdit as mmdit
  from t2i import parallel
  from t2i.convert.flux import load_diffusers_flux
  from t2i.models.mmdit import image_ids, text_ids
  from t2i.nn.attention import reference_attention
  from t2i.objectives.flow import flow_loss
  from t2i.sampling import flow as flow_sampling
  from t2i.sampling.flow import flux_schedule, sample_jit

  torch.set_num_threads(args.threads)
  cfg = flux_config(args)
  b, lt, li = args.batch, args.text_tokens, args.grid * args.grid
  guided = cfg["guidance_embeds"]
  results: dict[str, Any] = {}
  t_start = time.perf_counter()

  # ---------------------------------------------------------------- 1. weights, loader, parity
  tmodel = build_torch_model(cfg, args.seed).eval()
  with tempfile.TemporaryDirectory() as tmp:
    tmodel.save_pretrained(tmp)
    module, params_np = load_diffusers_flux(tmp, scan_layers=args.scan_layers)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params_np))
  assert n_params == sum(p.numel() for p in tmodel.parameters()), "parameter counts differ"

  rng = np.random.default_rng(args.seed)
  x0 = rng.standard_normal((b, li, args.in_channels)).astype(np.float32)
  ctx = rng.standard_normal((b, lt, args.joint_attention_dim)).astype(np.float32)
  pooled = rng.standard_normal((b, args.pooled_projection_dim)).astype(np.float32)
  img_ids, txt_ids = image_ids(args.grid, args.grid), text_ids(lt)
  cond_np = dict(encoder_hidden_states=ctx, pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids)
  cond = {k: jnp.asarray(v) for k, v in cond_np.items()}
  tcond = {k: torch.from_numpy(v) for k, v in cond_np.items()}
  g_np = np.full((b,), args.guidance, np.float32) if guided else None
  g_kw = dict(guidance=jnp.asarray(g_np)) if guided else {}
  tg_kw = dict(guidance=torch.from_numpy(g_np)) if guided else {}

  def torch_forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return tmodel(hidden_states=x, timestep=t, **tcond, **tg_kw, return_dict=False)[0]

  t_par = np.array(np.linspace(0.1, 0.9, b), np.float32)
  fwd = jax.jit(lambda p, x, t, c, g: module.apply({"params": p}, hidden_states=x, timestep=t, **c, **g))
  params_fwd = jax.tree.map(jnp.asarray, params_np)
  got = fwd(params_fwd, jnp.asarray(x0), jnp.asarray(t_par), cond, g_kw)
  with torch.no_grad():
    want = torch_forward(torch.from_numpy(x0), torch.from_numpy(t_par)).numpy()
  results["parity"] = _rel(got, want)
  print(f"config: {cfg}")
  print(f"batch {b}, image tokens {li} ({args.grid}x{args.grid} packed, {args.in_channels} ch), text tokens {lt}; "
        f"params {n_params / 1e6:.2f} M; jax {jax.__version__} on {jax.devices()[0].platform} "
        f"x{len(jax.devices())} (train step data parallel over {n_dev}); "
        f"torch {torch.__version__}, {args.threads} threads; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  print(f"[1] parity (load_diffusers_flux of save_pretrained): forward rel err {results['parity']:.2e} "
        f"(max|ref| {np.abs(want).max():.3f})", flush=True)

  # ---------------------------------------------------------------- 4 (first: initial weights). sampling
  shape = (b, li, args.in_channels)
  x_T = rng.standard_normal(shape).astype(np.float32)
  ts = flux_schedule(args.sample_steps, li)

  if guided:
    def velocity(p, x, t, g, c):
      return module.apply({"params": p}, hidden_states=x, timestep=t, guidance=g, **c)
  else:
    def velocity(p, x, t, c):
      return module.apply({"params": p}, hidden_states=x, timestep=t, **c)
  vfn = jax.tree_util.Partial(velocity, params_fwd)
  key = jax.random.key(args.seed)

  def ours_sample() -> jax.Array:
    return sample_jit(vfn, shape, cond, None, key, num_steps=args.sample_steps,
                      guidance_embed=args.guidance if guided else None, x_T=jnp.asarray(x_T)).block_until_ready()

  def torch_sample() -> torch.Tensor:
    x = torch.from_numpy(x_T.copy())
    with torch.no_grad():
      for i in range(args.sample_steps):
        v = torch_forward(x, torch.full((b,), float(ts[i])))
        x = x + float(np.float32(ts[i + 1] - ts[i])) * v
    return x

  t0 = time.perf_counter()
  ours_x = ours_sample()
  sample_compile = time.perf_counter() - t0
  torch_x = torch_sample()
  results["sample_rel"] = _rel(ours_x, torch_x.numpy())
  st = alternating({"ours": ours_sample, "torch": torch_sample}, args.sample_rounds)
  results["ours_ips"] = b / statistics.median(st["ours"])
  results["torch_ips"] = b / statistics.median(st["torch"])
  results["ips_ratio_min"] = min(st["torch"]) / min(st["ours"])
  print(f"[4] sampling {args.sample_steps} Euler steps, batch {b}: ours {results['ours_ips']:.2f} img/s "
        f"({_ms(st['ours']):.0f} ms/call, compile+first {sample_compile:.1f} s), torch {results['torch_ips']:.2f} "
        f"img/s ({_ms(st['torch']):.0f} ms/call); ratio ours/torch {results['ours_ips'] / results['torch_ips']:.2f}x;"
        f" final latents rel err {results['sample_rel']:.1e}", flush=True)

  # ---------------------------------------------------------------- 2. training step
  tx = optax.adamw(1e-4, weight_decay=1e-2)
  batch = (jnp.asarray(x0), cond)

  def make_step() -> Callable:
    """A fresh step function: jax caches traces per Python function, so a variant traced with a patched
    attention needs its own function object."""
    def loss_fn(p, r, x0, c):
      if guided:
        vel = lambda x, t, g, c: velocity(p, x, t, g, c)
      else:
        vel = lambda x, t, c: velocity(p, x, t, c)
      loss, _ = flow_loss(vel, x0, c, r, guidance=args.guidance if guided else None)
      return loss

    def step(p, o, r, x0, c):
      r, sub = jax.random.split(r)
      loss, grads = jax.value_and_grad(loss_fn)(p, sub, x0, c)
      updates, o = tx.update(grads, o, p)
      return optax.apply_updates(p, updates), o, r, loss
    return step

  replicated = None
  if n_dev > 1:  # the train step runs data parallel: params / optimiser replicated, batch split over devices
    replicated, split = data_parallel_shardings(n_dev)
    batch = jax.tree.map(lambda a: jax.device_put(a, split if a.shape[0] == b else replicated), batch)

  def ours_runner(step_jit: Callable) -> Callable[[], None]:
    params = jax.tree.map(lambda a: jnp.array(a, copy=True), params_np)
    # A raw uint32 key: a typed key array, replicated over 2 devices, added a second jit cache entry (no recompile).
    state = {"p": params, "o": tx.init(params), "r": jax.random.PRNGKey(args.seed + 1)}
    if n_dev > 1:
      state = jax.device_put(state, replicated)
      step_jit = parallel.traced_in(step_jit, replicated.mesh, DATA_PARALLEL_RULES)  # traced as the train step

    def run() -> float:
      state["p"], state["o"], state["r"], loss = step_jit(state["p"], state["o"], state["r"], *batch)
      return float(loss)
    return run

  def jit_step() -> Callable:
    return jax.jit(make_step(), donate_argnums=(0, 1), out_shardings=replicated)

  step_jit = jit_step()
  ours_step = ours_runner(step_jit)
  t0 = time.perf_counter()
  first_loss = ours_step()
  step_compile = time.perf_counter() - t0

  tmodel.train()
  topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-4, weight_decay=1e-2)
  tx0 = torch.from_numpy(x0)
  torch.manual_seed(args.seed + 1)

  def torch_step() -> float:
    topt.zero_grad(set_to_none=True)
    noise = torch.randn_like(tx0)
    t = torch.rand(b)
    tb = t[:, None, None]
    pred = torch_forward((1 - tb) * tx0 + tb * noise, t)
    loss = F.mse_loss(pred, noise - tx0)
    loss.backward()
    topt.step()
    return loss.item()

  first_torch_loss = torch_step()
  for _ in range(args.warmup):
    ours_step(), torch_step()
  tt = alternating({"ours": ours_step, "torch": torch_step}, args.steps, args.block, args.pause)
  results["ours_ms"], results["torch_ms"] = _ms(tt["ours"]), _ms(tt["torch"])
  results["ratio"] = results["torch_ms"] / results["ours_ms"]
  results["ours_min"], results["torch_min"] = 1e3 * min(tt["ours"]), 1e3 * min(tt["torch"])
  print(f"[2] train step (first loss ours {first_loss:.3f}, torch {first_torch_loss:.3f}): ours "
        f"{results['ours_ms']:.1f} ms (median of {args.steps}, min {1e3 * min(tt['ours']):.1f}; compile+first "
        f"{step_compile:.1f} s), torch {results['torch_ms']:.1f} ms (min {1e3 * min(tt['torch']):.1f}); "
        f"ratio torch/ours {results['ratio']:.2f}x (of the minima {results['torch_min'] / results['ours_min']:.2f}x)",
        flush=True)

  # ---------------------------------------------------------------- 3. FLOPs and MFU
  state0 = jax.tree.map(jnp.asarray, params_np)
  with patched(mmdit, "dot_product_attention", reference_attention):
    whole = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # unsharded: FLOPs of the whole step
    cost = jax.jit(make_step()).lower(state0, tx.init(state0), jax.random.PRNGKey(0),
                                      *jax.tree.map(whole, batch)).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  results["flops"] = flops = float(cost.get("flops", float("nan")))
  results["analytic"] = analytic = 3 * forward_flops(cfg, b, li, lt)
  if args.scan_layers:  # XLA counts a while loop's body once, not once per layer: use the analytic count
    results["flops"] = flops = analytic
  results["peak"] = peak = matmul_peak()
  results["mfu"] = flops / (results["ours_ms"] / 1e3) / peak
  results["torch_mfu"] = flops / (results["torch_ms"] / 1e3) / peak
  print(f"[3] FLOPs/step: {'analytic (scan)' if args.scan_layers else 'XLA cost_analysis (einsum attention)'} "
        f"{flops / 1e9:.2f} GFLOP, analytic matmul 3x fwd "
        f"{analytic / 1e9:.2f} GFLOP; float32 matmul peak {peak / 1e9:.1f} GFLOP/s; ours "
        f"{flops / (results['ours_ms'] / 1e3) / 1e9:.1f} GFLOP/s = MFU {results['mfu']:.1%} (torch "
        f"{results['torch_mfu']:.1%})", flush=True)

  # ---------------------------------------------------------------- 5. where does the time go
  slow = min(results["ratio"], results["torch_min"] / results["ours_min"]) < 2
  run_diag = args.diagnose == "on" or (args.diagnose == "auto" and slow)
  if run_diag:
    diagnose(args, results, module=module, params_np=params_np, batch=batch, fwd=fwd, g_kw=g_kw,
             torch_forward=torch_forward, ours_step=ours_step, torch_step=torch_step, jit_step=jit_step,
             ours_runner=ours_runner, torch_flux=torch_flux, mmdit=mmdit)
  cache = {"train step": step_jit._cache_size(), "sampler": flow_sampling._sample_jit._cache_size()}
  print(f"jit cache entries after all calls (1 = no recompilation): {cache}", flush=True)

  # ---------------------------------------------------------------- summary
  r = results
  print("\n==================== summary ====================")
  print(f"config {cfg}; batch {b}, {li} image + {lt} text tokens; {n_params / 1e6:.2f} M params; float32; "
        f"torch threads {args.threads}")
  print(f"parity (ours vs diffusers forward)   rel err {r['parity']:.2e}")
  print(f"train step  ours {r['ours_ms']:8.1f} ms   diffusers {r['torch_ms']:8.1f} ms   torch/ours "
        f"{r['ratio']:.2f}x  (medians; minima {r['ours_min']:.1f} vs {r['torch_min']:.1f} ms, "
        f"{r['torch_min'] / r['ours_min']:.2f}x)")
  print(f"MFU         ours {r['mfu']:.1%} (diffusers {r['torch_mfu']:.1%}) of {r['peak'] / 1e9:.1f} GFLOP/s "
        f"measured matmul peak; {r['flops'] / 1e9:.2f} GFLOP/step (XLA cost analysis, einsum attention; "
        f"analytic {r['analytic'] / 1e9:.2f})")
  print(f"sampling    ours {r['ours_ips']:8.2f} img/s  diffusers {r['torch_ips']:8.2f} img/s  ours/torch "
        f"{r['ours_ips'] / r['torch_ips']:.2f}x  (fastest calls {r['ips_ratio_min']:.2f}x; {args.sample_steps} Euler "
        f"steps, batch {b}; final latents rel "
        f"err {r['sample_rel']:.1e})")
  if "diag" in r:
    for line in r["diag"]:
      print(f"diag        {line}")
  print(f"wall time {time.perf_counter() - t_start:.0f} s")


def diagnose(args: argparse.Namespace, results: dict[str, Any], *, module, params_np, batch, fwd, g_kw,
             torch_forward, ours_step, torch_step, jit_step, ours_runner, torch_flux, mmdit) -> None:
  """Forward-only, attention-replaced and attention-only timings (appends lines to results["diag"])."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from t2i.nn.attention import dot_product_attention, reference_attention

  lines = results.setdefault("diag", [])
  b, li, lt = args.batch, args.grid * args.grid, args.text_tokens
  reps = args.diag_reps

  def say(line: str) -> None:
    lines.append(line)
    print(f"[5] {line}", flush=True)

  # Forward only.
  p = jax.tree.map(jnp.asarray, params_np)
  x, t = jnp.asarray(batch[0]), jnp.full((b,), 0.5, jnp.float32)
  tx_, tt_ = torch.from_numpy(np.array(batch[0])), torch.full((b,), 0.5)
  fwd(p, x, t, batch[1], g_kw).block_until_ready()

  def torch_fwd() -> None:
    with torch.no_grad():
      torch_forward(tx_, tt_)
  ft = alternating({"ours": lambda: fwd(p, x, t, batch[1], g_kw).block_until_ready(), "torch": torch_fwd}, reps)
  say(f"forward only: ours {_ms(ft['ours']):.1f} ms, torch (no_grad) {_ms(ft['torch']):.1f} ms, "
      f"torch/ours {_ms(ft['torch']) / _ms(ft['ours']):.2f}x")

  # Train step with the attention replaced, or with Dense layers flattened to 2-D matmuls; torch without attention.
  no_attention = lambda q, k, v, mask=None: v
  variants = {}
  for name, attr, value in (("einsum attention", "dot_product_attention", reference_attention),
                            ("no attention", "dot_product_attention", no_attention),
                            ("2-D Dense", "Dense", dense_2d_class())):
    run = ours_runner(jit_step())
    with patched(mmdit, attr, value):
      run()  # traced and compiled here, with the patch
    variants[name] = run

  def torch_no_attn() -> None:
    with patched(torch_flux, "dispatch_attention_fn", lambda q, k, v, **kw: v):
      torch_step()
  st = alternating({"blocked": ours_step, **variants, "torch": torch_step, "torch no attention": torch_no_attn},
                   reps)
  m = {k: _ms(v) for k, v in st.items()}
  lo = {k: 1e3 * min(v) for k, v in st.items()}
  say("train step, ms median (min): " + ", ".join(
      f"{k} {m[k]:.1f} ({lo[k]:.1f})" for k in ("blocked", "einsum attention", "no attention", "2-D Dense", "torch",
                                                "torch no attention")))
  say(f"attention share of the step: ours {m['blocked'] - m['no attention']:.1f} ms "
      f"({(m['blocked'] - m['no attention']) / m['blocked']:.0%}), torch {m['torch'] - m['torch no attention']:.1f} ms "
      f"({(m['torch'] - m['torch no attention']) / m['torch']:.0%}); rest of the step torch/ours "
      f"{m['torch no attention'] / m['no attention']:.2f}x (min {lo['torch no attention'] / lo['no attention']:.2f}x)")
  say(f"2-D Dense (x.reshape(-1, d) @ W, same params and values) vs current Dense: {m['2-D Dense']:.1f} vs "
      f"{m['blocked']:.1f} ms median, {lo['2-D Dense']:.1f} vs {lo['blocked']:.1f} ms min")

  # Attention fwd+bwd alone at the model's shapes, once per block of the step.
  n, h, d = li + lt, args.num_attention_heads, args.attention_head_dim
  rng = np.random.default_rng(1)
  q, k, v, do = (rng.standard_normal((b, n, h, d)).astype(np.float32) for _ in range(4))
  calls = args.num_layers + args.num_single_layers

  def jax_fb(attn):
    f = jax.jit(lambda q, k, v, do: jax.vjp(attn, q, k, v)[1](do))
    qs = [jnp.asarray(a) for a in (q, k, v, do)]
    jax.block_until_ready(f(*qs))
    return lambda: jax.block_until_ready(f(*qs))

  tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
  tdo = torch.from_numpy(do)

  def torch_fb() -> None:
    out = torch_flux.dispatch_attention_fn(tq, tk, tv)
    torch.autograd.grad(out, (tq, tk, tv), tdo)
  at = alternating({"blocked": jax_fb(dot_product_attention), "einsum": jax_fb(reference_attention),
                    "torch": torch_fb}, reps)
  say(f"attention fwd+bwd [{b},{n},{h},{d}] x{calls} per step: blocked custom-VJP {calls * _ms(at['blocked']):.1f} "
      f"ms, einsum {calls * _ms(at['einsum']):.1f} ms, torch SDPA {calls * _ms(at['torch']):.1f} ms")


if __name__ == "__main__":
  main()
