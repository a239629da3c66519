"""T5 encoder (transformers' `T5EncoderModel` layout), e.g. the T5-v1.1-XXL text encoder of FLUX.1.

Field names follow transformers' `T5Config`, so a `config.json` maps onto the module directly; see `t2i.convert.t5`
for the weight mapping. Architecture: token embedding (no scaling, no absolute positions) -> `num_layers` pre-norm
blocks [RMS norm -> self-attention -> residual, RMS norm -> (gated) MLP -> residual] -> final RMS norm. Attention
logits are not scaled by 1/sqrt(d_kv) and get a learned relative-position bias (bidirectional log buckets) that is
owned by the first layer and shared by all layers. Dropout is not applied (inference / frozen-encoder use).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i.nn.layers import Dense, RMSNorm, TOKEN_AXES, constrain
from t2i.nn.scan import STACK_SUFFIX, scanned

Dtype = Any
_NEG = -1e30

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}

T5_PRESETS: dict[str, dict[str, Any]] = {
    # google/t5-v1_1-xxl encoder (black-forest-labs/FLUX.1-dev text_encoder_2), 4.76 B parameters.
    "t5_v1_1_xxl": dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        relative_attention_num_buckets=32, relative_attention_max_distance=128,
                        layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu"),
}


def parse_feed_forward_proj(feed_forward_proj: str) -> tuple[str, bool]:
  """T5Config.feed_forward_proj -> (activation name, gated); "gated-gelu" means tanh-GELU as in transformers."""
  parts = feed_forward_proj.split("-")
  gated = len(parts) == 2 and parts[0] == "gated"
  if len(parts) > 2 or (len(parts) == 2 and not gated):
    raise ValueError(f"T5Encoder.feed_forward_proj={feed_forward_proj!r}: expected 'ACT' or 'gated-ACT'")
  act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
  if act not in _ACTIVATIONS:
    raise ValueError(f"T5Encoder.feed_forward_proj={feed_forward_proj!r}: activation {act!r} not supported; use one "
                     f"of {sorted(_ACTIVATIONS)}")
  return act, gated


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """Bidirectional T5 bucket ids [query_length, key_length] (int32) of relative positions key - query.

  Half of the buckets hold positive offsets. Within a half, offsets below num_buckets/4 get their own bucket and
  larger ones are binned logarithmically up to max_distance (float32 arithmetic, truncated, as transformers).
  """
  rel = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
  half = num_buckets // 2
  out = (rel > 0).astype(np.int64) * half
  n = np.abs(rel)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(np.maximum(n, 1).astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
  large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
  return (out + np.where(n < max_exact, n, large)).astype(np.int32)


class T5Attention(nn.Module):
  """Unscaled multi-head self-attention with an additive bias [1 or b, heads, q, k] (position bias + mask)."""
  num_heads: int
  d_kv: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, n, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    inner = self.num_heads * self.d_kv
    q, k, v = (constrain(Dense(inner, axes=("embed", "heads"), name=name, **kw)(x).reshape(
        b, n, self.num_heads, self.d_kv), ("batch", "length", "heads", "kv")) for name in ("q", "k", "v"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, inner)
    return Dense(d, axes=("heads", "embed"), name="o", **kw)(y)


class T5MLP(nn.Module):
  """wo(act(wi x)) or, gated, wo(act(wi_0 x) * wi_1 x); no biases."""
  d_ff: int
  activation: str = "relu"
  gated: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
    act = _ACTIVATIONS[self.activation]
    if self.gated:
      h = act(Dense(self.d_ff, axes=("embed", "mlp"), name="wi_0", **kw)(x)) * Dense(
          self.d_ff, axes=("embed", "mlp"), name="wi_1", **kw)(x)
    else:
      h = act(Dense(self.d_ff, axes=("embed", "mlp"), name="wi", **kw)(x))
    h = constrain(h, ("batch", "length", "mlp"))
    return Dense(x.shape[-1], axes=("mlp", "embed"), name="wo", **kw)(h)


class T5Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""
  num_heads: int
  d_kv: int
  d_ff: int
  activation: str = "relu"
  gated: bool = False
  layer_norm_epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = RMSNorm(self.layer_norm_epsilon, name="attn_norm", **kw)(x)
    x = constrain(x + T5Attention(self.num_heads, self.d_kv, name="attn", **kw)(h, bias), TOKEN_AXES)
    h = RMSNorm(self.layer_norm_epsilon, name="mlp_norm", **kw)(x)
    h = T5MLP(self.d_ff, self.activation, self.gated, name="mlp", **kw)(h)
    return constrain(x + h, TOKEN_AXES)


BLOCK_KINDS = ("block",)  # the scanned kinds (t2i.nn.scan.stack_layers)


class T5Encoder(nn.Module):
  """T5 encoder stack: `apply({"params": p}, input_ids, attention_mask=None)` -> last hidden state [b, n, d_model].

  input_ids: int [b, n]; attention_mask: optional [b, n] (1 = token, 0 = padding; padded keys are not attended,
  padded query positions still produce outputs, as in transformers). Params: `shared` (token embedding),
  `relative_attention_bias` (the first layer's [buckets, heads] table, used by every layer), `block_{i}`
  {attn_norm, attn {q,k,v,o}, mlp_norm, mlp {wi | wi_0, wi_1; wo}}, `final_layer_norm`; with `scan_layers` the
  blocks run in a `jax.lax.scan`, stacked under `block_stack` (`t2i.nn.scan`).
  """
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0  # accepted for config compatibility; dropout is never applied
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  scan_layers: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    act, gated = parse_feed_forward_proj(self.feed_forward_proj)
    if input_ids.ndim != 2:
      raise ValueError(f"T5Encoder: input_ids must be [batch, length], got shape {input_ids.shape}")
    b, n = input_ids.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")), name="shared", **kw)(input_ids)
    x = constrain(x, TOKEN_AXES)

    table = self.param("relative_attention_bias", nn.with_logical_partitioning(
        nn.initializers.normal(self.d_model ** -0.5), (None, "heads")),
        (self.relative_attention_num_buckets, self.num_heads), self.param_dtype)
    buckets = relative_position_buckets(n, n, self.relative_attention_num_buckets,
                                        self.relative_attention_max_distance)
    bias = jnp.transpose(jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0), (2, 0, 1))[None]
    if attention_mask is not None:
      if attention_mask.shape != (b, n):
        raise ValueError(f"T5Encoder: attention_mask must have shape {(b, n)}, got {attention_mask.shape}")
      bias = bias + jnp.where(attention_mask.astype(bool), 0.0, _NEG)[:, None, None, :]

    args = (self.num_heads, self.d_kv, self.d_ff, act, gated, self.layer_norm_epsilon)
    if self.scan_layers:
      x = scanned(T5Block, self.num_layers, self.remat, 1)(*args, name="block" + STACK_SUFFIX, **kw)(x, bias)[0]
    else:
      block_cls = nn.remat(T5Block) if self.remat else T5Block
      for i in range(self.num_layers):
        x = block_cls(*args, name=f"block_{i}", **kw)(x, bias)
    return RMSNorm(self.layer_norm_epsilon, name="final_layer_norm", **kw)(x)


def t5_encoder(preset: str | None = None, **overrides) -> T5Encoder:
  """T5Encoder from a `T5_PRESETS` name plus field overrides."""
  fields: dict[str, Any] = {}
  if preset is not None:
    if preset not in T5_PRESETS:
      raise ValueError(f"unknown T5 preset {preset!r}; available: {sorted(T5_PRESETS)}")
    fields.update(T5_PRESETS[preset])
  fields.update(overrides)
  return T5Encoder(**fields)
