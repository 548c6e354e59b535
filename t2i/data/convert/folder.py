"""A plain folder of images with captions in same-stem `.txt` files (`a/b.jpg` + `a/b.txt`).

Raw layout: if `--src` has subfolders named train, val, valid or test, each is a split (files
outside them are not read); otherwise the whole folder is the `train` split. Subfolders are
searched recursively, in sorted order. The caption is the text file's whole content. An image
without a text file counts as missing_caption, a text file without an image as missing_image.
"""

from __future__ import annotations

from pathlib import Path

from t2i.data.convert.common import require_dir
from t2i.data.shards import IMAGE_EXTENSIONS, Row, Skip

DESCRIPTION = "image folder with .txt captions"
SPLIT_FOLDERS = ("train", "val", "valid", "test")


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="folder of images + .txt captions (or train/val/test subfolders)")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    subfolders = {p.name.lower(): p for p in sorted(src.iterdir()) if p.is_dir() and p.name.lower() in SPLIT_FOLDERS}
    if not subfolders:
        return {"train": _rows(src)}
    return {name: _rows(subfolders[name]) for name in SPLIT_FOLDERS if name in subfolders}


def _rows(root: Path):
    groups: dict[str, dict] = {}  # relative path without extension -> {"images": [...], "text": Path}
    for path in sorted(root.rglob("*")):
        ext = path.suffix.lower().lstrip(".")
        if path.name.startswith(".") or not path.is_file():
            continue
        if ext == "txt" or ext in IMAGE_EXTENSIONS:
            group = groups.setdefault(path.relative_to(root).with_suffix("").as_posix(), {"images": [], "text": None})
            if ext == "txt":
                group["text"] = path
            else:
                group["images"].append(path)
    for source_id in sorted(groups):
        images, text = groups[source_id]["images"], groups[source_id]["text"]
        if not images:
            yield Skip("missing_image", source_id)
            continue
        caption = text.read_text(encoding="utf-8-sig", errors="replace") if text is not None else None
        for image in images:
            yield Row(source_id, caption, image) if caption is not None else Skip("missing_caption", source_id)
