"""FLUX.1 [dev]-size rectified-flow MMDiT (11.9 B params: hidden 3072, 19 double + 38 single blocks, 24 heads),
trained with FLUX's logit-normal, resolution-shifted timesteps at 1024 px; T5-XXL (context) and CLIP-L (pooled)
and the 16-channel VAE frozen; bf16 compute, f32 master weights, remat, FSDP over all devices.

Needs real hardware (TPU v5p-64 / 64x80 GB GPUs class for full fine-tuning) and local copies of the weights:
  python -m launch.main --config=experiments/flux1_dev.py --workdir=gs://bucket/flux \\
      --config.transformer.checkpoint=/ckpt/flux1-dev/transformer --config.vae.checkpoint=/ckpt/flux1-dev/vae \\
      --config.text_encoder.checkpoint=/ckpt/flux1-dev/text_encoder \\
      --config.text_encoder_2.checkpoint=/ckpt/flux1-dev/text_encoder_2 \\
      --config.tokenizer.path=/ckpt/flux1-dev/tokenizer --config.tokenizer_2.path=/ckpt/flux1-dev/tokenizer_2 \
      --config.data.dataset=image_folder --config.data.data_dir=/data
Expected: per-device memory as printed by `python benchmarks/compile_step.py --config=experiments/flux1_dev.py
--mesh=fsdp=8 --fast_compile --cache` (and `--mesh=fsdp=4,tensor=2`), blocks scanned (`scan_layers`): fsdp=8 at
batch 1/device, 1024 px: arguments 22.2 GiB, XLA:CPU temp 11.1 GiB, peak 33.3 GiB, compiled in 22 s; fsdp=4 x
tensor=2: 22.2 / 14.7 / 36.9 GiB (docs/results.md; per-layer blocks: temp 142.3 GiB). Without --cache (frozen
T5-XXL, scanned too, and CLIP in the step): temp 11.1 GiB, peak 35.6 GiB.
CLIP reads the 77 ids of `tokenizer` (CLIP BPE), T5 the 512 ids of `tokenizer_2` (T5's sentencepiece), as
diffusers' FluxPipeline tokenises (tested: tests/test_flow_train.py::test_two_tokenizers_match_flux_pipeline).
Variant `:small` = 512 px (quicker compile checks).
"""
from __future__ import annotations

import ml_collections

from experiments import common
from experiments import sdxl


def t5_xxl(**kw) -> ml_collections.ConfigDict:
  """google/t5-v1_1-xxl encoder (FLUX text_encoder_2): 4.76 B params."""
  return common.module_config("t2i.models.t5.T5Encoder", dict(
      vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
      feed_forward_proj="gated-gelu"), **kw)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = common.base_config()
  c.objective = "flow"
  c.image_size = 1024
  c.batch_size = 64
  common.real_hardware_schedule(c)
  c.diffusion = None
  c.flow = ml_collections.ConfigDict(dict(t_sampler="logit_normal", logit_mean=0.0, logit_std=1.0, shift=True,
                                          base_shift=0.5, max_shift=1.15, train_guidance=1.0, cond_dropout=0.0,
                                          loss_type="l2", sigma_data=0.0))  # > 0: x0-prediction with EDM's skip
  c.tokenizer = ml_collections.ConfigDict(dict(kind="pretrained", path="", max_length=77, vocab_size=0))
  c.tokenizer_2 = ml_collections.ConfigDict(dict(kind="pretrained", path="", max_length=512, vocab_size=0))
  # scan_layers: one compiled block body per kind; FSDP keeps one block's gathered weights and gradients live.
  c.transformer = common.module_config("t2i.models.mmdit.FluxTransformer", preset="flux1_dev", dtype="bfloat16",
                                       param_dtype="float32", remat=True, scan_layers=True)
  c.text_encoder = sdxl.clip_l(trainable=False, dtype="bfloat16")
  c.text_encoder.config.max_position_embeddings = 77
  c.text_encoder_2 = t5_xxl(trainable=False, dtype="bfloat16", scan_layers=True)
  c.vae = common.module_config("t2i.models.vae.AutoencoderKL", preset="flux", dtype="bfloat16")
  c.data = common.image_folder_data(flip=False)
  c.sample = ml_collections.ConfigDict(dict(prompts=["a photo of an astronaut riding a horse"], num_steps=28,
                                            guidance_scale=3.5, sampler="euler", seed=0, true_cfg=1.0))
  if variant == "small":
    c.image_size = 512
    c.batch_size = 8
  elif variant != "default":
    raise ValueError(f"experiments/flux1_dev.py: unknown variant {variant!r} (default, small)")
  return c
