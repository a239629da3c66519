"""Autoregressive decoding with the preallocated KV cache: one compiled `lax.fori_loop` per configuration.

  cfg = DecodeConfig(num_tokens=64, mode="sample", temperature=0.7, top_p=0.9, guidance=(3.0,),
                     allowed=(image_lo, image_hi))
  tokens = generate(module, params, [(cond_ids, cond_mask), (uncond_ids, uncond_mask)], rng, cfg)  # [B, N]

Streams: one or more left-padded prompts [B, P] (mask: 1 = token), ordered from most to least conditioned; they
are decoded as one batch [S*B] and share the chosen token each step. Guidance on logits with scales (s_0, ...):
  logits = l_{S-1} + sum_j s_j (l_j - l_{j+1})
so two streams give CM3Leon's `uncond + s (cond - uncond)` and three streams (full, image-only, uncond) give
Chameleon's `uncond + s_img (img - uncond) + s_txt (full - img)` with guidance=(s_txt, s_img).
Modes: "greedy"; "sample" (temperature + top-p); "cd_k" (contrastive decoding, CM3Leon's CD-K, expert = stream 0,
amateur = last stream): candidates V = {y: p_exp(y) >= alpha * (k-th largest p_exp)}, score
log p_exp - log p_ama on V, -inf elsewhere; then argmax (cd_sample=False) or sampling from softmax(score / T).
`allowed=(lo, hi)` restricts every generated token to ids [lo, hi) (e.g. the image-code range).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("greedy", "sample", "cd_k")
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Static decoding settings (hashable: one compilation per distinct config and shape)."""
  num_tokens: int
  mode: str = "greedy"
  temperature: float = 1.0
  top_p: float = 1.0
  guidance: tuple[float, ...] = ()
  cd_alpha: float = 0.1
  cd_k: int = 5
  cd_sample: bool = False
  allowed: tuple[int, int] | None = None
  eos_id: int | None = None
  pad_id: int = 0

  def check(self, num_streams: int) -> None:
    if self.mode not in MODES:
      raise ValueError(f"DecodeConfig.mode={self.mode!r}: expected one of {MODES}")
    if self.num_tokens < 1:
      raise ValueError(f"DecodeConfig.num_tokens must be >= 1, got {self.num_tokens}")
    if num_streams > 1 and len(self.guidance) != num_streams - 1:
      raise ValueError(f"DecodeConfig.guidance needs {num_streams - 1} scales for {num_streams} streams, "
                       f"got {self.guidance}")
    if self.mode == "cd_k" and num_streams < 2:
      raise ValueError("DecodeConfig.mode='cd_k' needs an amateur stream (at least two prompt streams)")
    if self.mode == "sample" and self.temperature <= 0:
      raise ValueError(f"DecodeConfig.temperature must be > 0 for sampling, got {self.temperature}")


def guided_logits(streams: jax.Array, scales: Sequence[float]) -> jax.Array:
  """Chained CFG over stream logits [S, B, V] (most conditioned first): l_{S-1} + sum_j s_j (l_j - l_{j+1})."""
  out = streams[-1]
  for j, s in enumerate(scales):
    out = out + s * (streams[j] - streams[j + 1])
  return out


def restrict(logits: jax.Array, allowed: tuple[int, int] | None) -> jax.Array:
  """Sets logits outside ids [lo, hi) to a large negative number."""
  if allowed is None:
    return logits
  ids = jnp.arange(logits.shape[-1])
  return jnp.where((ids >= allowed[0]) & (ids < allowed[1]), logits, _NEG)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Keeps the smallest set of highest-probability tokens whose mass reaches top_p (always the top token)."""
  if top_p >= 1.0:
    return logits
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly ahead of each token
  keep_sorted = before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits, _NEG)


def cd_k_scores(expert_logits: jax.Array, amateur_logits: jax.Array, alpha: float, k: int) -> jax.Array:
  """CD-K scores [B, V]: log p_exp - log p_ama where p_exp >= alpha * (k-th largest p_exp), else -1e30."""
  lp_exp = jax.nn.log_softmax(expert_logits.astype(jnp.float32), axis=-1)
  lp_ama = jax.nn.log_softmax(amateur_logits.astype(jnp.float32), axis=-1)
  kth = jax.lax.top_k(lp_exp, k)[0][..., -1:]
  keep = lp_exp >= kth + jnp.log(jnp.float32(alpha))
  return jnp.where(keep, lp_exp - lp_ama, _NEG)


def select_tokens(stream_logits: jax.Array, rng: jax.Array, cfg: DecodeConfig) -> jax.Array:
  """Next token [B] from per-stream logits [S, B, V] under `cfg` (guidance, range restriction, mode)."""
  if cfg.mode == "cd_k":
    expert = restrict(stream_logits[0], cfg.allowed)
    scores = cd_k_scores(expert, stream_logits[-1], cfg.cd_alpha, cfg.cd_k)
    if not cfg.cd_sample:
      return jnp.argmax(scores, axis=-1)
    return jax.random.categorical(rng, scores / max(cfg.temperature, 1e-6), axis=-1)
  logits = guided_logits(stream_logits, cfg.guidance) if stream_logits.shape[0] > 1 else stream_logits[0]
  logits = restrict(logits, cfg.allowed)
  if cfg.mode == "greedy":
    return jnp.argmax(logits, axis=-1)
  logits = top_p_filter(logits / cfg.temperature, cfg.top_p)
  return jax.random.categorical(rng, logits, axis=-1)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to [n, length] (default: the longest); returns (ids int32, mask bool)."""
  length = length or max(len(s) for s in seqs)
  ids = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), bool)
  for i, s in enumerate(seqs):
    if len(s) > length:
      raise ValueError(f"left_pad: sequence {i} has {len(s)} tokens, more than length={length}")
    if len(s):
      ids[i, length - len(s):] = s
      mask[i, length - len(s):] = True
  return ids, mask


def generate(module: Any, params: Any, streams: Sequence[tuple[Any, Any]] | Any, rng: jax.Array,
             cfg: DecodeConfig) -> jax.Array:
  """Generated tokens int32 [B, cfg.num_tokens]; `streams` is a list of (ids, mask) [B, P] pairs, or one ids array
  (no padding). After `eos_id` (if set) a row emits `pad_id`."""
  if not isinstance(streams, (list, tuple)):
    ids = jnp.asarray(streams)
    streams = [(ids, jnp.ones(ids.shape, bool))]
  cfg.check(len(streams))
  shapes = {tuple(np.shape(i)) for i, _ in streams} | {tuple(np.shape(m)) for _, m in streams}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"generate: every stream's ids and mask must share one [batch, length] shape, got {shapes}")
  ids = jnp.concatenate([jnp.asarray(i, jnp.int32) for i, _ in streams], axis=0)
  mask = jnp.concatenate([jnp.asarray(m).astype(bool) for _, m in streams], axis=0)
  return _generate(module, cfg, len(streams), params, ids, mask, rng)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(module, cfg: DecodeConfig, num_streams: int, params, ids, mask, rng):
  sb, p = ids.shape
  b = sb // num_streams
  cache = module.init_cache(sb, p + cfg.num_tokens)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  logits, cache = module.apply({"params": params}, ids, positions=positions, attention_mask=mask, cache=cache)
  last_pos = positions[:, -1]

  def pick(logits_last, i, done):
    tok = select_tokens(logits_last.reshape(num_streams, b, -1), jax.random.fold_in(rng, i), cfg)
    tok = jnp.where(done, cfg.pad_id, tok).astype(jnp.int32)
    if cfg.eos_id is not None:
      done = done | (tok == cfg.eos_id)
    return tok, done

  def body(i, carry):
    out, logits_last, cache, done = carry
    tok, done = pick(logits_last, i, done)
    out = out.at[:, i].set(tok)
    step_ids = jnp.tile(tok, num_streams)[:, None]
    pos = (last_pos + 1 + i)[:, None]
    new_logits, cache = module.apply({"params": params}, step_ids, positions=pos, cache=cache)
    return out, new_logits[:, -1], cache, done

  out = jnp.zeros((b, cfg.num_tokens), jnp.int32)
  done = jnp.zeros((b,), bool)
  out, logits_last, _, done = jax.lax.fori_loop(0, cfg.num_tokens - 1, body, (out, logits[:, -1], cache, done))
  tok, _ = pick(logits_last, cfg.num_tokens - 1, done)
  return out.at[:, -1].set(tok)
