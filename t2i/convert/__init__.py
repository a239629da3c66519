"""Loaders for reference checkpoints (diffusers / transformers save_pretrained folders, safetensors only)."""
from t2i.convert.clip import load_transformers_clip_text
from t2i.convert.vae import load_diffusers_vae


def load_diffusers_unet(*args, **kwargs):
  """diffusers UNet2DConditionModel folder -> (module, params); see `t2i.convert.unet.load_diffusers_unet`."""
  from t2i.convert.unet import load_diffusers_unet as load  # imported lazily: keeps this package importable alone

  return load(*args, **kwargs)


__all__ = ["load_diffusers_unet", "load_diffusers_vae", "load_transformers_clip_text"]
