"""Shapes demo: a tiny U-Net and a tiny CLIP text encoder trained jointly from scratch on shapes-bench, 32 px,
pixel space (no VAE).

Run (`:long` trains 4x longer):
  python -m launch.main --config=experiments/sd_shapes.py --workdir=/tmp/sd_shapes
  python -m t2i.sample --workdir=/tmp/sd_shapes --prompt="a red circle" --num=8 --out=/tmp/sd_shapes/out
Expected (target; the full run and its wall time are not measured yet, hyperparameters still to be tuned): the
loss falls from ~1.0 towards ~0.1-0.2 (min-SNR-weighted epsilon MSE); the validation grids in workdir/samples/
show the prompted colour and shape in most cells by the end. The shapes data is generated into data_dir on first
use.

Variants: `:long`; `:latent` (adds a tiny random-init frozen VAE and trains in its latent space; point
config.vae.checkpoint at a diffusers AutoencoderKL folder for a real one); `:smoke` (stand-in toy models and toy
data, a few steps: the tests use it to exercise the loop quickly); `:smoke_latent` (smoke + a tiny frozen VAE,
a frozen text encoder and the latent/embedding cache).
"""
from __future__ import annotations

import ml_collections

from experiments import common


def tiny_unet(in_channels: int = 3, size: int = 32) -> ml_collections.ConfigDict:
  return common.module_config("t2i.models.unet.UNet2DConditionModel", dict(
      sample_size=size, in_channels=in_channels, out_channels=in_channels,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=4,
      norm_num_groups=8))


def tiny_clip(max_length: int) -> ml_collections.ConfigDict:
  return common.module_config("t2i.models.text.CLIPTextModel", dict(
      vocab_size=-1, eos_token_id=-1,  # -1: from the tokenizer
      hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=max_length, hidden_act="quick_gelu"), trainable=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  c = common.base_config()
  c.image_size = 32
  c.batch_size = 32
  c.total_steps = 4000
  c.ckpt_every = 500
  c.sample_every = 500
  c.log_every = 10
  c.optimizer = common.optimizer_config(lr=3e-4, warmup_steps=200, schedule="cosine", weight_decay=1e-2,
                                        grad_clip=1.0)
  c.ema = ml_collections.ConfigDict(dict(decay=0.999, every=1, warmup=True))
  c.diffusion.schedule = dict(kind="cosine", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                              rescale_zero_terminal_snr=False)
  c.diffusion.prediction_type = "epsilon"
  c.diffusion.snr_gamma = 5.0
  c.diffusion.cond_dropout = 0.1
  c.tokenizer = ml_collections.ConfigDict(dict(kind="shapes", path="", max_length=16, vocab_size=0))
  c.unet = tiny_unet()
  c.text_encoder = tiny_clip(c.tokenizer.max_length)
  c.vae = None
  # name: "shapes" (generated + built into data_dir on first use), "tfds" (any built dataset), "toy".
  c.data = ml_collections.ConfigDict(dict(name="shapes", data_dir="~/t2i_data", shapes_split="train",
                                          shapes_num=10000, caption_dropout=0.0, flip=False, worker_count=0))
  c.sample = ml_collections.ConfigDict(dict(
      prompts=["a red circle", "a blue square", "a yellow triangle", "a large green circle",
               "a small purple square", "two orange squares", "a red circle to the left of a blue triangle",
               "a purple triangle"],  # the last binds a held-out pair
      num_steps=25, guidance_scale=4.0, sampler="ddim", seed=0))
  if variant == "long":
    c.total_steps = 16000
    c.optimizer.lr = 2e-4
  elif variant == "latent":
    c.vae = common.module_config("t2i.models.vae.AutoencoderKL", dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, scaling_factor=1.0), checkpoint=None)
    c.unet = tiny_unet(in_channels=4, size=16)
  elif variant in ("smoke", "smoke_latent"):
    c.image_size = 16
    c.batch_size = 8
    c.total_steps = 6
    c.ckpt_every = 2
    c.sample_every = 0
    c.log_every = 1
    c.progress = False
    c.mesh = common.mesh_config(data=-1)
    c.optimizer = common.optimizer_config(lr=1e-3, warmup_steps=2, grad_clip=1.0)
    c.tokenizer = ml_collections.ConfigDict(dict(kind="toy", path="", max_length=8, vocab_size=64))
    c.unet = common.module_config("t2i.train.toy.ToyUNet", dict(block_out_channels=(16,), cross_attention_dim=16))
    c.text_encoder = common.module_config("t2i.train.toy.ToyTextEncoder", dict(
        vocab_size=-1, hidden_size=16, max_position_embeddings=8), trainable=True)
    c.data = ml_collections.ConfigDict(dict(name="toy", nan_batch=-1))  # nan_batch >= 0: NaN images (tests)
    c.sample = ml_collections.ConfigDict(dict(prompts=["a red circle", "a blue square"], num_steps=4,
                                              guidance_scale=2.0, sampler="ddim", seed=0))
    if variant == "smoke_latent":  # + tiny frozen VAE, frozen text encoder, latent/embedding cache
      c.vae = common.module_config("t2i.models.vae.AutoencoderKL", dict(
          in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
          latent_channels=4, norm_num_groups=4, mid_block_add_attention=False, scaling_factor=1.0))
      c.unet.config.update(in_channels=4, out_channels=4)
      c.text_encoder.trainable = False
      c.cache = ml_collections.ConfigDict(dict(enabled=True, num_batches=2))
  elif variant != "default":
    raise ValueError(f"experiments/sd_shapes.py: unknown variant {variant!r} "
                     "(default, long, latent, smoke, smoke_latent)")
  return c
