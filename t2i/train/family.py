"""Model families: what the one loop (and `t2i.sample`) needs to know about a kind of model, selected by
`config.family`.

  "t2i"    (default) denoiser + text encoder(s) + optional VAE (`t2i.train.models`): diffusion, flow, DPO, SPIN
  "tokens" VQ image tokenizer and an autoregressive token LM (`t2i.train.token_models`): objectives "vq", "cm3"

A family gives four functions: setup_tokenizer(config, workdir) (creates workdir/tokenizer/ on first use),
load_tokenizer(config, workdir), build_models(config, tokenize) and make_data_iterator(config, tokenize, mesh).
The models object it builds has `trainable` (param group names), `init_fns()` (group -> init(rng) returning boxed
params, for every group), `batch_shapes(batch_size, pair)` (batch key -> (shape, dtype)) and `noise(seeds)`
(per-sample starting randomness for the sampler: Gaussian latents, or PRNG keys). The objective's loss and sampler
take it as their `models` argument. No trainer classes: the loop calls these functions, top to bottom.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

FAMILIES = ("t2i", "tokens")


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  setup_tokenizer: Callable[[Any, str], Any]
  load_tokenizer: Callable[[Any, str], Any]
  build_models: Callable[[Any, Any], Any]
  make_data_iterator: Callable[[Any, Any, Any], Any]


def _t2i() -> Family:
  from t2i.train import models as models_lib

  def data(config, tokenize, mesh):
    from t2i.train import loop
    return loop.make_data_iterator(config, tokenize, mesh)

  return Family("t2i", models_lib.setup_tokenizer, models_lib.load_tokenizer, models_lib.build_models, data)


def _tokens() -> Family:
  from t2i.train import token_models
  return Family("tokens", token_models.setup_tokenizer, token_models.load_tokenizer, token_models.build_models,
                token_models.make_data_iterator)


def get(config: Any) -> Family:
  """The family named by `config.family` (absent or empty: "t2i")."""
  name = config.get("family") or "t2i"
  if name == "t2i":
    return _t2i()
  if name == "tokens":
    return _tokens()
  raise ValueError(f"config.family={name!r}: expected one of {FAMILIES}")
