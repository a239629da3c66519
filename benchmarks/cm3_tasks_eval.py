"""Multi-task scores of a token-LM workdir (`experiments/cm3_shapes_sft.py`) on held-out shapes-bench derived
records, printed as one JSON line.

  python -m benchmarks.cm3_tasks_eval --workdir=W [--num=64] [--seed=1000] [--tasks=caption,vqa,edit,ground]
      [--image_sampler=top_p] [--top_p=0.9] [--temperature=1.0] [--out=scores.jsonl]

Records come from `data_pipelines.shapes.derived` with generator seed --seed (must differ from the run's
config.data.task_seed, the training records), rendered at the run's image size and encoded by its frozen VQ;
prompts are the training templates (`data_pipelines.token_tasks`, first caption instruction). Text answers are
greedy until <eod>; images are sampled (top-p, no CFG) over the image-code range and decoded by the VQ decoder.
Metrics (each a fraction of --num records):
  caption_accuracy  the generated caption names the right objects with their colours and shapes (parsed with the
                    canonical caption grammar, `derived.caption_match`); caption_exact: also sizes and background
  vqa_accuracy      exact answer match
  edit_success      the edited image holds the target scene's objects (colour, shape, centroid within the
                    grounding tolerance, one to one; `scoring.same_objects`) on the target's background: the
                    edited attribute changed and the rest kept; edit_unchanged: it matches the source instead;
                    edit_ceiling: the same test on the VQ reconstruction of the true target (the VQ's limit)
  ground_accuracy   every object of the grounded caption is detected with its colour and shape within the
                    grounding tolerance of the requested centroid; ground_ceiling: on the true image's VQ recon.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags() -> None:
  """The command line's flags (defined only when run as a script, so importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Token-LM train workdir (tokens family, LM stage).")
  flags.DEFINE_integer("num", 64, "Held-out records per task.")
  flags.DEFINE_integer("seed", 1000, "Generator seed of the held-out derived records.")
  flags.DEFINE_list("tasks", ["caption", "vqa", "edit", "ground"], "Tasks to score.")
  flags.DEFINE_enum("image_sampler", "top_p", ["top_p", "greedy"], "Image-token decoding.")
  flags.DEFINE_float("top_p", 0.9, "Top-p of image sampling.")
  flags.DEFINE_float("temperature", 1.0, "Temperature of image sampling.")
  flags.DEFINE_integer("max_text_tokens", 48, "Token budget of a generated caption / answer.")
  flags.DEFINE_integer("batch", 32, "Prompts per compiled call.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_string("out", None, "Append the JSON line to this file too.")


EVAL_TASKS = ("caption", "vqa", "edit", "ground")


def _generate(s: Any, prompts: list[list[int]], num_tokens: int, image: bool, seed: int, batch: int,
              sampler: str = "top_p", top_p: float = 0.9, temperature: float = 1.0) -> list[list[int]]:
  """Continuations [num_tokens] of each prompt (left-padded to the longest; batches padded with the last one)."""
  import jax
  import numpy as np
  from t2i.sampling import ar
  vocab = s.models.vocab
  sp = vocab.special
  if image:
    cfg = ar.DecodeConfig(num_tokens=num_tokens, mode="greedy" if sampler == "greedy" else "sample",
                          temperature=temperature, top_p=top_p, allowed=vocab.image_range, pad_id=sp.pad)
  else:
    cfg = ar.DecodeConfig(num_tokens=num_tokens, mode="greedy", eos_id=sp.eod, pad_id=sp.pad)
  length = max(len(p) for p in prompts)
  out = []
  for b0 in range(0, len(prompts), batch):
    chunk = prompts[b0:b0 + batch]
    ids, mask = ar.left_pad(chunk + [chunk[-1]] * (batch - len(chunk)), sp.pad, length)
    toks = ar.generate(s.models.lm, s.params["lm"], [(ids, mask)], jax.random.PRNGKey(seed + b0), cfg)
    out += np.asarray(jax.device_get(toks))[:len(chunk)].tolist()
  return out


def _text_of(vocab: Any, tokens: Sequence[int]) -> str:
  """Text before the first <eod>; "" when the model emitted a non-text token."""
  sp = vocab.special
  body = list(tokens[:tokens.index(sp.eod)] if sp.eod in tokens else tokens)
  try:
    return vocab.decode_text(body)
  except ValueError:
    return ""


def evaluate(workdir: str, num: int = 64, seed: int = 1000, tasks: Sequence[str] = EVAL_TASKS,
             image_sampler: str = "top_p", top_p: float = 0.9, temperature: float = 1.0,
             max_text_tokens: int = 48, batch: int = 32, step: int | None = None) -> dict[str, Any]:
  """The module docstring's metrics for `workdir` (a dict; tasks not asked for are absent)."""
  import jax
  import numpy as np
  from data_pipelines import token_tasks
  from data_pipelines.image_decode import to_float, to_uint8
  from data_pipelines.shapes import derived, scoring
  from t2i.sample import Sampler
  from t2i.train import token_data
  unknown = sorted(set(tasks) - set(EVAL_TASKS))
  if unknown:
    raise ValueError(f"--tasks: unknown {unknown} (known: {EVAL_TASKS})")
  s = Sampler(workdir, step=step)
  if s.config.get("family") != "tokens" or s.models.lm is None:
    raise ValueError(f"{workdir}: not a token-LM run (config.family='tokens' with config.lm)")
  train_seed = s.config.data.get("task_seed")
  if train_seed is not None and int(train_seed) == int(seed):
    raise ValueError(f"--seed={seed} is the run's config.data.task_seed (training records); pick another")
  vocab, size = s.models.vocab, int(s.config.image_size)
  h, w = s.models.code_shape
  vq, vq_params = s.models.vq, s.frozen["vq"]
  encode = jax.jit(lambda p, x: vq.apply({"params": p}, x, method="encode"))
  decode = jax.jit(lambda p, c: vq.apply({"params": p}, c, method="decode"))

  def codes_of(images: list[np.ndarray]) -> np.ndarray:
    return np.asarray(encode(vq_params, to_float(np.stack(images))))

  def pixels(codes: np.ndarray) -> np.ndarray:
    x = np.asarray(decode(vq_params, np.asarray(codes, np.int32)), np.float32)
    return to_uint8(x)

  def images_for(prompts: list[list[int]]) -> np.ndarray:
    toks = _generate(s, [p + [vocab.special.image_start] for p in prompts], h * w, True, seed, batch,
                     image_sampler, top_p, temperature)
    return pixels(np.asarray(toks).reshape(-1, h, w) - vocab.image_offset)

  out: dict[str, Any] = {"workdir": os.path.abspath(workdir), "step": int(s.step), "seed": seed, "num": num}
  canvas = float(size)
  for task in [t for t in ("caption", "vqa") if t in tasks]:
    recs = list(token_data.derived_records(task, num, seed, size))
    codes = codes_of([r["image"] for r in recs])
    prompts = [token_tasks.task_example(task, {"codes": c, "caption": r["caption"], "question": r.get("text", ""),
                                               "answer": r.get("answer", "")}, vocab)[0] for r, c in zip(recs, codes)]
    texts = [_text_of(vocab, t) for t in _generate(s, prompts, max_text_tokens, False, seed, batch)]
    if task == "caption":
      got = [derived.caption_match(t, r["caption"]) for t, r in zip(texts, recs)]
      out["caption_accuracy"] = float(np.mean([g["objects"] for g in got]))
      out["caption_exact"] = float(np.mean([g["exact"] for g in got]))
      out["caption_examples"] = [[r["caption"], t] for r, t in zip(recs[:3], texts[:3])]
    else:
      hit = [t.strip().lower() == r["answer"] for t, r in zip(texts, recs)]
      out["vqa_accuracy"] = float(np.mean(hit))
      by_kind: dict[str, list[bool]] = {}
      for r, o in zip(recs, hit):
        by_kind.setdefault(r["question_kind"], []).append(o)
      out["vqa_accuracy_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(by_kind.items())}
      out["vqa_examples"] = [[r["text"], r["answer"], t] for r, t in zip(recs[:3], texts[:3])]
  if "edit" in tasks:
    recs = list(token_data.derived_records("edit", num, seed, size))
    src_codes = codes_of([r["image"] for r in recs])
    tgt_codes = codes_of([r["target_image"] for r in recs])
    prompts = [token_tasks.task_example("edit", {"codes": c, "instruction": r["text"], "target_codes": c}, vocab)[0]
               for r, c in zip(recs, src_codes)]
    edited, recon = images_for(prompts), pixels(tgt_codes)

    def holds(img: np.ndarray, ref: np.ndarray) -> bool:
      return (scoring.same_objects(scoring.detect(img), scoring.detect(ref), canvas)
              and scoring.background_name(img) == scoring.background_name(ref))
    ok = [holds(e, r["target_image"]) for e, r in zip(edited, recs)]
    out["edit_success"] = float(np.mean(ok))
    out["edit_unchanged"] = float(np.mean([holds(e, r["image"]) for e, r in zip(edited, recs)]))
    out["edit_ceiling"] = float(np.mean([holds(c, r["target_image"]) for c, r in zip(recon, recs)]))
    edits: dict[str, list[bool]] = {}
    for r, o in zip(recs, ok):
      edits.setdefault(r["answer"], []).append(o)
    out["edit_success_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(edits.items())}
  if "ground" in tasks:
    if vocab.num_locations < 1:
      out["ground_accuracy"] = None   # the vocabulary has no coordinate tokens (e.g. a pre-SFT cm3 run)
    else:
      recs = list(token_data.derived_records("caption", num, seed, size))
      anns = [json.loads(r["annotation"]) for r in recs]
      codes = codes_of([r["image"] for r in recs])
      prompts = [token_tasks.task_example("ground", {"codes": c, "annotation": a}, vocab)[0]
                 for c, a in zip(codes, anns)]
      imgs, recon = images_for(prompts), pixels(codes)

      def placed(img: np.ndarray, ann: dict[str, Any]) -> bool:
        found = scoring.detect(img)
        return all(scoring.check(found, {"family": "grounding", "objects": [{"color": o["color"], "shape": o["shape"]}],
                                         "point": o["centroid"]}, canvas) for o in ann["objects"])
      out["ground_accuracy"] = float(np.mean([placed(i, a) for i, a in zip(imgs, anns)]))
      out["ground_ceiling"] = float(np.mean([placed(i, a) for i, a in zip(recon, anns)]))
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  res = evaluate(f.workdir, f.num, f.seed, f.tasks, f.image_sampler, f.top_p, f.temperature, f.max_text_tokens,
                 f.batch, f.step)
  line = json.dumps(res)
  print(line)
  if f.out:
    with open(f.out, "a") as fh:
      fh.write(line + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
