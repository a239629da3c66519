"""Tiny stand-in models with the real models' call signatures, for fast smoke tests of the train stack.

`ToyUNet` follows `UNet2DConditionModel`'s interface (from_config; apply(p, x_nhwc, t, encoder_hidden_states,
text_embeds=None, time_ids=None) -> NHWC) and `ToyTextEncoder` follows `CLIPTextModel`'s (apply(p, ids) ->
(last_hidden_state, pooled)). Parameters carry logical axis names so the sharding rules apply to them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from t2i.nn import layers


class ToyUNet(nn.Module):
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (32,)
  cross_attention_dim: int = 32
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False

  @classmethod
  def from_config(cls, config: dict[str, Any], **kw) -> "ToyUNet":
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
              if k in cls.__dataclass_fields__}
    return cls(**fields, **kw)

  @nn.compact
  def __call__(self, x, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
    c = self.block_out_channels[0]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), x.shape[:1])
    freqs = jnp.exp(-jnp.arange(c // 2) * (jnp.log(10000.0) / (c // 2)))
    temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
    temb = layers.Dense(c, axes=("embed", "mlp"), **kw)(temb)
    ctx = layers.Dense(c, axes=("embed", "mlp"), **kw)(encoder_hidden_states.mean(1))
    h = layers.Conv(c, **kw)(x)
    h = layers.constrain(h, layers.IMAGE_AXES)
    h = nn.silu(layers.GroupNorm(8, **kw)(h) + (temb + ctx)[:, None, None, :])
    h = layers.Conv(c, **kw)(h)
    h = nn.silu(layers.GroupNorm(8, **kw)(h))
    return layers.Conv(self.out_channels, **kw)(h)


class ToyTextEncoder(nn.Module):
  vocab_size: int = 1000
  hidden_size: int = 32
  max_position_embeddings: int = 16
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    emb = self.param("token_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("vocab", "embed")),
                     (self.vocab_size, self.hidden_size), self.param_dtype)
    pos = self.param("position_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                        (None, "embed")),
                     (self.max_position_embeddings, self.hidden_size), self.param_dtype)
    h = jnp.take(emb, input_ids, axis=0) + pos[:input_ids.shape[1]]
    h = h + layers.Dense(self.hidden_size, axes=("mlp", "embed"))(
        nn.gelu(layers.Dense(4 * self.hidden_size, axes=("embed", "mlp"))(layers.LayerNorm()(h))))
    h = layers.LayerNorm()(h)
    return h, h[:, -1]


# --- toy tokenizer and data (deterministic, checkpointable), used when config.data.name == "toy" ---

def toy_tokenize(texts: list[str], max_length: int, vocab_size: int) -> "np.ndarray":
  """Words -> ids by CRC32 hash (0 = pad, 1 = bos, 2 = eos); int32 [n, max_length]."""
  import zlib
  import numpy as np
  out = np.zeros((len(texts), max_length), np.int32)
  for i, t in enumerate(texts):
    ids = [1] + [3 + zlib.crc32(w.encode()) % (vocab_size - 3) for w in t.lower().split()][:max_length - 2] + [2]
    out[i, :len(ids)] = ids
  return out


TOY_WORDS = (("red", "green", "blue", "yellow"), ("circle", "square"))


class ToyDataIterator:
  """Yields {"image": f32 [B,S,S,3] in [-1,1], "input_ids": i32 [B,L]}: a coloured disc or square per caption.

  Batch n is a pure function of (seed, n); `get_state()` / `set_state()` carry n, like a grain iterator.
  """

  def __init__(self, tokenize_fn, global_batch_size: int, image_size: int, seed: int = 0, nan_batch: int = -1,
               pair: bool = False):
    self._nan_batch = nan_batch  # >= 0: that batch's images are NaN (exercises the NaN guard)
    self._pair = pair  # also "image_l": the same shape in the next colour (a rejected image for pair objectives)
    self._tok = tokenize_fn
    self._b = global_batch_size
    self._s = image_size
    self._seed = seed
    self._n = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    import numpy as np
    rng = np.random.default_rng([self._seed, self._n])
    self._n += 1
    colours = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1)}
    s = self._s
    yy, xx = np.mgrid[:s, :s] / (s - 1) * 2 - 1
    images, losers, texts = [], [], []
    for _ in range(self._b):
      ci = int(rng.integers(4))
      c = TOY_WORDS[0][ci]
      shape = TOY_WORDS[1][rng.integers(2)]
      cx, cy = rng.uniform(-0.4, 0.4, 2)
      mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < 0.25) if shape == "circle" else \
          (np.maximum(abs(xx - cx), abs(yy - cy)) < 0.45)
      images.append(np.where(mask[..., None], np.array(colours[c], np.float32), -0.5).astype(np.float32))
      wrong = colours[TOY_WORDS[0][(ci + 1) % 4]]
      losers.append(np.where(mask[..., None], np.array(wrong, np.float32), -0.5).astype(np.float32))
      texts.append(f"a {c} {shape}")
    images = np.stack(images)
    if self._n - 1 == self._nan_batch:
      images[:] = np.nan
    out = {"image": images, "input_ids": self._tok(texts)}
    if self._pair:
      out["image_l"] = np.stack(losers)
    return out

  def get_state(self) -> dict:
    return {"seed": self._seed, "next_batch": self._n}

  def set_state(self, state: dict) -> None:
    if state.get("seed") != self._seed:
      raise ValueError(f"toy data state has seed {state.get('seed')}, iterator has {self._seed}")
    self._n = int(state["next_batch"])
