"""Grain input pipeline: TFDS array_record source -> shuffled, repeated, decoded, cropped, tokenised batches.

  it = make_train_iterator(cfg, tokenizer_fn, global_batch_size=32, mesh=mesh)
  batch = next(it)  # {"image": f32 [B, H, W, 3] in [-1, 1], "input_ids": i32 [B, L]}
  state = it.get_state(); ...; it.set_state(state)  # exact resume (JSON-serialisable)

Order of work: (optional mix of several data sets, each repeated `repeats` times per epoch) -> global
shuffle (by seed, reshuffled every epoch) -> repeat forever -> per-process stride shard -> decode + resize
shorter side + crop (+ optional flip; caption tag shuffle, trigger prefix, caption dropout; randomness keyed by
seed and global position) -> optional multiprocess prefetch -> skip-and-count corrupt samples, group into per-bucket
batches -> tokenise -> global `jax.Array`s on the mesh. `grain.checkpoint.CheckpointSave/CheckpointRestore`
can save/restore the iterator with orbax.
"""
from __future__ import annotations

import collections
import functools
import importlib
import math
import os
import pathlib
from typing import Any, Callable, Sequence

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from data_pipelines import image_decode

TokenizerFn = Callable[[list[str]], np.ndarray]


def default_data_config() -> ml_collections.ConfigDict:
  """Data config read by `make_train_iterator` / `make_source`."""
  return ml_collections.ConfigDict({
      "data_dir": os.path.expanduser("~/t2i_data"),
      "dataset": "shapes_bench/train",  # "name[/config][:version]" under data_dir, e.g. "image_folder"
      "split": "train",
      "image_size": 64,
      "caption_dropout": 0.1,  # probability of replacing the caption by "" (classifier-free guidance)
      "buckets": None,  # None: square image_size crops; or [(h, w), ...], e.g. aspect_buckets(256)
      "random_crop": False,
      "flip": False,
      "seed": 0,
      "worker_count": 0,  # >0: grain worker processes (absl flags must be parsed, e.g. under app.run)
      "worker_buffer_size": 2,
      "read_threads": 2,
      "prefetch_buffer_size": 32,
      "max_length": 77,  # expected token length of tokenizer_fn's output (checked); 0 disables the check
      "image_key": "image",
      "caption_key": "caption",
      # Preference pairs (Pick-a-Pic layout: caption, jpg_0, jpg_1, label_0): batches get "image" = the preferred
      # image and "image_l" = the other, cropped alike; ties / undecided labels are skipped and counted ("tie").
      "pair": False,
      # Data curation hook: "module.function" (image uint8 [h, w, 3], caption) -> score; samples scoring below
      # quality_min are skipped and counted ("quality"), e.g. "data_pipelines.shapes.scoring.palette_fidelity_score".
      "quality_filter": "",
      "quality_min": 0.0,
      # Negative captions: "module.function" (caption, image_size) -> the caption changed so that the image
      # contradicts it (e.g. "data_pipelines.shapes.captions.flipped_caption": relation reversed, point
      # mirrored). Batches then get "neg_input_ids" and "neg_mask" f32 [B] (1 where the function changed a
      # non-empty caption), for config.diffusion.contrast (caption-contrastive denoising).
      "negative_caption": "",
      # Attribute groups for attention grounding (CosmicMan's HOLA, config.diffusion.hola): "module.function"
      # (caption, record) -> [(character spans of the group's words, bool mask [H, W][, placed])], e.g.
      # "data_pipelines.shapes.groups.token_groups". Batches then get "group_masks" f32 [B, max_groups, H / p,
      # W / p] (cropped like the image, average-pooled by p = group_mask_pool), "group_tokens" f32
      # [B, max_groups, L] (1 on the tokens of the group's words) and "group_placed" f32 [B, max_groups] (1 where
      # the caption fixes the group's place; a hook that returns pairs marks every group placed); unused groups
      # are all zero, extra ones dropped.
      "token_groups": "",
      "max_groups": 4,
      "group_mask_pool": 1,
      # Captions (kohya-style): prefix prepended to every caption (a trigger word, e.g. "sks dog, "); tag shuffle
      # of the comma-separated caption, keeping its first keep_tokens tags in place. Dropout still empties it all.
      "caption_prefix": "",
      "caption_shuffle": False,
      "keep_tokens": 0,
      # Masked loss: batches get "mask" f32 [B, H, W, 1] in [0, 1] from each record's mask_key field (ingest keeps
      # an image's alpha channel there; records without one train on every pixel), cropped like the image.
      "alpha_mask": False,
      "mask_key": "mask",
      # Several data sets in one run: [{"dataset": ..., "split": "train", "data_dir": data_dir, "repeats": 1,
      # "caption_prefix": caption_prefix, "loss_weight": 1.0}, ...]; each is seen `repeats` times per epoch (e.g. a
      # few subject images next to many class images); a loss_weight other than 1 anywhere gives batches a
      # "loss_weight" [B] that scales each sample's loss (DreamBooth's prior-preservation weight). Empty: the one
      # data set `dataset` / `split`.
      "sources": (),
  })

SOURCE_KEYS = {"dataset": None, "split": "train", "data_dir": None, "repeats": 1, "caption_prefix": None,
               "loss_weight": 1.0}


# ---------------------------------------------------------------------------------------------- sources
def source_entries(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """`cfg.sources` with defaults filled in (or the one `cfg.dataset` entry); bad entries raise naming the key."""
  defaults = {**SOURCE_KEYS, "data_dir": cfg.get("data_dir"), "caption_prefix": cfg.get("caption_prefix", "")}
  if not cfg.get("sources"):
    return [{**defaults, "dataset": cfg.get("dataset"), "split": cfg.get("split", "train")}]
  out = []
  for i, entry in enumerate(cfg.sources):
    entry = dict(entry)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
      raise ValueError(f"config.data.sources[{i}]: unknown key(s) {unknown}; expected {sorted(SOURCE_KEYS)}")
    if not entry.get("dataset"):
      raise ValueError(f"config.data.sources[{i}]: 'dataset' is required")
    full = {**defaults, **entry}
    if int(full["repeats"]) != full["repeats"] or full["repeats"] < 1:
      raise ValueError(f"config.data.sources[{i}].repeats={full['repeats']!r} must be a positive integer")
    if not float(full["loss_weight"]) >= 0:
      raise ValueError(f"config.data.sources[{i}].loss_weight={full['loss_weight']!r} must be >= 0")
    out.append(full)
  return out


def has_loss_weights(cfg: Any) -> bool:
  """Whether batches of data config `cfg` carry "loss_weight" (some source weighs its samples other than 1)."""
  return any(float(e["loss_weight"]) != 1.0 for e in source_entries(cfg))


class MixedSource:
  """Random-access concatenation of sources, source j repeated repeats[j] times; records gain "_source": j."""

  def __init__(self, sources: Sequence[Any], repeats: Sequence[int]):
    self._sources = list(sources)
    self._starts = np.cumsum([0] + [len(s) * int(r) for s, r in zip(sources, repeats)])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    j = int(np.searchsorted(self._starts, index, side="right")) - 1
    src = self._sources[j]
    return {**src[(index - int(self._starts[j])) % len(src)], "_source": j}


def make_source(cfg: ml_collections.ConfigDict):
  """Random-access source of `cfg.dataset`/`cfg.split` under `cfg.data_dir`, or of the mix `cfg.sources`
  (for training, caching, eval)."""
  from data_pipelines.tfds import common  # pylint: disable=g-import-not-at-top
  if not cfg.get("sources"):
    return common.load_source(cfg.data_dir, cfg.dataset, cfg.split)
  entries = source_entries(cfg)
  return MixedSource([common.load_source(e["data_dir"], e["dataset"], e["split"]) for e in entries],
                     [e["repeats"] for e in entries])


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
  """Shuffles the comma-separated tags of `caption` after its first `keep_tokens` ones."""
  tags = [t.strip() for t in caption.split(",")]
  if len(tags) - keep_tokens < 2:
    return caption
  rest = tags[keep_tokens:]
  return ", ".join(tags[:keep_tokens] + [rest[i] for i in rng.permutation(len(rest))])


def prepare_shapes(data_dir: str | pathlib.Path, split: str = "train", num: int | None = None,
                   size: int = 64, seed: int = 0) -> str:
  """Generates + builds shapes-bench `split` into `data_dir` unless present; returns the `cfg.dataset` name."""
  from data_pipelines.tfds import common, shapes_bench  # pylint: disable=g-import-not-at-top
  config = shapes_bench.shapes_config(split, num=num, size=size, seed=seed)
  builder = shapes_bench.ShapesBench(config=config, data_dir=str(data_dir), file_format=common.FILE_FORMAT)
  common.prepare(builder)
  return f"shapes_bench/{config.name}"


# -------------------------------------------------------------------------------------------- transforms
def aspect_buckets(image_size: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
  """(h, w) buckets, multiples of `step`, each with about image_size**2 pixels, aspect at most `max_aspect`."""
  area = image_size * image_size
  out = set()
  for h in range(step, int(image_size * math.sqrt(max_aspect)) + step, step):
    w = max(step, round(area / h / step) * step)
    if max(h / w, w / h) <= max_aspect + 1e-6:
      out.add((h, w))
  return sorted(out)


def choose_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
  """Index of the bucket closest in aspect ratio among those that fit inside the image (downscale only).

  Images smaller than every bucket fall back to the closest aspect ratio over all buckets (upscaled).
  """
  fit = [i for i, (h, w) in enumerate(buckets) if h <= height and w <= width]
  pool = fit or range(len(buckets))
  target = math.log(width / height)
  return min(pool, key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - target),
                                  -buckets[i][0] * buckets[i][1]))


def resize_crop(img: np.ndarray, out_hw: tuple[int, int], offset: tuple[float, float] = (0.5, 0.5)) -> np.ndarray:
  """Resizes so the image covers `out_hw` (keeping aspect) then crops; offset in [0, 1] (0.5 = centre)."""
  h, w = img.shape[:2]
  oh, ow = out_hw
  scale = max(oh / h, ow / w)
  nh, nw = max(oh, round(h * scale)), max(ow, round(w * scale))
  if (nh, nw) != (h, w):
    img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
  top = round((nh - oh) * offset[0])
  left = round((nw - ow) * offset[1])
  return img[top:top + oh, left:left + ow]


@functools.lru_cache(maxsize=None)
def _import_hook(path: str, key: str) -> Callable:
  """The function "module.function" named by config.data.<key>."""
  mod, _, name = path.rpartition(".")
  try:
    return getattr(importlib.import_module(mod), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f"config.data.{key}={path!r}: cannot import ({e})") from e


def _process(record: dict[str, Any], global_pos: int, pos: int, cfg: ml_collections.ConfigDict,
             buckets: list[tuple[int, int]], prefixes: Sequence[str],
             loss_weights: Sequence[float] | None) -> dict[str, Any]:
  """One raw record -> {"pos", "bucket", "image" uint8 [h, w, 3], "caption"} or {"pos", "skip": reason}."""
  rng = np.random.default_rng([cfg.seed, global_pos])
  u_drop, u_flip, u_top, u_left = rng.random(4)
  keys = (cfg.image_key,)
  if cfg.pair:
    from data_pipelines import preference  # pylint: disable=g-import-not-at-top
    if not preference.is_decided(record):
      return {"pos": pos, "skip": "tie"}
    record, keys = preference.winner_first(record), ("jpg_w", "jpg_l")
  try:
    imgs = [image_decode.decode_rgb(record[k]) for k in keys]
    if cfg.alpha_mask:  # not with pairs (make_train_iterator refuses the combination)
      imgs.append(image_decode.decode_mask(record.get(cfg.mask_key, b""), imgs[0].shape[:2]))
  except image_decode.SkipSample as e:
    return {"pos": pos, "skip": e.reason}
  except KeyError as e:
    raise KeyError(f"dataset {cfg.dataset!r}: record has no field {e} (config.image_key / pair); "
                   f"fields: {sorted(record)}") from e
  caption = record.get(cfg.caption_key if not cfg.pair else "caption", b"")
  caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
  if cfg.quality_filter:
    q = _import_hook(cfg.quality_filter, "quality_filter")(imgs[0], caption)
    if q < cfg.quality_min:
      return {"pos": pos, "skip": f"quality: {q:.3g} < {cfg.quality_min}"}
  bucket = choose_bucket(imgs[0].shape[0], imgs[0].shape[1], buckets)
  offset = (u_top, u_left) if cfg.random_crop else (0.5, 0.5)
  imgs = [resize_crop(img, buckets[bucket], offset) for img in imgs]
  if cfg.flip and u_flip < 0.5:
    imgs = [img[:, ::-1] for img in imgs]
  if cfg.caption_shuffle:
    caption = shuffle_tags(caption, int(cfg.keep_tokens), np.random.default_rng([cfg.seed, global_pos, 1]))
  caption = prefixes[record.get("_source", 0)] + caption
  if u_drop < cfg.caption_dropout:
    caption = ""
  out = {"pos": pos, "bucket": bucket, "image": np.ascontiguousarray(imgs[0]), "caption": caption}
  if cfg.token_groups:
    out["group_spans"], out["group_masks"], out["group_placed"] = _groups(caption, record, cfg, buckets[bucket],
                                                                          offset)
  if loss_weights is not None:
    out["loss_weight"] = np.float32(loss_weights[record.get("_source", 0)])
  if cfg.alpha_mask:
    out["mask"] = np.ascontiguousarray(imgs[-1])
  if cfg.pair:
    out["image_l"] = np.ascontiguousarray(imgs[1])
  return out


def _groups(caption: str, record: dict[str, Any], cfg: ml_collections.ConfigDict, out_hw: tuple[int, int],
            offset: tuple[float, float]) -> tuple[list[list[tuple[int, int]]], np.ndarray, np.ndarray]:
  """(character spans per group, f32 [max_groups, h, w] masks, f32 [max_groups] placed flags) of
  config.data.token_groups for one sample."""
  k, pool = int(cfg.max_groups), int(cfg.group_mask_pool)
  h, w = out_hw[0] // pool, out_hw[1] // pool
  masks, placed = np.zeros((k, h, w), np.float32), np.zeros((k,), np.float32)
  groups = list(_import_hook(cfg.token_groups, "token_groups")(caption, record))[:k] if caption else []
  for i, group in enumerate(groups):
    if len(group) not in (2, 3):
      raise ValueError(f"config.data.token_groups={cfg.token_groups!r} must return (spans, mask[, placed]) "
                       f"tuples, got {len(group)} items")
    m = resize_crop(np.asarray(group[1], np.uint8) * np.uint8(255), out_hw, offset).astype(np.float32) / 255
    masks[i] = m[:h * pool, :w * pool].reshape(h, pool, w, pool).mean(axis=(1, 3))
    placed[i] = float(group[2]) if len(group) == 3 else 1.0
  return [list(group[0]) for group in groups], masks, placed


# -------------------------------------------------------------------------------------------- iterators
class _BucketBatchIterator(grain.DatasetIterator):
  """Skips (and counts) corrupt samples; emits numpy batches whose samples all come from one bucket.

  Partly filled bucket buffers are checkpointed as stream positions and recomputed on restore.
  """

  def __init__(self, parent: grain.DatasetIterator, elements: grain.MapDataset, batch_size: int):
    super().__init__(parent)
    self._elements = elements
    self._batch_size = batch_size
    self._buffers: dict[int, list[dict[str, Any]]] = {}
    self.skip_counts: collections.Counter[str] = collections.Counter()

  def __next__(self) -> dict[str, Any]:
    while True:
      el = next(self._parent)
      if "skip" in el:
        self.skip_counts[el["skip"].split(":")[0]] += 1
        continue
      buf = self._buffers.setdefault(el["bucket"], [])
      buf.append(el)
      if len(buf) == self._batch_size:
        del self._buffers[el["bucket"]]
        out = {"image": np.stack([e["image"] for e in buf]), "caption": [e["caption"] for e in buf],
               "pos": np.array([e["pos"] for e in buf], np.int64)}
        for key in ("image_l", "loss_weight", "mask", "group_masks", "group_placed"):
          if key in el:
            out[key] = np.stack([e[key] for e in buf])
        if "group_spans" in el:
          out["group_spans"] = [e["group_spans"] for e in buf]
        return out

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "skip_counts": dict(self.skip_counts),
            "buffers": {str(b): [int(e["pos"]) for e in buf] for b, buf in self._buffers.items()}}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.skip_counts = collections.Counter(state["skip_counts"])
    self._buffers = {int(b): [self._elements[p] for p in ps] for b, ps in state["buffers"].items()}


class TrainIterator(grain.DatasetIterator):
  """Device batches {"image", "input_ids"}; `get_state`/`set_state` for exact resume.

  Attributes:
    skipped: number of corrupt samples skipped so far (by this process); `skip_counts` by reason.
    last_host_batch: host-side fields of the last batch ({"caption": list[str], "pos": int64 [B]}).
  """

  def __init__(self, parent: _BucketBatchIterator, tokenizer_fn: TokenizerFn, max_length: int,
               sharding: jax.sharding.Sharding | None,
               negative_fn: Callable[[str], str] | None = None):
    super().__init__(parent)
    self._tokenizer_fn = tokenizer_fn
    self._negative_fn = negative_fn
    self._max_length = max_length
    self._sharding = sharding
    self.last_host_batch: dict[str, Any] = {}

  @property
  def skip_counts(self) -> dict[str, int]:
    return dict(self._parent.skip_counts)

  @property
  def skipped(self) -> int:
    return sum(self._parent.skip_counts.values())

  def __next__(self) -> dict[str, Any]:
    b = next(self._parent)
    captions = list(b["caption"])
    batch = {"image": image_decode.to_float(b["image"]), "input_ids": self._tokenize(captions)}
    if self._negative_fn is not None:
      negatives = [self._negative_fn(c) if c else c for c in captions]
      batch["neg_input_ids"] = self._tokenize(negatives)
      batch["neg_mask"] = np.asarray([n != c for n, c in zip(negatives, captions)], np.float32)
    if "image_l" in b:
      batch["image_l"] = image_decode.to_float(b["image_l"])
    if "loss_weight" in b:
      batch["loss_weight"] = b["loss_weight"]
    if "mask" in b:
      batch["mask"] = b["mask"][..., None].astype(np.float32) * np.float32(1 / 255)
    if "group_masks" in b:
      span_fn = getattr(self._tokenizer_fn, "span_tokens", None)
      if span_fn is None:
        raise ValueError("config.data.token_groups: tokenizer_fn has no span_tokens (t2i.train.models.Tokenizer)")
      batch["group_masks"], batch["group_placed"] = b["group_masks"], b["group_placed"]
      batch["group_tokens"] = np.asarray(span_fn(captions, b["group_spans"], b["group_masks"].shape[1]),
                                         np.float32)
    self.last_host_batch = {"caption": b["caption"], "pos": b["pos"]}
    if self._sharding is not None:
      batch = {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in batch.items()}
    return batch

  def _tokenize(self, captions: list[str]) -> np.ndarray:
    n = len(captions)
    ids = np.asarray(self._tokenizer_fn(captions))
    if ids.ndim != 2 or ids.shape[0] != n:
      raise ValueError(f"tokenizer_fn must return [n={n}, L] token ids, got shape {ids.shape}")
    if self._max_length and ids.shape[1] != self._max_length:
      raise ValueError(f"tokenizer_fn returned length {ids.shape[1]} but config.max_length={self._max_length}")
    return ids.astype(np.int32)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Batch dimension over ("data", "fsdp") (the "batch" rule of experiments.common.AXIS_RULES)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))


def make_train_iterator(cfg: ml_collections.ConfigDict, tokenizer_fn: TokenizerFn, global_batch_size: int,
                        mesh: jax.sharding.Mesh | None = None, seed: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        source=None) -> TrainIterator:
  """Infinite iterator of training batches for this process (see module docstring).

  Args:
    cfg: data config (`default_data_config()`).
    tokenizer_fn: list of n captions -> int32 [n, L] token ids.
    global_batch_size: batch size over all processes; each process yields global/process_count samples
      (as global `jax.Array`s of the full size when `mesh` is given).
    mesh: mesh with axes "data" and "fsdp"; None yields numpy arrays.
    seed: overrides `cfg.seed` (shuffle order and augmentation randomness).
    process_index, process_count: override `jax.process_index()` / `jax.process_count()` (tests).
    source: random-access source overriding `make_source(cfg)` (a `MixedSource` when `cfg.sources` is set).
  """
  full = default_data_config().to_dict()
  full.update(cfg.to_dict())  # keys missing from `cfg` take their defaults
  cfg = ml_collections.ConfigDict(full)  # private copy for the element function
  cfg.seed = seed = cfg.seed if seed is None else seed
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} not in [0, process_count={pc})")
  if global_batch_size <= 0 or global_batch_size % pc:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of the "
                     f"process count {pc}")
  if mesh is not None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size % shards:
      raise ValueError(f"global_batch_size={global_batch_size} must be divisible by mesh data*fsdp={shards}")
  if not 0.0 <= cfg.caption_dropout <= 1.0:
    raise ValueError(f"config.caption_dropout={cfg.caption_dropout} must be in [0, 1]")
  if cfg.buckets:
    buckets = [tuple(int(x) for x in b) for b in cfg.buckets]
    if any(len(b) != 2 or min(b) <= 0 for b in buckets):
      raise ValueError(f"config.buckets must be a list of positive (height, width) pairs, got {cfg.buckets}")
  else:
    buckets = [(cfg.image_size, cfg.image_size)]
  if cfg.token_groups and (cfg.pair or int(cfg.max_groups) < 1 or int(cfg.group_mask_pool) < 1
                           or any(h % int(cfg.group_mask_pool) or w % int(cfg.group_mask_pool) for h, w in buckets)):
    raise ValueError(f"config.token_groups={cfg.token_groups!r} needs max_groups >= 1 (got {cfg.max_groups}), "
                     f"a group_mask_pool (got {cfg.group_mask_pool}) that divides every bucket {buckets}, and no "
                     "preference pairs (config.pair)")
  if cfg.alpha_mask and cfg.pair:
    raise ValueError("config.alpha_mask is not supported with preference pairs (config.pair)")
  if int(cfg.keep_tokens) < 0:
    raise ValueError(f"config.keep_tokens={cfg.keep_tokens} must be >= 0")
  entries = source_entries(cfg)
  prefixes = [str(e["caption_prefix"]) for e in entries]
  loss_weights = [float(e["loss_weight"]) for e in entries] if has_loss_weights(cfg) else None

  source = make_source(cfg) if source is None else source
  if len(source) == 0:
    raise ValueError(f"dataset {cfg.dataset!r} split {cfg.split!r} is empty")
  ds = grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat(None)[pi::pc]
  elements = ds.map_with_index(lambda pos, r: _process(r, pos * pc + pi, pos, cfg, buckets, prefixes,
                                                                loss_weights))
  it_ds = elements.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                                     prefetch_buffer_size=cfg.prefetch_buffer_size))
  if cfg.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                           per_worker_buffer_size=cfg.worker_buffer_size))
  negative_fn = None
  if cfg.negative_caption:
    hook, size = _import_hook(cfg.negative_caption, "negative_caption"), int(cfg.image_size)
    negative_fn = lambda caption: hook(caption, size)  # noqa: E731
  batches = _BucketBatchIterator(iter(it_ds), elements, global_batch_size // pc)
  return TrainIterator(batches, tokenizer_fn, cfg.max_length, batch_sharding(mesh) if mesh is not None else None,
                       negative_fn)
