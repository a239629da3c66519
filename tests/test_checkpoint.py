"""Checkpoint round trip (params, optimiser, EMA, step, rng, data position) and SIGKILL-during-save safety."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from experiments import sd_shapes
from t2i import parallel
from t2i.train import checkpoint as ckpt_lib
from t2i.train import models as models_lib
from t2i.train import optimizer as opt_lib
from t2i.train import step as step_lib
from t2i.train.toy import ToyDataIterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_restore_is_identical_and_sharded(tmp_path):
  cfg = sd_shapes.get_config("smoke")
  cfg.mesh = dict(data=2, fsdp=2, tensor=2)
  cfg.unet.config = dict(block_out_channels=(32,), cross_attention_dim=32)
  mesh = parallel.make_mesh(cfg.mesh)
  tok = models_lib.setup_tokenizer(cfg, str(tmp_path))
  models = models_lib.build_models(cfg, tok)
  tx, _ = opt_lib.make_optimizer(cfg.optimizer, 10)
  structs, shards, f_structs, f_shards = step_lib.abstract_state(models, tx, mesh, cfg.axis_rules, True)
  state, frozen = step_lib.init_state(models, tx, mesh, cfg.axis_rules, 0, shards, f_shards)
  # Make every part distinct from a fresh init: perturb params/opt state/EMA, set step and rng.
  @jax.jit
  def perturb(st):
    noisy = lambda t, s: jax.tree.map(lambda x: x + s if x.dtype == jnp.float32 else x + 3, t)
    return st.replace(step=jnp.int32(7), params=noisy(st.params, 0.1), opt_state=noisy(st.opt_state, 0.2),
                      ema_params=noisy(st.ema_params, 0.3), rng=jax.random.PRNGKey(42))
  state = jax.device_put(perturb(state), shards)
  data = ToyDataIterator(tok, 8, 16, seed=3)
  for _ in range(5):
    next(data)
  mngr = ckpt_lib.make_manager(str(tmp_path), keep=2)
  ckpt_lib.save(mngr, state, frozen, data.get_state())
  mngr.wait_until_finished()
  expected_next = next(data)

  fresh = ckpt_lib.make_manager(str(tmp_path))
  assert fresh.latest_step() == 7
  restored, _, data_state = ckpt_lib.restore(fresh, structs, f_structs)
  for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(restored),
                             jax.tree.leaves(shards)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert b.sharding == s, jax.tree_util.keystr(path)
  assert int(restored.step) == 7
  data2 = ToyDataIterator(tok, 8, 16, seed=3)
  data2.set_state(data_state)
  got = next(data2)
  for k in expected_next:
    np.testing.assert_array_equal(got[k], expected_next[k])
  assert ckpt_lib.restore(ckpt_lib.make_manager(str(tmp_path / "empty")), structs, f_structs) is None


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import jax, jax.numpy as jnp
    from t2i.train import checkpoint as ckpt_lib
    from t2i.train.state import TrainState
    mngr = ckpt_lib.make_manager(sys.argv[1])
    def state(step, n):
      return TrainState(step=jnp.int32(step), params={"w": jnp.full((n,), float(step))}, opt_state={},
                        ema_params=None, rng=jax.random.PRNGKey(step))
    ckpt_lib.save(mngr, state(1, 10), {}, {"pos": 1})
    mngr.wait_until_finished()
    # A large second save, killed while it is being written.
    ckpt_lib.save(mngr, state(2, 30_000_000), {}, {"pos": 2})
    print("saving", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_save_keeps_last_checkpoint(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert "saving" in proc.stdout
  ckpt_dir = tmp_path / "checkpoints"
  leftovers = sorted(os.listdir(ckpt_dir))
  assert "1" in leftovers and "2" not in leftovers, leftovers
  print("left in checkpoints/ after the kill:", leftovers)
  mngr = ckpt_lib.make_manager(str(tmp_path))
  assert mngr.latest_step() == 1
  from t2i.train.state import TrainState
  target = TrainState(step=jnp.int32(0), params={"w": jnp.zeros((10,))}, opt_state={}, ema_params=None,
                      rng=jax.random.PRNGKey(0))
  restored, _, data_state = ckpt_lib.restore(mngr, target, {})
  np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.ones(10))
  assert data_state == {"pos": 1}
  # The next save works and becomes the latest.
  ckpt_lib.save(mngr, restored.replace(step=jnp.int32(3)), {}, {"pos": 3})
  mngr.wait_until_finished()
  assert ckpt_lib.make_manager(str(tmp_path)).latest_step() == 3
