"""Image shards: the one place that turns raw (image, caption) rows into webdataset tars.

Every converter yields `Row`s (or `Skip`s for rows it cannot even parse); `write_split` screens
them, decodes and resizes the images (optionally in a process pool), and packs the samples into
img2dataset-style tars: `KEY.jpg|png`, `KEY.txt`, `KEY.json`, keys without dots. Each finished
shard gets a `<shard>_stats.json` beside it, and both are written under a temporary name and
renamed when complete, so an interrupted conversion resumes where it stopped and produces the
same bytes. `write_manifest` then records the shards, counts per split and skips by reason.
"""

from __future__ import annotations

import base64
import binascii
import collections
import io
import json
import os
import tarfile
import warnings
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from t2i import __version__

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "t2i-shards/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

# Why a row can be left out; every skip is counted under one of these in the manifest.
SKIP_REASONS = (
    "malformed_row",  # the source line cannot be parsed (missing field, bad JSON ...)
    "bad_base64",  # the image field is not valid base64
    "undecodable_image",  # the bytes are not an image PIL can read in full
    "missing_image",  # a caption names an image the release does not have
    "missing_caption",  # an image has no caption
    "empty_caption",  # the caption is blank
    "too_small",  # the image's shorter side is below `min_size`
    "duplicate_pair",  # the same (image, caption) pair was already written
)


@dataclass(frozen=True)
class TsvRef:
    """A base64 image kept in field `column` of the line at byte `offset` of a TSV file."""

    path: str
    offset: int
    column: int = 1


@dataclass
class Row:
    """One (image, caption) pair as a source provides it.

    `image` is encoded image bytes, base64 text (`str`), a file (`Path`), a `TsvRef`, or HxWx3
    uint8 pixels;
    decoding it is left to the worker processes. `meta` goes into the sample's JSON.
    """

    source_id: str
    caption: str | None
    image: bytes | str | Path | TsvRef | np.ndarray | None
    meta: dict = field(default_factory=dict)


@dataclass
class Skip:
    """A source row that cannot become a sample; counted under `reason`."""

    reason: str
    source_id: str = ""


class RowError(Exception):
    """Raised while processing a row; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: square `size` (0 keeps the size), JPEG quality or PNG."""

    size: int = 256
    format: str = "jpg"
    quality: int = 95
    min_size: int = 32

    def __post_init__(self):
        if self.format not in ("jpg", "png"):
            raise ValueError(f"image format must be 'jpg' or 'png', got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.quality}")
        if self.size < 0 or self.min_size < 0:
            raise ValueError("image size and min_size must be >= 0")


# ---------------------------------------------------------------------------------------------
# Image decoding and normalisation (runs in worker processes)


def b64decode(text: str) -> bytes:
    """Decode URL-safe or standard base64, with or without padding (releases use both)."""
    data = text.strip().encode("ascii", "strict")
    data = data.replace(b"+", b"-").replace(b"/", b"_")
    data += b"=" * (-len(data) % 4)
    return base64.b64decode(data, altchars=b"-_", validate=True)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white, 16-bit is rescaled."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # a PNG tRNS colour / index
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(image: bytes | str | Path | TsvRef | np.ndarray | None) -> Image.Image:
    """Resolve a Row's image reference to a fully decoded RGB PIL image, or raise RowError."""
    if image is None:
        raise RowError("missing_image")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8), "RGB")
    if isinstance(image, TsvRef):
        with open(image.path, "rb") as f:
            f.seek(image.offset)
            fields = f.readline().rstrip(b"\r\n").split(b"\t")
        if len(fields) <= image.column:
            raise RowError("malformed_row", f"{image.path} at byte {image.offset}")
        image = fields[image.column].decode("latin-1")  # base64 text
    if isinstance(image, Path):
        if not image.is_file():
            raise RowError("missing_image", str(image))
        image = image.read_bytes()
    elif isinstance(image, str):
        try:
            image = b64decode(image)
        except (binascii.Error, ValueError, UnicodeEncodeError) as e:
            raise RowError("bad_base64", str(e)) from None
    try:
        img = Image.open(io.BytesIO(image))
        img.load()  # force a full decode: truncated files fail here, not later
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RowError("undecodable_image", str(e)) from None


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` and cut the centre square, in one resampling pass."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    if side == size and w == h:
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def encode_image(img: Image.Image, opts: ImageOptions) -> bytes:
    buf = io.BytesIO()
    if opts.format == "jpg":
        img.save(buf, format="JPEG", quality=opts.quality, subsampling=0 if opts.quality >= 90 else 2)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def process_row(row: Row, opts: ImageOptions) -> tuple[bytes, dict] | str:
    """Row -> (encoded image, size info), or the skip reason."""
    try:
        img = load_image(row.image)
    except RowError as e:
        return e.reason
    original = img.size
    if min(original) < opts.min_size:
        return "too_small"
    if opts.size:
        img = resize_center_crop(img, opts.size)
    info = {
        "width": img.size[0],
        "height": img.size[1],
        "original_width": original[0],
        "original_height": original[1],
    }
    return encode_image(img, opts), info


# ---------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class ShardStats:
    path: str
    samples: int = 0
    rows_read: int = 0
    skipped: dict = field(default_factory=dict)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def stats_path(tar_path: Path) -> Path:
    """`train-00000.tar` -> `train-00000_stats.json` beside it."""
    return tar_path.with_name(tar_path.stem + "_stats.json")


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata so that the same samples always give the same bytes
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_tar(f, members: Iterable[tuple[str, bytes]]) -> None:
    """Write (name, bytes) members as a USTAR tar with fixed metadata: same members, same bytes."""
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _tar_member(tar, name, data)


def write_atomic(path: Path, write) -> None:
    """Call `write(f)` on `path.tmp`, then rename it to `path`: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(tar_path: Path, members: Iterable[tuple[str, bytes]], stats: dict) -> None:
    """Write a shard's stats, then the shard, each atomically.

    The tar is renamed last, so "tar and stats both exist" means the shard is complete: that is
    the test every resumable writer applies (see `shard_done`).
    """
    stats_json = json.dumps(stats, sort_keys=True, indent=1).encode()
    write_atomic(stats_path(tar_path), lambda f: f.write(stats_json))
    write_atomic(tar_path, lambda f: write_tar(f, members))


def shard_done(tar_path: Path) -> bool:
    """Whether an earlier run completed this shard (its tar and its stats exist)."""
    return tar_path.exists() and stats_path(tar_path).exists()


class _Screen:
    """Checks a row needs no image work to reject: caption present and new pair."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()

    def __call__(self, item: Row | Skip) -> str | None:
        if isinstance(item, Skip):
            return item.reason
        if item.caption is None:
            return "missing_caption"
        item.caption = item.caption.strip()
        if not item.caption:
            return "empty_caption"
        pair = (item.source_id, item.caption)
        if pair in self.seen:
            return "duplicate_pair"
        self.seen.add(pair)
        return None


def _processed(items: Iterator[Row | Skip], screen: _Screen, opts: ImageOptions, workers: int):
    """Yield (item, result) in source order; result is (bytes, info) or a skip reason.

    Work goes to the pool in bounded chunks so a many-GB source never sits in memory at once.
    """
    chunk = max(1, workers) * 32
    pool = get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        while True:
            batch = []
            for item in items:
                batch.append(item)
                if len(batch) == chunk:
                    break
            if not batch:
                return
            reasons = [screen(item) for item in batch]
            todo = [item for item, reason in zip(batch, reasons) if reason is None]
            if pool is not None:
                done = iter(pool.starmap(process_row, [(item, opts) for item in todo]))
            else:
                done = (process_row(item, opts) for item in todo)
            for item, reason in zip(batch, reasons):
                yield item, reason if reason is not None else next(done)
    finally:
        if pool is not None:
            pool.terminate()


def write_split(
    items: Iterable[Row | Skip],
    out_dir: str | Path,
    split: str,
    opts: ImageOptions,
    *,
    source: str,
    shard_size: int = 1000,
    workers: int = 0,
    progress: bool = True,
) -> list[ShardStats]:
    """Write one split's samples into `out_dir/<split>-NNNNN.tar` shards; return their stats.

    Shards already completed by an earlier run of the same conversion are kept: their rows are
    read past (without image work) and their stats reused.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = iter(items)
    screen = _Screen()
    shards: list[ShardStats] = []

    # Resume: complete shards form a prefix; replay their rows through the screen only.
    while True:
        tar_path = out_dir / shard_name(split, len(shards))
        if not shard_done(tar_path):
            break
        stats = ShardStats(**json.loads(stats_path(tar_path).read_text()))
        for _ in range(stats.rows_read):
            screen(next(items))
        shards.append(stats)

    digits = len(str(shard_size - 1))
    current = ShardStats(shard_name(split, len(shards)))
    samples: list[tuple[str, bytes, str, bytes]] = []

    def close_shard():
        members = [member for key, image, text, meta in samples
                   for member in ((f"{key}.{opts.format}", image), (f"{key}.txt", text), (f"{key}.json", meta))]
        write_shard(out_dir / current.path, members, asdict(current))
        shards.append(current)

    bar = tqdm(desc=f"{source}/{split}", unit="row", disable=not progress, initial=sum(s.rows_read for s in shards))
    for item, result in _processed(items, screen, opts, workers):
        bar.update()
        if isinstance(result, str):
            current.rows_read += 1
            current.skipped[result] = current.skipped.get(result, 0) + 1
            continue
        if current.samples == shard_size:  # full: close it now that a next sample exists
            close_shard()
            current = ShardStats(shard_name(split, len(shards)))
            samples = []
        image, info = result
        key = f"{split}_{len(shards):05d}{current.samples:0{digits}d}"
        meta = {"key": key, "caption": item.caption, "source": source, "source_id": item.source_id,
                "split": split, "status": "success", **info, **item.meta}
        samples.append((key, image, item.caption.encode(), json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()))
        current.rows_read += 1
        current.samples += 1
    bar.close()
    if current.samples:
        close_shard()
    elif current.rows_read:
        # only unusable rows after the last shard (or none usable at all): count them, no tar
        if shards:
            last = shards[-1]
            last.rows_read += current.rows_read
            for reason, n in current.skipped.items():
                last.skipped[reason] = last.skipped.get(reason, 0) + n
            write_atomic(stats_path(out_dir / last.path),
                         lambda f: f.write(json.dumps(asdict(last), sort_keys=True, indent=1).encode()))
        else:
            shards.append(current)  # a record with no tar: keeps the skip counts in the manifest
    return shards


# ---------------------------------------------------------------------------------------------
# Manifest


def split_summary(shards: list[ShardStats]) -> dict:
    skipped = collections.Counter()
    for s in shards:
        skipped.update(s.skipped)
    return {
        "samples": sum(s.samples for s in shards),
        "rows_read": sum(s.rows_read for s in shards),
        "skipped": dict(sorted(skipped.items())),
        "shards": [{"path": s.path, "samples": s.samples} for s in shards if s.samples],
    }


def write_manifest(out_dir: str | Path, splits: dict[str, list[ShardStats]], *, kind: str = "image", **info) -> dict:
    """Write `out_dir/manifest.json`: shards per split with counts, skips by reason, tool and args."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "tool_version": __version__,
        **info,
        "splits": {name: split_summary(shards) for name, shards in splits.items()},
    }
    text = json.dumps(manifest, ensure_ascii=False, indent=1, sort_keys=False).encode()
    write_atomic(Path(out_dir) / MANIFEST, lambda f: f.write(text))
    return manifest


def read_manifest(path: str | Path) -> dict:
    """Load a manifest (given the file or its folder); shard paths come back absolute or as URLs."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no shard manifest at {path}: convert a dataset first (python -m t2i.data.convert --help) "
            "or point the data root at a folder holding manifest.json"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a t2i shard manifest (format {manifest.get('format')!r})")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if "://" not in shard["path"] and not shard["path"].startswith(("pipe:", "/")):
                shard["path"] = str(path.parent / shard["path"])
    return manifest


def describe(manifest: dict) -> str:
    """A table of a manifest: samples, shards, rows read and skips per split."""
    if manifest["kind"] == "codes":
        grid = "x".join(str(n) for n in manifest.get("grid", ()))
        what = f"code grid {grid} from {manifest.get('image_size')}px images, hflip copies: {manifest.get('hflip')}"
    else:
        what = f"image size {manifest.get('image_size')}, {manifest.get('image_format')}"
    lines = [f"{manifest.get('source', '?')} ({manifest['kind']} shards, {what})",
             f"{'split':<8}{'samples':>10}{'shards':>8}{'rows read':>11}  skipped"]
    for name, split in manifest["splits"].items():
        skipped = ", ".join(f"{k}={v}" for k, v in split["skipped"].items()) or "-"
        lines.append(f"{name:<8}{split['samples']:>10}{len(split['shards']):>8}{split['rows_read']:>11}  {skipped}")
    return "\n".join(lines)


def warn_skips(source: str, split: str, summary: dict) -> None:
    if summary["skipped"]:
        details = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items())
        warnings.warn(f"{source}/{split}: skipped {sum(summary['skipped'].values())} rows ({details})", stacklevel=2)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m t2i.data.shards DATASET_DIR  (prints its manifest)")
    print(describe(read_manifest(sys.argv[1])))
