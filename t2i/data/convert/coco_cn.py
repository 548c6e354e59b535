"""COCO-CN: Chinese sentences for MS-COCO images.

Raw layout: `coco-cn_{train,val,test}.txt` (one image id per line) and
`imageid.human-written-caption.txt` with lines `<image_id>#<n><TAB>sentence`
(`--captions translated`: `imageid.manually-translated-caption.txt`, same format, test images
only; splits none of whose images it covers are left out, warned). A split whose id list is not
in the folder is left out (warned, and named in the summary). Images come from the MS-COCO
download: `COCO_train2014_000000123456` is `train2014/COCO_train2014_000000123456.jpg` under
`--coco`. One row per caption; caption lines of images in no split list are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from t2i.data.convert.common import MissingSplit, caption_rows, find_file, read_captions, read_ids, require_dir

DESCRIPTION = "COCO-CN"
SPLITS = ("train", "val", "test")
CAPTION_FILES = {"human": "imageid.human-written-caption.txt",
                 "translated": "imageid.manually-translated-caption.txt"}
COCO_ID = re.compile(r"COCO_([A-Za-z]+\d{4})_\d+")


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="the COCO-CN folder (coco-cn_*.txt, imageid.*-caption.txt)")
    parser.add_argument("--captions", choices=tuple(CAPTION_FILES), default="human",
                        help="human-written sentences, or the manual translations (test images only)")
    parser.add_argument("--coco", type=Path,
                        help="MS-COCO image folder holding train2014/ and val2014/ (default: --src if it has them)")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    lists = {split: src / f"coco-cn_{split}.txt" for split in SPLITS}
    if not any(path.is_file() for path in lists.values()):
        raise FileNotFoundError(f"no COCO-CN split list ({', '.join(p.name for p in lists.values())}) in {src} (--src)")
    coco = _coco_dir(src, args.coco)
    captions = read_captions(find_file(src, "--src", "COCO-CN captions", [CAPTION_FILES[args.captions]]))
    splits = {}
    for split, id_list in lists.items():
        if not id_list.is_file():
            splits[split] = MissingSplit(f"no {id_list.name} in {src}")
            continue
        ids = read_ids(id_list)
        if args.captions != "human" and not any(i in captions for i in ids):
            splits[split] = MissingSplit(f"the {args.captions} captions ({CAPTION_FILES[args.captions]}) "
                                         "cover none of its images")
            continue
        splits[split] = caption_rows(ids, captions, lambda image_id: _image_path(coco, image_id))
    return splits


def _coco_dir(src: Path, coco: Path | None) -> Path:
    if coco is not None:
        folder = require_dir(coco, "--coco")
    elif any((src / d).is_dir() for d in ("train2014", "val2014")):
        folder = src
    else:
        raise FileNotFoundError(f"no MS-COCO images: {src} has no train2014/ or val2014/; "
                                "pass --coco DIR (the folder holding train2014/ and val2014/)")
    if not any((folder / d).is_dir() for d in ("train2014", "val2014")):
        raise FileNotFoundError(f"--coco {folder} holds neither train2014/ nor val2014/")
    return folder


def _image_path(coco: Path, image_id: str) -> Path | None:
    match = COCO_ID.fullmatch(image_id)
    return coco / match.group(1) / f"{image_id}.jpg" if match else None
