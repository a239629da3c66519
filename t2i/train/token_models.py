"""The "tokens" model family (config.family = "tokens"): a VQ image tokenizer (param group "vq") and an
autoregressive token LM over a joint text + image-code vocabulary (group "lm"), CM3Leon / Chameleon style.

Two stages, one loop (`t2i.train.loop.train`), each an experiment file:
  VQ stage  (config.lm = None, objective "vq"): group "vq" trains on images (config.data as for the t2i family,
            e.g. name="shapes"); batch {"image" [B, S, S, 3]}.
  LM stage  (config.lm set, objective "cm3"): group "lm" trains, group "vq" is frozen and read from the VQ run
            (config.init_from.workdir: every group is read from the same-named group of that run, see
            `t2i.train.init_from`); data name="vq_tokens": the VQ run encodes a shapes-bench split once
            (`t2i.train.token_data`) and `data_pipelines.tokens` builds CM3 documents; batch {"tokens", "loss_mask"}
            [B, config.data.max_length].

config.vq / config.lm: module entries as in `t2i.train.models` (t2i.models.vq.VQModel /
t2i.models.transformer.Transformer; lm vocab_size=-1 takes the joint vocabulary's size).
config.tokenizer (LM stage): kind="shapes" (byte-level BPE trained on the shapes-bench caption corpus),
vocab_size (text BPE size), max_length (prompt length P). The joint vocabulary (text | image codes | specials) is
saved in workdir/tokenizer/ (tokenizer.json + joint_vocab.json). The tokenizer this family returns maps prompts to
left-padded sampling prompts `<bos> text <break> <image_start>` [n, P]; "" gives the unconditional prompt
`<bos> <mask> <break> <image_start>` (CM3Leon's CFG stream).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2i.train import models as models_lib


class PromptTokenizer(models_lib.Tokenizer):
  """texts -> int32 [n, P] left-padded `<bos> text <break> <image_start>` (text cut to P - 3 tokens; "" -> <mask>)."""

  def __init__(self, vocab: Any, length: int):
    if length < 4:
      raise ValueError(f"config.tokenizer.max_length={length}: the prompt needs at least 4 tokens")
    self.vocab = vocab
    self.length = int(length)
    super().__init__(self._encode, vocab.size, vocab.special.eod)

  def prompt(self, text: str) -> list[int]:
    sp = self.vocab.special
    body = self.vocab.encode_text(text)[:self.length - 3] if text else [sp.mask]
    return [sp.bos, *body, sp.break_id, sp.image_start]

  def _encode(self, texts: list[str]) -> np.ndarray:
    from t2i.sampling.ar import left_pad
    return left_pad([self.prompt(t) for t in texts], self.vocab.special.pad, self.length)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenModels:
  """Modules and constants of the tokens family; closed over by the jitted step (see `t2i.train.family`)."""
  vq: nn.Module
  lm: nn.Module | None
  vocab: Any                      # JointVocab (LM stage) or None
  trainable: tuple[str, ...]      # ("vq",) or ("lm",)
  image_size: int
  code_shape: tuple[int, int]     # (h, w) code grid of one image
  seq_length: int                 # training document length (config.data.max_length), LM stage
  config: Any

  def init_fns(self) -> dict[str, Callable[[jax.Array], Any]]:
    s = self.image_size
    fns = {"vq": lambda rng: self.vq.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]}
    if self.lm is not None:
      fns["lm"] = lambda rng: self.lm.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return fns

  def batch_shapes(self, batch_size: int, pair: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    if pair:
      raise ValueError("config.objective: pair objectives are not defined for config.family='tokens'")
    if self.lm is None:
      s = self.image_size
      return {"image": ((batch_size, s, s, 3), jnp.float32)}
    return {"tokens": ((batch_size, self.seq_length), jnp.int32),
            "loss_mask": ((batch_size, self.seq_length), jnp.float32)}

  def noise(self, seeds: jax.Array) -> jax.Array:
    """Per-image PRNG keys [n, 2] (image i's token sampling uses PRNGKey(seeds[i]))."""
    return jax.vmap(jax.random.PRNGKey)(seeds)


def _vq_module(config: Any) -> tuple[nn.Module, tuple[int, int]]:
  if config.get("vq") is None:
    raise ValueError("config.vq: missing (config.family='tokens' needs a VQ tokenizer entry)")
  vq = models_lib.build_module(config.vq, "vq")
  s = int(config.image_size)
  codes = jax.eval_shape(lambda x: vq.init_with_output(jax.random.PRNGKey(0), x, method="encode")[0],
                         jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  return vq, tuple(int(d) for d in codes.shape[1:])


def _stub_tokenizer(config: Any) -> models_lib.Tokenizer:
  """VQ stage: no text is used; zeros keep the image pipeline's batch layout."""
  length = int(config.tokenizer.get("max_length", 1) or 1) if config.get("tokenizer") is not None else 1
  return models_lib.Tokenizer(lambda texts: np.zeros((len(texts), length), np.int32), 1, 0)


def setup_tokenizer(config: Any, workdir: str) -> models_lib.Tokenizer:
  """Writes workdir/tokenizer/ (text BPE + joint vocabulary) on first use (LM stage); returns `load_tokenizer`."""
  if config.get("lm") is None:
    return _stub_tokenizer(config)
  from t2i.text.joint_vocab import JointVocab, train_text_tokenizer
  out = os.path.join(workdir, "tokenizer")
  init_vocab = os.path.join(os.path.expanduser((config.get("init_from") or {}).get("workdir", "") or "."),
                            "tokenizer", "joint_vocab.json")
  if not os.path.exists(os.path.join(out, "joint_vocab.json")) and os.path.exists(init_vocab):
    # fine-tuning an LM run (e.g. multi-task SFT): its text BPE and codes, config.tokenizer.num_locations appended
    src = JointVocab.from_folder(os.path.dirname(init_vocab))
    locs = int(config.tokenizer.get("num_locations", src.num_locations))
    if locs < src.num_locations:
      raise ValueError(f"config.tokenizer.num_locations={locs} < {src.num_locations} of {init_vocab}")
    JointVocab(src.text, src.num_image_codes, locs, src.image_shape).save(out)
  elif not os.path.exists(os.path.join(out, "joint_vocab.json")):
    cfg = config.tokenizer
    if cfg.kind != "shapes":
      raise ValueError(f"config.tokenizer.kind={cfg.kind!r}: the tokens family trains its text BPE on 'shapes'")
    from t2i.text.tokenizer import default_shapes_corpus
    vq, shape = _vq_module(config)
    tok = train_text_tokenizer(default_shapes_corpus(), out, vocab_size=int(cfg.vocab_size))
    JointVocab(tok, int(vq.num_codes), int(cfg.get("num_locations", 0)), shape).save(out)
  return load_tokenizer(config, workdir)


def load_tokenizer(config: Any, workdir: str) -> models_lib.Tokenizer:
  if config.get("lm") is None:
    return _stub_tokenizer(config)
  from t2i.text.joint_vocab import JointVocab
  folder = os.path.join(workdir, "tokenizer")
  if not os.path.exists(os.path.join(folder, "joint_vocab.json")):
    raise FileNotFoundError(f"{folder}/joint_vocab.json: no joint vocabulary (a train run writes it)")
  return PromptTokenizer(JointVocab.from_folder(folder), int(config.tokenizer.max_length))


def build_models(config: Any, tokenize: models_lib.Tokenizer) -> TokenModels:
  vq, shape = _vq_module(config)
  lm, vocab, seq = None, None, 0
  if config.get("lm") is not None:
    vocab = getattr(tokenize, "vocab", None)
    if vocab is None:
      raise ValueError("config.lm: the LM stage needs the joint-vocabulary tokenizer (token_models.setup_tokenizer)")
    if vocab.num_image_codes != vq.num_codes or tuple(vocab.image_shape or shape) != shape:
      raise ValueError(f"workdir tokenizer/joint_vocab.json: {vocab.num_image_codes} codes, grid {vocab.image_shape}"
                       f" but config.vq gives {vq.num_codes} codes, grid {shape}")
    lm = models_lib.build_module(config.lm, "lm", {"vocab_size": tokenize.vocab_size})
    if lm.vocab_size < vocab.size:
      raise ValueError(f"config.lm.config.vocab_size={lm.vocab_size} < joint vocabulary size {vocab.size} "
                       "(use -1 to take it from the vocabulary)")
    seq = int(config.data.max_length)
  return TokenModels(vq=vq, lm=lm, vocab=vocab, trainable=("lm",) if lm is not None else ("vq",),
                     image_size=int(config.image_size), code_shape=shape, seq_length=seq, config=config)


def make_data_iterator(config: Any, tokenize: models_lib.Tokenizer, mesh: Any) -> Any:
  """VQ stage: the t2i image pipeline (config.data.name "shapes" / "tfds" / "toy"); LM stage: name="vq_tokens"."""
  if config.get("lm") is None:
    from t2i.train import loop
    return loop.make_data_iterator(config, tokenize, mesh)
  from data_pipelines import pipeline, tokens
  from t2i.train import token_data
  cfg = config.data.to_dict()
  kind = cfg.pop("name")
  if kind not in ("vq_tokens", "vq_tasks"):
    raise ValueError(f"config.data.name={kind!r}: the LM stage of config.family='tokens' reads 'vq_tokens' or "
                     "'vq_tasks'")
  cfg["data_dir"] = os.path.expanduser(cfg.get("data_dir") or "~/t2i_data")
  split, num = cfg.pop("shapes_split", "train"), cfg.pop("shapes_num", None)
  init = config.get("init_from") or {}
  vq_run = cfg.pop("vq_workdir", "") or init.get("workdir", "")
  if not vq_run:
    raise ValueError("config.data.vq_workdir / config.init_from.workdir: set the VQ run whose codes to train on")
  size = int(config.image_size)
  ema, step = bool(init.get("ema", True)), int(init.get("step", -1))
  if jax.process_index() == 0:  # built once (cached by name); other processes read what process 0 built
    real = pipeline.prepare_shapes(cfg["data_dir"], split, num, size=max(32, size))
    cfg["dataset"] = token_data.build(vq_run, cfg["data_dir"], real, size, ema, step)
  else:
    from data_pipelines.tfds import shapes_bench
    real = "shapes_bench/" + shapes_bench.shapes_config(split, num, max(32, size)).name
    cfg["dataset"] = token_data.resolve(vq_run, real, ema, step)
  if kind == "vq_tasks":  # multi-task SFT mixture: + the derived-task code sets (data_pipelines.token_tasks)
    from data_pipelines import token_tasks
    cfg = token_data.build_task_sets(cfg, vq_run, size, ema, step)
    return token_tasks.make_train_iterator(ml_collections.ConfigDict(cfg), tokenize.vocab, int(config.batch_size),
                                           mesh=mesh, seed=int(config.seed))
  return tokens.make_train_iterator(ml_collections.ConfigDict(cfg), tokenize.vocab, int(config.batch_size),
                                    mesh=mesh, seed=int(config.seed))
