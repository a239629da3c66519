"""Joint vocabulary: BPE training on shapes-bench text, id layout, mixed-document round trips, save/load."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.shapes.derived import edit_triplets, vqa_pairs
from t2i.text.joint_vocab import SPECIALS, JointVocab, train_text_tokenizer
from t2i.text.tokenizer import default_shapes_corpus


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  folder = tmp_path_factory.mktemp("tok")
  corpus = default_shapes_corpus()
  corpus += [r["instruction"] for r in edit_triplets(20, size=32)]
  corpus += [r["question"] + " " + r["answer"] for r in vqa_pairs(20, size=32)]
  tok = train_text_tokenizer(corpus, folder, vocab_size=600)
  assert (folder / "tokenizer.json").is_file() and tok.get_vocab_size() <= 600
  return JointVocab.from_folder(folder, num_image_codes=64, num_locations=16, image_shape=(4, 4))


def test_layout(vocab):
  t = vocab.text_size
  assert vocab.image_range == (t, t + 64)
  assert [vocab.token_id(s) for s in SPECIALS] == list(range(t + 64, t + 64 + len(SPECIALS)))
  assert vocab.token_id("<loc_0>") == t + 64 + len(SPECIALS) and vocab.size == vocab.token_id("<loc_15>") + 1
  assert len(set(vocab.special.structural)) == len(SPECIALS)
  with pytest.raises(ValueError, match="loc_16"):
    vocab.loc_id(16)


def test_text_is_compressed_and_round_trips(vocab):
  text = "a large red circle to the left of a small blue square on a dark background"
  ids = vocab.encode_text(text)
  assert len(ids) < len(text) / 2  # the BPE learnt the shapes-bench words
  assert max(ids) < vocab.text_size and vocab.decode_text(ids) == text
  odd = "Unseen wörds & ünïcode ✓"  # byte fallback: still lossless
  assert vocab.decode_text(vocab.encode_text(odd)) == odd


def test_mixed_document_round_trip(vocab):
  rs = np.random.RandomState(0)
  img1, img2 = rs.randint(0, 64, (4, 4)), rs.randint(0, 64, (4, 4))
  box = vocab.loc_tokens([3.0, 10.0, 31.9, 17.0], canvas=32)
  assert box == "<loc_1><loc_5><loc_15><loc_8>"
  doc = [img1, "make the circle blue", img2, f"a blue circle at {box} on a dark background"]
  ids = vocab.encode_document(doc)
  sp = vocab.special
  assert ids[0] == sp.bos and ids[-1] == sp.eod and ids.count(sp.break_id) == 3
  assert ids[1] == sp.image_start and ids[18] == sp.image_end
  assert ids[2:18] == (img1.reshape(-1) + vocab.image_offset).tolist()
  assert vocab.loc_id(15) in ids
  back = vocab.decode_document(ids + [sp.pad] * 3)
  assert len(back) == 4 and back[1] == doc[1] and back[3] == doc[3]
  np.testing.assert_array_equal(back[0], img1)
  np.testing.assert_array_equal(back[2], img2)


def test_save_load_and_errors(vocab, tmp_path):
  vocab.save(tmp_path)
  again = JointVocab.from_folder(tmp_path)
  assert again.size == vocab.size and again.image_shape == (4, 4)
  assert again.encode_text("a red circle") == vocab.encode_text("a red circle")
  with pytest.raises(ValueError, match="codes outside"):
    vocab.encode_image(np.full((2, 2), 64))
  with pytest.raises(ValueError, match="integer"):
    vocab.encode_image(np.zeros((2, 2), np.float32))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    JointVocab.from_folder(tmp_path / "nothing", num_image_codes=4)
