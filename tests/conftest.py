"""Test setup: 8 fake CPU devices, float32 matmuls at full precision; shared fixtures."""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def read_group():
  """read_group(workdir, group, kind="state", key="ema_params") -> {path: numpy array} of one param group of a
  run's latest checkpoint ("state"/key, or kind="frozen"), restored without a target."""
  def read(workdir, group, kind="state", key="ema_params"):
    import numpy as np
    import orbax.checkpoint as ocp
    from flax import traverse_util
    from t2i.train import checkpoint as ckpt_lib
    step = ckpt_lib.make_manager(str(workdir), async_save=False).latest_step()
    tree = ocp.PyTreeCheckpointer().restore(f"{workdir}/checkpoints/{step}/{kind}")
    tree = tree[key] if kind == "state" else tree
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree[group]).items()}
  return read


@pytest.fixture
def make_t5_tokenizer():
  """make_t5_tokenizer(folder, vocab_size=60) -> folder: a T5TokenizerFast (unigram, `<pad>`=0, `</s>`=1) trained
  offline on a few captions and saved with save_pretrained, standing in for FLUX's `tokenizer_2`."""
  def make(folder, vocab_size=60):
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["a red circle on a blue square", "two green triangles", "a small yellow star next to a circle"] * 20
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                        extra_ids=0)
    fast.save_pretrained(folder)
    return folder
  return make
