r"""Ingest a folder of images + captions into the ImageFolder TFDS data set (array_record), with a skip report.

  python -m data_pipelines.ingest --src=FOLDER --data_dir=DIR [--manifest=F.jsonl] [--min_size=2]

Captions come from a sidecar `<image stem>.txt` next to each image, or from a `.jsonl` manifest with lines
`{"file": "relative/path.jpg", "caption": "..."}`. Every image is decoded and re-encoded as 8-bit RGB PNG
(CMYK, greyscale, 16-bit, palette and RGBA composited on white are converted). Files that cannot be used
are skipped with a reason, never fatally; the skips are printed and written to `<dataset dir>/skipped.jsonl`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from typing import Iterator, Sequence

from data_pipelines import image_decode

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_IGNORED_EXTENSIONS = (".txt", ".json", ".jsonl", ".md", ".csv", ".parquet")


@dataclasses.dataclass(frozen=True)
class Skip:
  file: str
  reason: str


@dataclasses.dataclass(frozen=True)
class Example:
  file: str
  png: bytes
  caption: str
  height: int
  width: int
  source_mode: str
  mask_png: bytes = b""


@dataclasses.dataclass
class IngestReport:
  """What `ingest_folder` kept, converted and skipped."""
  src: str
  dataset_dir: str
  num_kept: int
  skipped: list[dict[str, str]]  # {"file", "reason"}
  converted: list[dict[str, str]]  # {"file", "mode"}: kept after conversion from a non-RGB mode

  @property
  def skip_counts(self) -> dict[str, int]:
    """Number of skips per reason kind (the reason up to its first ':')."""
    return dict(collections.Counter(s["reason"].split(":")[0] for s in self.skipped))

  def format(self) -> str:
    lines = [f"ingest {self.src} -> {self.dataset_dir}: kept {self.num_kept}, "
             f"converted {len(self.converted)}, skipped {len(self.skipped)}"]
    lines += [f"  SKIP {s['file']}: {s['reason']}" for s in self.skipped]
    lines += [f"  skipped {n} x {kind}" for kind, n in sorted(self.skip_counts.items())]
    return "\n".join(lines)


def read_caption(path: pathlib.Path) -> str:
  """Sidecar caption text; raises SkipSample if missing, unreadable, not UTF-8 or empty."""
  if not path.is_file():
    raise image_decode.SkipSample(f"missing caption: no {path.name}")
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise image_decode.SkipSample(f"missing caption: cannot read {path.name}: {e}") from e
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise image_decode.SkipSample(f"caption not UTF-8: {path.name}: {e}") from e
  text = " ".join(text.split())
  if not text:
    raise image_decode.SkipSample(f"empty caption: {path.name}")
  return text


def _read_manifest(manifest: pathlib.Path) -> Iterator[tuple[str, str | Skip]]:
  """(relative file, caption or Skip) per manifest line."""
  seen = set()
  with open(manifest, "rb") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{manifest.name}:{n}"
      try:
        entry = json.loads(line.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        yield where, Skip(where, f"bad manifest line: {e}")
        continue
      if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
        yield where, Skip(where, 'bad manifest line: expected {"file": str, "caption": str}')
        continue
      file = entry["file"]
      if file in seen:
        yield file, Skip(file, f"duplicate manifest entry: {where}")
        continue
      seen.add(file)
      caption = entry.get("caption")
      if not isinstance(caption, str) or not caption.strip():
        yield file, Skip(file, f"missing caption: {where}")
        continue
      yield file, " ".join(caption.split())


def iter_folder(src: str | pathlib.Path, manifest: str | pathlib.Path | None = None,
                min_size: int = 2) -> Iterator[Example | Skip]:
  """Validated, normalised examples (or Skips with reasons) of an image folder, in sorted file order."""
  src = pathlib.Path(src)
  if not src.is_dir():
    raise FileNotFoundError(f"--src {src}: not a folder")
  if manifest is not None:
    manifest = pathlib.Path(manifest)
    if not manifest.is_file():
      raise FileNotFoundError(f"--manifest {manifest}: not found")
    entries = _read_manifest(manifest)
  else:
    def sidecar_entries():
      for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        ext = path.suffix.lower()
        if path.name.startswith(".") or ext in _IGNORED_EXTENSIONS:
          continue
        if ext not in IMAGE_EXTENSIONS:
          yield rel, Skip(rel, f"unsupported file type: {ext or 'no extension'}")
          continue
        try:
          yield rel, read_caption(path.with_suffix(".txt"))
        except image_decode.SkipSample as e:
          yield rel, Skip(rel, e.reason)
    entries = sidecar_entries()

  for rel, caption in entries:
    if isinstance(caption, Skip):
      yield caption
      continue
    path = src / rel
    try:
      data = path.read_bytes()
    except OSError as e:
      yield Skip(rel, f"unreadable file: {e.strerror or e}")
      continue
    try:
      norm = image_decode.normalize_image(data, min_size=min_size)
    except image_decode.SkipSample as e:
      yield Skip(rel, e.reason)
      continue
    yield Example(rel, norm.png, caption, norm.height, norm.width, norm.source_mode, norm.mask_png)


def ingest_folder(src: str | pathlib.Path, data_dir: str | pathlib.Path, manifest: str | None = None,
                  min_size: int = 2, overwrite: bool = True, verbose: bool = True) -> IngestReport:
  """Builds the ImageFolder data set from `src` into `data_dir` (dataset name "image_folder")."""
  from data_pipelines.tfds import common, image_folder  # pylint: disable=g-import-not-at-top
  if min_size < 1:
    raise ValueError(f"min_size must be >= 1, got {min_size}")
  builder = image_folder.ImageFolder(src=str(src), manifest=manifest, min_size=min_size,
                                     data_dir=str(data_dir), file_format=common.FILE_FORMAT)
  try:
    out = common.prepare(builder, overwrite=overwrite)
  except AssertionError as e:  # TFDS: 'No examples were yielded.'
    if "No examples" not in str(e):
      raise
    report = IngestReport(str(src), "", 0, list(builder.skipped), list(builder.converted))
    raise ValueError(f"--src {src}: no usable image\n{report.format()}") from e
  num = builder.info.splits["train"].num_examples
  report = IngestReport(str(src), str(out), num, list(builder.skipped), list(builder.converted))
  with open(out / "skipped.jsonl", "w") as f:
    for s in report.skipped:
      f.write(json.dumps(s) + "\n")
  if verbose:
    print(report.format(), flush=True)
  return report


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  ingest_folder(f.src, f.data_dir, manifest=f.manifest, min_size=f.min_size, overwrite=f.overwrite)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("src", None, "Folder of images with sidecar .txt captions (or see --manifest).", required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data_dir to write the 'image_folder' data set into.", required=True)
  flags.DEFINE_string("manifest", None, 'Optional .jsonl manifest of {"file": ..., "caption": ...} lines.')
  flags.DEFINE_integer("min_size", 2, "Skip images whose shorter side is below this many pixels.")
  flags.DEFINE_bool("overwrite", True, "Regenerate the data set if it already exists.")
  app.run(main)
