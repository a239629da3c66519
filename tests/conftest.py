"""Test setup: 8 fake CPU devices, float32 matmuls at full precision; shared fixtures."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def read_group():
  """read_group(workdir, group, kind="state", key="ema_params") -> {path: numpy array} of one param group of a
  run's latest checkpoint ("state"/key, or kind="frozen"), restored without a target."""
  def read(workdir, group, kind="state", key="ema_params"):
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import traverse_util
    from t2i.train import checkpoint as ckpt_lib
    step = ckpt_lib.make_manager(str(workdir), async_save=False).latest_step()
    tree = ocp.PyTreeCheckpointer().restore(f"{workdir}/checkpoints/{step}/{kind}")
    tree = tree[key] if kind == "state" else tree
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree[group]).items()}
  return read
