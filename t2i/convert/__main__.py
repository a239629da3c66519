"""Convert diffusers / transformers `save_pretrained` folders into a t2i checkpoint that starts a training run.

  python -m t2i.convert --out=DIR [--pipeline=PIPE] [--unet=F] [--vae=F] [--text_encoder=F]
      [--text_encoder_2=F] [--transformer=F] [--scan_layers]
  python -m launch.main --config=experiments/sd15.py --workdir=W --config.init_from.workdir=DIR

`--pipeline` takes a diffusers pipeline folder (model_index.json) and converts each of its subfolders named like a
t2i param group; the per-group flags override or add folders. The loader is chosen by the folder's config.json
(`_class_name` for diffusers, `architectures` / `model_type` for transformers). Output:
  DIR/checkpoints/0/state   Orbax tree {"params": {group: params}} (float32), read by `config.init_from`
  DIR/converted.json        per group: t2i module, source folder, source class, parameter count
The run that starts from DIR must build the same modules (e.g. the `sd15` / `sdxl` / `flux1_dev` presets, or
`--config.<group>.checkpoint=F` for the module shape); leaves of another shape are reported by `init_from` and kept
fresh. `--scan_layers` writes the U-Net / MMDiT / T5 blocks stacked for runs with `scan_layers=True` (`t2i.nn.scan`;
`flux1_dev.py`, `sdxl.py`). Safetensors only: pickled weights are refused with a message naming the folder.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Sequence

from absl import app, flags

GROUPS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")


SCANNABLE = ("t2i.models.unet.UNet2DConditionModel", "t2i.models.mmdit.FluxTransformer", "t2i.models.t5.T5Encoder")


def _loader(folder: str) -> tuple[str, str, Callable[..., tuple[Any, Any]]]:
  """(source class, t2i module path, loader) for a save_pretrained folder, from its config.json."""
  from t2i.convert.common import CheckpointError, read_config
  conf = read_config(folder)
  cls = conf.get("_class_name") or " ".join(conf.get("architectures") or []) or conf.get("model_type", "")
  if cls == "UNet2DConditionModel":
    from t2i.convert.unet import load_diffusers_unet
    return cls, "t2i.models.unet.UNet2DConditionModel", load_diffusers_unet
  if cls == "AutoencoderKL":
    from t2i.convert.vae import load_diffusers_vae
    return cls, "t2i.models.vae.AutoencoderKL", load_diffusers_vae
  if cls == "FluxTransformer2DModel":
    from t2i.convert.flux import load_diffusers_flux
    return cls, "t2i.models.mmdit.FluxTransformer", load_diffusers_flux
  if cls.startswith("CLIPTextModel") or cls == "clip_text_model":
    from t2i.convert.clip import load_transformers_clip_text
    return cls, "t2i.models.text.CLIPTextModel", load_transformers_clip_text
  if cls.startswith("T5EncoderModel") or cls == "t5":
    from t2i.convert.t5 import load_transformers_t5_encoder
    return cls, "t2i.models.t5.T5Encoder", load_transformers_t5_encoder
  raise CheckpointError(f"{folder}/config.json: no t2i loader for {cls or 'an unnamed model'!r} (known: "
                        "UNet2DConditionModel, AutoencoderKL, FluxTransformer2DModel, CLIPTextModel, T5EncoderModel)")


def folders(pipeline: str | None, groups: dict[str, str | None]) -> dict[str, str]:
  """group -> folder: the pipeline's subfolders named like a group, then the explicit per-group folders."""
  from t2i.convert.common import CheckpointError
  out: dict[str, str] = {}
  if pipeline:
    root = pathlib.Path(pipeline)
    if not (root / "model_index.json").is_file():
      raise CheckpointError(f"--pipeline={pipeline}: no model_index.json (expected a diffusers pipeline folder)")
    out.update({g: str(root / g) for g in GROUPS if (root / g / "config.json").is_file()})
  out.update({g: f for g, f in groups.items() if f})
  unknown = sorted(set(out) - set(GROUPS))
  if unknown:
    raise ValueError(f"unknown param groups {unknown} (known: {GROUPS})")
  if not out:
    raise ValueError("nothing to convert: give --pipeline or at least one of --" + ", --".join(GROUPS))
  return out


def convert(out_dir: str, sources: dict[str, str], scan_layers: bool = False) -> dict[str, dict[str, Any]]:
  """Writes the t2i checkpoint for `sources` (group -> folder) into `out_dir`; returns the converted.json rows.
  `scan_layers`: blocks of the scannable modules stacked (the layout of a `scan_layers=True` run)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  out = pathlib.Path(out_dir).expanduser().absolute()
  target = out / "checkpoints" / "0" / "state"
  if target.exists():
    raise FileExistsError(f"--out={out_dir}: {target} exists; choose an empty folder")
  params, report = {}, {}
  for group, folder in sources.items():
    cls, module, load = _loader(folder)
    scan = scan_layers and module in SCANNABLE
    _, p = load(folder, scan_layers=True) if scan else load(folder)
    params[group] = jax.tree.map(
        lambda x: np.asarray(x, np.float32) if np.issubdtype(np.asarray(x).dtype, np.floating) else np.asarray(x), p)
    report[group] = {"module": module, "source": os.path.abspath(folder), "source_class": cls,
                     "num_params": int(sum(np.size(x) for x in jax.tree.leaves(p))), "scan_layers": scan}
  target.parent.mkdir(parents=True, exist_ok=True)
  ocp.PyTreeCheckpointer().save(str(target), {"params": params})
  (out / "converted.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
  return report


def define_flags() -> None:
  flags.DEFINE_string("out", None, "Output folder (new or empty): the t2i checkpoint.")
  flags.DEFINE_string("pipeline", None, "A diffusers pipeline folder (model_index.json + subfolders).")
  for g in GROUPS:
    flags.DEFINE_string(g, None, f"save_pretrained folder for param group {g!r}.")
  flags.DEFINE_bool("scan_layers", False, "Stack U-Net / MMDiT / T5 blocks for runs with scan_layers=True.")
  flags.mark_flag_as_required("out")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import sys
  f = flags.FLAGS
  try:
    report = convert(f.out, folders(f.pipeline, {g: f[g].value for g in GROUPS}), scan_layers=f.scan_layers)
  except (ValueError, FileExistsError) as e:  # CheckpointError is a ValueError
    print(f"t2i.convert: error: {e}", file=sys.stderr)
    sys.exit(2)
  for group, row in report.items():
    print(f"{group}: {row['source_class']} -> {row['module']}, {row['num_params']:,} params")
  print(f"wrote {f.out}; start a run from it with --config.init_from.workdir={f.out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
