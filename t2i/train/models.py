"""Builds the text-to-image modules (denoiser, text encoder(s), optional VAE) and tokenizer from the config.

The denoiser is `config.unet` (a U-Net, diffusion objectives) or `config.transformer` (a FLUX-style MMDiT, flow
objectives); exactly one is set. An MMDiT takes its token context from `text_encoder_2` (T5) when present, else
from `text_encoder`, and its pooled vector from `text_encoder` (CLIP), as FLUX does.
`config.reference` (optional) adds a frozen copy of the denoiser, group "reference" (DPO / SPIN reference or
opponent, guidance-distillation teacher); see `t2i.train.init_from`.

config.unet / config.transformer / config.text_encoder / config.text_encoder_2 / config.vae each hold:
  module: dotted path of a flax module class ("t2i.models.unet.UNet2DConditionModel");
  preset: optional name in the module file's *_PRESETS dict; config: dict of (diffusers-style) fields that
  override the preset; dtype / param_dtype (strings); remat; scan_layers (repeated blocks in a jax.lax.scan,
  params stacked, see t2i.nn.scan); checkpoint: optional diffusers / transformers
  save_pretrained folder (safetensors) whose config.json and weights replace preset/config and the random init.
  Text encoders also carry `trainable` and `hidden_layer` (-1 final output, -2 penultimate as in SDXL).
  `config.vae = None` trains in pixel space.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
DENOISERS = ("unet", "transformer")


def denoiser_name(config: Any) -> str:
  """"unet" or "transformer": the one denoiser entry the config sets."""
  names = [n for n in DENOISERS if config.get(n) is not None]
  if len(names) != 1:
    raise ValueError(f"config: set exactly one of config.unet / config.transformer (set: {names or 'none'})")
  return names[0]


def import_object(path: str) -> Any:
  mod, _, name = path.rpartition(".")
  try:
    return getattr(importlib.import_module(mod), name)
  except (ImportError, AttributeError) as e:
    raise ImportError(f"cannot import {path!r}: {e}") from e


def _tuplify(x: Any) -> Any:
  if isinstance(x, (list, tuple)):
    return tuple(_tuplify(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  return x


def _to_dict(cfg: Any) -> dict[str, Any]:
  if cfg is None:
    return {}
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def build_module(cfg: Any, name: str, overrides: dict[str, Any] | None = None) -> nn.Module:
  """Instantiates `cfg.module` from preset + config (+ overrides), then sets dtype/param_dtype/remat.

  A config value of -1 for a key of `overrides` (e.g. "vocab_size", "eos_token_id") takes the override value.
  """
  if not cfg.get("module"):
    raise ValueError(f"config.{name}.module: missing (dotted path of a flax module class)")
  if cfg.get("checkpoint"):
    module = module_from_checkpoint(cfg, name)
    return _set_dtypes(module, cfg)
  cls = import_object(cfg.module)
  fields = {}
  if cfg.get("preset"):
    mod = importlib.import_module(cfg.module.rpartition(".")[0])
    tables = {k: v for k, v in vars(mod).items() if k.endswith("_PRESETS") and isinstance(v, dict)}
    hits = [t[cfg.preset] for t in tables.values() if cfg.preset in t]
    if not hits:
      known = sorted(p for t in tables.values() for p in t)
      raise ValueError(f"config.{name}.preset={cfg.preset!r}: unknown (known: {known})")
    fields.update(hits[0])
  fields.update(_to_dict(cfg.get("config")))
  for k, v in (overrides or {}).items():
    if fields.get(k) == -1:
      fields[k] = v
  fields = _tuplify(fields)
  if hasattr(cls, "from_config"):
    module = cls.from_config(fields)
  else:
    known = getattr(cls, "__dataclass_fields__", {})
    bad = sorted(k for k in fields if k not in known)
    if bad:
      raise ValueError(f"config.{name}.config: unknown fields {bad} for {cfg.module}")
    module = cls(**fields)
  return _set_dtypes(module, cfg)


def _set_dtypes(module: nn.Module, cfg: Any) -> nn.Module:
  extra = {}
  for key in ("dtype", "param_dtype", "remat", "scan_layers"):
    if cfg.get(key) is not None and key in module.__dataclass_fields__:
      extra[key] = jnp.dtype(cfg[key]) if "dtype" in key else bool(cfg[key])
  return module.clone(**extra) if extra else module


# Pretrained folders (diffusers / transformers save_pretrained layout, safetensors only), by module class name.
_CHECKPOINT_KINDS = {"UNet2DConditionModel": "unet", "CLIPTextModel": "clip", "AutoencoderKL": "vae",
                     "FluxTransformer": "flux", "T5Encoder": "t5"}


def _checkpoint_kind(cfg: Any, name: str) -> str:
  kind = _CHECKPOINT_KINDS.get(cfg.module.rpartition(".")[2])
  if kind is None:
    raise ValueError(f"config.{name}.checkpoint: no loader for {cfg.module} (loaders: {sorted(_CHECKPOINT_KINDS)})")
  return kind


def module_from_checkpoint(cfg: Any, name: str) -> nn.Module:
  """The module described by `cfg.checkpoint`/config.json (no weights read)."""
  from t2i.convert.common import read_config
  folder = cfg.checkpoint
  conf = read_config(folder)
  source = os.path.join(folder, "config.json")
  kind = _checkpoint_kind(cfg, name)
  if kind == "unet":
    from t2i.models.unet import UNet2DConditionModel
    return UNet2DConditionModel.from_config(conf)
  if kind == "flux":
    from t2i.models.mmdit import FluxTransformer
    return FluxTransformer.from_config(conf)
  if kind == "t5":
    from t2i.convert.t5 import t5_from_config
    return t5_from_config(conf, source)
  if kind == "clip":
    from t2i.convert.clip import clip_text_from_config
    proj = "WithProjection" in " ".join(conf.get("architectures") or []) or \
        bool(_to_dict(cfg.get("config")).get("with_projection", False))
    return clip_text_from_config(conf, source, with_projection=proj)
  from t2i.convert.vae import vae_from_config
  return vae_from_config(conf, source)


def load_checkpoint_params(cfg: Any, name: str) -> Any:
  """Unboxed float32 params of `cfg.checkpoint` (numpy / host arrays)."""
  kind = _checkpoint_kind(cfg, name)
  scan = bool(cfg.get("scan_layers", False))  # blocks stacked for a scanned module (t2i.nn.scan)
  if kind == "unet":
    from t2i.convert.unet import load_diffusers_unet
    return load_diffusers_unet(cfg.checkpoint, scan_layers=scan)[1]
  if kind == "flux":
    from t2i.convert.flux import load_diffusers_flux
    return load_diffusers_flux(cfg.checkpoint, scan_layers=scan)[1]
  if kind == "t5":
    from t2i.convert.t5 import load_transformers_t5_encoder
    return load_transformers_t5_encoder(cfg.checkpoint, scan_layers=scan)[1]
  if kind == "clip":
    from t2i.convert.clip import load_transformers_clip_text
    return load_transformers_clip_text(cfg.checkpoint)[1]
  from t2i.convert.vae import load_diffusers_vae
  return load_diffusers_vae(cfg.checkpoint)[1]


@dataclasses.dataclass(frozen=True, eq=False)
class T2IModels:
  """Modules and constants the objective needs; closed over by the jitted step (not a jit argument)."""
  denoiser: nn.Module             # U-Net (NHWC in/out) or FLUX-style MMDiT (packed tokens; see `denoise`)
  text_encoders: dict[str, nn.Module]
  vae: nn.Module | None
  trainable: tuple[str, ...]      # names of trainable param groups ("unet", "text_encoder", ...)
  image_size: int
  max_length: int
  latent_shape: tuple[int, ...]   # per-example NHWC shape the denoiser sees (before MMDiT packing)
  uncond_ids: np.ndarray          # int32 [L]: the empty prompt
  schedule: Any                   # diffusion noise schedule (None for flow objectives)
  config: Any                     # the full experiment config (loss options etc.)
  denoiser_name: str = "unet"     # its param group: "unet" or "transformer"
  reference: nn.Module | None = None  # frozen copy (group "reference"): DPO/SPIN reference, distillation teacher
  add_time_ids: bool = False
  hidden_layers: tuple[int, ...] = ()   # per text encoder: -1 = final (normed) output, -2 = penultimate, ...
  id_blocks: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # encoder -> input_ids columns

  @property
  def is_mmdit(self) -> bool:
    return hasattr(self.denoiser, "guidance_embeds")

  @property
  def self_condition(self) -> float:
    """config.diffusion.self_condition of a U-Net run (0: off); the denoiser then reads [x_t, x0 estimate]."""
    if self.schedule is None:
      return 0.0
    return float(self.config.diffusion.get("self_condition") or 0.0)

  # -- the model-family interface (t2i.train.family): what the loop, step and sampler ask of a models object
  def init_fns(self) -> dict[str, Callable[[jax.Array], Any]]:
    return init_fns(self)

  def batch_shapes(self, batch_size: int, pair: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    """"image" [B, S, S, 3] float32 in [-1, 1], "input_ids" [B, L] int32 (+ "image_l" for pair objectives,
    + "loss_weight" [B] float32 when a data source weighs its samples: `pipeline.has_loss_weights`, + "mask"
    [B, S, S, 1] float32 in [0, 1] with config.data.alpha_mask, + "neg_input_ids" [B, L] int32 and "neg_mask"
    [B] float32 with config.data.negative_caption, + "group_tokens" [B, K, L1], "group_masks" [B, K, S / p,
    S / p] and "group_placed" [B, K] float32 with config.data.token_groups: K = max_groups, L1 the first id block,
    p = group_mask_pool)."""
    from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top
    s = self.image_size
    shapes = {"image": ((batch_size, s, s, 3), jnp.float32), "input_ids": ((batch_size, self.max_length), jnp.int32)}
    if pair:
      shapes["image_l"] = shapes["image"]
    data = self.config.get("data")
    if data is not None and pipeline.has_loss_weights(data):
      shapes["loss_weight"] = ((batch_size,), jnp.float32)
    if data is not None and data.get("alpha_mask") and not pair:
      shapes["mask"] = ((batch_size, s, s, 1), jnp.float32)
    if data is not None and data.get("negative_caption") and not pair:
      shapes["neg_input_ids"] = shapes["input_ids"]
      shapes["neg_mask"] = ((batch_size,), jnp.float32)
    if data is not None and data.get("token_groups") and not pair:
      k, pool = int(data.get("max_groups", 4)), int(data.get("group_mask_pool", 1))
      start, stop = self.id_blocks.get("text_encoder", (0, self.max_length))
      shapes["group_tokens"] = ((batch_size, k, stop - start), jnp.float32)
      shapes["group_masks"] = ((batch_size, k, s // pool, s // pool), jnp.float32)
      shapes["group_placed"] = ((batch_size, k), jnp.float32)
    return shapes

  def noise(self, seeds: jax.Array) -> jax.Array:
    """Starting latents x_T [n, *latent_shape]: sample i is N(0, 1) noise of PRNGKey(seeds[i])."""
    shape = tuple(self.latent_shape)
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape))(seeds)

  def encoder_ids(self, name: str, input_ids: jax.Array) -> jax.Array:
    """The columns of `input_ids` [B, L] that text encoder `name` reads: its block when two tokenizers are set
    (`Tokenizer`), else all of them, cut to the encoder's max_position_embeddings (FLUX: CLIP reads 77, T5 512)."""
    if name in self.id_blocks:
      start, stop = self.id_blocks[name]
      return input_ids[:, start:stop]
    limit = getattr(self.text_encoders[name], "max_position_embeddings", None)
    return input_ids[:, :limit] if limit else input_ids

  def encode_text(self, params: dict[str, Any], input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(encoder_hidden_states, pooled): hidden states of all encoders concatenated, pooled of the last."""
    hs, pooled = [], None
    layers = self.hidden_layers or (-1,) * len(self.text_encoders)
    for (name, te), layer in zip(self.text_encoders.items(), layers):
      ids = self.encoder_ids(name, input_ids)
      if layer == -1:
        h, pooled = te.apply({"params": params[name]}, ids)
      else:
        _, pooled, all_h = te.apply({"params": params[name]}, ids, output_hidden_states=True)
        h = all_h[layer]
      hs.append(h)
    return jnp.concatenate(hs, -1) if len(hs) > 1 else hs[0], pooled

  def cond(self, params: dict[str, Any], input_ids: jax.Array, time_ids: jax.Array | None = None) -> dict:
    """The denoiser's conditioning dict for token ids [B, L]."""
    if self.is_mmdit:
      out = {n: te.apply({"params": params[n]}, self.encoder_ids(n, input_ids)) for n, te in self.text_encoders.items()}
      context = out["text_encoder_2"] if "text_encoder_2" in out else out["text_encoder"]
      context = context[0] if isinstance(context, tuple) else context
      pooled = out["text_encoder"][1]
      return {"encoder_hidden_states": context, "pooled_projections": pooled}
    ehs, pooled = self.encode_text(params, input_ids)
    return self.cond_from_embeddings(ehs, pooled, time_ids)

  def cond_from_embeddings(self, ehs: jax.Array, pooled: jax.Array | None, time_ids: jax.Array | None) -> dict:
    """U-Net conditioning; SDXL's time_ids default to (H, W, 0, 0, H, W): full image, no crop."""
    out = {"encoder_hidden_states": ehs}
    if self.add_time_ids:
      if time_ids is None:
        s = float(self.image_size)
        time_ids = jnp.broadcast_to(jnp.array([s, s, 0.0, 0.0, s, s], jnp.float32), (ehs.shape[0], 6))
      out["text_embeds"] = pooled
      out["time_ids"] = time_ids
    return out

  def denoise(self, params: Any, x: jax.Array, t: jax.Array, cond: dict, guidance: jax.Array | None = None,
              module: nn.Module | None = None, attention_maps: bool = False) -> Any:
    """Denoiser prediction for NHWC latents x [B, h, w, C] at t [B] (U-Net: integer timesteps; MMDiT: t in [0, 1]).

    An MMDiT sees x packed into 2x2 tokens with FLUX's (0, row, column) image ids and all-zero text ids; its
    output is unpacked back to NHWC. `guidance` [B] (default `cond["guidance"]`) feeds a guidance embedder and
    is ignored by a module without one; `module` defaults to the denoiser
    (pass `self.reference` to run the frozen copy). `attention_maps=True` (U-Net) returns (prediction, the
    cross-attention probabilities [B, heads, Q, L] of every layer; `t2i.objectives.attention.attention_maps`).
    """
    module = module or self.denoiser
    if guidance is None:
      guidance = cond.get("guidance")
    if self.is_mmdit:
      from t2i.models import mmdit
      b, h, w, _ = x.shape
      out = module.apply(
          {"params": params}, hidden_states=mmdit.pack_latents(x), encoder_hidden_states=cond["encoder_hidden_states"],
          pooled_projections=cond["pooled_projections"], timestep=t, img_ids=mmdit.image_ids(h // 2, w // 2),
          txt_ids=mmdit.text_ids(cond["encoder_hidden_states"].shape[1]),
          guidance=guidance if module.guidance_embeds else None)
      return mmdit.unpack_latents(out, h, w)
    kw = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
    if attention_maps:
      from t2i.objectives import attention
      out, state = module.apply({"params": params}, x, t, cond["encoder_hidden_states"], mutable=["intermediates"],
                                **kw)
      return out, attention.attention_maps(state["intermediates"])
    return module.apply({"params": params}, x, t, cond["encoder_hidden_states"], **kw)

  @property
  def latent_scale(self) -> tuple[float, float]:
    if self.vae is None:
      return 1.0, 0.0
    return float(self.vae.scaling_factor), float(getattr(self.vae, "shift_factor", None) or 0.0)

  def to_latents(self, params: dict[str, Any], image: jax.Array, rng: jax.Array) -> jax.Array:
    if self.vae is None:
      return image
    mean, logvar = self.vae.apply({"params": params["vae"]}, image, method="encode")
    return self.latents_from_moments(mean, logvar, rng)

  def latents_from_moments(self, mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A posterior sample, shifted and scaled as the U-Net sees latents."""
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    scale, shift = self.latent_scale
    return (z - shift) * scale

  def to_image(self, params: dict[str, Any], latents: jax.Array) -> jax.Array:
    if self.vae is None:
      return latents
    scale, shift = self.latent_scale
    return self.vae.apply({"params": params["vae"]}, latents / scale + shift, method="decode")


def build_models(config: Any, tokenize: Tokenizer) -> T2IModels:
  from t2i.objectives import diffusion
  name = denoiser_name(config)
  denoiser = build_module(config[name], name)
  encoders = {}
  for n in TEXT_ENCODERS:
    if config.get(n) is not None:
      tok = tokenize.for_encoder(n)
      encoders[n] = build_module(config[n], n, {"vocab_size": tok.vocab_size, "eos_token_id": tok.eos_token_id})
  if "text_encoder" not in encoders:
    raise ValueError("config.text_encoder: missing")
  lengths = tokenize.block_lengths()
  id_blocks = {}
  if len(lengths) == 2:
    if "text_encoder_2" not in encoders:
      raise ValueError("config.tokenizer_2 is set but config.text_encoder_2 is not: the second id block has no reader")
    id_blocks = {"text_encoder": (0, lengths[0]), "text_encoder_2": (lengths[0], sum(lengths))}
  vae = None
  if config.get("vae") is not None:
    vae = build_module(config.vae, "vae")
  reference = None
  if config.get("reference") is not None:
    ref_cfg = ml_collections.ConfigDict(config[name].to_dict())
    ref_cfg.config.update(_to_dict(config.reference.get("config")))
    ref_cfg.checkpoint = None
    reference = build_module(ref_cfg, "reference")
  trainable = (name,) + tuple(n for n in encoders if config[n].get("trainable", False))
  size = int(config.image_size)
  if vae is not None:
    z = jax.eval_shape(lambda x: vae.init_with_output(jax.random.PRNGKey(0), x, method="encode")[0][0],
                       jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    latent_shape = tuple(z.shape[1:])
  else:
    latent_shape = (size, size, 3)
  schedule = None
  if config.get("diffusion") is not None and not hasattr(denoiser, "guidance_embeds"):
    schedule = diffusion.make_schedule(**_to_dict(config.diffusion.schedule))
    _check_self_condition(config, name, denoiser, latent_shape)
  return T2IModels(
      denoiser=denoiser, text_encoders=encoders, vae=vae, trainable=trainable, image_size=size,
      max_length=sum(lengths), latent_shape=latent_shape, uncond_ids=tokenize([""])[0], id_blocks=id_blocks,
      schedule=schedule, config=config, denoiser_name=name, reference=reference,
      add_time_ids=getattr(denoiser, "addition_embed_type", None) == "text_time",
      hidden_layers=tuple(int(config[n].get("hidden_layer", -1)) for n in encoders))


def _check_self_condition(config: Any, name: str, denoiser: nn.Module, latent_shape: tuple[int, ...]) -> None:
  """Self-conditioning needs a denoiser reading twice the latent channels and the plain diffusion objective."""
  p = float(config.diffusion.get("self_condition") or 0.0)
  if not p:
    return
  if not 0.0 < p <= 1.0:
    raise ValueError(f"config.diffusion.self_condition must be in [0, 1] (share of steps), got {p}")
  c = latent_shape[-1]
  if getattr(denoiser, "in_channels", None) != 2 * c:
    raise ValueError(f"config.diffusion.self_condition: config.{name}.config.in_channels must be {2 * c} "
                     f"(latent channels {c} + the x0 estimate's {c}), got {getattr(denoiser, 'in_channels', None)}")
  if config.get("objective", "diffusion") != "diffusion":
    raise ValueError(f"config.diffusion.self_condition is supported by objective 'diffusion' only, "
                     f"not {config.objective!r}")
  if config.diffusion.get("sigma_data"):
    raise ValueError("config.diffusion.self_condition and config.diffusion.sigma_data cannot be combined")


def init_fns(models: T2IModels) -> dict[str, Callable[[jax.Array], Any]]:
  """name -> init(rng) returning boxed params, for every module (trainable or frozen)."""
  b, L = 1, models.max_length
  ids = jnp.zeros((b, L), jnp.int32)
  fns: dict[str, Callable[[jax.Array], Any]] = {}
  for name, te in models.text_encoders.items():
    te_ids = models.encoder_ids(name, ids)
    fns[name] = (lambda te, te_ids: lambda rng: te.init(rng, te_ids)["params"])(te, te_ids)

  def denoiser_init(module):
    def init(rng):
      te_params = {n: nn.meta.unbox(jax.eval_shape(fns[n], jax.random.PRNGKey(0))) for n in models.text_encoders}
      cond = jax.eval_shape(lambda p: models.cond(p, ids), te_params)
      cond = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), cond)
      x = jnp.zeros((b,) + models.latent_shape, jnp.float32)
      if models.self_condition:
        x = jnp.concatenate([x, x], axis=-1)
      t = jnp.zeros((b,), jnp.float32 if models.is_mmdit else jnp.int32)
      return _init_denoiser(models, module, rng, x, t, cond, jnp.ones((b,), jnp.float32))
    return init
  fns[models.denoiser_name] = denoiser_init(models.denoiser)
  if models.reference is not None:
    fns["reference"] = denoiser_init(models.reference)
  if models.vae is not None:
    size = models.image_size
    # .get: a parameter-free stand-in (t2i.models.patch_ae.SpaceToDepth) has no "params" collection.
    fns["vae"] = lambda rng: models.vae.init(rng, jnp.zeros((1, size, size, 3), jnp.float32)).get("params", {})
  return fns


def _init_denoiser(models: T2IModels, module: nn.Module, rng: jax.Array, x: jax.Array, t: jax.Array, cond: dict,
                   g: jax.Array) -> Any:
  """Boxed params of `module` initialised on the inputs `models.denoise` would give it."""
  if models.is_mmdit:
    from t2i.models import mmdit
    b, h, w, _ = x.shape
    return module.init(rng, hidden_states=mmdit.pack_latents(x), encoder_hidden_states=cond["encoder_hidden_states"],
                       pooled_projections=cond["pooled_projections"], timestep=t,
                       img_ids=mmdit.image_ids(h // 2, w // 2),
                       txt_ids=mmdit.text_ids(cond["encoder_hidden_states"].shape[1]),
                       guidance=g if module.guidance_embeds else None)["params"]
  kw = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
  return module.init(rng, x, t, cond["encoder_hidden_states"], **kw)["params"]


def pretrained_params(config: Any) -> dict[str, Any]:
  """name -> params loaded from `config.<name>.checkpoint` (host arrays, unsharded), for every model with one."""
  out = {}
  for name in DENOISERS + TEXT_ENCODERS + ("vae",):
    cfg = config.get(name)
    if cfg is not None and cfg.get("checkpoint"):
      out[name] = load_checkpoint_params(cfg, name)
  return out


# --- tokenizer ---

class Tokenizer:
  """texts -> int32 [n, L]; `vocab_size` and `eos_token_id` size the text encoder's embedding table and pooling.

  With a second tokenizer (`config.tokenizer_2`: FLUX's T5 tokenizer, SDXL's OpenCLIP one) a call returns both
  id blocks side by side, [n, L1 + L2]: `text_encoder` reads the first L1 columns and `text_encoder_2` the last L2
  (`T2IModels.encoder_ids`). Everything else (data, caches, sampling, preference pairs) sees one "input_ids" array.
  """

  def __init__(self, fn: Callable[[list[str]], np.ndarray], vocab_size: int, eos_token_id: int,
               second: "Tokenizer | None" = None, span_fn: Callable[..., np.ndarray] | None = None):
    self._fn = fn
    self._span_fn = span_fn
    self.vocab_size = int(vocab_size)
    self.eos_token_id = int(eos_token_id)
    self.second = second

  def __call__(self, texts: list[str]) -> np.ndarray:
    ids = self._fn(list(texts))
    if self.second is not None:
      ids = np.concatenate([ids, self.second(texts)], axis=1)
    return ids

  def span_tokens(self, texts: list[str], spans: list, max_groups: int) -> np.ndarray:
    """float32 [n, max_groups, L1]: which tokens of the first id block hold each group's character spans
    (`t2i.text.tokenizer.span_token_masks`; config.data.token_groups)."""
    if self._span_fn is None:
      raise ValueError("config.data.token_groups needs a tokenizer with character offsets (not the toy one)")
    return self._span_fn(list(texts), spans, max_groups)

  def for_encoder(self, name: str) -> "Tokenizer":
    """The tokenizer whose ids text encoder `name` reads (its vocabulary sizes that encoder)."""
    return self.second if name == "text_encoder_2" and self.second is not None else self

  def block_lengths(self) -> tuple[int, ...]:
    """Columns per id block: (L,) or (L1, L2)."""
    first = (int(np.asarray(self._fn([""])).shape[1]),)
    return first + (self.second.block_lengths() if self.second is not None else ())


def unconditional_ids(tokenize: Tokenizer, prompts: list[str], negative: str = "") -> np.ndarray:
  """ids [n, L] of the CFG stream of `prompts`: `tokenize.unconditional(prompts, negative)` for tokenizers whose
  unconditional prompt depends on the prompt (retrieval-augmented token models), else `negative` repeated."""
  fn = getattr(tokenize, "unconditional", None)
  if fn is not None:
    return np.asarray(fn(list(prompts), negative))
  return np.repeat(tokenize([negative]), len(prompts), 0)


TOKENIZERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))  # config key, encoder it feeds


def token_length(config: Any) -> int:
  """Columns of a batch's "input_ids": config.tokenizer.max_length (+ config.tokenizer_2.max_length)."""
  return sum(int(config[k].max_length) for k, _ in TOKENIZERS if config.get(k) is not None)


def setup_tokenizer(config: Any, workdir: str) -> Tokenizer:
  """Creates (or reuses) `workdir/tokenizer/` (and `workdir/tokenizer_2/`) from config.tokenizer (and
  config.tokenizer_2) and returns texts -> int32 [n, L]."""
  for key, _ in TOKENIZERS:
    cfg = config.get(key)
    out_dir = os.path.join(workdir, key)
    if cfg is None or (os.path.isdir(out_dir) and os.listdir(out_dir)):
      continue
    kind = cfg.kind
    kinds = ("toy", "shapes", "pretrained") if key == "tokenizer" else ("shapes", "pretrained")
    if kind not in kinds:
      raise ValueError(f"config.{key}.kind={kind!r}: expected one of {kinds}")
    if kind == "pretrained" and not os.path.isdir(os.path.expanduser(cfg.path or "")):
      raise FileNotFoundError(f"config.{key}.path={cfg.path!r}: not a folder (a tokenizer as save_pretrained "
                              "writes it, e.g. <pipeline>/tokenizer)")
    os.makedirs(out_dir, exist_ok=True)
    if kind == "toy":
      with open(os.path.join(out_dir, "toy.json"), "w") as f:
        json.dump({"vocab_size": int(cfg.vocab_size)}, f)
    elif kind == "shapes":
      from t2i.text.tokenizer import build_clip_tokenizer, default_shapes_corpus
      build_clip_tokenizer(default_shapes_corpus(), out_dir)
    else:
      from transformers import AutoTokenizer
      AutoTokenizer.from_pretrained(os.path.expanduser(cfg.path)).save_pretrained(out_dir)
  return load_tokenizer(config, workdir)


def load_tokenizer(config: Any, workdir: str) -> Tokenizer:
  """texts -> int32 [n, L] from `workdir/tokenizer/` (and `workdir/tokenizer_2/` when config.tokenizer_2 is set)."""
  second = None
  if config.get("tokenizer_2") is not None:
    second = _load_one(os.path.join(workdir, "tokenizer_2"), int(config.tokenizer_2.max_length))
  first = _load_one(os.path.join(workdir, "tokenizer"), int(config.tokenizer.max_length))
  first.second = second
  return first


def _load_one(tok_dir: str, max_length: int) -> Tokenizer:
  toy = os.path.join(tok_dir, "toy.json")
  if os.path.exists(toy):
    from t2i.train.toy import toy_tokenize
    with open(toy) as f:
      vocab = json.load(f)["vocab_size"]
    return Tokenizer(lambda texts: toy_tokenize(texts, max_length, vocab), vocab, 2)
  if not os.path.isdir(tok_dir):
    raise FileNotFoundError(f"{tok_dir}: no tokenizer (a train run writes it into its workdir)")
  from transformers import AutoTokenizer
  from t2i.text.tokenizer import span_token_masks, tokenize
  tok = AutoTokenizer.from_pretrained(tok_dir)
  span_fn = None
  if getattr(tok, "is_fast", False):
    span_fn = lambda texts, spans, k: span_token_masks(tok, texts, spans, k, max_length)  # noqa: E731
  return Tokenizer(lambda texts: np.asarray(tokenize(tok, texts, max_length), np.int32), len(tok),
                   tok.eos_token_id, span_fn=span_fn)
