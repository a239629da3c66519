"""Contrastive image-text dual encoder (the project's small stand-in for CLIP) and its training loss.

  model = DualEncoder(vocab_size=len(tok), max_length=32, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id)
  params = nn.meta.unbox(model.init(rng, images, ids))["params"]   # images NHWC in [-1, 1], ids int [B, L]
  img = model.apply({"params": params}, images, method=DualEncoder.embed_image)      # [B, D], unit norm
  txt = model.apply({"params": params}, ids, method=DualEncoder.embed_text)          # [B, D], unit norm
  doc = model.apply({"params": params}, images, ids, method=DualEncoder.embed_document)
  doc = embed_documents(model, params, images, ids)   # jitted versions: embed_images / embed_texts / ...
  loss, metrics = contrastive_loss(params, {"images": images, "ids": ids}, rng, model)  # inside jax.grad

The image tower is a strided conv net; the text tower is `t2i.models.text.CLIPTextModel` (causal, pooled at the
first EOS). Both are projected to `embed_dim` and L2-normalised; a learnable logit scale starts at log(1/0.07).
A document embedding is normalise(mean(normalise(image), normalise(text))) (CM3Leon's retriever).
`token_dropout` implements the 20 % query-token dropout applied to the text (query) side during training.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from t2i.models.text import CLIPTextModel
from t2i.nn.layers import Conv, Dense, GroupNorm

Dtype = Any


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / ||x|| over the last axis, computed in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def token_dropout(ids: jax.Array, rng: jax.Array, rate: float = 0.2, *, pad_id: int,
                  keep_special: Sequence[int] = (), replace_id: int | None = None) -> jax.Array:
  """Drops each non-special, non-padding token of `ids` [..., L] independently with probability `rate`.

  Tokens equal to `pad_id` or listed in `keep_special` (e.g. BOS / EOS) are never dropped. With
  `replace_id=None` dropped tokens are removed and the row is compacted to the left and re-padded with `pad_id`
  (positions shift, the EOS moves forward); otherwise they are overwritten with `replace_id`. Pure and jit-able;
  the same `rng` gives the same result.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"token_dropout: rate={rate} must be in [0, 1)")
  ids = jnp.asarray(ids)
  if ids.ndim < 1:
    raise ValueError(f"token_dropout: ids must have a length axis, got shape {ids.shape}")
  droppable = ids != pad_id
  for s in keep_special:
    droppable &= ids != int(s)
  drop = droppable & (jax.random.uniform(rng, ids.shape) < rate)
  if replace_id is not None:
    return jnp.where(drop, jnp.asarray(replace_id, ids.dtype), ids)
  order = jnp.argsort(drop.astype(jnp.int32), axis=-1, stable=True)  # kept tokens first, original order
  compact = jnp.take_along_axis(ids, order, axis=-1)
  n_keep = jnp.sum(~drop, axis=-1, keepdims=True)
  return jnp.where(jnp.arange(ids.shape[-1]) < n_keep, compact, jnp.asarray(pad_id, ids.dtype))


class ImageTower(nn.Module):
  """Strided 3x3 conv stages (GroupNorm + SiLU), halving the resolution each stage, then a flatten + Dense."""
  channels: Sequence[int] = (32, 64, 128)
  width: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"DualEncoder: images must be NHWC RGB [batch, h, w, 3], got shape {images.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    for i, c in enumerate(self.channels):
      x = Conv(c, (3, 3), strides=(2, 2), name=f"conv_{i}", **kw)(x)
      x = nn.silu(GroupNorm(min(8, c), name=f"norm_{i}", **kw)(x))
    x = x.reshape(x.shape[0], -1)  # keep the spatial layout: captions name positions
    return nn.silu(Dense(self.width, axes=(None, "embed"), name="fc", **kw)(x))


class DualEncoder(nn.Module):
  """Image and text towers projected to a shared `embed_dim`; `__call__` returns (img [B, D], txt [B, D],
  logit_scale) with unit-norm embeddings and logit_scale = exp(param) clipped at 100."""
  vocab_size: int
  max_length: int = 32
  bos_id: int = 0
  eos_id: int = 1
  pad_id: int = 1
  embed_dim: int = 64
  text_width: int = 64
  text_layers: int = 2
  text_heads: int = 4
  image_channels: Sequence[int] = (32, 64, 128)
  image_width: int = 128
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.image_tower = ImageTower(tuple(self.image_channels), self.image_width, **kw)
    self.text_tower = CLIPTextModel(
        vocab_size=self.vocab_size, hidden_size=self.text_width, intermediate_size=4 * self.text_width,
        num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
        max_position_embeddings=self.max_length, hidden_act="gelu", eos_token_id=self.eos_id, **kw)
    self.image_proj = Dense(self.embed_dim, axes=("embed", None), use_bias=False, **kw)
    self.text_proj = Dense(self.embed_dim, axes=("embed", None), use_bias=False, **kw)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(math.log(1 / 0.07)), ()), (),
        jnp.float32)

  def embed_image(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> unit-norm [B, embed_dim] float32."""
    return l2_normalize(self.image_proj(self.image_tower(images)))

  def embed_text(self, ids: jax.Array) -> jax.Array:
    """int [B, L] (BOS text EOS pad..., L <= max_length) -> unit-norm [B, embed_dim] float32."""
    _, pooled = self.text_tower(ids)
    return l2_normalize(self.text_proj(pooled))

  def embed_document(self, images: jax.Array, ids: jax.Array) -> jax.Array:
    """normalise(mean(normalise(image), normalise(text))): the retrieval key of an image-text document."""
    return l2_normalize(0.5 * (self.embed_image(images) + self.embed_text(ids)))

  def scale(self) -> jax.Array:
    return jnp.exp(jnp.minimum(self.logit_scale, math.log(100.0)))

  def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return self.embed_image(images), self.embed_text(ids), self.scale()


@functools.partial(jax.jit, static_argnames=("model",))
def embed_images(model: DualEncoder, params: Any, images: jax.Array) -> jax.Array:
  """Jitted `model.embed_image` (the module is static: one compile per model and shape)."""
  return model.apply({"params": params}, images, method=DualEncoder.embed_image)


@functools.partial(jax.jit, static_argnames=("model",))
def embed_texts(model: DualEncoder, params: Any, ids: jax.Array) -> jax.Array:
  """Jitted `model.embed_text`."""
  return model.apply({"params": params}, ids, method=DualEncoder.embed_text)


@functools.partial(jax.jit, static_argnames=("model",))
def embed_documents(model: DualEncoder, params: Any, images: jax.Array, ids: jax.Array) -> jax.Array:
  """Jitted `model.embed_document`: the retrieval key of image-text documents."""
  return model.apply({"params": params}, images, ids, method=DualEncoder.embed_document)


def contrastive_loss(params: Any, batch: dict[str, jax.Array], rng: jax.Array, model: DualEncoder,
                     query_dropout: float = 0.2) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE over a batch {"images": [B, H, W, 3], "ids": int [B, L]} of matching pairs.

  The text (query) side first goes through `token_dropout(rate=query_dropout)` (BOS / EOS / padding kept).
  Returns (loss, {"loss", "i2t_top1", "t2i_top1", "logit_scale"}).
  """
  for key in ("images", "ids"):
    if key not in batch:
      raise KeyError(f"contrastive_loss: batch has no {key!r} (keys: {sorted(batch)})")
  ids = batch["ids"]
  if query_dropout > 0:
    ids = token_dropout(ids, rng, query_dropout, pad_id=model.pad_id, keep_special=(model.bos_id, model.eos_id))
  img, txt, scale = model.apply({"params": params}, batch["images"], ids)
  logits = scale * img @ txt.T  # [B images, B texts]
  labels = jnp.arange(logits.shape[0])
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  loss = 0.5 * (i2t + t2i)
  metrics = {
      "loss": loss,
      "i2t_top1": jnp.mean(jnp.argmax(logits, axis=1) == labels),
      "t2i_top1": jnp.mean(jnp.argmax(logits, axis=0) == labels),
      "logit_scale": scale,
  }
  return loss, metrics
