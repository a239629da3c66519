"""The "tokens" model family (config.family = "tokens"): a VQ image tokenizer (param group "vq") and an
autoregressive token LM over a joint text + image-code vocabulary (group "lm"), CM3Leon / Chameleon style.

Three stages, one loop (`t2i.train.loop.train`), each an experiment file:
  VQ stage  (config.lm = None, objective "vq"): group "vq" trains on images (config.data as for the t2i family,
            e.g. name="shapes"); batch {"image" [B, S, S, 3]}.
  LM stage  (config.lm set, objective "cm3"): group "lm" trains, group "vq" is frozen and read from the VQ run
            (config.init_from.workdir: every group is read from the same-named group of that run, see
            `t2i.train.init_from`); data name="vq_tokens": the VQ run encodes a shapes-bench split once
            (`t2i.train.token_data`) and `data_pipelines.tokens` builds CM3 documents; batch {"tokens", "loss_mask"}
            [B, config.data.max_length]. With config.data.retrieval_k > 0 each document gets its retrieved
            neighbours prepended (`t2i.retrieval.store`, config.data.retrieval_workdir = a dual-encoder run).
  Retriever (config.dual_encoder set, objective "contrastive"): group "dual_encoder" (`t2i.retrieval.DualEncoder`)
            trains on image-caption pairs of the t2i image pipeline (batch {"image", "input_ids"}; captions by a
            CLIP-format BPE written to workdir/tokenizer/, config.tokenizer.kind="shapes").

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
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from t2i.train import models as models_lib


class PromptTokenizer(models_lib.Tokenizer):
  """texts -> int32 [n, P] left-padded `<bos> text <break> <image_start>` (text cut to P - 3 tokens; "" -> <mask>).

  With `retrieval_k` > 0 (CM3Leon at inference) each prompt's text queries `retriever()` (a
  `t2i.retrieval.store.TextRetriever`, built on first use) and its best documents are prepended whole
  (`prepend_retrieved`, within P tokens); `unconditional(texts)` gives the <mask> prompts with the same documents.
  """

  def __init__(self, vocab: Any, length: int, retriever: Callable[[], Any] | None = None, retrieval_k: int = 0):
    if length < 4:
      raise ValueError(f"config.tokenizer.max_length={length}: the prompt needs at least 4 tokens")
    self.vocab = vocab
    self.length = int(length)
    self._make_retriever, self._retriever = retriever, None
    self.retrieval_k = 0
    self._set_k(retrieval_k)
    super().__init__(self._encode, vocab.size, vocab.special.eod)

  def _set_k(self, k: int) -> None:
    if k < 0:
      raise ValueError(f"retrieval_k={k} must be >= 0")
    if k > 0 and self._make_retriever is None:
      raise ValueError(f"retrieval_k={k}: the run has no retriever (config.data.retrieval_workdir is empty)")
    self.retrieval_k = int(k)

  def with_retrieval(self, k: int) -> "PromptTokenizer":
    """A copy prepending k retrieved documents (0 = none); shares the retriever."""
    out = PromptTokenizer(self.vocab, self.length, self._make_retriever, k)
    out._retriever = self._retriever  # pylint: disable=protected-access
    return out

  def retriever(self) -> Any:
    if self._retriever is None:
      self._retriever = self._make_retriever()
    return self._retriever

  def prompt(self, text: str, docs: Sequence[tuple[str, Any]] = ()) -> list[int]:
    """Prompt ids for `text` after the given (caption, codes) documents (dropped from the end if P is short)."""
    sp = self.vocab.special
    body = self.vocab.encode_text(text)[:self.length - 3] if text else [sp.mask]
    ids = [sp.bos, *body, sp.break_id, sp.image_start]
    if not docs:
      return ids
    from t2i.retrieval.augment import prepend_retrieved
    ids, _ = prepend_retrieved(ids, [self.vocab.encode_document([c, np.asarray(x)]) for c, x in docs], self.length,
                               sp.break_id, bos_id=sp.bos, eod_id=sp.eod)
    return ids.tolist()

  def documents(self, texts: Sequence[str]) -> list[list[tuple[str, Any]]]:
    """The retrieved (caption, codes) documents of each text (empty lists when retrieval_k = 0)."""
    if self.retrieval_k == 0:
      return [[] for _ in texts]
    return self.retriever().documents(list(texts), self.retrieval_k)

  def _encode(self, texts: list[str]) -> np.ndarray:
    from t2i.sampling.ar import left_pad
    docs = self.documents(texts)
    return left_pad([self.prompt(t, d) for t, d in zip(texts, docs)], self.vocab.special.pad, self.length)[0]

  def unconditional(self, texts: Sequence[str], negative: str = "") -> np.ndarray:
    """The CFG stream of `texts`: `negative` ("" -> <mask>) after the documents retrieved for each text."""
    from t2i.sampling.ar import left_pad
    docs = self.documents(texts)
    return left_pad([self.prompt(negative, d) for d in docs], self.vocab.special.pad, self.length)[0]


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


@dataclasses.dataclass(frozen=True, eq=False)
class DualEncoderModels:
  """The retriever stage of the tokens family: one trainable group "dual_encoder" (no sampler)."""
  dual_encoder: nn.Module
  trainable: tuple[str, ...]
  image_size: int
  max_length: int                 # caption length (config.tokenizer.max_length)
  config: Any

  def init_fns(self) -> dict[str, Callable[[jax.Array], Any]]:
    s, n = self.image_size, self.max_length
    return {"dual_encoder": lambda rng: self.dual_encoder.init(rng, jnp.zeros((1, s, s, 3), jnp.float32),
                                                               jnp.zeros((1, n), jnp.int32))["params"]}

  def batch_shapes(self, batch_size: int, pair: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    if pair:
      raise ValueError("config.objective: pair objectives are not defined for a dual encoder")
    s = self.image_size
    return {"image": ((batch_size, s, s, 3), jnp.float32), "input_ids": ((batch_size, self.max_length), jnp.int32)}

  def noise(self, seeds: jax.Array) -> jax.Array:
    raise ValueError("config.objective='contrastive': a dual encoder has no sampler")


class CaptionTokenizer(models_lib.Tokenizer):
  """The dual encoder's caption tokenizer (CLIP-format BPE in workdir/tokenizer/) with its bos / eos / pad ids."""

  def __init__(self, folder: str, length: int):
    from transformers import CLIPTokenizer
    from t2i.text.tokenizer import tokenize
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{folder}: no caption tokenizer (a dual-encoder train run writes it)")
    tok = CLIPTokenizer.from_pretrained(folder)
    self.bos_token_id, self.pad_token_id = int(tok.bos_token_id), int(tok.pad_token_id)
    self.length = int(length)
    super().__init__(lambda texts: np.asarray(tokenize(tok, texts, self.length), np.int32), len(tok),
                     tok.eos_token_id)


def build_dual_encoder(config: Any, tokenize: Any) -> nn.Module:
  """config.dual_encoder's module with the caption tokenizer's vocabulary size and special ids filled in."""
  for key in ("bos_token_id", "pad_token_id"):
    if not hasattr(tokenize, key):
      raise ValueError("config.dual_encoder: needs the caption tokenizer (token_models.CaptionTokenizer)")
  return models_lib.build_module(config.dual_encoder, "dual_encoder", {
      "vocab_size": tokenize.vocab_size, "bos_id": tokenize.bos_token_id, "eos_id": tokenize.eos_token_id,
      "pad_id": tokenize.pad_token_id, "max_length": int(config.tokenizer.max_length)})


def _is_retriever(config: Any) -> bool:
  return config.get("dual_encoder") is not None


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
  if _is_retriever(config):
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(folder) or not os.listdir(folder):
      if config.tokenizer.kind != "shapes":
        raise ValueError(f"config.tokenizer.kind={config.tokenizer.kind!r}: the dual encoder trains its caption "
                         "BPE on 'shapes'")
      from t2i.text.tokenizer import build_clip_tokenizer, default_shapes_corpus
      build_clip_tokenizer(default_shapes_corpus(), folder)
    return load_tokenizer(config, workdir)
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
  if _is_retriever(config):
    return CaptionTokenizer(os.path.join(workdir, "tokenizer"), int(config.tokenizer.max_length))
  if config.get("lm") is None:
    return _stub_tokenizer(config)
  from t2i.text.joint_vocab import JointVocab
  folder = os.path.join(workdir, "tokenizer")
  if not os.path.exists(os.path.join(folder, "joint_vocab.json")):
    raise FileNotFoundError(f"{folder}/joint_vocab.json: no joint vocabulary (a train run writes it)")
  vocab = JointVocab.from_folder(folder)
  retriever = None
  if retrieval_settings(config)["retrieval_workdir"]:
    retriever = lambda: text_retriever(config, vocab)
  k = int(config.sample.get("retrieval_k", -1)) if config.get("sample") is not None else -1
  k = int(config.data.get("retrieval_k", 0)) if k < 0 else k
  return PromptTokenizer(vocab, int(config.tokenizer.max_length), retriever, k)


# config.data keys of the retriever (popped before the document pipeline sees config.data)
RETRIEVAL_DEFAULTS = dict(retrieval_workdir="", retrieval_variants=4, retrieval_exclude_above=0.9,
                          retrieval_dedupe_above=0.98, retrieval_query_dropout=0.2,
                          retrieval_neighbours="dual_encoder")
NEIGHBOUR_KINDS = ("dual_encoder", "random")  # "random": the ablation control, same token budget, no relevance


def retrieval_settings(config: Any) -> dict[str, Any]:
  data = config.data.to_dict() if config.get("data") is not None else {}
  return {k: data.get(k, d) for k, d in RETRIEVAL_DEFAULTS.items()}


def _datasets(config: Any) -> tuple[str, str, str, str, bool, int]:
  """(data_dir, source shapes-bench dataset, VQ run, its code dataset name, ema, step) of the LM stage."""
  from data_pipelines.tfds import shapes_bench
  from t2i.train import token_data
  data = config.data
  data_dir = os.path.expanduser(data.get("data_dir") or "~/t2i_data")
  init = config.get("init_from") or {}
  vq_run = data.get("vq_workdir", "") or init.get("workdir", "")
  if not vq_run:
    raise ValueError("config.data.vq_workdir / config.init_from.workdir: set the VQ run whose codes to train on")
  size = int(config.image_size)
  real = "shapes_bench/" + shapes_bench.shapes_config(data.get("shapes_split", "train"), data.get("shapes_num"),
                                                      max(32, size)).name
  ema, step = bool(init.get("ema", True)), int(init.get("step", -1))
  return data_dir, real, vq_run, token_data.resolve(vq_run, real, ema, step), ema, step


def text_retriever(config: Any, vocab: Any) -> Any:
  """The sampling-time `TextRetriever` of an LM run: index over its training documents (built if missing),
  documents from its code dataset; thresholds config.sample.retrieval_exclude_above (default None: the prompt is
  not a training document) and retrieval_dedupe_above (default config.data's)."""
  from data_pipelines.tfds import common
  from t2i.retrieval import store
  r = retrieval_settings(config)
  data_dir, real, _, tokens_ds, _, _ = _datasets(config)
  index = store.build_document_index(r["retrieval_workdir"], data_dir, real, max(32, int(config.image_size)))
  src = common.load_source(data_dir, tokens_ds, "train")
  docs = {}
  for i in range(len(src)):
    rec = src[i]
    docs[common.text(rec["id"])] = (common.text(rec["caption"]), np.asarray(rec["codes"]))
  sample = config.get("sample") or {}
  return store.TextRetriever(r["retrieval_workdir"], index, docs,
                             exclude_above=sample.get("retrieval_exclude_above", None),
                             dedupe_above=sample.get("retrieval_dedupe_above", r["retrieval_dedupe_above"]))


def random_neighbours(n: int, k: int, variants: int, seed: int) -> np.ndarray:
  """int64 [n, variants, k]: for each row, k distinct other rows drawn uniformly (never the row itself)."""
  if n <= k:
    raise ValueError(f"random retrieval neighbours: {n} documents cannot give k={k} others each")
  rng = np.random.default_rng(seed)
  draws = np.stack([np.stack([rng.choice(n - 1, k, replace=False) for _ in range(variants)]) for _ in range(n)])
  return draws + (draws >= np.arange(n)[:, None, None])  # skip the row itself


def training_neighbours(config: Any, real: str, tokens_ds: str) -> dict[str, np.ndarray]:
  """Record id of the code dataset -> int [variants, k] code-dataset rows of its retrieved documents (built once,
  cached under data_dir; see `t2i.retrieval.store`), or of k random other documents (seeded by config.seed) when
  config.data.retrieval_neighbours is "random"."""
  from data_pipelines.tfds import common
  from t2i.retrieval import store
  r = retrieval_settings(config)
  k = int(config.data.retrieval_k)
  data_dir = os.path.expanduser(config.data.get("data_dir") or "~/t2i_data")
  if r["retrieval_neighbours"] not in NEIGHBOUR_KINDS:
    raise ValueError(f"config.data.retrieval_neighbours={r['retrieval_neighbours']!r}: expected one of "
                     f"{NEIGHBOUR_KINDS}")
  if r["retrieval_neighbours"] == "dual_encoder" and not r["retrieval_workdir"]:
    raise ValueError(f"config.data.retrieval_k={k}: set config.data.retrieval_workdir to a dual-encoder run "
                     "(experiments/dual_encoder_shapes.py)")
  src = common.load_source(data_dir, tokens_ds, "train")
  ids = [common.text(src[i]["id"]) for i in range(len(src))]  # code-dataset row -> record id
  if r["retrieval_neighbours"] == "random":
    table = random_neighbours(len(ids), k, int(r["retrieval_variants"]), seed=int(config.seed))
    return {i: table[j] for j, i in enumerate(ids)}
  index = store.build_document_index(r["retrieval_workdir"], data_dir, real, max(32, int(config.image_size)))
  table = store.build_neighbours(index, r["retrieval_workdir"], k, int(r["retrieval_variants"]),
                                 r["retrieval_exclude_above"], r["retrieval_dedupe_above"],
                                 float(r["retrieval_query_dropout"]))
  with np.load(index) as f:
    index_ids = [str(i) for i in f["ids"]]
  row_of = {i: j for j, i in enumerate(ids)}
  missing = [i for i in index_ids if i not in row_of]
  if missing:
    raise ValueError(f"{index}: documents such as {missing[:3]} are missing from {tokens_ds}")
  to_row = np.asarray([row_of[i] for i in index_ids] + [-1], np.int64)  # index row -> code row; -1 stays -1
  return {i: to_row[table[j]] for j, i in enumerate(index_ids)}


def build_models(config: Any, tokenize: models_lib.Tokenizer) -> TokenModels | DualEncoderModels:
  if _is_retriever(config):
    if config.objective != "contrastive":
      raise ValueError(f"config.objective={config.objective!r}: a config.dual_encoder run trains 'contrastive'")
    return DualEncoderModels(dual_encoder=build_dual_encoder(config, tokenize), trainable=("dual_encoder",),
                             image_size=int(config.image_size), max_length=int(config.tokenizer.max_length),
                             config=config)
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
  """VQ and retriever stages: the t2i image pipeline (config.data.name "shapes" / "tfds" / "toy"); LM stage:
  name="vq_tokens"."""
  if config.get("lm") is None:
    from t2i.train import loop
    return loop.make_data_iterator(config, tokenize, mesh)
  from data_pipelines import pipeline, tokens
  from t2i.train import token_data
  cfg = config.data.to_dict()
  for key in RETRIEVAL_DEFAULTS:
    cfg.pop(key, None)
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
  neighbours = training_neighbours(config, real, cfg["dataset"]) if int(cfg.get("retrieval_k", 0)) > 0 else None
  return tokens.make_train_iterator(ml_collections.ConfigDict(cfg), tokenize.vocab, int(config.batch_size),
                                    mesh=mesh, seed=int(config.seed), neighbours=neighbours)
