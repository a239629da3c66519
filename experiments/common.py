"""Pieces shared by experiment configs: mesh, logical-axis rules, optimiser, checkpointing, logging."""
from __future__ import annotations

import ml_collections

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). One table for every model.
# A mesh axis that does not divide a dimension is dropped for that array (replicated on that axis instead).
AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("height", None),
    ("width", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("norm", None),
    ("layers", None),   # leading axis of scanned block stacks (t2i.nn.layers.STACK_SUFFIX)
)


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh shape over axes (data, fsdp, tensor); -1 fills the remaining devices."""
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def optimizer_config(lr: float = 1e-4, warmup_steps: int = 0, schedule: str = "cosine", weight_decay: float = 1e-2,
                     grad_clip: float = 1.0, grad_accum: int = 1) -> ml_collections.ConfigDict:
  """AdamW with a weight-decay mask (kernels/embeddings only), warm-up + cosine/constant, clipping, accumulation."""
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay, wd_mask="ndim>=2",
      schedule=schedule, warmup_steps=warmup_steps, min_lr_ratio=0.0, grad_clip=grad_clip, grad_accum=grad_accum,
      lr_scale={}))  # {params group: learning-rate factor}, e.g. {"text_encoder": 3.0}


def module_config(module: str, config: dict | None = None, preset: str | None = None, dtype: str = "float32",
                  param_dtype: str = "float32", remat: bool = False, **extra) -> ml_collections.ConfigDict:
  """A model entry: flax class path, optional *_PRESETS name, field overrides (diffusers/transformers keys)."""
  d = dict(module=module, preset=preset, config=dict(config or {}), dtype=dtype, param_dtype=param_dtype,
           remat=remat, checkpoint=None)
  d.update(extra)
  return ml_collections.ConfigDict(d)


def base_config() -> ml_collections.ConfigDict:
  """Fields every text-to-image experiment has; experiment files fill in models, data and sizes."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "diffusion"
  c.image_size = 32
  c.batch_size = 32                 # global batch
  c.total_steps = 1000              # train steps (micro-steps when optimizer.grad_accum > 1)
  c.log_every = 10                  # TensorBoard scalars (metrics.jsonl gets every step)
  c.ckpt_every = 500
  c.keep_ckpts = 3
  c.async_ckpt = True
  c.sample_every = 500              # validation grid PNG + TensorBoard image; 0 = never
  c.progress = True
  c.mesh = mesh_config()
  c.axis_rules = AXIS_RULES
  c.optimizer = optimizer_config()
  c.ema = ml_collections.ConfigDict(dict(decay=0.999, every=1, warmup=True))
  c.diffusion = ml_collections.ConfigDict(dict(
      schedule=dict(kind="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    rescale_zero_terminal_snr=False),
      # weight_floor > 0: lower bound on the min-SNR weight; sigma_data > 0: x0-prediction with EDM skip
      # preconditioning (prediction_type "sample"); self_condition p > 0: self-conditioning on a share p of steps
      # (the denoiser's in_channels must be twice the latent channels); t_sampler "uniform" or "logit_normal"
      # (timestep density, with logit_mean / logit_std).
      prediction_type="epsilon", snr_gamma=0.0, weight_floor=0.0, noise_offset=0.0, loss_type="l2",
      cond_dropout=0.1, sigma_data=0.0, self_condition=0.0, t_sampler="uniform", logit_mean=0.0, logit_std=1.0,
      # Caption-contrastive denoising (t2i.objectives.diffusion.caption_contrast) against config.data's
      # negative_caption: weight 0 = off; scale = 1 / the relative margin it aims for; rows > 0 = extra pass
      # on that many rows per batch (0 = all).
      contrast=dict(weight=0.0, scale=10.0, rows=0),
      # CosmicMan's HOLA attention grounding (t2i.objectives.attention) on config.data.token_groups: weight 0 =
      # off; resolutions = side lengths of the supervised cross-attention maps (empty: all the masks pool to).
      hola=dict(weight=0.0, resolutions=()),
      # Text-side layout grounding (t2i.objectives.layout) on config.data.token_groups: weight 0 = off; each
      # group's tokens regress its mask centroid (x, y) on these two output channels of the trained text encoder;
      # per_token: every token of a group, not their mean; object_channel >= 0: a logit there marks object words;
      # spread_channel >= 0: the log std of each token's footprint (its object's extent and place uncertainty);
      # placed_only: only groups whose caption fixes their place (the hook's third item) are regressed and marked
      # as objects, so an object-gated splat paints only relations and coordinates.
      layout=dict(weight=0.0, channels=(0, 1), per_token=False, object_channel=-1, spread_channel=-1,
                  placed_only=False)))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="shapes", path="", max_length=24, vocab_size=0))
  # A second tokenizer (FLUX's T5, SDXL's OpenCLIP): its ids follow the first's in "input_ids" and feed
  # text_encoder_2 (t2i.train.models.Tokenizer). None: one tokenizer feeds every text encoder.
  c.tokenizer_2 = None
  c.text_encoder_2 = None
  c.vae = None
  # Precompute pass over the first num_batches batches: frozen-VAE latents and frozen text embeddings.
  c.cache = ml_collections.ConfigDict(dict(enabled=False, num_batches=100))
  # Start from another run's or a `python -m t2i.convert` checkpoint ("" = from scratch); see t2i.train.init_from.
  c.init_from = ml_collections.ConfigDict(dict(workdir="", ema=True, step=-1, reinit_mismatched=False))
  c.sample = ml_collections.ConfigDict(dict(prompts=["a red circle"], num_steps=25, guidance_scale=4.0,
                                            sampler="ddim", seed=0))
  c.eval = eval_config()
  return c


def reference_config(**config) -> ml_collections.ConfigDict:
  """config.reference: the frozen copy of the denoiser (DPO / SPIN reference, distillation teacher) built with
  `config` overrides and read from `init_from` (default: config.init_from.workdir); see t2i.train.init_from."""
  return ml_collections.ConfigDict(dict(init_from="", ema=True, step=-1, config=config, reinit_mismatched=False))


def eval_config() -> ml_collections.ConfigDict:
  """The held-out loss, off: every `every` steps (0 = off) on `batches` fixed batches with fixed t / noise (seed),
  logged as eval_loss (and eval_loss_ema); the non-empty fields of `data` are laid over config.data (e.g.
  --config.eval.data.split=validation for a TFDS data set); none set = the training data."""
  return ml_collections.ConfigDict(dict(every=0, batches=2, seed=0, data=dict(dataset="", split="")))


def judged_pairs_data(prompts_per_family: int = 200) -> ml_collections.ConfigDict:
  """On-policy preference pairs (`config.data.name="judged"`, `t2i/train/generated_pairs.py::build_judged`): the
  start run samples `samples_per_prompt` images for each shapes-bench prompt of `prompt_seed` (none naming a
  held-out pair; about 850 prompts from 200 per family), the scorer marks each pass or fail, and up to
  `max_pairs_per_prompt` (pass, fail) pairs of one prompt are kept; `winner="render"`: a clean render of the
  prompt's ground-truth scene instead of a passing sample, against each failing sample."""
  return ml_collections.ConfigDict(dict(name="judged", data_dir="~/t2i_data", prompts_per_family=prompts_per_family,
                                        samples_per_prompt=4, max_pairs_per_prompt=4, prompt_seed=0,
                                        winner="sample", caption_dropout=0.0, flip=False, worker_count=0))


def image_folder_data(flip: bool = False) -> ml_collections.ConfigDict:
  """Data of the real-size experiments: an ingested image folder (`python -m data_pipelines.ingest`), or several
  (`sources`: each with its own data_dir, repeats per epoch and trigger-word prefix), with kohya-style caption
  handling (prefix, tag shuffle after keep_tokens tags); see `data_pipelines.pipeline.default_data_config`."""
  return ml_collections.ConfigDict(dict(name="tfds", data_dir="", dataset="image_folder", split="train",
                                        caption_dropout=0.0, caption_prefix="", caption_shuffle=False, keep_tokens=0,
                                        sources=(), random_crop=True, flip=flip, worker_count=8))


def smoke_schedule(c: ml_collections.ConfigDict, total_steps: int, ckpt_every: int, sample_every: int,
                   batch_size: int = 8, lr: float = 1e-3, warmup_steps: int = 2, schedule: str = "cosine",
                   weight_decay: float = 1e-2) -> None:
  """A few steps on all local devices, logged every step, no progress bar: the `:smoke` variants (tests)."""
  c.batch_size = batch_size
  c.total_steps = total_steps
  c.ckpt_every = ckpt_every
  c.sample_every = sample_every
  c.log_every = 1
  c.progress = False
  c.mesh = mesh_config(data=-1)
  c.optimizer = optimizer_config(lr=lr, warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay,
                                 grad_clip=1.0)


def real_hardware_schedule(c: ml_collections.ConfigDict) -> None:
  """Steps, logging/checkpoint cadence, FSDP mesh, optimiser and EMA shared by the real-size experiments."""
  c.total_steps = 100_000
  c.log_every = 50
  c.ckpt_every = 2000
  c.sample_every = 2000
  c.mesh = mesh_config(data=1, fsdp=-1, tensor=1)
  c.optimizer = optimizer_config(lr=1e-5, warmup_steps=500, schedule="constant", weight_decay=1e-2, grad_clip=1.0)
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, every=1, warmup=True))
