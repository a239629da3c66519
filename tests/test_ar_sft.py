"""Multi-task SFT of the token LM: task templates and loss masks, the task mixture, the caption parser, vocabulary
growth, and a smoke SFT run through the one loop scored by benchmarks/cm3_tasks_eval."""
import json
import os

import numpy as np
import pytest

from data_pipelines import token_tasks
from data_pipelines.shapes import derived, scoring


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  from t2i.text.joint_vocab import JointVocab, train_text_tokenizer
  corpus = [r["caption"] for r in derived.caption_targets(50, 0, 32)] + ["describe the image.", "make it red"]
  tok = train_text_tokenizer(corpus, tmp_path_factory.mktemp("tok"), vocab_size=300)
  return JointVocab(tok, num_image_codes=16, num_locations=32, image_shape=(4, 4))


def _records(vocab):
  """One stored-layout record per task (as read from vq_tokens / vq_tasks)."""
  codes, target = np.arange(16).reshape(4, 4), np.arange(16)[::-1].reshape(4, 4).copy()
  cap = next(derived.caption_targets(1, 0, 32))
  ann = json.dumps(dict(json.loads(cap["annotation"]), canvas=32))
  return {
      "t2i": {"caption": b"a red circle", "codes": codes},
      "caption": {"caption": cap["caption"], "codes": codes, "text": "", "annotation": ann},
      "vqa": {"caption": "x", "codes": codes, "text": "how many circles are there?", "answer": "two"},
      "edit": {"caption": "x", "codes": codes, "text": "make the circle blue", "target_codes": target},
      "ground": {"caption": cap["caption"], "codes": codes, "annotation": ann},
  }, cap


def test_templates_layout_and_loss_mask(vocab):
  sp = vocab.special
  recs, cap = _records(vocab)
  img = vocab.encode_image(np.arange(16).reshape(4, 4))
  for task in token_tasks.TASKS:
    rec = token_tasks.decode_record(recs[task], task)
    prompt, response = token_tasks.task_example(task, rec, vocab)
    tokens, mask = token_tasks.sft_document(prompt, response)
    n = len(prompt)
    assert tokens[0] == sp.bos and tokens[n - 1] == sp.break_id and tokens[-1] == sp.eod, task
    assert mask[:n].sum() == 0 and np.all(mask[n:] == 1), task   # loss on the response (and its <eod>) only
    segs = vocab.decode_document(tokens[:n - 1].tolist())
    answer = vocab.decode_document(tokens[n:].tolist())
    if task == "t2i":
      assert segs == ["a red circle"] and response == img + [sp.eod]
    elif task == "caption":
      assert np.array_equal(segs[0], np.arange(16).reshape(4, 4)) and segs[1] in token_tasks.CAPTION_INSTRUCTIONS
      assert answer == [cap["caption"]]
    elif task == "vqa":
      assert segs[1] == "how many circles are there?" and answer == ["two"]
    elif task == "edit":
      assert segs[1] == "make the circle blue"
      assert np.array_equal(answer[0], np.arange(16)[::-1].reshape(4, 4))
    else:
      obj = json.loads(recs["ground"]["annotation"])["objects"]
      assert segs[0].count("<loc_") == 2 * len(obj) and response == img + [sp.eod]
      leftmost = min(o["centroid"] for o in obj)
      assert segs[0].split(" at ")[1].startswith(vocab.loc_tokens(leftmost, 32))
  uncond, resp = token_tasks.task_example("t2i", token_tasks.decode_record(recs["t2i"], "t2i"), vocab, uncond=True)
  assert uncond == [sp.bos, sp.mask, sp.break_id] and resp == img + [sp.eod]


def test_split_never_masks_the_response(vocab):
  recs, _ = _records(vocab)
  sources = {t: [recs[t]] for t in token_tasks.TASKS}
  cfg = token_tasks.default_task_config()
  cfg.update(max_length=96, read_threads=1, prefetch_buffer_size=2, uncond_rate=0.3)
  b = next(token_tasks.make_train_iterator(cfg, vocab, 32, sources=sources))
  sp = vocab.special
  for toks, mask in zip(b["tokens"], b["loss_mask"]):
    n = int((toks != sp.pad).sum())
    assert np.all(toks[n:] == sp.pad) and np.all(mask[n:] == 0)
    brk = np.flatnonzero(toks[:n] == sp.break_id)[-1]   # the response starts after the last <break>
    assert np.all(mask[brk + 1:n] == 1) and np.all(mask[:brk + 1] == 0)
  with pytest.raises(ValueError, match="config.data.max_length"):
    cfg.max_length = 20
    next(token_tasks.make_train_iterator(cfg, vocab, 8, sources=sources))


def test_mixture_is_deterministic_and_resumes(vocab):
  recs, _ = _records(vocab)
  sources = {t: [recs[t]] * 3 for t in token_tasks.TASKS}
  cfg = token_tasks.default_task_config()
  cfg.update(max_length=96, read_threads=1, prefetch_buffer_size=2, tasks="t2i:1,vqa:3,edit:0")
  assert token_tasks.parse_tasks(cfg.tasks) == {"t2i": 0.25, "vqa": 0.75}
  it = token_tasks.make_train_iterator(cfg, vocab, 16, sources=sources)
  first = next(it)["tokens"]
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(2)]
  again = token_tasks.make_train_iterator(cfg, vocab, 16, sources=sources)
  np.testing.assert_array_equal(next(again)["tokens"], first)
  again.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(np.stack([next(again)["tokens"] for _ in range(2)]), np.stack(want))
  docs = np.concatenate([first] + want)
  is_vqa = np.any(docs == vocab.encode_text("two")[0], axis=1) & ~np.any(docs == vocab.special.mask, axis=1)
  assert 0.5 < is_vqa.mean() < 0.95                       # ~75 % vqa documents
  other = token_tasks.make_train_iterator(cfg, vocab, 16, sources=sources, seed=1)
  assert not np.array_equal(next(other)["tokens"], first)
  with pytest.raises(ValueError, match="config.data.tasks"):
    token_tasks.parse_tasks("t2i:1,paint:2")


def test_caption_parser_scores():
  ref = "a small red circle and two large blue squares on a light grey background"
  assert derived.caption_match(ref, ref) == {"objects": True, "exact": True}
  assert derived.caption_match("a small blue circle and two large blue squares on a light grey background",
                               ref)["objects"] is False                        # wrong colour
  assert derived.caption_match("a small red circle and a large blue square on a light grey background",
                               ref)["objects"] is False                        # wrong count
  assert derived.caption_match("a large red circle, a large blue square and a large blue square on a dark "
                               "background", ref) == {"objects": True, "exact": False}
  assert derived.caption_match("red red circle circle", ref)["objects"] is False
  for r in derived.caption_targets(30, 3, 32):
    assert derived.caption_match(r["caption"], r["caption"])["exact"]


def test_scene_comparison_for_edits():
  from data_pipelines import image_decode
  for r in derived.edit_triplets(6, 0, 32):
    src, tgt = (image_decode.decode_rgb(r[k]) for k in ("source", "target"))
    assert scoring.same_objects(scoring.detect(tgt), scoring.detect(tgt), 32)
    changed = not scoring.same_objects(scoring.detect(src), scoring.detect(tgt), 32) or (
        scoring.background_name(src) != scoring.background_name(tgt))
    assert changed, r["instruction"]


def test_init_from_grows_the_vocabulary(tmp_path):
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from t2i.train import init_from
  src = {"lm": {"embed_tokens": {"embedding": np.arange(12, dtype=np.float32).reshape(4, 3)},
                "lm_head": {"kernel": np.ones((3, 4), np.float32)}, "norm": {"scale": np.ones(3, np.float32)}}}
  ocp.PyTreeCheckpointer().save(str(tmp_path / "checkpoints" / "5" / "state"), {"params": src})
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  want = {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((6, 3), jnp.float32, sharding=dev)},
          "lm_head": {"kernel": jax.ShapeDtypeStruct((3, 6), jnp.float32, sharding=dev)},
          "norm": {"scale": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=dev)}}
  with pytest.raises(ValueError, match=r"embed_tokens/embedding \(4, 3\) -> \(6, 3\).*grow=True"):
    init_from.restore_groups(str(tmp_path), {"lm": ("lm", want)})  # without grow: other shapes are an error
  plain = init_from.restore_groups(str(tmp_path), {"lm": ("lm", want)}, reinit_mismatched=True)["lm"]
  assert set(plain) == {("norm", "scale")}                       # ... or, when asked, stay fresh
  got = init_from.restore_groups(str(tmp_path), {"lm": ("lm", want)}, grow=True)["lm"]
  emb = np.asarray(got[("embed_tokens", "embedding")])
  np.testing.assert_array_equal(emb[:4], src["lm"]["embed_tokens"]["embedding"])
  np.testing.assert_allclose(emb[4:], np.tile(src["lm"]["embed_tokens"]["embedding"].mean(0), (2, 1)))
  assert np.asarray(got[("lm_head", "kernel")]).shape == (3, 6)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
  from experiments import cm3_shapes, cm3_shapes_sft, vq_shapes
  from t2i.train.loop import train
  base = tmp_path_factory.mktemp("sft")
  data, vq, cm3, sft = (str(base / n) for n in ("data", "vq", "cm3", "sft"))
  c = vq_shapes.get_config("smoke")
  c.data.data_dir, c.total_steps, c.sample_every = data, 2, 0
  train(c, vq)
  c = cm3_shapes.get_config("smoke")
  c.data.data_dir, c.init_from.workdir, c.total_steps, c.sample_every = data, vq, 2, 0
  train(c, cm3)
  c = cm3_shapes_sft.get_config("smoke")
  c.data.data_dir, c.init_from.workdir, c.total_steps, c.sample_every = data, cm3, 3, 0
  train(c, sft)
  return {"data": data, "cm3": cm3, "sft": sft}


def test_smoke_sft_trains_and_is_scored(sft_run):
  from benchmarks import cm3_tasks_eval
  from t2i.text.joint_vocab import JointVocab
  with open(os.path.join(sft_run["sft"], "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows)
  base = JointVocab.from_folder(os.path.join(sft_run["cm3"], "tokenizer"))
  tuned = JointVocab.from_folder(os.path.join(sft_run["sft"], "tokenizer"))
  assert tuned.num_locations == 32 and tuned.size == base.size + 32 and tuned.special == base.special
  sets = sorted(os.listdir(os.path.join(sft_run["data"], "vq_tasks")))
  assert len([s for s in sets if not s.startswith(".")]) == 3             # caption, vqa, edit code sets
  res = cm3_tasks_eval.evaluate(sft_run["sft"], num=4, seed=1000, batch=4, max_text_tokens=6)
  for k in ("caption_accuracy", "caption_exact", "vqa_accuracy", "edit_success", "edit_unchanged",
            "edit_ceiling", "ground_accuracy", "ground_ceiling"):
    assert 0.0 <= res[k] <= 1.0, k
  assert res["step"] == 3 and res["num"] == 4
  with pytest.raises(ValueError, match="task_seed"):
    cm3_tasks_eval.evaluate(sft_run["sft"], num=2, seed=0, tasks=["vqa"])
