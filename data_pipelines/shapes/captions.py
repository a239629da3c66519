"""Paraphrase templates per prompt family, text generation from a prompt spec, and the parser back.

A prompt spec holds the conditions a prompt sets:
  {"family", "objects": [{"color", "shape", "size": "small"|"large"|None}], "count": int|None,
   "relation": str|None, "point": [x, y]|None, "background": str|None, "flaws": [str]}
Templates write "a" before every noun phrase; it becomes "an" before a vowel. Every template of every family
parses back to the same spec (tests check it), so training captions and eval prompts share one grammar.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from data_pipelines.shapes import palette

TEMPLATES = {
    "single": (
        "a {obj}",
        "a picture of a {obj}",
        "an image with a single {obj}",
        "a lone {obj}",
        "just a {obj}, nothing else",
    ),
    "two_objects": (
        "a {obj1} and a {obj2}",
        "a {obj1} together with a {obj2}",
        "two shapes: a {obj1} and a {obj2}",
        "both a {obj1} and a {obj2}",
    ),
    "counting": (
        "{n} {color} {shapes}",
        "exactly {n} {color} {shapes}",
        "there {be} {n} {color} {shapes}",
        "a picture of {n} {color} {shapes}",
    ),
    "colours": (
        "a {shape} that is {color}",
        "a {color}-coloured {shape}",
        "a {shape} coloured {color}",
        "a {shape} in {color}",
    ),
    "position": (
        "a {obj1} {rel} a {obj2}",
        "a {obj1} placed {rel} a {obj2}",
        "a {obj1} sitting {rel} a {obj2}",
    ),
    "grounding": (
        "a {obj} at ({x}, {y})",
        "a {obj} centred at ({x}, {y})",
        "a {obj} located at x={x}, y={y}",
        "a {obj} with its centre at ({x}, {y})",
    ),
}

_WORDS = {n: w for n, w in enumerate(palette.NUMBER_WORDS)}


def _phrase(obj: dict[str, Any]) -> str:
  size = f"{obj['size']} " if obj.get("size") else ""
  return f"{size}{obj['color']} {obj['shape']}"


def _articles(text: str) -> str:
  return re.sub(r"\ba (?=[aeiou])", "an ", text)


def text_for(spec: dict[str, Any], template: int | None = None, rng: np.random.Generator | None = None) -> str:
  """Prompt text of a spec from template number `template` (or one drawn with `rng`), with suffixes."""
  family = spec["family"]
  if family not in TEMPLATES:
    raise ValueError(f"prompt family must be one of {palette.FAMILIES}, got {family!r}")
  options = TEMPLATES[family]
  if template is None:
    template = int(rng.integers(len(options))) if rng is not None else 0
  objs = spec["objects"]
  fields = {"obj": _phrase(objs[0]), "obj1": _phrase(objs[0]), "color": objs[0]["color"],
            "shape": objs[0]["shape"]}
  if len(objs) > 1:
    fields["obj2"] = _phrase(objs[1])
  if spec.get("count") is not None:
    n = int(spec["count"])
    fields.update(n=_WORDS[n], be="is" if n == 1 else "are",
                  shapes=objs[0]["shape"] if n == 1 else palette.PLURALS[objs[0]["shape"]])
  if spec.get("relation") is not None:
    fields["rel"] = spec["relation"]
  if spec.get("point") is not None:
    fields["x"], fields["y"] = (f"{v:g}" for v in spec["point"])
  text = options[template % len(options)].format(**fields)
  if spec.get("background"):
    text += " on " + palette.BACKGROUNDS[spec["background"]][1]
  for flaw in spec.get("flaws", ()):
    text += ", " + flaw
  return _articles(text)


def flipped_caption(caption: str, size: int) -> str:
  """The caption with its spatial relation reversed, or its grounding point mirrored through the centre of a
  `size`-px image ("(9, 15)" -> "(23, 17)" at 32 px); unchanged if it names neither. A caption that the image
  contradicts only in where things are: the conditioning probe (`benchmarks.conditioning`) and the negative
  captions of caption-contrastive denoising (`config.data.negative_caption`)."""
  for rel, opposite in palette.OPPOSITE_RELATION.items():
    if f" {rel} " in caption:
      return caption.replace(f" {rel} ", f" {opposite} ", 1)
  mirror = lambda m: f"{m.group(1)}{size - int(m.group(2))}{m.group(3)}{size - int(m.group(4))}"  # noqa: E731
  return re.sub(r"(\(|x=)(\d+)(, (?:y=)?)(\d+)", mirror, caption, count=1)


# ----------------------------------------------------------------------------------------------- parsing

def _alt(words) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR, _SHAPE, _SIZE = _alt(palette.COLOR_NAMES), _alt(palette.SHAPES), _alt(palette.SIZES)


def _obj_re(i: int) -> str:
  return rf"(?:(?P<size{i}>{_SIZE}) )?(?P<color{i}>{_COLOR}) (?P<shape{i}>{_SHAPE})"


_SLOTS = {
    "obj": _obj_re(0), "obj1": _obj_re(0), "obj2": _obj_re(1),
    "color": rf"(?P<color0>{_COLOR})", "shape": rf"(?P<shape0>{_SHAPE})", "shapes": rf"(?P<shape0>{_SHAPE})s?",
    "n": rf"(?P<n>{_alt(palette.NUMBER_WORDS[1:5])})", "be": "(?:is|are)",
    "rel": rf"(?P<rel>{_alt(palette.RELATIONS)})",
    "x": r"(?P<x>-?\d+(?:\.\d+)?)", "y": r"(?P<y>-?\d+(?:\.\d+)?)",
}


def _template_re(template: str) -> re.Pattern:
  out, pos = [], 0
  for m in re.finditer(r"\{(\w+)\}", template):
    out.append(re.escape(template[pos:m.start()]))
    out.append(_SLOTS[m.group(1)])
    pos = m.end()
  out.append(re.escape(template[pos:]))
  pattern = "".join(out).replace(r"\ ", " ")
  pattern = re.sub(r"(?:(?<=^)|(?<= ))a ", "an? ", pattern)
  return re.compile(pattern)


_PARSERS = [(family, _template_re(t)) for family, ts in TEMPLATES.items() for t in ts]
_BG_RE = re.compile(r"^(?P<body>.*) on (?P<bg>" + _alt(v[1] for v in palette.BACKGROUNDS.values()) + ")$")
_BG_BY_PHRASE = {v[1]: k for k, v in palette.BACKGROUNDS.items()}


class PromptParseError(ValueError):
  """A prompt that none of the shapes-bench templates produces."""


def parse_prompt(text: str) -> dict[str, Any]:
  """Prompt spec (family + conditions) of a shapes-bench prompt or clean training caption."""
  norm = " ".join(str(text).lower().split()).rstrip(" .")
  flaws = []
  while True:
    for flaw in palette.FLAWS:
      if norm.endswith(", " + flaw):
        flaws.insert(0, flaw)
        norm = norm[:-len(flaw) - 2]
        break
    else:
      break
  background = None
  m = _BG_RE.match(norm)
  if m:
    norm, background = m.group("body"), _BG_BY_PHRASE[m.group("bg")]
  for family, pattern in _PARSERS:
    m = pattern.fullmatch(norm)
    if m is None:
      continue
    g = m.groupdict()
    objects = [{"color": g[f"color{i}"], "shape": g[f"shape{i}"], "size": g.get(f"size{i}")}
               for i in (0, 1) if g.get(f"color{i}")]
    return {
        "family": family, "objects": objects,
        "count": palette.NUMBER_WORDS.index(g["n"]) if g.get("n") else None,
        "relation": g.get("rel"),
        "point": [float(g["x"]), float(g["y"])] if g.get("x") is not None else None,
        "background": background, "flaws": flaws,
    }
  raise PromptParseError(f"not a shapes-bench prompt: {text!r}")


def object_spans(text: str) -> tuple[dict[str, Any], list[list[tuple[int, int]]], tuple[int, int] | None]:
  """(spec, per spec object the character spans of its words, span of the background phrase or None) of a
  caption as `text_for` writes it (lower case, single spaces). Object words are its size, colour and shape (the
  plural in counting captions); relations, numbers and points belong to no object. Raises PromptParseError for a
  caption of another form (e.g. with a trigger prefix)."""
  spec = parse_prompt(text)
  body = text
  for flaw in reversed(spec["flaws"]):
    body = body[:-len(flaw) - 2]
  bg_span = None
  if spec["background"] is not None:
    phrase = palette.BACKGROUNDS[spec["background"]][1]
    body = body[:-len(phrase) - 4]  # " on " + phrase
    bg_span = (len(body) + 4, len(body) + 4 + len(phrase))
  for family, pattern in _PARSERS:
    m = pattern.fullmatch(body) if family == spec["family"] else None
    if m is not None:
      break
  else:
    raise PromptParseError(f"object_spans: {text!r} is not in text_for's normal form")
  spans = []
  for i in range(len(spec["objects"])):
    spans.append([m.span(g) for g in (f"size{i}", f"color{i}", f"shape{i}")
                  if g in m.re.groupindex and m.group(g) is not None])
  return spec, spans, bg_span
