"""Derived tasks from the shapes-bench generator: preference pairs, edit triplets, VQA, captioning targets.

All generators are deterministic in (seed, index) and never bind a held-out (colour, shape) pair.
"""
from __future__ import annotations

import copy
import json
import re
from typing import Any, Iterator

import numpy as np

from data_pipelines.shapes import captions, palette, scenes
from data_pipelines.shapes.records import annotation
from data_pipelines.shapes.rendering import png_bytes, render

TIE_SHARE = 0.05
FLAW_SHARE = 0.25


def _pick(rng: np.random.Generator, items):
  return items[int(rng.integers(len(items)))]


def _png(scene: dict[str, Any], size: int, rng: np.random.Generator) -> bytes:
  return png_bytes(render(scene, size, seed=int(rng.integers(2**31))))


def random_scene(rng: np.random.Generator, size: int, num_objects: int, distinct: bool = True) -> dict[str, Any]:
  """Scene of `num_objects` training-pair objects (distinct pairs unless told otherwise) at random places."""
  pairs = list(palette.TRAIN_PAIRS)
  chosen = ([pairs[i] for i in rng.permutation(len(pairs))[:num_objects]] if distinct
            else [_pick(rng, pairs) for _ in range(num_objects)])
  objs = [{"color": c, "shape": s, "size": _pick(rng, palette.SIZES)} for c, s in chosen]
  placed = scenes.place(objs, rng, size) or scenes.place([dict(o, size="small") for o in objs], rng, size)
  if placed is None:
    raise RuntimeError(f"cannot lay out {num_objects} objects on {size} px")
  return {"background": _pick(rng, palette.BACKGROUND_NAMES), "objects": placed, "flaws": []}


def canonical_caption(scene: dict[str, Any]) -> str:
  """One caption per scene: objects left to right, identical ones grouped, then the background."""
  groups: dict[tuple[str, str, str], int] = {}
  for o in sorted(scene["objects"], key=lambda o: (o["center"][0], o["center"][1])):
    key = (o["size"], o["color"], o["shape"])
    groups[key] = groups.get(key, 0) + 1
  parts = [f"a {s} {c} {sh}" if n == 1 else f"{palette.NUMBER_WORDS[n]} {s} {c} {palette.PLURALS[sh]}"
           for (s, c, sh), n in groups.items()]
  body = "no shapes" if not parts else parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  text = f"{body} on {palette.BACKGROUNDS[scene['background']][1]}"
  for flaw in scene.get("flaws", ()):
    text += ", " + flaw
  return captions._articles(text)


_COUNT_WORDS = {w: n for n, w in enumerate(palette.NUMBER_WORDS)}
_PART_RE = re.compile(r"(?:an?|(?P<n>" + "|".join(palette.NUMBER_WORDS[1:]) + r")) (?P<size>" + "|".join(palette.SIZES)
                      + r") (?P<color>" + "|".join(palette.COLOR_NAMES) + r") (?P<shape>"
                      + "|".join(list(palette.SHAPES) + list(palette.PLURALS.values())) + r")")
_BG_PHRASES = {v[1]: k for k, v in palette.BACKGROUNDS.items()}


def parse_canonical_caption(text: str) -> dict[str, Any]:
  """Inverse of `canonical_caption` (without flaws): {"objects": sorted [(size, colour, shape)] with repeats,
  "background": name}. Raises ValueError when the text is not in that grammar (e.g. a garbled generation)."""
  norm = " ".join(str(text).lower().split()).rstrip(" .")
  body, sep, bg = norm.rpartition(" on ")
  if not sep or bg not in _BG_PHRASES:
    raise ValueError(f"not a canonical shapes caption (no known background): {text!r}")
  objects: list[tuple[str, str, str]] = []
  if body != "no shapes":
    for part in re.split(r", | and ", body):
      m = _PART_RE.fullmatch(part)
      if m is None:
        raise ValueError(f"not a canonical shapes caption (cannot read {part!r}): {text!r}")
      n = _COUNT_WORDS[m.group("n")] if m.group("n") else 1
      shape = next(s for s in palette.SHAPES if m.group("shape") in (s, palette.PLURALS[s]))
      if (n == 1) != (m.group("shape") == shape):
        raise ValueError(f"not a canonical shapes caption (number and noun disagree in {part!r}): {text!r}")
      objects += [(m.group("size"), m.group("color"), shape)] * n
  return {"objects": sorted(objects), "background": _BG_PHRASES[bg]}


def caption_match(generated: str, reference: str) -> dict[str, bool]:
  """{"objects": the generated caption names the reference's objects with their colours and shapes (as a
  multiset; sizes and background ignored), "exact": also sizes and background}; False for unparseable text."""
  ref = parse_canonical_caption(reference)
  try:
    got = parse_canonical_caption(generated)
  except ValueError:
    return {"objects": False, "exact": False}
  objects = sorted(o[1:] for o in got["objects"]) == sorted(o[1:] for o in ref["objects"])
  return {"objects": objects, "exact": objects and got == ref}


def preference_pairs(num: int, seed: int = 0, size: int = 64) -> Iterator[dict[str, Any]]:
  """Pick-a-Pic style pairs {"caption", "jpg_0", "jpg_1" (PNG bytes), "label_0", "rejected", "family", "id"}.

  The preferred image satisfies the caption; the other breaks one attribute (rejected = colour / shape / count /
  position / grounding / size) or carries a flaw (rejected = "flaw: <name>"). label_0 = 1 when jpg_0 is preferred,
  0 when jpg_1 is; a share TIE_SHARE are ties (two satisfying images, label_0 = 0.5, rejected = "tie").
  """
  size = palette.check_canvas(size)
  for i in range(int(num)):
    rng = palette.rng_for(seed, "preference", i)
    family = _pick(rng, palette.FAMILIES)
    spec = scenes.sample_spec(family, rng, palette.TRAIN_PAIRS, size)
    good = scenes.scene_for(spec, rng, size)
    raw, spec = spec, scenes.clean_spec(spec)
    caption = captions.text_for(spec, rng=rng)
    other, rejected = None, "tie"
    if rng.random() >= TIE_SHARE:
      if rng.random() >= FLAW_SHARE:
        for kind in rng.permutation(scenes.applicable_breaks(spec)):
          other = scenes.break_scene(spec, good, str(kind), rng, size, palette.TRAIN_PAIRS)
          if other is not None:
            rejected = str(kind)
            break
      if other is None:
        flaw = _pick(rng, palette.FLAWS)
        other, rejected = dict(copy.deepcopy(good), flaws=[flaw]), "flaw: " + flaw
    else:
      other = scenes.scene_for(raw, rng, size, background=good["background"])
    imgs = [_png(good, size, rng), _png(other, size, rng)]
    label = 0.5 if rejected == "tie" else 1.0
    if rng.random() < 0.5:
      imgs, label = imgs[::-1], 1.0 - label
    yield {"id": f"preference-{seed}-{i:08d}", "caption": caption, "jpg_0": imgs[0], "jpg_1": imgs[1],
           "label_0": label, "rejected": rejected, "family": family}


def _ref(scene: dict[str, Any], i: int) -> str:
  """Shortest unambiguous name of object i: "circle" when it is the only circle, else "red circle"."""
  o = scene["objects"][i]
  same_shape = sum(p["shape"] == o["shape"] for p in scene["objects"])
  return o["shape"] if same_shape == 1 else f"{o['color']} {o['shape']}"


EDITS = ("recolour", "reshape", "remove", "add", "background")


def _edit(scene: dict[str, Any], rng: np.random.Generator, size: int) -> tuple[str, str, dict[str, Any]] | None:
  kind = _pick(rng, EDITS)
  target = copy.deepcopy(scene)
  objs = target["objects"]
  taken = {(o["color"], o["shape"]) for o in objs}
  i = int(rng.integers(len(objs)))
  ref = _ref(scene, i)
  if kind == "recolour":
    colors = [c for c in palette.COLOR_NAMES if (c, objs[i]["shape"]) in palette.TRAIN_PAIRS
              and (c, objs[i]["shape"]) not in taken]
    if not colors:
      return None
    objs[i]["color"] = c = _pick(rng, colors)
    text = _pick(rng, ("make the {r} {c}", "change the colour of the {r} to {c}", "turn the {r} {c}",
                       "paint the {r} {c}")).format(r=ref, c=c)
  elif kind == "reshape":
    shapes = [s for s in palette.SHAPES if (objs[i]["color"], s) in palette.TRAIN_PAIRS
              and (objs[i]["color"], s) not in taken]
    if not shapes:
      return None
    objs[i]["shape"] = s = _pick(rng, shapes)
    if not scenes.valid(target, size):
      return None
    text = _pick(rng, ("turn the {r} into a {s}", "replace the {r} with a {c} {s}", "make the {r} a {s}")).format(
        r=ref, s=s, c=objs[i]["color"])
  elif kind == "remove":
    del objs[i]
    text = _pick(rng, ("remove the {r}", "delete the {r}", "take away the {r}")).format(r=ref)
  elif kind == "add":
    pairs = [p for p in palette.TRAIN_PAIRS if p not in taken]
    c, s = _pick(rng, pairs)
    placed = scenes.place([{"color": c, "shape": s, "size": _pick(rng, palette.SIZES)}], rng, size, fixed=objs)
    if placed is None:
      return None
    objs.extend(placed)
    text = _pick(rng, ("add a {c} {s}", "put a {c} {s} somewhere", "insert a {c} {s}")).format(c=c, s=s)
  else:
    bgs = [b for b in palette.BACKGROUND_NAMES if b != scene["background"]]
    target["background"] = b = _pick(rng, bgs)
    word = {"light grey": "light grey", "off-white": "off-white", "dark slate": "dark"}[b]
    text = _pick(rng, ("change the background to {w}", "make the background {w}")).format(w=word)
  return kind, captions._articles(text), target


def edit_triplets(num: int, seed: int = 0, size: int = 64) -> Iterator[dict[str, Any]]:
  """{"source", "instruction", "target" (PNG bytes), "edit", "source_caption", "target_caption", "id"}.

  Edits: recolour ("make the circle blue"), reshape, remove, add, background; objects are named by shape alone
  when that is unambiguous. Everything else in the scene stays put.
  """
  size = palette.check_canvas(size)
  for i in range(int(num)):
    rng = palette.rng_for(seed, "edit", i)
    while True:
      source = random_scene(rng, size, int(rng.integers(1, 4)))
      out = _edit(source, rng, size)
      if out is not None:
        break
    kind, text, target = out
    yield {"id": f"edit-{seed}-{i:08d}", "source": png_bytes(render(source, size)), "instruction": text,
           "target": png_bytes(render(target, size)), "edit": kind, "source_caption": canonical_caption(source),
           "target_caption": canonical_caption(target)}


def _question(scene: dict[str, Any], rng: np.random.Generator) -> tuple[str, str, str]:
  objs = scene["objects"]
  kind = _pick(rng, ("count_shape", "count_color", "color_of", "shape_of", "exists"))
  if kind == "count_shape":
    s = _pick(rng, palette.SHAPES)
    n = sum(o["shape"] == s for o in objs)
    return kind, f"how many {palette.PLURALS[s]} are there?", palette.NUMBER_WORDS[n]
  if kind == "count_color":
    c = _pick(rng, palette.COLOR_NAMES)
    n = sum(o["color"] == c for o in objs)
    return kind, f"how many {c} shapes are there?", palette.NUMBER_WORDS[n]
  if kind == "color_of":
    unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
    if unique:
      o = _pick(rng, unique)
      return kind, f"what colour is the {o['shape']}?", o["color"]
  if kind == "shape_of":
    unique = [o for o in objs if sum(p["color"] == o["color"] for p in objs) == 1]
    if unique:
      o = _pick(rng, unique)
      return kind, f"what shape is the {o['color']} object?", o["shape"]
  c, s = _pick(rng, palette.TRAIN_PAIRS)
  present = any(o["color"] == c and o["shape"] == s for o in objs)
  return "exists", captions._articles(f"is there a {c} {s}?"), "yes" if present else "no"


def vqa_pairs(num: int, seed: int = 0, size: int = 64) -> Iterator[dict[str, Any]]:
  """{"image" (PNG), "question", "answer", "kind", "caption" (canonical), "annotation" (JSON), "id"}.

  Questions: counts by shape or colour ("how many squares are there?" -> "two"), the colour of the only object of
  a shape, the shape of the only object of a colour, and yes/no existence of a colour+shape pair.
  """
  size = palette.check_canvas(size)
  for i in range(int(num)):
    rng = palette.rng_for(seed, "vqa", i)
    scene = random_scene(rng, size, int(rng.integers(1, 5)), distinct=False)
    kind, question, answer = _question(scene, rng)
    yield {"id": f"vqa-{seed}-{i:08d}", "image": png_bytes(render(scene, size)), "question": question,
           "answer": answer, "kind": kind, "caption": canonical_caption(scene),
           "annotation": json.dumps(annotation(scene, size), sort_keys=True)}


def caption_targets(num: int, seed: int = 0, size: int = 64) -> Iterator[dict[str, Any]]:
  """{"image" (PNG), "caption" (canonical caption of every object), "annotation" (JSON), "id"}."""
  size = palette.check_canvas(size)
  for i in range(int(num)):
    rng = palette.rng_for(seed, "caption", i)
    scene = random_scene(rng, size, int(rng.integers(1, 5)), distinct=False)
    yield {"id": f"caption-{seed}-{i:08d}", "image": png_bytes(render(scene, size)),
           "caption": canonical_caption(scene), "annotation": json.dumps(annotation(scene, size), sort_keys=True)}
