r"""Greedy decoding speed: t2i KV-cache decoding (one jitted fori_loop) vs transformers `generate()`.

  python benchmarks/decode.py --hidden=256 --layers=4 --heads=8 --vocab=4096 --prompt=32 --new_tokens=256 \
      --batch=1,8 --repeats=3

Same tiny random LlamaForCausalLM (float32) for both: saved with save_pretrained, loaded into t2i with
`load_transformers_llama`. Per batch size: first checks that both produce the same greedy tokens, then times
`repeats` runs of each (after one warm-up / compile run), interleaved, and reports medians as generated tokens/s
(batch * new_tokens / seconds; prefill included) and the ratio ours / torch. Torch uses `--threads` intra-op threads.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags

_HIDDEN = flags.DEFINE_integer("hidden", 256, "hidden_size")
_LAYERS = flags.DEFINE_integer("layers", 4, "num_hidden_layers")
_HEADS = flags.DEFINE_integer("heads", 8, "num_attention_heads")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 0, "num_key_value_heads (0 = heads)")
_VOCAB = flags.DEFINE_integer("vocab", 4096, "vocab_size")
_PROMPT = flags.DEFINE_integer("prompt", 32, "prompt tokens")
_NEW = flags.DEFINE_integer("new_tokens", 256, "generated tokens")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "batch sizes")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per framework and batch size")
_THREADS = flags.DEFINE_integer("threads", 2, "torch intra-op threads")


def main(argv) -> None:
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from t2i.convert.llama import load_transformers_llama
  from t2i.sampling.ar import DecodeConfig, generate

  torch.set_num_threads(_THREADS.value)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value,
                                 intermediate_size=int(_HIDDEN.value * 8 / 3 + 63) // 64 * 64,
                                 num_hidden_layers=_LAYERS.value, num_attention_heads=_HEADS.value,
                                 num_key_value_heads=_KV_HEADS.value or _HEADS.value,
                                 max_position_embeddings=_PROMPT.value + _NEW.value)
  ref = transformers.LlamaForCausalLM(cfg).eval()
  ref.generation_config.eos_token_id = None
  ref.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d)
    model, params = load_transformers_llama(d)
  n_params = sum(p.numel() for p in ref.parameters())
  print(f"config: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads {cfg.num_attention_heads} "
        f"(kv {cfg.num_key_value_heads}), mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}, {n_params / 1e6:.2f}M "
        f"params; prompt {_PROMPT.value}, new tokens {_NEW.value}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} with {_THREADS.value} threads")
  dcfg = DecodeConfig(num_tokens=_NEW.value)
  for b in (int(x) for x in _BATCH.value):
    prompt = np.random.RandomState(b).randint(0, cfg.vocab_size, (b, _PROMPT.value)).astype(np.int32)
    pt = torch.tensor(prompt, dtype=torch.long)

    def ours():
      return np.asarray(jax.block_until_ready(generate(model, params, jnp.asarray(prompt), jax.random.key(0), dcfg)))

    def theirs():
      with torch.no_grad():
        out = ref.generate(pt, attention_mask=torch.ones_like(pt), max_new_tokens=_NEW.value,
                           min_new_tokens=_NEW.value, do_sample=False, use_cache=True)
      return out[:, _PROMPT.value:].numpy()

    t0 = time.perf_counter()
    a = ours()
    compile_s = time.perf_counter() - t0
    r = theirs()
    same = a == r
    first_diff = [int(np.argmin(row)) if not row.all() else None for row in same]
    print(f"batch {b}: tokens agree {same.mean() * 100:.1f}% (first mismatch per row: {first_diff}); "
          f"first t2i call incl. compile {compile_s:.2f}s")
    t_ours, t_torch = [], []
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      ours()
      t_ours.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      theirs()
      t_torch.append(time.perf_counter() - t0)
    tok = b * _NEW.value
    o, t = tok / statistics.median(t_ours), tok / statistics.median(t_torch)
    print(f"batch {b}: t2i {o:,.0f} tok/s ({statistics.median(t_ours):.3f}s)  transformers {t:,.0f} tok/s "
          f"({statistics.median(t_torch):.3f}s)  ratio {o / t:.2f}x")


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  app.run(main)
