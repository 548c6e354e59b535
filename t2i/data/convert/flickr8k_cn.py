"""Flickr8k-CN: Chinese sentences for the Flickr8k images.

Raw layout: `flickr8kzhc.caption.txt` (human-written; `--captions zhb|zhg` for the machine
translations `flickr8kzhb/zhg.caption.txt`) with lines `1000268201_693b08cb0e.jpg#zhc#0 sentence`
(one space after the reference; a tab is accepted too), split lists `flickr8k{train,val,test}.txt`
holding ids without `.jpg`, and the images in the original `Flicker8k_Dataset/` folder
(`--images`). One row per caption; caption lines of images in no split list are ignored.
"""

from __future__ import annotations

from pathlib import Path

from t2i.data.convert.common import caption_rows, find_file, read_captions, read_ids, require_dir, strip_image_ext

DESCRIPTION = "Flickr8k-CN"
SPLITS = ("train", "val", "test")


def add_arguments(parser):
    parser.add_argument("--src", required=True,
                        help="Flickr8k-CN folder (flickr8kzh?.caption.txt, flickr8k{train,val,test}.txt)")
    parser.add_argument("--captions", choices=("zhc", "zhb", "zhg"), default="zhc",
                        help="zhc: human-written; zhb, zhg: machine translations")
    parser.add_argument("--images", type=Path, help="Flickr8k image folder (default: SRC/Flicker8k_Dataset)")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    images = require_dir(args.images if args.images is not None else src / "Flicker8k_Dataset", "--images")
    captions = read_captions(find_file(src, "--src", "Flickr8k-CN captions", [f"flickr8k{args.captions}.caption.txt"]))
    splits = {}
    for split in SPLITS:
        id_list = find_file(src, "--src", f"Flickr8k-CN {split} list", [f"flickr8k{split}.txt"])
        ids = [strip_image_ext(i) for i in read_ids(id_list)]
        splits[split] = caption_rows(ids, captions, lambda image_id: images / f"{image_id}.jpg")
    return splits
