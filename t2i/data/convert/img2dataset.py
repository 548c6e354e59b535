"""Shards made by img2dataset (or anything in its webdataset layout).

Raw layout: `--src` holds `00000.tar`, `00001.tar`, ... with members `KEY.jpg` (or png, webp),
`KEY.txt` (the caption) and `KEY.json` (url, status, sizes), and `00000_stats.json` beside.
By default the samples are re-sharded through the normal writer (resized, screened, new keys).
`--reuse` writes no shards, only `--out/manifest.json` listing the existing tars (absolute
paths) with their counts of complete samples; their images are used as they are.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

from t2i.data.convert import _jsonable
from t2i.data.convert.common import require_dir
from t2i.data.shards import IMAGE_EXTENSIONS, Row, ShardStats, Skip, write_manifest

DESCRIPTION = "img2dataset shards"
SAMPLE_EXTENSIONS = (*IMAGE_EXTENSIONS, "txt", "json")


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="folder with img2dataset's 00000.tar ... files")
    parser.add_argument("--split", default="train", type=_split_name, help="split name for these samples")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the tars as they are and write only a manifest pointing at them")


def _split_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise argparse.ArgumentTypeError(f"{name!r}: use letters, digits, _ and - (it becomes part of sample keys)")
    return name


def _tars(src) -> list[Path]:
    tars = sorted(require_dir(src).glob("*.tar"))
    if not tars:
        raise FileNotFoundError(f"no .tar files in {src} (--src)")
    return tars


def read_splits(args) -> dict:
    return {args.split: _rows(_tars(args.src))}


def _samples(tar_path: Path, key_of):
    """(key, {extension: member}, tar) for each run of consecutive members sharing a key.

    A repeated extension also starts a new sample, as webdataset's grouping does.
    """
    with tarfile.open(tar_path) as tar:
        key, members = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = key_of(member.name)
            ext = ext.lower()
            if members and (k != key or ext in members):
                yield key, members, tar
                members = {}
            key = k
            members[ext] = member
        if members:
            yield key, members, tar


def _split_last_dot(name: str) -> tuple[str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    return (f"{folder}/{stem}" if folder else stem), ext


def _split_first_dot(name: str) -> tuple[str, str]:  # what webdataset does
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _image_ext(members: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)


def _rows(tars: list[Path]):
    for tar_path in tars:
        # re-sharding makes new keys, so a dotted key only loses its last extension here
        for key, members, tar in _samples(tar_path, _split_last_dot):
            source_id = f"{tar_path.stem}/{key}"
            image_ext = _image_ext(members)
            if image_ext is None:
                yield Skip("missing_image", source_id)
                continue
            if "txt" not in members:
                yield Skip("missing_caption", source_id)
                continue
            caption = tar.extractfile(members["txt"]).read().decode("utf-8", errors="replace")
            yield Row(source_id, caption, tar.extractfile(members[image_ext]).read(), _meta(tar, members))


def _meta(tar, members) -> dict:
    if "json" not in members:
        return {}
    try:
        info = json.loads(tar.extractfile(members["json"]).read())
    except (ValueError, UnicodeDecodeError):
        return {}
    return {"url": info["url"]} if isinstance(info, dict) and info.get("url") else {}


def convert(args) -> dict | None:
    """--reuse: count the complete samples of each tar and write a manifest; else None."""
    if not args.reuse:
        return None
    shards = []
    for tar_path in _tars(args.src):
        stats, previous = ShardStats(str(tar_path.resolve())), None
        for key, members, _ in _samples(tar_path, _split_first_dot):
            _check_readable(tar_path, key, members, previous)
            previous = key
            stats.rows_read += 1
            reason = ("missing_image" if _image_ext(members) is None
                      else "missing_caption" if "txt" not in members else None)
            if reason is None:
                stats.samples += 1
            else:
                stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
        shards.append(stats)
    args.out.mkdir(parents=True, exist_ok=True)
    return write_manifest(args.out, {args.split: shards}, source="img2dataset", reused=True,
                          image_size=None, image_format=None, args=_jsonable(vars(args)))


def _check_readable(tar_path, key, members, previous) -> None:
    """Refuse what webdataset would misread: dotted keys (cut at the first dot), repeated members."""
    dotted = [ext for ext in members if "." in ext and ext.rpartition(".")[2] in SAMPLE_EXTENSIONS]
    if dotted:
        problem = f"member {key}.{dotted[0]} has a dot in its key, which webdataset cuts at the first dot"
    elif key == previous:
        problem = f"sample {key} repeats a member, which webdataset refuses"
    else:
        return
    raise ValueError(f"{tar_path}: {problem}: convert without --reuse to re-shard these tars")
