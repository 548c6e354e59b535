"""Flickr8k-CN: Chinese sentences for the Flickr8k images.

Raw layout: `flickr8kzhc.caption.txt` (human-written; `--captions zhb|zhg` for the machine
translations `flickr8kzhb/zhg.caption.txt`; `--captions zhm` for the human translations of the
test captions, `flickr8kzhmtest.captions.txt`, test images only: splits none of whose images it
covers are left out, warned) with lines `1000268201_693b08cb0e.jpg#zhc#0 sentence` (one space
after the reference; a tab is accepted too), split lists `flickr8k{train,val,test}.txt` holding
ids without `.jpg`, and the images in the original `Flicker8k_Dataset/` folder (`--images`). A
split whose list is not in the folder is left out (warned, and named in the summary). One row
per caption; caption lines of images in no split list are ignored.
"""

from __future__ import annotations

from pathlib import Path

from t2i.data.convert.common import (MissingSplit, caption_rows, find_file, read_captions, read_ids, require_dir,
                                     strip_image_ext)

DESCRIPTION = "Flickr8k-CN"
SPLITS = ("train", "val", "test")
CAPTION_FILES = {
    "zhc": ["flickr8kzhc.caption.txt"],
    "zhb": ["flickr8kzhb.caption.txt"],
    "zhg": ["flickr8kzhg.caption.txt"],
    "zhm": ["flickr8kzhmtest.captions.txt", "flickr8kzhmtest.caption.txt"],
}
TEST_ONLY = ("zhm",)  # caption sets written for the test images only


def add_arguments(parser):
    parser.add_argument("--src", required=True,
                        help="Flickr8k-CN folder (flickr8kzh?.caption.txt, flickr8k{train,val,test}.txt)")
    parser.add_argument("--captions", choices=tuple(CAPTION_FILES), default="zhc",
                        help="zhc: human-written; zhb, zhg: machine translations; "
                             "zhm: human translations of the test images' English captions")
    parser.add_argument("--images", type=Path, help="Flickr8k image folder (default: SRC/Flicker8k_Dataset)")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    lists = {split: src / f"flickr8k{split}.txt" for split in SPLITS}
    if not any(path.is_file() for path in lists.values()):
        raise FileNotFoundError(f"no Flickr8k-CN split list ({', '.join(p.name for p in lists.values())}) "
                                f"in {src} (--src)")
    images = require_dir(args.images if args.images is not None else src / "Flicker8k_Dataset", "--images")
    caption_file = find_file(src, "--src", f"Flickr8k-CN {args.captions} captions", CAPTION_FILES[args.captions])
    captions = read_captions(caption_file)
    splits = {}
    for split, id_list in lists.items():
        if not id_list.is_file():
            splits[split] = MissingSplit(f"no {id_list.name} in {src}")
            continue
        ids = [strip_image_ext(i) for i in read_ids(id_list)]
        if args.captions in TEST_ONLY and not any(i in captions for i in ids):
            splits[split] = MissingSplit(f"the {args.captions} captions ({caption_file.name}) cover none of its images")
            continue
        splits[split] = caption_rows(ids, captions, lambda image_id: images / f"{image_id}.jpg")
    return splits
