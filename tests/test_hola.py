"""Attention grounding (CosmicMan's HOLA): caption groups, their tokens and masks, the loss, the train loop."""
import io
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from data_pipelines import pipeline
from data_pipelines.shapes import captions, groups, records
from t2i.objectives import attention
from t2i.text.tokenizer import build_clip_tokenizer, default_shapes_corpus, span_token_masks, tokenize
from t2i.train.models import Tokenizer


@pytest.fixture(scope="module")
def shapes_tok(tmp_path_factory):
  return build_clip_tokenizer(default_shapes_corpus(), tmp_path_factory.mktemp("tok"))


def _labels(record):
  return np.asarray(Image.open(io.BytesIO(record["mask"])))


def test_groups_name_each_objects_words_and_pixels():
  """One group per named object (its size, colour and shape words; the mask = every object of that colour and
  shape) and one for a named background (mask = no object); other caption forms give no groups."""
  seen = set()
  for r in records.generate_records("train", 120, seed=3, size=32):
    cap, ann, labels = r["caption"], json.loads(r["annotation"]), _labels(r)
    spec = captions.parse_prompt(cap)
    got = groups.token_groups(cap, r)
    assert len(got) == len(spec["objects"]) + (spec["background"] is not None)
    for obj, (spans, mask, placed) in zip(spec["objects"], got):
      assert placed == (spec["family"] in ("position", "grounding")), cap
      words = [cap[a:b] for a, b in spans]
      assert obj["color"] in words and any(w.startswith(obj["shape"]) for w in words), (cap, words)
      assert (obj["size"] in words) == bool(obj["size"]), (cap, words)
      ids = [o["mask_label"] for o in ann["objects"] if (o["color"], o["shape"]) == (obj["color"], obj["shape"])]
      np.testing.assert_array_equal(mask, np.isin(labels, ids))
      assert mask.any()
      seen.add(spec["family"])
    if spec["background"] is not None:
      (a, b), = got[-1][0]
      assert cap[a:b].endswith("background")
      np.testing.assert_array_equal(got[-1][1], labels == 0)
      assert got[-1][2] is False
  assert seen == set(captions.TEMPLATES)
  r = next(records.generate_records("train", 1, seed=3, size=32))
  assert groups.token_groups("", r) == [] and groups.token_groups("sks " + r["caption"], r) == []


def test_span_token_masks_mark_the_groups_tokens(shapes_tok):
  """Tokens overlapping a group's character spans, at the positions `tokenize` puts them (right or left padding);
  tokens cut by truncation belong to no group."""
  cap = "a small red circle to the left of a blue square on a dark background"
  spans = [[(2, 7), (8, 11), (12, 18)], [(36, 40), (41, 47)], [(51, 66)]]
  assert [cap[a:b] for a, b in spans[0]] == ["small", "red", "circle"]
  m = span_token_masks(shapes_tok, [cap, ""], [spans, []], 4, 24)
  ids = tokenize(shapes_tok, [cap], 24)[0]
  words = lambda row: [shapes_tok.convert_ids_to_tokens(int(i)).replace("</w>", "") for i in ids[row > 0]]  # noqa
  assert words(m[0, 0]) == ["small", "red", "circle"] and words(m[0, 1]) == ["blue", "square"]
  assert words(m[0, 2]) == ["a", "dark", "background"] and not m[0, 3].any() and not m[1].any()
  cut = span_token_masks(shapes_tok, [cap], [spans], 4, 12)  # 17 tokens cut to 12: the last kept is <|endoftext|>
  np.testing.assert_array_equal(cut[0, :, :11], m[0, :, :11])  # "square" (index 11) was cut with the background
  assert m[0, 1, 11] == 1 and not cut[0, :, 11:].any()
  shapes_tok.padding_side = "left"
  try:
    left = span_token_masks(shapes_tok, [cap], [spans], 4, 24)
    shift = 24 - len(shapes_tok([cap])["input_ids"][0])
    np.testing.assert_array_equal(left[0, :, shift:], m[0, :, :24 - shift])
  finally:
    shapes_tok.padding_side = "right"


def unplaced_groups(caption, record):
  """A config.data.token_groups hook of the older form: (spans, mask) pairs, no placed flag."""
  return [(spans, mask) for spans, mask, _ in groups.token_groups(caption, record)]


def malformed_groups(caption, record):
  """A hook that returns 1-tuples: the pipeline must refuse it, naming config.data.token_groups."""
  return [(spans,) for spans, _, _ in groups.token_groups(caption, record)]


def test_pipeline_batches_carry_group_tokens_and_pooled_masks(shapes_tok):
  """config.token_groups: group_masks are the hook's masks cropped like the image and average-pooled;
  group_tokens come from the tokenizer's span_tokens; group_placed is the hook's placed flag; a dropped caption has
  no groups."""
  recs = list(records.generate_records("train", 16, seed=5, size=32))
  tok = Tokenizer(lambda t: tokenize(shapes_tok, t, 24), len(shapes_tok), shapes_tok.eos_token_id,
                  span_fn=lambda t, s, k: span_token_masks(shapes_tok, t, s, k, 24))
  cfg = pipeline.default_data_config()
  cfg.update(image_size=32, caption_dropout=0.0, max_length=24, token_groups="data_pipelines.shapes.groups.token_groups",
             max_groups=3, group_mask_pool=4)
  b = next(pipeline.make_train_iterator(cfg, tok, 8, source=recs, seed=0))
  assert b["group_masks"].shape == (8, 3, 8, 8) and b["group_tokens"].shape == (8, 3, 24)
  assert b["group_placed"].shape == (8, 3) and 0 < b["group_placed"].sum() < b["group_tokens"].any(-1).sum()
  by_caption = {r["caption"]: r for r in recs}
  for i, ids in enumerate(b["input_ids"]):
    cap = next(c for c in by_caption if (tokenize(shapes_tok, [c], 24)[0] == ids).all())
    want = groups.token_groups(cap, by_caption[cap])[:3]
    for k in range(3):
      if k < len(want):
        np.testing.assert_allclose(b["group_masks"][i, k], want[k][1].reshape(8, 4, 8, 4).mean((1, 3)), atol=1e-6)
        np.testing.assert_array_equal(b["group_tokens"][i, k], span_token_masks(shapes_tok, [cap], [[want[k][0]]],
                                                                                1, 24)[0, 0])
        assert b["group_placed"][i, k] == float(want[k][2])
      else:
        assert not b["group_masks"][i, k].any() and not b["group_tokens"][i, k].any() and not b["group_placed"][i, k]
  cfg.caption_dropout = 1.0
  dropped = next(pipeline.make_train_iterator(cfg, tok, 8, source=recs, seed=0))
  assert not dropped["group_tokens"].any() and not dropped["group_masks"].any()
  cfg.update(caption_dropout=0.0, token_groups="test_hola.unplaced_groups")  # a hook without placed flags
  b2 = next(pipeline.make_train_iterator(cfg, tok, 8, source=recs, seed=0))
  np.testing.assert_array_equal(b2["group_placed"], b["group_tokens"].any(-1))  # every group placed
  np.testing.assert_array_equal(b2["group_masks"], b["group_masks"])
  cfg.token_groups = "test_hola.malformed_groups"
  with pytest.raises(ValueError, match="test_hola.malformed_groups.*must return"):
    next(pipeline.make_train_iterator(cfg, tok, 8, source=recs, seed=0))
  with pytest.raises(ValueError, match="group_mask_pool"):
    cfg.group_mask_pool = 5
    pipeline.make_train_iterator(cfg, tok, 8, source=recs, seed=0)


def _hola_by_definition(maps, sel, masks, keep):
  """The HOLA term written as its definition, loop by loop (numpy)."""
  layer_terms = []
  for m in maps:
    m = np.asarray(m, np.float64)
    b, h, q, _ = m.shape
    f = int(np.sqrt(masks.shape[2] * masks.shape[3] / q))
    pooled = masks.reshape(b, masks.shape[1], masks.shape[2] // f, f, masks.shape[3] // f, f).mean((3, 5))
    total, count = 0.0, 0.0
    for i in range(b):
      for k in range(sel.shape[1]):
        toks = np.nonzero(sel[i, k])[0]
        if not len(toks) or not keep[i]:
          continue
        target = pooled[i, k].reshape(-1)
        token = np.mean([np.mean((m[i, :, :, j] - target) ** 2) for j in toks])
        group = np.mean((m[i][:, :, toks].mean(-1) - target) ** 2)
        total, count = total + token + group, count + 1
    layer_terms.append(total / count)
  return np.mean(layer_terms)


def test_hola_loss_equals_its_definition():
  """Two layers (8x8 and 4x4 positions) against masks at 16x16; a scanned [n, B, ...] stack folds into heads;
  resolutions restricts the layers; a perfect map scores zero."""
  rng = np.random.default_rng(0)
  b, k, length = 3, 2, 6
  maps = [jax.nn.softmax(jnp.asarray(rng.normal(size=(b, 2, q, length)), jnp.float32), -1) for q in (64, 16)]
  sel = np.zeros((b, k, length), np.float32)
  sel[0, 0, [1, 2]] = sel[0, 1, 4] = sel[1, 0, [2, 3, 4]] = sel[2, 1, 1] = 1
  masks = (rng.random((b, k, 16, 16)) > 0.6).astype(np.float32)
  keep = np.array([1.0, 1.0, 0.0], np.float32)
  term, metrics = attention.hola_loss(maps, jnp.asarray(sel), jnp.asarray(masks), jnp.asarray(keep))
  np.testing.assert_allclose(float(term), _hola_by_definition(maps, sel, masks, keep), rtol=1e-5)
  assert 0 < float(metrics["attn_in_mask"]) < 1
  only8, _ = attention.hola_loss(maps, jnp.asarray(sel), jnp.asarray(masks), jnp.asarray(keep), resolutions=(8,))
  np.testing.assert_allclose(float(only8), _hola_by_definition(maps[:1], sel, masks, keep), rtol=1e-5)
  stacked = attention.attention_maps({"blk": {"cross_attn_probs": (jnp.stack([maps[0], maps[0] * 0.5]),)}})
  assert stacked[0].shape == (b, 4, 64, length)
  np.testing.assert_allclose(stacked[0][:, 2:], maps[0] * 0.5)
  # one token per group whose map is exactly its (binary, pooled) mask: zero at token and group level
  target = np.zeros((1, 1, 4, 4), np.float32)
  target[0, 0, :2] = 1
  perfect = jnp.stack([jnp.asarray(target.reshape(16)), 1 - jnp.asarray(target.reshape(16))], -1)[None, None]
  zero, m = attention.hola_loss([perfect], jnp.asarray([[[1.0, 0.0]]]), jnp.asarray(target))
  assert float(zero) == 0.0 and float(m["attn_in_mask"]) == 1.0
  with pytest.raises(ValueError, match="no cross-attention map"):
    attention.hola_loss(maps, jnp.asarray(sel), jnp.asarray(masks), resolutions=(2,))


def test_hola_in_the_train_loop(tmp_path):
  """config.data.token_groups + config.diffusion.hola (and the text-side config.diffusion.layout on the same
  groups, counting only placed groups and marking their words on an object channel) train a real (tiny) U-Net
  through the one loop and log their terms, attn_in_mask and layout_order; the term without groups fails naming the
  data key."""
  from experiments import sd_shapes
  from t2i.train import loop
  cfg = sd_shapes.get_config()
  cfg.batch_size, cfg.total_steps, cfg.log_every = 8, 2, 1
  cfg.ckpt_every, cfg.sample_every, cfg.eval.every = 2, 0, 0
  cfg.unet.config.update(block_out_channels=(32, 32), cross_attention_dim=32, attention_head_dim=4,
                         norm_num_groups=8)
  cfg.text_encoder.config.update(hidden_size=32, intermediate_size=32, num_hidden_layers=1)
  cfg.data.update(data_dir=str(tmp_path / "data"), shapes_num=32)
  cfg.diffusion.hola.weight = 1.0
  with pytest.raises(ValueError, match="config.data.token_groups"):
    loop.train(cfg, str(tmp_path / "no_groups"))
  cfg.data.token_groups = "data_pipelines.shapes.groups.token_groups"
  cfg.diffusion.layout.update(weight=1.0, placed_only=True, object_channel=2)
  m = loop.train(cfg, str(tmp_path / "run"))
  assert np.isfinite(float(m["loss"])) and float(m["hola"]) > 0 and 0 < float(m["attn_in_mask"]) < 1, m
  assert float(m["layout"]) > 0 and 0 <= float(m["layout_order"]) <= 1 and float(m["layout_object"]) > 0, m
