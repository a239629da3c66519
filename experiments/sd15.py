"""Stable Diffusion 1.5 at 512 px: U-Net (859.5 M params) trained, CLIP ViT-L text encoder and the VAE frozen,
bf16 compute with f32 master weights, FSDP over all devices.

Needs real hardware (TPU v4-8 / 8 GPUs or more) and local copies of the VAE and tokenizer:
  python -m launch.main --config=experiments/sd15.py --workdir=/runs/sd15 \
      --config.vae.checkpoint=/ckpt/sd15/vae --config.tokenizer.path=/ckpt/sd15/tokenizer \
      --config.data.name=tfds --config.data.dataset=image_folder --config.data.data_dir=/data
Expected: loss around 0.1 (epsilon MSE) on natural images. 
Fine-tuning: also set config.unet.checkpoint / config.text_encoder*.checkpoint to diffusers / transformers
folders (safetensors); without them the U-Net trains from scratch.
Variant `:train_text` also trains the text encoder.
"""
from __future__ import annotations

import ml_collections

from experiments import common
from experiments.sdxl import clip_l


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = common.base_config()
  c.image_size = 512
  c.batch_size = 256
  common.real_hardware_schedule(c)
  c.tokenizer = ml_collections.ConfigDict(dict(kind="pretrained", path="", max_length=77, vocab_size=0))
  c.unet = common.module_config("t2i.models.unet.UNet2DConditionModel", preset="sd15", dtype="bfloat16",
                                param_dtype="float32", remat=True)
  c.text_encoder = clip_l(trainable=variant == "train_text", hidden_layer=-1, dtype="bfloat16")
  c.vae = common.module_config("t2i.models.vae.AutoencoderKL", preset="sd", dtype="bfloat16")
  c.data = common.image_folder_data(flip=False)
  c.sample = ml_collections.ConfigDict(dict(prompts=["a photo of an astronaut riding a horse"], num_steps=30,
                                            guidance_scale=7.5, sampler="ddim", seed=0))
  if variant not in ("default", "train_text"):
    raise ValueError(f"experiments/sd15.py: unknown variant {variant!r} (default, train_text)")
  return c
