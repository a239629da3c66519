"""Joint text + image-code vocabulary for autoregressive token models (CM3Leon / Chameleon).

  train_text_tokenizer(captions, "out/tok", vocab_size=512)        # byte-level BPE -> out/tok/tokenizer.json
  vocab = JointVocab.from_folder("out/tok", num_image_codes=256, num_locations=32, image_shape=(8, 8))
  ids = vocab.encode_document(["a red circle at <loc_3><loc_7>", codes_8x8])
  segments = vocab.decode_document(ids)                             # ["a red circle at <loc_3><loc_7>", codes]

Id layout: [0, T) text BPE ids | [T, T + K) image codes | specials <break> <mask> <infill> <eod> <pad> <bos>
<image_start> <image_end> | <loc_0> .. <loc_{N-1}> coordinate tokens.
Document layout: <bos> segment (<break> segment)* <eod>, an image segment being <image_start> codes <image_end>
(row-major). Text may carry coordinate tokens written as "<loc_i>"; they map to their own ids both ways.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np

SPECIALS = ("<break>", "<mask>", "<infill>", "<eod>", "<pad>", "<bos>", "<image_start>", "<image_end>")
_LOC = re.compile(r"<loc_(\d+)>")


def train_text_tokenizer(texts: Iterable[str], out_dir: str | pathlib.Path, vocab_size: int = 1024):
  """Trains a byte-level BPE (no special tokens; lossless round trip) on `texts`, writes out_dir/tokenizer.json
  and returns the `tokenizers.Tokenizer`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  texts = [str(t) for t in texts]
  if not any(t.strip() for t in texts):
    raise ValueError("train_text_tokenizer: the corpus is empty")
  if vocab_size < 256:
    raise ValueError(f"train_text_tokenizer: vocab_size={vocab_size} is below the 256 byte symbols")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
  tok.train_from_iterator(texts, trainer)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok.save(str(out / "tokenizer.json"))
  return tok


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids the CM3 transform and the samplers need (see `data_pipelines.cm3`)."""
  break_id: int
  mask: int
  infill: int
  eod: int
  pad: int
  bos: int
  image_start: int
  image_end: int

  @property
  def structural(self) -> tuple[int, ...]:
    """Tokens a CM3 span may never contain."""
    return (self.break_id, self.mask, self.infill, self.eod, self.pad, self.bos, self.image_start, self.image_end)


class JointVocab:
  """Maps mixed documents (text segments with optional <loc_i>, image code grids) to one id space."""

  def __init__(self, text_tokenizer, num_image_codes: int, num_locations: int = 0,
               image_shape: tuple[int, int] | None = None):
    if num_image_codes < 1 or num_locations < 0:
      raise ValueError(f"JointVocab: num_image_codes={num_image_codes} must be >= 1 and num_locations="
                       f"{num_locations} >= 0")
    self.text = text_tokenizer
    self.text_size = text_tokenizer.get_vocab_size()
    self.num_image_codes = num_image_codes
    self.num_locations = num_locations
    self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
    self.image_offset = self.text_size
    self.special_offset = self.image_offset + num_image_codes
    self.loc_offset = self.special_offset + len(SPECIALS)
    self.size = self.loc_offset + num_locations
    s = {name: self.special_offset + i for i, name in enumerate(SPECIALS)}
    self.special = SpecialIds(s["<break>"], s["<mask>"], s["<infill>"], s["<eod>"], s["<pad>"], s["<bos>"],
                              s["<image_start>"], s["<image_end>"])

  # -- construction / persistence
  @classmethod
  def from_folder(cls, folder: str | pathlib.Path, num_image_codes: int | None = None, num_locations: int | None = None,
                  image_shape: tuple[int, int] | None = None) -> "JointVocab":
    """Loads tokenizer.json (+ joint_vocab.json written by `save`, whose values the arguments override)."""
    from tokenizers import Tokenizer

    folder = pathlib.Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
      raise FileNotFoundError(f"{path}: not found (write it with train_text_tokenizer)")
    meta_path = folder / "joint_vocab.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    codes = num_image_codes if num_image_codes is not None else meta.get("num_image_codes")
    if codes is None:
      raise ValueError(f"{folder}: no joint_vocab.json; pass num_image_codes")
    locs = num_locations if num_locations is not None else meta.get("num_locations", 0)
    shape = image_shape if image_shape is not None else meta.get("image_shape")
    vocab = cls(Tokenizer.from_file(str(path)), codes, locs, shape)
    if "size" in meta and num_image_codes is None and num_locations is None and meta["size"] != vocab.size:
      raise ValueError(f"{meta_path}: size {meta['size']} != {vocab.size} rebuilt from {path}")
    return vocab

  def save(self, folder: str | pathlib.Path) -> None:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self.text.save(str(folder / "tokenizer.json"))
    (folder / "joint_vocab.json").write_text(json.dumps(
        {"num_image_codes": self.num_image_codes, "num_locations": self.num_locations,
         "image_shape": self.image_shape, "size": self.size, "specials": list(SPECIALS)}, indent=1))

  # -- single tokens
  def token_id(self, name: str) -> int:
    if name in SPECIALS:
      return self.special_offset + SPECIALS.index(name)
    m = _LOC.fullmatch(name)
    if m:
      return self.loc_id(int(m.group(1)))
    raise KeyError(f"JointVocab: unknown special token {name!r}")

  def loc_id(self, i: int) -> int:
    if not 0 <= i < self.num_locations:
      raise ValueError(f"JointVocab: <loc_{i}> outside the {self.num_locations} coordinate tokens")
    return self.loc_offset + i

  def loc_tokens(self, coords: Sequence[float], canvas: float) -> str:
    """"<loc_i>..." text for coordinates in [0, canvas] quantised to `num_locations` bins (e.g. a box x0,y0,x1,y1)."""
    n = self.num_locations
    bins = [min(n - 1, max(0, int(float(c) / canvas * n))) for c in coords]
    return "".join(f"<loc_{b}>" for b in bins)

  @property
  def image_range(self) -> tuple[int, int]:
    """[lo, hi) of image-code ids (for `DecodeConfig.allowed`)."""
    return self.image_offset, self.special_offset

  def is_image(self, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.image_offset) & (ids < self.special_offset)

  # -- segments
  def encode_text(self, text: str) -> list[int]:
    out: list[int] = []
    pos = 0
    for m in _LOC.finditer(text):
      if m.start() > pos:
        out += self.text.encode(text[pos:m.start()]).ids
      out.append(self.loc_id(int(m.group(1))))
      pos = m.end()
    if pos < len(text):
      out += self.text.encode(text[pos:]).ids
    return out

  def decode_text(self, ids: Sequence[int]) -> str:
    parts, run = [], []
    for i in ids:
      i = int(i)
      if i < self.text_size:
        run.append(i)
        continue
      if run:
        parts.append(self.text.decode(run))
        run = []
      if self.loc_offset <= i < self.size:
        parts.append(f"<loc_{i - self.loc_offset}>")
      else:
        raise ValueError(f"JointVocab.decode_text: id {i} is not a text or coordinate token")
    if run:
      parts.append(self.text.decode(run))
    return "".join(parts)

  def encode_image(self, codes: np.ndarray) -> list[int]:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype.kind not in "iu":
      raise ValueError(f"JointVocab.encode_image: codes must be an integer [h, w] grid, got {codes.dtype} "
                       f"{codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= self.num_image_codes):
      raise ValueError(f"JointVocab.encode_image: codes outside [0, {self.num_image_codes})")
    return [self.special.image_start, *(codes.reshape(-1) + self.image_offset).tolist(), self.special.image_end]

  def encode_document(self, segments: Sequence[str | np.ndarray], bos: bool = True, eod: bool = True) -> list[int]:
    """<bos>? seg (<break> seg)* <eod>? with str segments as text and 2-D integer arrays as images."""
    out = [self.special.bos] if bos else []
    for i, seg in enumerate(segments):
      if i:
        out.append(self.special.break_id)
      out += self.encode_text(seg) if isinstance(seg, str) else self.encode_image(seg)
    if eod:
      out.append(self.special.eod)
    return out

  def decode_document(self, ids: Sequence[int]) -> list[str | np.ndarray]:
    """Inverse of `encode_document` (bos / eod / pad dropped); image grids get `image_shape` when it fits."""
    sp = self.special
    ids = [int(i) for i in ids if int(i) not in (sp.bos, sp.pad)]
    if sp.eod in ids:
      ids = ids[:ids.index(sp.eod)]
    segments: list[str | np.ndarray] = []
    cur: list[int] = []
    for i in ids + [sp.break_id]:
      if i != sp.break_id:
        cur.append(i)
        continue
      if cur and cur[0] == sp.image_start:
        body = cur[1:-1] if cur[-1] == sp.image_end else cur[1:]
        codes = np.asarray(body, np.int64) - self.image_offset
        if not np.all(self.is_image(np.asarray(body, np.int64))):
          raise ValueError("JointVocab.decode_document: non-image token inside an image segment")
        if self.image_shape is not None and codes.size == self.image_shape[0] * self.image_shape[1]:
          codes = codes.reshape(self.image_shape)
        segments.append(codes)
      else:
        segments.append(self.decode_text(cur))
      cur = []
    return segments
