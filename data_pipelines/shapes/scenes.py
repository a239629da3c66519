"""Sampling prompt specs, scenes (render specs) that satisfy them, and scenes that break exactly one attribute."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np

from data_pipelines.shapes import palette
from data_pipelines.shapes.rendering import extents, object_box

Pair = tuple[str, str]
BREAKS = ("colour", "shape", "count", "position", "grounding", "size")


def gap(canvas: int) -> float:
  """Minimum free space between two objects' boxes (keeps anti-aliased fringes apart)."""
  return max(2.0, 0.04 * canvas)


def margin(canvas: int) -> float:
  return max(1.0, 0.02 * canvas)


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
  return items[int(rng.integers(len(items)))]


def sample_spec(family: str, rng: np.random.Generator, pairs: Sequence[Pair] = palette.TRAIN_PAIRS,
                canvas: int = 64, name_size: float = 0.3, first_pairs: Sequence[Pair] | None = None,
                count: int | None = None) -> dict[str, Any]:
  """A random prompt spec of `family` using (colour, shape) `pairs` (`first_pairs` for the first object)."""
  if family not in palette.FAMILIES:
    raise ValueError(f"family must be one of {palette.FAMILIES}, got {family!r}")
  first = _pick(rng, first_pairs or pairs)
  objs = [{"color": first[0], "shape": first[1], "size": None}]
  if family in ("two_objects", "position"):
    rest = [p for p in pairs if p != first] or [p for p in palette.ALL_PAIRS if p != first]
    second = _pick(rng, rest)
    objs.append({"color": second[0], "shape": second[1], "size": None})
  if family in ("single", "two_objects", "position", "grounding"):
    for o in objs:
      if rng.random() < name_size:
        o["size"] = _pick(rng, palette.SIZES)
  spec = {"family": family, "objects": objs, "count": None, "relation": None, "point": None,
          "background": None, "flaws": []}
  if family == "counting":
    spec["count"] = int(count if count is not None else rng.integers(1, 5))
  if family == "position":
    spec["relation"] = _pick(rng, palette.RELATIONS)
  if family == "grounding":
    o = objs[0]
    size = o["size"] or _pick(rng, palette.SIZES)
    o["_size"] = size  # the scene's size when the prompt leaves it open
    dx0, dy0, dx1, dy1 = extents(o["shape"], palette.object_side(size, canvas))
    m = margin(canvas)
    x = rng.integers(int(np.ceil(m - dx0)), int(np.floor(canvas - m - dx1)) + 1)
    y = rng.integers(int(np.ceil(m - dy0)), int(np.floor(canvas - m - dy1)) + 1)
    spec["point"] = [int(x), int(y)]
  return spec


def clean_spec(spec: dict[str, Any]) -> dict[str, Any]:
  """Spec without private sampling hints."""
  out = copy.deepcopy(spec)
  for o in out["objects"]:
    o.pop("_size", None)
  return out


# --------------------------------------------------------------------------------------------- layouts

def valid(scene: dict[str, Any], canvas: int) -> bool:
  """Objects inside the canvas (with margin) and apart from each other by at least `gap`."""
  boxes = [object_box(o, canvas) for o in scene["objects"]]
  m, g = margin(canvas) - 1e-6, gap(canvas) - 1e-6
  for i, b in enumerate(boxes):
    if b[0] < m or b[1] < m or b[2] > canvas - m or b[3] > canvas - m:
      return False
    for c in boxes[:i]:
      if b[0] < c[2] + g and c[0] < b[2] + g and b[1] < c[3] + g and c[1] < b[3] + g:
        return False
  return True


def relation_holds(a: dict[str, Any], b: dict[str, Any], relation: str, canvas: int) -> bool:
  """Boxes of a and b separated along the relation's axis, a on the named side."""
  ba, bb = object_box(a, canvas), object_box(b, canvas)
  return {"to the left of": ba[2] <= bb[0], "to the right of": ba[0] >= bb[2],
          "above": ba[3] <= bb[1], "below": ba[1] >= bb[3]}[relation]


def place(objs: list[dict[str, Any]], rng: np.random.Generator, canvas: int, fixed: Sequence[dict] = (),
           check=None, tries: int = 40) -> list[dict[str, Any]] | None:
  m = margin(canvas)
  for _ in range(tries):
    placed = list(fixed)
    for o in objs:
      dx0, dy0, dx1, dy1 = extents(o["shape"], palette.object_side(o["size"], canvas))
      lo_x, hi_x, lo_y, hi_y = m - dx0, canvas - m - dx1, m - dy0, canvas - m - dy1
      if hi_x < lo_x or hi_y < lo_y:
        return None
      for _ in range(30):
        cand = dict(o, center=(round(float(rng.uniform(lo_x, hi_x)), 2), round(float(rng.uniform(lo_y, hi_y)), 2)))
        if valid({"objects": placed + [cand]}, canvas):
          placed.append(cand)
          break
      else:
        break
    else:
      if check is None or check(placed):
        return placed[len(fixed):]
  return None


def pack_line(objs: list[dict[str, Any]], rng: np.random.Generator, canvas: int, axis: int) -> list[dict] | None:
  """Objects in the given order along an axis (0 = x, 1 = y) with random spare room; None if they cannot fit."""
  m, g = margin(canvas), gap(canvas)
  ext = [extents(o["shape"], palette.object_side(o["size"], canvas)) for o in objs]
  lengths = [e[2 + axis] - e[axis] for e in ext]
  spare = canvas - 2 * m - sum(lengths) - g * (len(objs) - 1)
  if spare < 0:
    return None
  shares = rng.dirichlet(np.ones(len(objs) + 1)) * spare * 0.999
  pos, out = m + shares[0], []
  for o, e, length, extra in zip(objs, ext, lengths, shares[1:]):
    lo, hi = m - e[1 - axis], canvas - m - e[3 - axis]
    other = float(rng.uniform(lo, hi))
    along = pos - e[axis]
    center = (along, other) if axis == 0 else (other, along)
    out.append(dict(o, center=(round(center[0], 2), round(center[1], 2))))
    pos += length + g + extra
  return out


def scene_for(spec: dict[str, Any], rng: np.random.Generator, canvas: int = 64,
              background: str | None = None) -> dict[str, Any]:
  """A random scene (render spec) that satisfies a prompt spec."""
  family, objs = spec["family"], spec["objects"]
  bg = background or spec.get("background") or _pick(rng, palette.BACKGROUND_NAMES)

  def sized(o, size=None):
    return {"shape": o["shape"], "color": o["color"],
            "size": o.get("size") or size or o.get("_size") or _pick(rng, palette.SIZES)}

  if family == "grounding":
    o = sized(objs[0])
    o["center"] = tuple(float(v) for v in spec["point"])
    scene = {"background": bg, "objects": [o], "flaws": []}
    if not valid(scene, canvas):
      raise ValueError(f"grounding point {spec['point']} does not fit a {o['size']} {o['shape']} on {canvas} px")
    return scene
  if family == "counting":
    items = [objs[0]] * int(spec["count"])
  else:
    items = objs
  check = None
  if family == "position":
    check = lambda p: relation_holds(p[0], p[1], spec["relation"], canvas)  # noqa: E731
  for attempt in range(3):
    # Fall back to small objects (where the prompt leaves the size open) when large ones do not fit.
    placed = place([sized(o, "small" if attempt else None) for o in items], rng, canvas, check=check)
    if placed is not None:
      return {"background": bg, "objects": placed, "flaws": []}
  # Sizes named by the prompt that random placement cannot fit: pack the objects along one axis.
  objs_ = [sized(o, "small") for o in items]
  if family == "position":
    axis = 0 if spec["relation"] in ("to the left of", "to the right of") else 1
    order = objs_ if spec["relation"] in ("to the left of", "above") else objs_[::-1]
  else:
    axis, order = int(rng.integers(2)), [objs_[i] for i in rng.permutation(len(objs_))]
  placed = pack_line(order, rng, canvas, axis)
  if placed is not None:
    placed = placed if order is objs_ else [placed[order.index(o)] for o in objs_]
    scene = {"background": bg, "objects": placed, "flaws": []}
    if valid(scene, canvas) and (check is None or check(placed)):
      return scene
  raise RuntimeError(f"cannot lay out {spec} on a {canvas} px canvas")


# ---------------------------------------------------------------------------------------- broken scenes

def _matches(o: dict[str, Any], req: dict[str, Any]) -> bool:
  return o["color"] == req["color"] and o["shape"] == req["shape"]


def break_scene(spec: dict[str, Any], scene: dict[str, Any], kind: str, rng: np.random.Generator,
                canvas: int = 64, pairs: Sequence[Pair] = palette.ALL_PAIRS) -> dict[str, Any] | None:
  """A copy of `scene` with one attribute changed so that it no longer satisfies `spec`, or None.

  kind: colour (recolour one required object), shape, count (add or remove one object), position (swap the two
  objects of a position prompt), grounding (move the object away from the point), size (flip a named size).
  New (colour, shape) bindings are drawn from `pairs`.
  """
  family = spec["family"]
  new = copy.deepcopy(scene)
  objs = new["objects"]
  targets = [i for i, o in enumerate(objs) if any(_matches(o, r) for r in spec["objects"])]
  if not targets:
    return None
  i = targets[int(rng.integers(len(targets)))]

  def first_valid(candidates):
    for c in candidates:
      if valid(c, canvas):
        return c
    return None

  if kind in ("colour", "shape"):
    key = "color" if kind == "colour" else "shape"
    other = "shape" if key == "color" else "color"
    values = [v for v in (palette.COLOR_NAMES if key == "color" else palette.SHAPES) if v != objs[i][key]]
    values = [v for v in values if ((v, objs[i][other]) if key == "color" else (objs[i][other], v)) in pairs]
    cands = []
    for v in rng.permutation(values):
      c = copy.deepcopy(new)
      c["objects"][i][key] = str(v)
      cands.append(c)
    return first_valid(cands)
  if kind == "count":
    n = len([o for o in objs if _matches(o, spec["objects"][0])])
    remove = family in ("two_objects", "position", "colours", "grounding") or (
        family == "counting" and (n == 4 or (n > 1 and rng.random() < 0.5)))
    if remove:
      del objs[i]
      return new
    extra = dict(objs[0]) if family == "counting" else dict(zip(("color", "shape"), _pick(rng, pairs)))
    extra["size"] = "small"
    placed = place([extra], rng, canvas, fixed=objs)
    if placed is None:
      return None
    objs.extend(placed)
    return new
  if kind == "position":
    if family != "position" or len(objs) != 2:
      return None
    a, b = objs
    swapped = copy.deepcopy(new)
    swapped["objects"][0]["center"], swapped["objects"][1]["center"] = b["center"], a["center"]
    mirrored = copy.deepcopy(new)
    for o in mirrored["objects"]:
      x, y = o["center"]
      o["center"] = (canvas - x, y) if spec["relation"] in ("to the left of", "to the right of") else (x, canvas - y)
    return first_valid([swapped, mirrored])
  if kind == "grounding":
    if family != "grounding":
      return None
    px, py = spec["point"]
    far = 3 * 6.0 * canvas / 64

    def away(p):
      x, y = p[0]["center"]
      return np.hypot(x - px, y - py) >= far

    placed = place([{k: v for k, v in objs[i].items() if k != "center"}], rng, canvas,
                    fixed=objs[:i] + objs[i + 1:], check=away, tries=200)
    if placed is None:
      return None
    objs[i] = placed[0]
    return new
  if kind == "size":
    named = [j for j in targets if any(_matches(objs[j], r) and r.get("size") for r in spec["objects"])]
    if family != "single" or not named:
      return None
    objs[named[0]]["size"] = "small" if objs[named[0]]["size"] == "large" else "large"
    return first_valid([new])
  raise ValueError(f"break kind must be one of {BREAKS}, got {kind!r}")


def applicable_breaks(spec: dict[str, Any]) -> tuple[str, ...]:
  family = spec["family"]
  kinds = ["colour", "shape", "count"]
  if family == "position":
    kinds.append("position")
  if family == "grounding":
    kinds.append("grounding")
  if family == "single" and spec["objects"][0].get("size"):
    kinds.append("size")
  return tuple(kinds)
