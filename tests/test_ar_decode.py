"""AR decoding: KV-cache greedy == full recomputation, top-p -> 0 == greedy, CFG scale 1 == conditional, CD-K."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i.models.transformer import Transformer
from t2i.sampling.ar import (DecodeConfig, cd_k_scores, generate, guided_logits, left_pad, select_tokens,
                             top_p_filter)

TINY = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.1)


@pytest.fixture(scope="module")
def model():
  m = Transformer(**TINY)
  params = m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return m, params


def _recompute_greedy(m, params, prompt, n):
  """Greedy decoding that runs the whole sequence through the no-cache path at every step (one fixed-length
  buffer; causal attention makes the not-yet-written tail irrelevant)."""
  fwd = jax.jit(lambda ids, t: jnp.argmax(m.apply({"params": params}, ids)[:, t - 1], -1))
  p = prompt.shape[1]
  seq = np.zeros((prompt.shape[0], p + n), np.int32)
  seq[:, :p] = prompt
  for t in range(p, p + n):
    seq[:, t] = np.asarray(fwd(jnp.asarray(seq), t))
  return seq[:, p:]


def test_kv_cache_greedy_matches_recomputation(model):
  m, params = model
  prompt = np.random.RandomState(0).randint(0, TINY["vocab_size"], (2, 7)).astype(np.int32)
  got = np.asarray(generate(m, params, prompt, jax.random.key(0), DecodeConfig(num_tokens=64)))
  want = _recompute_greedy(m, params, prompt, 64)
  assert len(set(want[0].tolist())) > 3  # a non-degenerate sequence
  np.testing.assert_array_equal(got, want)


def test_cache_logits_match_full_forward_with_left_padding(model):
  m, params = model
  rs = np.random.RandomState(1)
  seqs = [rs.randint(0, 97, 9).tolist(), rs.randint(0, 97, 5).tolist()]
  ids, mask = left_pad(seqs, pad_id=0)
  apply = jax.jit(lambda *a, **k: m.apply({"params": params}, *a, **k))
  cache = m.init_cache(2, 12)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  logits, cache = apply(jnp.asarray(ids), positions=jnp.asarray(pos), attention_mask=jnp.asarray(mask), cache=cache)
  step, cache = apply(jnp.asarray([[3], [4]]), positions=jnp.asarray(pos[:, -1:] + 1), cache=cache)
  assert int(cache["index"]) == 10
  for row, s in enumerate(seqs):
    full = apply(jnp.asarray([s + [3 + row]]))
    np.testing.assert_allclose(logits[row, -1], full[0, -2], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(step[row, -1], full[0, -1], atol=1e-5, rtol=1e-5)


def test_top_p_to_zero_equals_greedy(model):
  m, params = model
  prompt = np.random.RandomState(2).randint(0, 97, (3, 5)).astype(np.int32)
  greedy = generate(m, params, prompt, jax.random.key(0), DecodeConfig(num_tokens=24))
  nucleus = generate(m, params, prompt, jax.random.key(5),
                     DecodeConfig(num_tokens=24, mode="sample", temperature=1.0, top_p=1e-6))
  np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))
  wide = generate(m, params, prompt, jax.random.key(5), DecodeConfig(num_tokens=24, mode="sample", top_p=1.0))
  assert not np.array_equal(np.asarray(wide), np.asarray(greedy))  # plain sampling does differ


def test_cfg_scale_one_equals_conditional_and_range_restriction(model):
  m, params = model
  rs = np.random.RandomState(3)
  cond, cmask = left_pad([rs.randint(0, 97, 8).tolist(), rs.randint(0, 97, 6).tolist()], 0)
  uncond, umask = left_pad([[5, 6], [5, 6]], 0, length=8)
  alone = generate(m, params, [(cond, cmask)], jax.random.key(0), DecodeConfig(num_tokens=20))
  guided = generate(m, params, [(cond, cmask), (uncond, umask)], jax.random.key(0),
                    DecodeConfig(num_tokens=20, guidance=(1.0,)))
  np.testing.assert_array_equal(np.asarray(guided), np.asarray(alone))
  strong = generate(m, params, [(cond, cmask), (uncond, umask)], jax.random.key(0),
                    DecodeConfig(num_tokens=20, guidance=(6.0,)))
  assert not np.array_equal(np.asarray(strong), np.asarray(alone))
  ranged = generate(m, params, [(cond, cmask), (uncond, umask)], jax.random.key(1),
                    DecodeConfig(num_tokens=20, mode="sample", guidance=(3.0,), allowed=(40, 60)))
  assert np.all((np.asarray(ranged) >= 40) & (np.asarray(ranged) < 60))


def test_guided_logits_three_streams():
  full, img, unc = (jnp.asarray([[float(v), 0.0]]) for v in (5, 3, 1))
  out = guided_logits(jnp.stack([full, img, unc]), (3.0, 1.2))  # (s_txt, s_img)
  np.testing.assert_allclose(np.asarray(out)[0, 0], 1 + 1.2 * (3 - 1) + 3.0 * (5 - 3))


def test_cd_k_on_hand_made_logits():
  p_exp = np.array([0.5, 0.3, 0.1, 0.06, 0.04])
  p_ama = np.array([0.6, 0.1, 0.02, 0.27, 0.01])
  e, a = jnp.log(jnp.asarray([p_exp])), jnp.log(jnp.asarray([p_ama]))
  # k=3 -> k-th largest expert probability 0.1; alpha=0.5 -> keep p >= 0.05: tokens 0, 1, 2, 3.
  s = np.asarray(cd_k_scores(e, a, alpha=0.5, k=3))[0]
  assert s[4] < -1e29 and np.all(s[:4] > -1e29)
  np.testing.assert_allclose(s[:4], np.log(p_exp[:4]) - np.log(p_ama[:4]), rtol=1e-5)
  assert int(np.argmax(s)) == 2  # 0.1 / 0.02 beats 0.3 / 0.1 and 0.5 / 0.6
  s_top1 = np.asarray(cd_k_scores(e, a, alpha=1.0, k=1))[0]  # original CD with alpha=1: greedy
  assert int(np.argmax(s_top1)) == 0 and np.sum(s_top1 > -1e29) == 1
  cfg = DecodeConfig(num_tokens=1, mode="cd_k", cd_alpha=0.5, cd_k=3)
  tok = select_tokens(jnp.stack([e, a]), jax.random.key(0), cfg)
  assert int(tok[0]) == 2


def test_top_p_filter_keeps_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.3, 0.15]]))
  kept = np.asarray(top_p_filter(logits, 0.7))[0] > -1e29
  np.testing.assert_array_equal(kept, [False, True, True, False])


def test_decode_config_errors(model):
  m, params = model
  prompt = np.zeros((1, 3), np.int32)
  with pytest.raises(ValueError, match="guidance needs 1 scales"):
    generate(m, params, [(prompt, prompt >= 0), (prompt, prompt >= 0)], jax.random.key(0),
             DecodeConfig(num_tokens=2))
  with pytest.raises(ValueError, match="amateur"):
    generate(m, params, prompt, jax.random.key(0), DecodeConfig(num_tokens=2, mode="cd_k"))
