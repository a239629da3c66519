"""CLIP-style BPE tokenizers trained on a caption corpus, and batch tokenisation for training.

Nothing is downloaded: `build_clip_tokenizer` learns byte-level BPE merges on captions (lower-cased, `</w>`
end-of-word suffix, CLIP's pre-tokenisation) and writes a folder that `transformers.CLIPTokenizer.from_pretrained`
reloads: tokenizer.json, tokenizer_config.json, plus vocab.json / merges.txt in the original CLIP format.

Note (transformers 5): `CLIPTokenizer(vocab_file=..., merges_file=...)` ignores the files and silently builds a
3-token vocabulary; load with `CLIPTokenizer.from_pretrained(folder)` (or pass `vocab=`/`merges=`).
"""
from __future__ import annotations

import itertools
import json
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np
from absl import logging

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"


def byte_alphabet() -> list[str]:
  """The 256 printable stand-ins of byte-level BPE, in byte order (printable Latin-1 bytes map to themselves)."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def _train_merges(corpus: Iterable[str], max_merges: int) -> list[tuple[str, str]]:
  """BPE merges (highest priority first) learnt with the `tokenizers` trainer under CLIP's pre-tokenisation."""
  from tokenizers import Tokenizer, pre_tokenizers, trainers
  from tokenizers.models import BPE
  from transformers import CLIPTokenizer

  clip = CLIPTokenizer().backend_tokenizer  # blank: carries CLIP's normaliser and pre-tokeniser only
  tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=EOW))
  tok.normalizer, tok.pre_tokenizer = clip.normalizer, clip.pre_tokenizer
  trainer = trainers.BpeTrainer(vocab_size=1 << 24, min_frequency=1, special_tokens=[], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix=EOW)
  tok.train_from_iterator(corpus, trainer)
  merges = json.loads(tok.to_str())["model"]["merges"]
  return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges][:max_merges]


def build_clip_tokenizer(corpus: Iterable[str], out_dir: str | pathlib.Path, vocab_size: int = 1024,
                         model_max_length: int = 77):
  """Trains a CLIP-format BPE tokenizer on `corpus`, saves it to `out_dir` and returns it reloaded from there.

  The vocabulary holds the 256 byte symbols and their `</w>` forms (so any text encodes without unknown
  tokens), then one token per learnt merge, then <|startoftext|> and <|endoftext|> (also pad and unk), at most
  `vocab_size` ids. Merges stop early once every corpus word is a single token.
  """
  from transformers import CLIPTokenizer

  base = byte_alphabet()
  n_fixed = 2 * len(base) + 2
  if vocab_size < n_fixed:
    raise ValueError(f"build_clip_tokenizer: vocab_size={vocab_size} is below the {n_fixed} byte and special "
                     "tokens every CLIP vocabulary holds")
  corpus = [str(t) for t in corpus]
  if not any(t.strip() for t in corpus):
    raise ValueError("build_clip_tokenizer: the corpus is empty")
  merges = _train_merges(corpus, vocab_size - n_fixed)
  vocab = {s: i for i, s in enumerate(base + [c + EOW for c in base])}
  for a, b in merges:
    if a not in vocab or b not in vocab:
      raise RuntimeError(f"BPE merge ({a!r}, {b!r}) uses a symbol missing from the vocabulary")
    vocab.setdefault(a + b, len(vocab))
  vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
  tok.save_pretrained(out)
  (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
  (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  reloaded = CLIPTokenizer.from_pretrained(out)
  if len(reloaded) != len(vocab):
    raise RuntimeError(f"{out}: reloaded tokenizer has {len(reloaded)} tokens, expected {len(vocab)}")
  return reloaded


def tokenize(tokenizer, texts: Sequence[str] | str, max_length: int = 77) -> np.ndarray:
  """int32 [n, max_length] ids: <|startoftext|> text <|endoftext|>, padded with the pad token to `max_length`
  (on the tokenizer's padding side); longer texts are truncated as the tokenizer truncates them, so that
  <|endoftext|> stays the last token, with a warning naming the count and an example.

  Each text is tokenized once; only the texts that are too long are tokenized again, with truncation.
  """
  if isinstance(texts, str):
    texts = [texts]
  if max_length < 2:
    raise ValueError(f"tokenize: max_length={max_length} leaves no room for the start and end tokens")
  texts = list(texts)
  rows = list(tokenizer(texts, truncation=False)["input_ids"]) if texts else []
  long = [i for i, ids in enumerate(rows) if len(ids) > max_length]
  if long:
    cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
    logging.log_every_n_seconds(
        logging.WARNING, "%d of %d texts are longer than max_length=%d tokens and were cut (e.g. %d tokens: %r); "
        "raise config.tokenizer.max_length", 60, len(long), len(texts), max_length, len(rows[long[0]]),
        texts[long[0]])
    for i, ids in zip(long, cut):
      rows[i] = ids
  out = np.full((len(texts), max_length), tokenizer.pad_token_id, np.int32)
  left = getattr(tokenizer, "padding_side", "right") == "left"
  for i, ids in enumerate(rows):
    if left:
      out[i, max_length - len(ids):] = ids
    else:
      out[i, :len(ids)] = ids
  return out


def span_token_masks(tokenizer, texts: Sequence[str], spans: Sequence[Sequence[Sequence[tuple[int, int]]]],
                     max_groups: int, max_length: int = 77) -> np.ndarray:
  """float32 [n, max_groups, max_length]: 1 where a token of `tokenize(tokenizer, texts, max_length)` overlaps one
  of the character spans of group k of text i (spans[i][k] = [(start, end), ...]); groups beyond max_groups are
  dropped, tokens cut by truncation belong to no group. Needs a fast tokenizer (character offsets)."""
  texts = list(texts)
  out = np.zeros((len(texts), max_groups, max_length), np.float32)
  if not texts:
    return out
  enc = tokenizer(texts, truncation=False, return_offsets_mapping=True)
  left = getattr(tokenizer, "padding_side", "right") == "left"
  for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
    n = min(len(ids), max_length)
    keep = n - 1 if len(ids) > max_length else n  # truncation keeps the first max_length - 1 and the end token
    shift = max_length - n if left else 0
    for k, group in enumerate(list(spans[i])[:max_groups]):
      for j, (a, b) in enumerate(offsets[:keep]):
        if b > a and any(a < e and s < b for s, e in group):
          out[i, k, j + shift] = 1.0
  return out


def truncated(tokenizer, texts: Sequence[str], max_length: int) -> list[tuple[int, str]]:
  """(token count with start and end tokens, text) of each text longer than `max_length` tokens."""
  lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
  return [(n, t) for n, t in zip(lengths, texts) if n > max_length]


_COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_SHAPES = ("circle", "square", "triangle")
_PLURALS = ("circles", "squares", "triangles")
_SIZES = ("small", "large")
_NUMBERS = ("zero", "one", "two", "three", "four", "five")
_RELATIONS = ("to the left of", "to the right of", "above", "below")
_BACKGROUNDS = ("a light grey background", "an off-white background", "a dark background",
                "a dark slate background", "a white background", "a grey background", "a black background")
_FLAWS = ("blurry", "noisy", "washed out", "jpeg artifacts")
_PHRASES = (
    "a picture of a {o}", "an image with a single {o}", "a lone {o}", "just a {o}, nothing else", "a photo of a {o}",
    "an image of a {o}", "a {o} and a {o2}", "a {o} together with a {o2}", "two shapes: a {o} and a {o2}",
    "both a {o} and a {o2}", "{n} {c} {ps}", "exactly {n} {c} {ps}", "there are {n} {c} {ps}",
    "there is one {c} {s}", "a picture of {n} {c} {ps}", "a {s} that is {c}", "a {c}-coloured {s}",
    "a {s} coloured {c}", "a {s} in {c}", "a {o} {r} a {o2}", "a {o} placed {r} a {o2}",
    "a {o} sitting {r} a {o2}", "a {o} at ({x}, {y})", "a {o} centred at ({x}, {y})",
    "a {o} located at x={x}, y={y}", "a {o} with its centre at ({x}, {y})", "{d} {c} {ps}",
)


def default_shapes_corpus() -> list[str]:
  """Captions covering the closed vocabulary of shapes-bench (colours, shapes and plurals, sizes, counts as words
  and digits, relations, coordinates, backgrounds, flaws, template words), a few hundred sentences, fixed order."""
  out = []
  for i, (c, s) in enumerate(itertools.product(_COLORS, _SHAPES)):
    z = _SIZES[i % 2]
    c2, s2 = _COLORS[(i + 1) % len(_COLORS)], _SHAPES[(i + 2) % len(_SHAPES)]
    for j, phrase in enumerate(_PHRASES):
      k = i + j
      text = phrase.format(o=f"{z} {c} {s}" if k % 2 else f"{c} {s}", o2=f"{c2} {s2}", c=c, s=s,
                           ps=_PLURALS[_SHAPES.index(s)], n=_NUMBERS[1 + k % 4], d=str(1 + k % 4),
                           r=_RELATIONS[k % 4], x=str(k % 10), y=str((3 * k + 1) % 10))
      if k % 3 == 0:
        text += " on " + _BACKGROUNDS[k % len(_BACKGROUNDS)]
      if k % 5 == 0:
        text += ", " + _FLAWS[k % len(_FLAWS)]
      out.append(re.sub(r"\ba (?=[aeiou])", "an ", text))
  words = " ".join(_COLORS + _SHAPES + _PLURALS + _SIZES + _NUMBERS + _RELATIONS + _BACKGROUNDS + _FLAWS)
  return out + [words, "0 1 2 3 4 5 6 7 8 9"]
