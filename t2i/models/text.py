"""CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection layout).

Field names follow transformers' `CLIPTextConfig`, so a `config.json` maps onto the module directly; see
`t2i.convert.clip` for the weight mapping.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from t2i.nn.attention import dot_product_attention
from t2i.nn.layers import Dense, LayerNorm, TOKEN_AXES, constrain

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in _ACTIVATIONS:
    raise ValueError(f"CLIPTextModel.hidden_act={name!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class SelfAttention(nn.Module):
  """Multi-head self-attention with q/k/v/out projections (all with bias)."""
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    b, n, d = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q, k, v = (Dense(d, axes=("embed", "heads"), name=name, **kw)(x).reshape(b, n, self.num_heads, -1)
               for name in ("q_proj", "k_proj", "v_proj"))
    y = dot_product_attention(q, k, v, mask=mask).reshape(b, n, d)
    return Dense(d, axes=("heads", "embed"), name="out_proj", **kw)(y)


class EncoderLayer(nn.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
    x = constrain(x + SelfAttention(self.num_heads, name="self_attn", **kw)(h, mask), TOKEN_AXES)
    h = LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
    h = Dense(self.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(h)
    h = constrain(activation(self.hidden_act)(h), ("batch", "length", "mlp"))
    h = Dense(x.shape[-1], axes=("mlp", "embed"), name="fc2", **kw)(h)
    return constrain(x + h, TOKEN_AXES)


class CLIPTextModel(nn.Module):
  """CLIP text transformer with a causal mask (`causal=False`: bidirectional, for encoders trained from scratch).

  `apply({"params": p}, input_ids)` -> (last_hidden_state [b, n, hidden], pooled [b, hidden]); the pooled
  vector is the final-normed state at the EOS token (or, with `with_projection`, its projection `text_embeds`
  [b, projection_dim]). With `output_hidden_states=True` a third element holds the embeddings output and every
  layer's output (num_hidden_layers + 1 arrays, before the final LayerNorm; SDXL uses `[-2]`).
  """
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 512
  with_projection: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False
  # False: every token attends to every token (like T5), so a word also reads what follows it ("a red circle" in
  # "a red circle above a blue square" knows it is the upper one). CLIP checkpoints are causal.
  causal: bool = True
  # True: the last hidden state also carries each token's own embedding (without position or context), appended
  # after the hidden_size channels ([b, n, 2 * hidden]; the pooled output is unchanged). A U-Net's layout splat
  # can then paint what a word is at the place its contextual state names, without the other object's words
  # that context mixes in (`UNet2DConditionModel.layout_splat_value_channels`). Not a transformers option.
  append_token_embeddings: bool = False

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               output_hidden_states: bool = False):
    """input_ids: int [b, n] with n <= max_position_embeddings; attention_mask: optional [b, n], 1 = token."""
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextModel: hidden_size={self.hidden_size} not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")
    activation(self.hidden_act)
    if input_ids.ndim != 2 or input_ids.shape[1] > self.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: input_ids must be [batch, length<= {self.max_position_embeddings}], got "
                       f"shape {input_ids.shape}")
    b, n = input_ids.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    init = nn.initializers.normal(0.02)
    tok = nn.Embed(self.vocab_size, self.hidden_size, embedding_init=nn.with_logical_partitioning(
        init, ("vocab", "embed")), name="token_embedding", **kw)
    pos = self.param("position_embedding", nn.with_logical_partitioning(init, (None, "embed")),
                     (self.max_position_embeddings, self.hidden_size), self.param_dtype)
    words = tok(input_ids)
    x = words + jnp.asarray(pos[:n], self.dtype)[None]
    x = constrain(x, TOKEN_AXES)

    mask = (jnp.tril(jnp.ones((n, n), bool)) if self.causal else jnp.ones((n, n), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    hidden_states = [x]
    for i in range(self.num_hidden_layers):
      x = layer_cls(self.num_attention_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps,
                    name=f"layers_{i}", **kw)(x, mask)
      hidden_states.append(x)
    last = LayerNorm(self.layer_norm_eps, name="final_layer_norm", **kw)(x)

    if self.eos_token_id == 2:  # legacy configs: EOS has the largest id in the vocabulary
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:  # first occurrence of eos_token_id
      eos_pos = jnp.argmax((input_ids == self.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = last[jnp.arange(b), eos_pos]
    if self.with_projection:
      pooled = Dense(self.projection_dim, axes=("embed", None), use_bias=False, name="text_projection", **kw)(pooled)
    if self.append_token_embeddings:
      last = constrain(jnp.concatenate([last, words.astype(last.dtype)], axis=-1), TOKEN_AXES)
    if output_hidden_states:
      return last, pooled, tuple(hidden_states)
    return last, pooled
