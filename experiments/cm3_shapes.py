"""CM3Leon-style token LM on shapes-bench: stage 2 of the autoregressive family, on the codes of a
`experiments/vq_shapes.py` run (frozen group "vq", read from config.init_from.workdir).

Data: the VQ run encodes the shapes-bench train split once (dataset vq_tokens/<run>_..., cached in data_dir);
documents `<bos> caption <break> <image_start> 64 codes <image_end> <eod>` (joint vocabulary: 512 text BPE | 256
codes | specials), image-first flips 20 %, CM3 span transform on half of the documents, 10 % with the whole caption
as the span (the `<mask>` stream CFG uses), padded to 128 tokens. Model: 4-layer Llama-style decoder (RMSNorm,
SwiGLU, RoPE, QK-norm), d=128; loss next-token NLL + 1e-5 z-loss. Sampling: prompt `<bos> caption <break>
<image_start>`, 64 codes with top-p 0.9, CFG 3 against `<bos> <mask> <break> <image_start>`, VQ decoder.

Run (after the VQ stage):
  python -m launch.main --config=experiments/vq_shapes.py --workdir=workdirs/vq_shapes
  python -m launch.main --config=experiments/cm3_shapes.py --workdir=workdirs/cm3_shapes \\
      --config.init_from.workdir=workdirs/vq_shapes
  python -m t2i.sample --workdir=workdirs/cm3_shapes --prompt="a large red circle" --num=8 --out=out
  python -m benchmarks.cm3_eval --workdirs=workdirs/cm3_shapes --settings=topp,topp_nocfg,cdk
Expected (measured with --config.total_steps=1200 on the 600-step VQ run, one shared CPU core, 26 min): train nll
6.6 -> 1.70 at step 300 -> 1.11 at 1200 (token accuracy 0.65); shapes-bench accuracy (120 prompts, seed 1234)
0.150 top-p + CFG 3, 0.108 without CFG, 0.142 CD-K (300 prompts, seed 99: 0.177 / 0.103 / 0.140). The 4000-step
default has not been measured.

Variant `:retrieval` (CM3Leon retrieval augmentation): 2 documents retrieved by a dual-encoder run
(`experiments/dual_encoder_shapes.py`, config.data.retrieval_workdir) are prepended to every training document
(neighbour table: self and near-duplicates above cosine 0.9 excluded, de-duplicated above 0.98, 20 % query-token
dropout; 4 dropout draws per document) and, at sampling, to the prompt and its <mask> CFG stream (text-embedding
query, no near-duplicate threshold); documents 256 tokens, prompts 192.
  python -m launch.main --config=experiments/dual_encoder_shapes.py --workdir=workdirs/dual_encoder_shapes
  python -m launch.main --config=experiments/cm3_shapes.py:retrieval --workdir=workdirs/cm3_shapes_retrieval \
      --config.init_from.workdir=workdirs/vq_shapes --config.data.retrieval_workdir=workdirs/dual_encoder_shapes
  python -m benchmarks.cm3_eval --workdirs=workdirs/cm3_shapes_retrieval --retrieval=0,1,2
Expected (measured, 700 steps on the 600-step VQ and dual-encoder runs; docs/results.md): shapes-bench accuracy
with 0 / 1 / 2 retrieved documents, top-p + CFG 3: 0.150 / 0.175 / 0.208 (120 prompts, seed 1234), 0.207 / 0.223 /
0.193 (300 prompts, seed 99); without CFG 0.133 / 0.183 / 0.150 and 0.163 / 0.193 / 0.183; CD-K 0.208 / 0.158 /
0.133 and 0.160 / 0.133 / 0.137. Retrieval's gain is within noise at this budget.
Control: `--config.data.retrieval_neighbours=random` prepends 2 random other documents instead (same rows, same
token budget, no relevance; no dual encoder needed), which separates retrieval from "more documents per row".
Variants `:smoke` / `:smoke_retrieval` (tiny VQ and LM, 64 images, 4 steps; the latter retrieves 1 document) are
used by the tests.
"""
from __future__ import annotations

import ml_collections

from experiments import common, vq_shapes


def tiny_lm(hidden: int, layers: int, heads: int, max_length: int) -> ml_collections.ConfigDict:
  return common.module_config("t2i.models.transformer.Transformer", dict(
      vocab_size=-1,  # -1: the joint vocabulary's size
      hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
      max_position_embeddings=max_length, qk_norm=True, norm_order="pre", norm_kind="rms",
      tie_word_embeddings=False, initializer_range=0.02))


def add_retrieval(c: ml_collections.ConfigDict, k: int, max_length: int, prompt_length: int) -> None:
  """CM3Leon retrieval augmentation: k documents retrieved by the dual-encoder run config.data.retrieval_workdir
  (experiments/dual_encoder_shapes.py) are prepended to each training document and, at sampling, to the prompt."""
  c.data.update(dict(retrieval_k=k, retrieval_workdir="workdirs/dual_encoder_shapes", retrieval_variants=4,
                     retrieval_exclude_above=0.9, retrieval_dedupe_above=0.98, retrieval_query_dropout=0.2,
                     retrieval_loss_weight=1.0, retrieval_neighbours="dual_encoder",
                     max_length=max_length))
  c.lm.config.max_position_embeddings = max_length
  c.tokenizer.max_length = prompt_length  # retrieved documents + prompt; + h*w codes <= max_length
  c.sample.update(dict(retrieval_k=k, retrieval_exclude_above=None, retrieval_dedupe_above=0.98))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in ("default", "smoke", "retrieval", "smoke_retrieval"):
    raise ValueError(f"experiments/cm3_shapes.py: unknown variant {variant!r} (default, smoke, retrieval, "
                     "smoke_retrieval)")
  c = vq_shapes.token_base_config()
  c.objective = "cm3"
  c.image_size = 32
  c.batch_size = 32
  c.total_steps = 4000
  c.ckpt_every = 500
  c.sample_every = 1000
  c.log_every = 10
  c.optimizer = common.optimizer_config(lr=1e-3, warmup_steps=200, schedule="cosine", weight_decay=0.1,
                                        grad_clip=1.0)
  c.optimizer.b2 = 0.95
  c.optimizer.min_lr_ratio = 0.1
  c.ema = ml_collections.ConfigDict(dict(decay=0.995, every=1, warmup=True))
  c.init_from.workdir = "workdirs/vq_shapes"
  c.vq = vq_shapes.vq_module()          # must match the VQ run (checked against its checkpoint)
  c.lm = tiny_lm(128, 4, 4, 128)
  c.cm3 = ml_collections.ConfigDict(dict(z_loss_weight=1e-5))
  c.tokenizer = ml_collections.ConfigDict(dict(kind="shapes", vocab_size=512, max_length=32))  # prompt length
  # vq_workdir: "" = init_from.workdir (the codes and the frozen "vq" group come from the same checkpoint).
  c.data = ml_collections.ConfigDict(dict(
      name="vq_tokens", data_dir="~/t2i_data", vq_workdir="", shapes_split="train", shapes_num=10000,
      max_length=128, image_first=0.2, cm3_rate=0.5, span_rate=1.0, max_span_len=0, uncond_rate=0.1))
  c.sample = ml_collections.ConfigDict(dict(
      prompts=["a red circle", "a blue square", "a yellow triangle", "a large green circle",
               "a small purple square", "two orange squares", "a red circle to the left of a blue triangle",
               "a purple triangle"],
      num_steps=0, guidance_scale=3.0, sampler="top_p", temperature=1.0, top_p=0.9, cd_alpha=0.1, cd_k=5, seed=0))
  if variant.startswith("smoke"):
    common.smoke_schedule(c, total_steps=4, ckpt_every=2, sample_every=4, lr=3e-3, warmup_steps=0,
                          schedule="constant", weight_decay=0.0)
    c.init_from.workdir = ""  # the tests pass the smoke VQ run
    c.vq = vq_shapes.vq_module("smoke")
    c.lm = tiny_lm(32, 2, 2, 64)
    c.data.shapes_num = 64
    c.data.max_length = 64
    c.sample.prompts = ["a red circle", "a blue square"]
    c.sample.guidance_scale = 2.0
  if variant == "retrieval":  # 2 retrieved documents of ~80 tokens + the document
    add_retrieval(c, k=2, max_length=256, prompt_length=192)
  elif variant == "smoke_retrieval":  # the tests pass the smoke dual-encoder run
    add_retrieval(c, k=1, max_length=96, prompt_length=80)
    c.data.retrieval_workdir = ""
  return c
