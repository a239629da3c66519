"""Orbax checkpoints of the train state, frozen params and the data iterator position.

Layout: `workdir/checkpoints/<step>/{state,frozen,data}`. Orbax writes each step into a temporary directory and
renames it when complete, so a crash or SIGKILL during a save leaves the previous checkpoint as the latest one;
unfinished temporary directories are ignored (and cleaned up) on the next start.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """CheckpointManager over `workdir/checkpoints`, keeping the last `keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoints_dir(workdir), options=options, item_names=("state", "frozen", "data"))


def saved_steps(workdir: str) -> list[int]:
  """Completed checkpoint steps under `workdir/checkpoints`, ascending (Orbax's temporary folders excluded)."""
  root = checkpoints_dir(workdir)
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def checkpoints_dir(workdir: str) -> str:
  """`workdir/checkpoints` as an absolute path (`~` expanded): where the manager writes and `init_from` and SPIN
  rounds read."""
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")


def encode_data_state(state: Any) -> Any:
  """Iterator state -> JSON-able value (grain DataLoader iterators give bytes, dataset iterators dicts)."""
  if state is None:
    return {"kind": "none"}
  if isinstance(state, bytes):
    return {"kind": "bytes", "value": state.decode("utf-8")}
  return {"kind": "json", "value": json.loads(json.dumps(state))}


def decode_data_state(obj: Any) -> Any:
  kind = obj.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return obj["value"].encode("utf-8")
  if kind == "json":
    return obj["value"]
  raise ValueError(f"checkpoint data item: unknown kind {kind!r}")


def _as_dict(state: Any) -> dict[str, Any]:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "ema_params": state.ema_params, "rng": state.rng}


def save(mngr: ocp.CheckpointManager, state: Any, frozen: Any, data_state: Any, force: bool = True) -> int:
  """Starts an (async) save of `state` at its step; returns the step. Call `mngr.wait_until_finished()`."""
  step = int(jax.device_get(state.step))
  args = {"state": ocp.args.StandardSave(_as_dict(state)),
          "data": ocp.args.JsonSave(encode_data_state(data_state))}
  if jax.tree.leaves(frozen):
    args["frozen"] = ocp.args.StandardSave(frozen)
  mngr.save(step, args=ocp.args.Composite(**args), force=force)
  return step


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def restore(mngr: ocp.CheckpointManager, target_state: Any, target_frozen: Any = None,
            step: int | None = None) -> tuple[Any, Any, Any] | None:
  """Restores (state, frozen, data_state) at `step` (default latest), sharded like the targets.

  Targets may be arrays or ShapeDtypeStructs with shardings. Returns None when there is no checkpoint.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  args = {"state": ocp.args.StandardRestore(_abstract(_as_dict(target_state))), "data": ocp.args.JsonRestore()}
  has_frozen = bool(jax.tree.leaves(target_frozen))
  if has_frozen:
    args["frozen"] = ocp.args.StandardRestore(_abstract(target_frozen))
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  state = target_state.replace(**out["state"])
  frozen = out["frozen"] if has_frozen else target_frozen
  return state, frozen, decode_data_state(out["data"])


def restore_params(mngr: ocp.CheckpointManager, params_target: Any, frozen_target: Any = None, ema: bool = True,
                   step: int | None = None) -> tuple[Any, Any, int] | None:
  """Restores only (EMA or raw params, frozen params, step): no optimiser state is read (for sampling/eval)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  key = "ema_params" if ema else "params"
  leaf = jax.tree.leaves(params_target)[0]
  repl = jax.sharding.NamedSharding(leaf.sharding.mesh, jax.sharding.PartitionSpec())
  item = {key: _abstract(params_target), "step": jax.ShapeDtypeStruct((), "int32", sharding=repl)}
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                               dtype=s.dtype), item)
  args = {"state": ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)}
  has_frozen = bool(jax.tree.leaves(frozen_target))
  if has_frozen:
    args["frozen"] = ocp.args.StandardRestore(_abstract(frozen_target))
  out = mngr.restore(step, args=ocp.args.Composite(**args))
  return out["state"][key], (out["frozen"] if has_frozen else frozen_target), int(out["state"]["step"])
