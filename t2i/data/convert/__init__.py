"""Converters: raw dataset releases -> image shards + manifest.json.

One module per source. Each module defines

    DESCRIPTION                  one line for --help
    add_arguments(parser)        its own command-line options (most take only --src)
    read_splits(args) -> dict    split name -> iterable of shards.Row / shards.Skip, read lazily;
                                 or common.Prompts (texts without images: written as a prompts
                                 file for `eval.py task=generate`), or common.MissingSplit (a
                                 split the release lacks: left out, warned and named in the summary)
    IMAGE_DEFAULTS (optional)    ImageOptions fields it prefers (e.g. PNG for synthetic images)

and `convert` runs any of them through the one shard writer. Command line:

    python -m t2i.data.convert muge --src RAW_DIR --out data/muge
"""

from __future__ import annotations

import argparse
import collections
import importlib
import logging
import sys
import warnings
from pathlib import Path

from t2i.data.convert.common import MissingSplit, Prompts
from t2i.data.shards import ImageOptions, Skip, describe, write_atomic, write_manifest, write_split, warn_skips

log = logging.getLogger(__name__)

SOURCES = {
    "shapes": "built-in synthetic shapes dataset (no download)",
    "muge": "MUGE ECommerce-T2I (T2I_{split}.img.tsv + T2I_{split}.text.tsv/.txt.tsv)",
    "chinese_clip": "Chinese-CLIP layout ({split}_imgs.tsv + {split}_texts.jsonl)",
    "easynlp": "EasyNLP TSV (idx<TAB>text<TAB>imgbase64; idx<TAB>text: prompts only), one file per split",
    "coco_cn": "COCO-CN id lists + human-written captions + an MS-COCO image folder",
    "flickr8k_cn": "Flickr8k-CN captions (zhc/zhb/zhg, zhm: test only) + the Flickr8k image folder",
    "flickr30k_cn": "Flickr30k-CN segmented captions + the Flickr30k image folder",
    "folder": "a folder of images with same-stem .txt captions (one subfolder per split, or all train)",
    "img2dataset": "existing img2dataset shards: re-shard them, or --reuse them as they are",
}


def source_module(name: str):
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; choose one of: {', '.join(SOURCES)}")
    return importlib.import_module(f"t2i.data.convert.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m t2i.data.convert",
        description="Convert a raw image-caption release into webdataset shards with a manifest.",
    )
    subparsers = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, description in SOURCES.items():
        module = source_module(name)
        sub = subparsers.add_parser(name, help=description, description=description)
        sub.add_argument("--out", required=True, type=Path, help="output folder for shards + manifest.json")
        module.add_arguments(sub)
        defaults = {**ImageOptions().__dict__, **getattr(module, "IMAGE_DEFAULTS", {})}
        image = sub.add_argument_group("stored images")
        image.add_argument("--size", type=int, default=defaults["size"],
                           help="square side: shorter side resized, centre crop (0 keeps the size)")
        image.add_argument("--format", choices=("jpg", "png"), default=defaults["format"])
        image.add_argument("--quality", type=int, default=defaults["quality"], help="JPEG quality")
        image.add_argument("--min-size", type=int, default=defaults["min_size"],
                           help="skip images whose shorter side is smaller (counted as too_small)")
        sub.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        sub.add_argument("--workers", type=int, default=0, help="image-processing processes (0: in this one)")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def convert(args: argparse.Namespace) -> dict:
    """Run one conversion described by parsed arguments; returns the manifest."""
    module = source_module(args.source)
    if hasattr(module, "convert"):  # a source that writes no shards of its own (img2dataset --reuse)
        manifest = module.convert(args)
        if manifest is not None:
            return manifest
    opts = ImageOptions(size=args.size, format=args.format, quality=args.quality, min_size=args.min_size)
    splits = module.read_splits(args)
    missing = {name: s.reason for name, s in splits.items() if isinstance(s, MissingSplit)}
    prompts = {name: s for name, s in splits.items() if isinstance(s, Prompts)}
    rows = {name: s for name, s in splits.items() if name not in missing and name not in prompts}
    if not rows and not prompts:
        detail = "".join(f"; {name}: {reason}" for name, reason in missing.items())
        raise FileNotFoundError(f"{args.source}: no split found under {getattr(args, 'src', '?')}{detail}")
    for name, reason in missing.items():
        warnings.warn(f"{args.source}: split {name!r} left out: {reason}", stacklevel=2)
    written = {}
    for split, items in rows.items():
        written[split] = write_split(items, args.out, split, opts, source=args.source,
                                     shard_size=args.shard_size, workers=args.workers, progress=not args.quiet)
    info = {}
    if prompts:
        info["prompts"] = {name: write_prompts(p, args.out, name) for name, p in prompts.items()}
    if missing:
        info["missing_splits"] = missing
    manifest = write_manifest(args.out, written, source=args.source, image_size=opts.size,
                              image_format=opts.format, args=_jsonable(vars(args)), **info)
    for split, summary in manifest["splits"].items():
        warn_skips(args.source, split, summary)
    for split, summary in info.get("prompts", {}).items():
        warn_skips(args.source, f"{split} prompts", summary)
        log.info("%s: %d %s prompts without images written to %s", args.source, summary["prompts"], split,
                 Path(args.out) / summary["path"])
    return manifest


PROMPTS_DIR = "prompts"


def write_prompts(prompts: Prompts, out_dir: str | Path, split: str) -> dict:
    """Write a split of texts without images as `prompts/<split>.txt` (one prompt per line, what
    `eval.py task=generate prompts_file=...` reads) and their ids, line for line, as
    `prompts/<split>.ids.txt`; returns the counts (paths relative to `out_dir`)."""
    texts, ids, skipped, rows_read = [], [], collections.Counter(), 0
    for item in prompts.items:
        rows_read += 1
        if isinstance(item, Skip):
            skipped[item.reason] += 1
            continue
        idx, text = (" ".join(part.splitlines()).strip() for part in item)  # one line each, whatever breaks it
        if not text:
            skipped["empty_caption"] += 1
            continue
        ids.append(idx)
        texts.append(text)
    folder = Path(out_dir) / PROMPTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in ((f"{split}.txt", texts), (f"{split}.ids.txt", ids)):
        data = "".join(f"{line}\n" for line in lines).encode("utf-8")
        write_atomic(folder / name, lambda f, data=data: f.write(data))
    return {"path": f"{PROMPTS_DIR}/{split}.txt", "ids": f"{PROMPTS_DIR}/{split}.ids.txt", "prompts": len(texts),
            "rows_read": rows_read, "skipped": dict(sorted(skipped.items())), "source_file": str(prompts.source)}


def summary_notes(manifest: dict) -> list[str]:
    """Lines for the printed summary: splits left out, and prompts files written (with their use)."""
    out = Path(manifest.get("args", {}).get("out", "."))
    lines = [f"left out: {name} ({reason})" for name, reason in manifest.get("missing_splits", {}).items()]
    for name, p in manifest.get("prompts", {}).items():
        skipped = ", ".join(f"{k}={v}" for k, v in p["skipped"].items()) or "none skipped"
        lines.append(f"prompts without images: {name}: {p['prompts']} prompts ({skipped}) in {out / p['path']}, "
                     f"their ids in {out / p['ids']}; generate with: python eval.py task=generate ckpt=GPT_CKPT "
                     f"prompts_file={out / p['path']}")
    return lines


def run(argv: list[str] | None = None) -> dict:
    """Parse a command line (as `python -m t2i.data.convert` does) and convert."""
    return convert(build_parser().parse_args(argv))


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    try:
        manifest = run(argv)
    except (FileNotFoundError, ValueError) as e:  # a wrong option or release: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join([describe(manifest), *summary_notes(manifest)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
