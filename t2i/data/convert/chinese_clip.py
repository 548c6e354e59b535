"""Chinese-CLIP dataset layout (how MUGE, Flickr30k-CN and COCO-CN are usually passed around).

Raw layout: `{split}_imgs.tsv` (`image_id<TAB>base64`) and `{split}_texts.jsonl` with lines
`{"text_id": 8428, "text": "...", "image_ids": [1076345, 517602]}` for split in train, valid,
test (names kept as the release has them), and any other split the folder holds as the same
pair of files: `test2_imgs.tsv` + `test2_texts.jsonl` becomes split `test2` (choose it with
`data.splits.test=test2`); such an extra split with only one of its two files is left out,
warned. One text may belong to several images: each
(image, text) pair is a row. A text with no image ids (as on test) counts as missing_image,
an image that no text names as missing_caption.
"""

from __future__ import annotations

import json
import re

from t2i.data.convert.common import MissingSplit, index_tsv, read_lines, require_dir
from t2i.data.shards import Row, Skip

DESCRIPTION = "Chinese-CLIP layout"
SPLITS = ("train", "valid", "test")  # first, in this order; other names found in the folder follow
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # usable in shard file names and sample keys
SUFFIXES = ("_imgs.tsv", "_texts.jsonl")


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="folder with {train,valid,test}_imgs.tsv and _texts.jsonl")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    found = {path.name[: -len(suffix)] for suffix in SUFFIXES for path in src.glob(f"*{suffix}") if path.is_file()}
    splits = {}
    for split in [*SPLITS, *sorted(found - set(SPLITS))]:
        images, texts = src / f"{split}_imgs.tsv", src / f"{split}_texts.jsonl"
        if images.is_file() and texts.is_file():
            if not SPLIT_NAME.fullmatch(split):
                splits[split] = MissingSplit(f"{split!r} is not usable as a split name (letters, digits, _ and -): "
                                             f"rename {images.name} and {texts.name}")
                continue
            splits[split] = _rows(images, texts)
        elif images.is_file() or texts.is_file():
            missing = texts.name if images.is_file() else images.name
            if split not in SPLITS:  # an extra file beside the release: say so, convert the rest
                splits[split] = MissingSplit(f"{missing} is missing in {src}")
                continue
            raise FileNotFoundError(f"Chinese-CLIP {split}: {missing} is missing in {src} (--src)")
    return splits


def _rows(images_tsv, texts_jsonl):
    images = index_tsv(images_tsv)
    captioned = set()
    for n, line in enumerate(read_lines(texts_jsonl)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield Skip("malformed_row", f"{texts_jsonl.name}:{n}")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("image_ids", []), list):
            yield Skip("malformed_row", f"{texts_jsonl.name}:{n}")
            continue
        text, text_id = record.get("text"), record.get("text_id", n)
        if text is not None and not isinstance(text, str):
            yield Skip("malformed_row", str(text_id))
            continue
        image_ids = [str(i).strip() for i in record.get("image_ids", [])]
        if not image_ids:
            yield Skip("missing_image", str(text_id))
        for image_id in image_ids:
            captioned.add(image_id)
            yield Row(image_id, text, images.get(image_id), {"text_id": text_id})
    for image_id in images:
        if image_id not in captioned:
            yield Skip("missing_caption", image_id)
