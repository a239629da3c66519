"""Start a run from another t2i run's checkpoint (SFT after pre-training, DPO/SPIN after SFT, a distillation
teacher), and fill the frozen "reference" copy of the denoiser.

  config.init_from = dict(workdir="RUN", ema=True, step=-1, grow=False, reinit_mismatched=False)
      every param group of this run is read from the same-named group of RUN's checkpoint (its EMA params when
      `ema` and RUN kept an EMA; step -1 = latest); `grow`, `reinit_mismatched`: see below;
  config.reference = dict(init_from="", ema=True, step=-1, config={}, reinit_mismatched=False)
      group "reference" (frozen) = the denoiser built with `config` overrides, read from the denoiser group of
      `reference.init_from` (default: `init_from.workdir`).

Leaves are matched by path; those missing from the source keep their fresh initialisation and are listed in the
log (e.g. the guidance embedder of a student distilled from a teacher without one). A leaf the source holds in
another shape is an error naming it (a silently re-initialised position table or input convolution trains a
different model than the user asked for), unless `reinit_mismatched` keeps such leaves fresh too.
With `grow` (vocabulary growth, e.g. a token LM whose fine-tuning vocabulary appends coordinate tokens), a leaf
that is larger than the source along exactly one axis takes the source values in its leading part and the mean
of the source along that axis in the appended part (new embedding rows / LM-head columns start at the average
token, Hewitt 2021); such leaves are listed in the log.
Arrays are restored straight into this run's shardings (Orbax partial restore), so nothing is gathered on one host.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from t2i.train import checkpoint


class PartialParams(dict):
  """Flat {path tuple: array} for some leaves of a group; the rest keep their initialisation."""


def _step_dir(workdir: str, step: int) -> str:
  root, steps = checkpoint.checkpoints_dir(workdir), checkpoint.saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{root}: no checkpoint to initialise from (init_from / reference.init_from)")
  if step < 0:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"{root}/{step}: no such checkpoint step (have {steps})")
  return os.path.join(root, str(step))


def _metadata(path: str) -> dict:
  if not os.path.isdir(path):
    return {}
  md = ocp.PyTreeCheckpointer().metadata(path)
  md = getattr(md, "item_metadata", md)
  return dict(getattr(md, "tree", md))


def _grown_axis(src_shape: tuple[int, ...], shape: tuple[int, ...]) -> int | None:
  """The one axis along which `shape` is larger than `src_shape` (all others equal), else None."""
  if len(src_shape) != len(shape):
    return None
  diff = [i for i, (a, b) in enumerate(zip(src_shape, shape)) if a != b]
  return diff[0] if len(diff) == 1 and shape[diff[0]] > src_shape[diff[0]] else None


def _grow(x: jax.Array, target: Any, axis: int) -> jax.Array:
  """`x` padded along `axis` to target.shape with its mean along that axis, placed in target.sharding."""
  import jax.numpy as jnp
  extra = target.shape[axis] - x.shape[axis]
  fill = jnp.repeat(jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True), extra, axis=axis)
  out = jnp.concatenate([x.astype(jnp.float32), fill], axis=axis).astype(target.dtype)
  return jax.device_put(out, target.sharding)


def _check_layer_layout(src_top: set[str], want_top: set[str], where: str) -> None:
  """Blocks stored per layer in one run and stacked for scan in the other cannot be matched leaf by leaf."""
  from t2i.nn.scan import STACK_SUFFIX
  for name in want_top ^ src_top:
    if name.endswith(STACK_SUFFIX) and f"{name[:-len(STACK_SUFFIX)]}_0" in want_top | src_top:
      stacked = "this run" if name in want_top else "the source run"
      raise ValueError(f"{where}: {stacked} stacks {name[:-len(STACK_SUFFIX)]} for scan (scan_layers=True) and "
                       "the other stores them per layer; set the same scan_layers in both (convert with `python -m "
                       "t2i.convert --scan_layers` for a scanned run), or load the diffusers folder with "
                       "config.<model>.checkpoint (it stacks as needed)")


def restore_groups(workdir: str, wants: dict[str, tuple[str, Any]], ema: bool = True, step: int = -1,
                   grow: bool = False, reinit_mismatched: bool = False,
                   flag: str = "config.init_from") -> dict[str, PartialParams]:
  """wants: target group -> (source group, abstract tree of ShapeDtypeStructs with shardings).

  Returns target group -> PartialParams of the leaves found in the source run with the same shape (with `grow`,
  also those larger along one axis, padded as the module docstring says). Leaves of another shape raise a
  ValueError naming them and `<flag>.reinit_mismatched`, unless `reinit_mismatched` (then they stay fresh).
  """
  d = _step_dir(workdir, step)
  state_md, frozen_md = _metadata(os.path.join(d, "state")), _metadata(os.path.join(d, "frozen"))
  use_ema = ema and bool(state_md.get("ema_params"))
  item, args, plan = {}, {}, {}
  for target, (source, abstract) in wants.items():
    for top, tree in ((("ema_params" if use_ema else "params"), state_md.get("ema_params" if use_ema else "params")),
                      ("frozen", frozen_md)):
      if tree and source in tree:
        break
    else:
      logging.warning("%s: no group %r in %s; %s keeps its initialisation", workdir, source, d, target)
      continue
    src = traverse_util.flatten_dict(tree[source])
    want = traverse_util.flatten_dict(abstract)
    _check_layer_layout({k[0] for k in src}, {k[0] for k in want}, f"init {target} from {d}/{source}")
    hit = {k: v for k, v in want.items() if k in src and tuple(src[k].shape) == tuple(v.shape)}
    grown = {k: _grown_axis(tuple(src[k].shape), tuple(v.shape)) for k, v in want.items()
             if grow and k in src and k not in hit}
    grown = {k: a for k, a in grown.items() if a is not None}
    other = sorted(f"{'/'.join(k)} {tuple(src[k].shape)} -> {tuple(v.shape)}" for k, v in want.items()
                   if k in src and k not in hit and k not in grown)
    if other and not reinit_mismatched:
      raise ValueError(f"init {target} from {d}/{source}: {len(other)} leaves have another shape in the source: "
                       f"{other[:8]}; set --{flag}.reinit_mismatched=True to keep them freshly initialised"
                       + ("" if grow else f" (or --{flag}.grow=True for vocabulary growth)"))
    if grown:
      logging.warning("init %s from %s/%s: %d leaves grown along one axis (source values + source mean): %s",
                      target, d, source, len(grown), sorted("/".join(k) for k in grown))
      replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      for k in grown:  # restored at the source shape on one device, padded after the restore
        hit[k] = jax.ShapeDtypeStruct(tuple(src[k].shape), want[k].dtype, sharding=replicated)
    miss = sorted("/".join(k) for k in want if k not in hit)
    if miss:
      logging.warning("init %s from %s/%s: %d of %d leaves not in the source, kept fresh: %s", target, d, source,
                      len(miss), len(want), miss[:8])
    plan[target] = (top, source, list(hit), {k: (want[k], a) for k, a in grown.items()})
    sub = item.setdefault(top, {}).setdefault(source, {})
    sub_args = args.setdefault(top, {}).setdefault(source, {})
    for k, v in hit.items():
      node, node_args = sub, sub_args
      for part in k[:-1]:
        node, node_args = node.setdefault(part, {}), node_args.setdefault(part, {})
      node[k[-1]] = v
      node_args[k[-1]] = ocp.ArrayRestoreArgs(sharding=v.sharding, global_shape=v.shape, dtype=v.dtype)
  out: dict[str, PartialParams] = {}
  restored = {}
  for top in item:
    name = "frozen" if top == "frozen" else "state"
    sub_item = item[top] if top == "frozen" else {top: item[top]}
    sub_args = args[top] if top == "frozen" else {top: args[top]}
    got = ocp.PyTreeCheckpointer().restore(
        os.path.join(d, name), args=ocp.args.PyTreeRestore(sub_item, restore_args=sub_args, partial_restore=True))
    restored[top] = got if top == "frozen" else got[top]
  for target, (top, source, keys, grown) in plan.items():
    flat = traverse_util.flatten_dict(restored[top][source])
    out[target] = PartialParams({k: _grow(flat[k], *grown[k]) if k in grown else flat[k] for k in keys})
    logging.info("init %s from %s (%s/%s): %d leaves", target, d, top, source, len(keys))
  return out


def check_text_lengths(config: Any, workdir: str) -> None:
  """Raises when run `workdir` fed a text encoder this run also has a different number of tokens (its position
  table is of another shape): the error names the caption-length flag to pass, which `restore_groups`' general
  shape error cannot know."""
  path = os.path.join(os.path.expanduser(workdir), "config.json")
  if not os.path.exists(path):
    return  # a converted checkpoint (t2i.convert) or a foreign folder: nothing to compare
  with open(path) as f:
    source = json.load(f)
  for tok, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
    if not (source.get(encoder) and config.get(encoder) is not None):
      continue
    theirs, ours = (source.get(tok) or {}).get("max_length"), config.get(tok) and config[tok].get("max_length")
    if theirs is not None and ours is not None and int(theirs) != int(ours):
      raise ValueError(f"{path}: that run's {encoder} read config.{tok}.max_length={theirs} tokens, this run has "
                       f"{ours}; pass --config.{tok}.max_length={theirs} to start from it")


def pretrained_from_runs(config: Any, models: Any, abstract: dict[str, Any]) -> dict[str, PartialParams]:
  """Group -> PartialParams from config.init_from and config.reference (see the module docstring).

  abstract: group -> abstract params (ShapeDtypeStructs with shardings) of this run.
  """
  out: dict[str, PartialParams] = {}
  init = config.get("init_from")
  if init is not None and init.get("workdir"):
    check_text_lengths(config, init.workdir)
    wants = {g: (g, a) for g, a in abstract.items() if g != "reference" and jax.tree.leaves(a)}
    out.update(restore_groups(init.workdir, wants, bool(init.get("ema", True)), int(init.get("step", -1)),
                              grow=bool(init.get("grow", False)),
                              reinit_mismatched=bool(init.get("reinit_mismatched", False))))
  ref = config.get("reference")
  if ref is not None and "reference" in abstract:
    src = ref.get("init_from") or (init.get("workdir") if init is not None else "")
    if src:
      out.update(restore_groups(src, {"reference": (models.denoiser_name, abstract["reference"])},
                                bool(ref.get("ema", True)), int(ref.get("step", -1)),
                                reinit_mismatched=bool(ref.get("reinit_mismatched", False)),
                                flag="config.reference"))
  return out
