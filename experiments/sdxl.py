"""Stable Diffusion XL base fine-tune at 1024 px: U-Net (2.567 B params) trained, both text encoders and the VAE
frozen, size/crop conditioning (time_ids), bf16 compute with f32 master weights, remat, FSDP over all devices.

Needs real hardware (TPU v5p-8 / 8x80 GB GPUs or more) and local copies of the weights:
  python -m launch.main --config=experiments/sdxl.py --workdir=gs://bucket/sdxl \
      --config.vae.checkpoint=/ckpt/sdxl/vae --config.tokenizer.path=/ckpt/sdxl/tokenizer \
      --config.tokenizer_2.path=/ckpt/sdxl/tokenizer_2 \
      --config.data.name=tfds --config.data.dataset=image_folder --config.data.data_dir=/data
  bash launch/tpu_pod.sh experiments/sdxl.py gs://bucket/sdxl ...    # multi-host
Expected: per-device memory as printed by `python benchmarks/compile_step.py --config=experiments/sdxl.py
--fast_compile [--cache]` (AOT-compiled on a fake fsdp=8 CPU mesh, batch 1/device, transformer blocks scanned):
5.2 GiB params/optimiser/EMA arguments; XLA-CPU temp 8.8 GiB (peak 14.0), or 5.8 GiB (peak 11.0) on cached
latents/embeddings; compiled in 2-3 minutes (per-layer blocks: temp 42.3 GiB, compile 45 minutes; docs/results.md);
loss around 0.1 (epsilon MSE) on natural images.
Fine-tuning: also set config.unet.checkpoint / config.text_encoder*.checkpoint to diffusers / transformers
folders (safetensors); without them the U-Net trains from scratch.
Variant `:small` = 512 px, batch 8 (quick compile checks).
"""
from __future__ import annotations

import ml_collections

from experiments import common


def clip_l(**kw) -> ml_collections.ConfigDict:
  """openai/clip-vit-large-patch14 text tower (SDXL text_encoder)."""
  return common.module_config("t2i.models.text.CLIPTextModel", dict(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
      max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=-1, projection_dim=768), **kw)


def clip_bigg(**kw) -> ml_collections.ConfigDict:
  """OpenCLIP ViT-bigG/14 text tower with projection (SDXL text_encoder_2)."""
  return common.module_config("t2i.models.text.CLIPTextModel", dict(
      vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
      max_position_embeddings=77, hidden_act="gelu", eos_token_id=-1, projection_dim=1280,
      with_projection=True), **kw)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = common.base_config()
  c.image_size = 1024
  c.batch_size = 64
  common.real_hardware_schedule(c)
  c.diffusion.schedule = dict(kind="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              rescale_zero_terminal_snr=False)
  c.diffusion.snr_gamma = 5.0
  c.diffusion.cond_dropout = 0.1
  c.tokenizer = ml_collections.ConfigDict(dict(kind="pretrained", path="", max_length=77, vocab_size=0))
  # SDXL's second tokenizer pads with "!" (id 0) where the first pads with <|endoftext|>; bigG reads its own ids.
  c.tokenizer_2 = ml_collections.ConfigDict(dict(kind="pretrained", path="", max_length=77, vocab_size=0))
  # scan_layers: the depth-2 / depth-10 spatial transformers' blocks in a jax.lax.scan (t2i.nn.scan).
  c.unet = common.module_config("t2i.models.unet.UNet2DConditionModel", preset="sdxl", dtype="bfloat16",
                                param_dtype="float32", remat=True, scan_layers=True)
  # Both encoders feed their penultimate hidden states (concatenated: 768 + 1280 = 2048); pooled = bigG's.
  c.text_encoder = clip_l(trainable=False, hidden_layer=-2, dtype="bfloat16")
  c.text_encoder_2 = clip_bigg(trainable=False, hidden_layer=-2, dtype="bfloat16")
  c.vae = common.module_config("t2i.models.vae.AutoencoderKL", preset="sdxl", dtype="bfloat16")
  c.data = common.image_folder_data(flip=True)
  c.sample = ml_collections.ConfigDict(dict(prompts=["a photo of an astronaut riding a horse"], num_steps=30,
                                            guidance_scale=5.0, sampler="ddim", seed=0))
  if variant == "small":
    c.image_size = 512
    c.batch_size = 8
  elif variant != "default":
    raise ValueError(f"experiments/sdxl.py: unknown variant {variant!r} (default, small)")
  return c
