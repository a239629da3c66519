"""Mesh, logical sharding rules, sharded init, and 8-device vs 1-device equivalence of the train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments import common, sd_shapes
from t2i import parallel
from t2i.train import models as models_lib
from t2i.train import objectives
from t2i.train import optimizer as opt_lib
from t2i.train import step as step_lib
from t2i.train.toy import ToyDataIterator


def test_make_mesh_fills_and_rejects():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="has 4 devices but 8 are available"):
    parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match="not divisible by 3"):
    parallel.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
  with pytest.raises(ValueError, match="unknown axes"):
    parallel.make_mesh({"data": -1, "pipeline": 1})


def test_logical_to_spec_rules():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = common.AXIS_RULES
  assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), rules, mesh) == P("fsdp", "tensor")
  assert parallel.logical_to_spec(("batch", None), (8, 3), rules, mesh) == P(("data", "fsdp"))
  # 6 is divisible by data (2) but not by data*fsdp (4): fsdp is dropped for this array only.
  assert parallel.logical_to_spec(("batch", None), (6, 3), rules, mesh) == P("data")
  # Odd sizes are replicated instead of failing.
  assert parallel.logical_to_spec(("embed", "mlp"), (3, 5), rules, mesh) == P()
  # A mesh axis is used once per array.
  assert parallel.logical_to_spec(("embed", "embed"), (4, 4), rules, mesh) == P("fsdp")
  with pytest.raises(ValueError, match="'nope' has no rule"):
    parallel.logical_to_spec(("nope",), (4,), rules, mesh)
  with pytest.raises(ValueError, match="no such mesh axis"):
    parallel.logical_to_spec(("x",), (4,), [("x", "pipeline")], mesh)


def test_host_to_global_roundtrip():
  mesh = parallel.make_mesh({"data": -1})
  x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  g = parallel.host_to_global({"x": x}, mesh, common.AXIS_RULES)["x"]
  assert g.sharding.spec == P(("data", "fsdp")) and len(g.addressable_shards) == 8
  np.testing.assert_array_equal(parallel.global_to_host(g), x)


def _two_steps(mesh_cfg, devices, tmp_path):
  cfg = sd_shapes.get_config("smoke")
  cfg.mesh = common.mesh_config(**mesh_cfg)
  # The real U-Net and CLIP text encoder at tiny widths that fsdp and tensor both divide; 16 px pixel space.
  cfg.unet = sd_shapes.tiny_unet(in_channels=3, size=16, channels=(32, 64))
  cfg.unet.config.update(cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
  cfg.text_encoder = sd_shapes.tiny_clip(cfg.tokenizer.max_length)
  cfg.text_encoder.config.update(hidden_size=32, intermediate_size=64, num_attention_heads=4)
  # Adam's first steps are ~lr * sign(g): an entry whose true gradient is 0 (e.g. a conv bias feeding a GroupNorm)
  # gets reduction-order noise and moves by +-lr on either mesh. A larger eps keeps such entries still, so the
  # params can be compared at 1e-5 (with eps 1e-8: 1.2e-5).
  cfg.optimizer.eps = 1e-4
  rules = cfg.axis_rules
  mesh = parallel.make_mesh(cfg.mesh, devices)
  tok = models_lib.setup_tokenizer(cfg, str(tmp_path))
  models = models_lib.build_models(cfg, tok)
  tx, sched = opt_lib.make_optimizer(cfg.optimizer, cfg.total_steps)
  structs, shards, f_structs, f_shards = step_lib.abstract_state(models, tx, mesh, rules, True)
  update = step_lib.make_update(models, objectives.get("diffusion").loss, tx, sched, cfg.ema)
  b_structs = step_lib.batch_structs(models, cfg.batch_size, mesh, rules)
  step = step_lib.compile_step(update, mesh, rules, structs, shards, f_structs, f_shards, b_structs)
  state, frozen = step_lib.init_state(models, tx, mesh, rules, 0, shards, f_shards)
  data = ToyDataIterator(tok, cfg.batch_size, cfg.image_size, seed=0)
  losses = []
  for _ in range(2):
    b = next(data)
    batch = {k: jax.device_put(jnp.asarray(b[k]), s.sharding) for k, s in b_structs.items()}
    state, m = step(state, frozen, batch)
    losses.append(float(m["loss"]))
  return losses, state


def _report(tmp: str) -> None:
  """Runs both meshes and prints what the test checks, as JSON (called in a subprocess)."""
  import json
  import pathlib
  losses8, state8 = _two_steps({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), pathlib.Path(tmp) / "a")
  losses1, state1 = _two_steps({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], pathlib.Path(tmp) / "b")
  specs = {jax.tree_util.keystr(k): str(v.sharding.spec)
           for k, v in jax.tree_util.tree_leaves_with_path(state8.params)}
  kernel = state8.params["unet"]["time_embedding"]["linear_1"]["dense"]["kernel"]
  diffs = {jax.tree_util.keystr(k): float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(state8.params), jax.tree.leaves(state1.params))}
  diff = max(diffs.values())
  print(json.dumps({
      "losses8": losses8, "losses1": losses1, "specs": specs, "devices8": len(jax.devices()),
      "kernel_shape": kernel.shape, "kernel_shard_shape": kernel.addressable_shards[0].data.shape,
      "mu_spec": str(state8.opt_state[1][0].mu["unet"]["time_embedding"]["linear_1"]["dense"]["kernel"].sharding.spec),
      "max_param_diff": diff}))


def test_sharded_step_matches_single_device(tmp_path):
  """Two train steps of the real U-Net + CLIP on mesh data=2, fsdp=2, tensor=2 (8 devices) vs one device: same
  losses and params (this caught wrong GroupNorm gradients from XLA's partitioner; see t2i.nn.layers.GroupNorm).

  Runs in a subprocess with XLA's CPU backend at -O0: same numerics here, a third of the compile time.
  """
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-c", f"from tests.test_parallel import _report; _report({str(tmp_path)!r})"],
                        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["devices8"] == 8
  np.testing.assert_allclose(r["losses8"], r["losses1"], rtol=1e-5)
  assert r["losses8"][0] != r["losses8"][1]
  specs = r["specs"]
  attn = "['unet']['down_blocks_0_attentions_0']"
  assert specs["['unet']['time_embedding']['linear_1']['dense']['kernel']"] == str(P("fsdp", "tensor"))
  assert specs[attn + "['proj_in']['conv']['kernel']"] == str(P(None, None, "fsdp", "tensor"))
  assert specs[attn + "['transformer_blocks_0']['attn2']['to_k']['dense']['kernel']"] == str(P("fsdp", "tensor"))
  assert specs["['text_encoder']['token_embedding']['embedding']"] == str(P("tensor", "fsdp"))
  assert r["kernel_shard_shape"] == [r["kernel_shape"][0] // 2, r["kernel_shape"][1] // 2]
  assert r["mu_spec"] == str(P("fsdp", "tensor"))   # optimiser moments follow their params' sharding
  assert r["max_param_diff"] < 1e-5
