"""Decoder-only transformer for autoregressive token models (Llama layout; CM3Leon / Chameleon switches).

Field names follow transformers' `LlamaConfig`, so `Transformer.from_config(config_dict)` reads a Llama
`config.json` directly (see `t2i.convert.llama` for the weights). Architecture: token embedding -> N blocks ->
final norm -> LM head (or the transposed embedding when `tie_word_embeddings`). A block is

  norm_order="pre"  (Llama):     h = x + attn(norm1(x));  out = h + mlp(norm2(h))
  norm_order="swin" (Chameleon): h = x + norm1(attn(x));  out = h + norm2(mlp(h))

with SwiGLU MLP `down(silu(gate(x)) * up(x))`, rotate-half RoPE (Llama convention: channel i pairs with
i + head_dim/2), grouped-query attention (`num_key_value_heads`), optional per-head `qk_norm`, and norms of kind
"rms" (learnable scale) or "layernorm_nonaffine" (CM3Leon: no parameters).

Calls (params tree names mirror transformers: embed_tokens, layers_{i}.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,
down}_proj, input_layernorm, post_attention_layernorm}, norm, lm_head):

  logits = module.apply({"params": p}, input_ids)                        # training / full recomputation
  cache = module.init_cache(batch, max_length)                           # preallocated KV cache pytree
  logits, cache = module.apply({"params": p}, ids, cache=cache, attention_mask=m, positions=pos)

The cache is an explicit pytree {"index": int32 scalar (slots filled), "valid": bool [B, M] (slot holds a real
token), "layers": ({"k", "v"}: [B, M, kv_heads, head_dim], ...)}; each call writes its L tokens at slots
[index, index + L) and returns the advanced cache, so decoding runs inside `jax.jit` + `lax.fori_loop`.
`z_loss(logits)` is Chameleon's log²Z penalty (per token).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t2i.nn.attention import dot_product_attention
from t2i.nn.layers import Dense, LayerNorm, RMSNorm, TOKEN_AXES, constrain

Dtype = Any
Cache = dict[str, Any]
HEAD_AXES = ("batch", "length", "heads", "kv")
NORM_ORDERS = ("pre", "swin")
NORM_KINDS = ("rms", "layernorm_nonaffine")
_NEG = -1e30


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), float32 [..., head_dim], for integer positions [...] in Llama's rotate-half layout.

  Inverse frequencies are computed in float32 like transformers' default RoPE: 1 / theta ** (arange(0, d, 2) / d).
  """
  if head_dim % 2:
    raise ValueError(f"rope: head_dim must be even, got {head_dim}")
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)
  ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x * cos + rotate_half(x) * sin on x [B, L, heads, head_dim] with cos/sin [B, L, head_dim]; float32 math."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def z_loss(logits: jax.Array) -> jax.Array:
  """log(Z)^2 per position, Z = sum(exp(logits)) over the vocabulary (float32); weight ~1e-5 in Chameleon."""
  return jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))


def _norm(kind: str, eps: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
  if kind == "rms":
    return RMSNorm(eps, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "layernorm_nonaffine":
    return LayerNorm(eps, use_scale=False, use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"Transformer.norm_kind={kind!r}: expected one of {NORM_KINDS}")


class Attention(nn.Module):
  """Causal GQA self-attention with RoPE; uses the blocked `dot_product_attention` without a cache and a
  grouped einsum (float32 softmax) over the preallocated cache slots with one."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  qk_norm: bool = False
  norm_kind: str = "rms"
  eps: float = 1e-6
  use_bias: bool = False
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None,
               layer_cache: dict[str, jax.Array] | None = None, index: jax.Array | None = None,
               valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    b, n, d = x.shape
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
              kernel_init=nn.initializers.normal(self.initializer_range))
    h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
    q = Dense(h * hd, axes=("embed", "heads"), name="q_proj", **kw)(x).reshape(b, n, h, hd)
    k = Dense(kvh * hd, axes=("embed", "heads"), name="k_proj", **kw)(x).reshape(b, n, kvh, hd)
    v = Dense(kvh * hd, axes=("embed", "heads"), name="v_proj", **kw)(x).reshape(b, n, kvh, hd)
    if self.qk_norm:
      q = _norm(self.norm_kind, self.eps, "q_norm", self.dtype, self.param_dtype)(q)
      k = _norm(self.norm_kind, self.eps, "k_norm", self.dtype, self.param_dtype)(k)
    q = constrain(apply_rotary(q, cos, sin), HEAD_AXES)
    k = constrain(apply_rotary(k, cos, sin), HEAD_AXES)
    v = constrain(v, HEAD_AXES)
    new_cache = None
    if layer_cache is None:
      rep = h // kvh
      kr, vr = (jnp.repeat(t, rep, axis=2) if rep > 1 else t for t in (k, v))
      y = dot_product_attention(q, kr, vr, mask)
    else:
      ck = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), (0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), (0, index, 0, 0))
      new_cache = {"k": ck, "v": cv}
      y = self._cached_attention(q, ck, cv, index, valid)
    y = constrain(y.reshape(b, n, h, hd), HEAD_AXES).reshape(b, n, h * hd)
    out = Dense(d, axes=("heads", "embed"), name="o_proj", **kw)(y)
    return out, new_cache

  def _cached_attention(self, q: jax.Array, ck: jax.Array, cv: jax.Array, index: jax.Array,
                        valid: jax.Array) -> jax.Array:
    b, n, h, hd = q.shape
    kvh, m = ck.shape[2], ck.shape[1]
    qg = q.reshape(b, n, kvh, h // kvh, hd) * jnp.asarray(hd ** -0.5, q.dtype)
    s = jnp.einsum("blkgd,bmkd->bkglm", qg, ck.astype(q.dtype), preferred_element_type=jnp.float32,
                   precision=self.precision)
    causal = jnp.arange(m)[None, :] <= index + jnp.arange(n)[:, None]  # [L, M] by slot
    allowed = causal[None] & valid[:, None, :]  # [B, L, M]
    s = jnp.where(allowed[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(cv.dtype)
    return jnp.einsum("bkglm,bmkd->blkgd", p, cv, precision=self.precision).astype(q.dtype)


class MLP(nn.Module):
  """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""
  intermediate_size: int
  use_bias: bool = False
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
              kernel_init=nn.initializers.normal(self.initializer_range))
    gate = Dense(self.intermediate_size, axes=("embed", "mlp"), name="gate_proj", **kw)(x)
    up = Dense(self.intermediate_size, axes=("embed", "mlp"), name="up_proj", **kw)(x)
    hmid = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return Dense(x.shape[-1], axes=("mlp", "embed"), name="down_proj", **kw)(hmid)


class DecoderLayer(nn.Module):
  """One block in "pre" (Llama) or "swin" (Chameleon) norm order; see the module docstring."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  eps: float = 1e-6
  norm_order: str = "pre"
  norm_kind: str = "rms"
  qk_norm: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x, cos, sin, mask, layer_cache=None, index=None, valid=None):
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                  initializer_range=self.initializer_range)
    attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.qk_norm, self.norm_kind, self.eps,
                     self.attention_bias, name="self_attn", **common)
    mlp = MLP(self.intermediate_size, self.mlp_bias, name="mlp", **common)
    norm1 = _norm(self.norm_kind, self.eps, "input_layernorm", self.dtype, self.param_dtype)
    norm2 = _norm(self.norm_kind, self.eps, "post_attention_layernorm", self.dtype, self.param_dtype)
    if self.norm_order == "pre":
      a, new_cache = attn(norm1(x), cos, sin, mask, layer_cache, index, valid)
      x = constrain(x + a, TOKEN_AXES)
      x = constrain(x + mlp(norm2(x)), TOKEN_AXES)
    elif self.norm_order == "swin":
      a, new_cache = attn(x, cos, sin, mask, layer_cache, index, valid)
      x = constrain(x + norm1(a), TOKEN_AXES)
      x = constrain(x + norm2(mlp(x)), TOKEN_AXES)
    else:
      raise ValueError(f"Transformer.norm_order={self.norm_order!r}: expected one of {NORM_ORDERS}")
    return x, new_cache


class Transformer(nn.Module):
  """Decoder-only LM; `apply({"params": p}, input_ids[, positions, attention_mask, segment_ids, cache])`.

  input_ids: int [B, L]. positions: int [B, L] RoPE positions (default: arange, or cache index + arange).
  attention_mask: [B, L] 1 = real token, 0 = padding (padded keys are never attended). segment_ids: [B, L]
  packed-document ids (attention stays within a segment; not with a cache). Returns float32 logits [B, L, vocab],
  and with `cache=` also the advanced cache.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  qk_norm: bool = False
  norm_order: str = "pre"
  norm_kind: str = "rms"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None
  remat: bool = False

  @property
  def kv_heads(self) -> int:
    return self.num_key_value_heads or self.num_attention_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_attention_heads

  @classmethod
  def from_config(cls, config: dict[str, Any], source: str = "config", **overrides) -> "Transformer":
    """Transformer from a transformers LlamaConfig dict (plus optional t2i fields qk_norm, norm_order, ...)."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act={act!r}; only 'silu' (SwiGLU) is supported")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"{source}: rope_type={rope_type!r}; only the default RoPE is supported")
    fields = {f: config[f] for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                     "max_position_embeddings", "tie_word_embeddings", "attention_bias",
                                     "mlp_bias", "initializer_range", "qk_norm", "norm_order", "norm_kind")
              if config.get(f) is not None}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    if theta is not None:
      fields["rope_theta"] = float(theta)
    return cls(**{**fields, **overrides})

  def init_cache(self, batch_size: int, max_length: int, dtype: Dtype | None = None) -> Cache:
    """Empty cache with `max_length` slots per sequence (zeros, nothing valid, index 0)."""
    shape = (batch_size, max_length, self.kv_heads, self.dim_per_head)
    dt = dtype or self.dtype
    return {"index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch_size, max_length), bool),
            "layers": tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}
                            for _ in range(self.num_hidden_layers))}

  def _check(self) -> None:
    if self.num_attention_heads % self.kv_heads:
      raise ValueError(f"Transformer: num_attention_heads={self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads={self.kv_heads}")
    if self.norm_order not in NORM_ORDERS:
      raise ValueError(f"Transformer.norm_order={self.norm_order!r}: expected one of {NORM_ORDERS}")
    if self.norm_kind not in NORM_KINDS:
      raise ValueError(f"Transformer.norm_kind={self.norm_kind!r}: expected one of {NORM_KINDS}")

  @nn.compact
  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
               cache: Cache | None = None):
    self._check()
    if input_ids.ndim != 2:
      raise ValueError(f"Transformer: input_ids must be [batch, length], got shape {input_ids.shape}")
    b, n = input_ids.shape
    tok_mask = None if attention_mask is None else attention_mask.astype(bool)
    embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(self.initializer_range),
                                                                 ("vocab", "embed")), name="embed_tokens")
    x = constrain(embed(input_ids.astype(jnp.int32)), TOKEN_AXES)

    if cache is None:
      pos = jnp.broadcast_to(jnp.arange(n), (b, n)) if positions is None else positions
      mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
      if tok_mask is not None:
        mask = mask & tok_mask[:, None, None, :]
      if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
      index = valid = None
    else:
      if segment_ids is not None:
        raise ValueError("Transformer: segment_ids are not supported together with a KV cache")
      index = cache["index"]
      pos = index + jnp.broadcast_to(jnp.arange(n), (b, n)) if positions is None else positions
      new_valid = jnp.ones((b, n), bool) if tok_mask is None else tok_mask
      valid = jax.lax.dynamic_update_slice(cache["valid"], new_valid, (0, index))
      mask = None
    cos, sin = rope_cos_sin(pos, self.dim_per_head, self.rope_theta)

    layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    new_layers = []
    for i in range(self.num_hidden_layers):
      layer = layer_cls(self.num_attention_heads, self.kv_heads, self.dim_per_head, self.intermediate_size,
                        self.rms_norm_eps, self.norm_order, self.norm_kind, self.qk_norm, self.attention_bias,
                        self.mlp_bias, self.initializer_range, self.dtype, self.param_dtype, self.precision,
                        name=f"layers_{i}")
      x, lc = layer(x, cos, sin, mask, None if cache is None else cache["layers"][i], index, valid)
      new_layers.append(lc)
    x = _norm(self.norm_kind, self.rms_norm_eps, "norm", self.dtype, self.param_dtype)(x)
    if self.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = Dense(self.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=self.dtype,
                     param_dtype=self.param_dtype, precision=self.precision,
                     kernel_init=nn.initializers.normal(self.initializer_range), name="lm_head")(x)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    if cache is None:
      return logits
    return logits, {"index": index + n, "valid": valid, "layers": tuple(new_layers)}
