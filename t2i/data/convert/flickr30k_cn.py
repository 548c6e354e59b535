"""Flickr30k-CN: Chinese sentences for the Flickr30k images (layout not verified on a download).

Raw layout: split folders `flickr30kzhbbosontrain/`, `flickr30kzhbbosonval/`,
`flickr30kzhmbosontest/` (found by glob `*train`, `*val`, `*test` if named differently), each
with `ImageSets/<folder>.txt` (numeric image ids) and `TextData/seg.<folder>.caption.txt` lines
`<id>#zhb#<n> <space-separated words>` (test: `#zhm#`, words tagged `词:n`). Captions are turned
back into plain text: word spaces and part-of-speech tags dropped. Images: `--images`
(default SRC/flickr30k-images) as `<id>.jpg`. One row per caption; caption lines of images not
in the folder's id list are ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from t2i.data.convert.common import caption_rows, find_file, read_captions, read_ids, require_dir, strip_image_ext

DESCRIPTION = "Flickr30k-CN"
SPLITS = ("train", "val", "test")
FOLDERS = {"train": "flickr30kzhbbosontrain", "val": "flickr30kzhbbosonval", "test": "flickr30kzhmbosontest"}
POS_TAGGED = re.compile(r"(.+):([A-Za-z]{1,6})")  # word:tag, the tag after the last colon


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="folder holding the flickr30kzh*boson{train,val,test} folders")
    parser.add_argument("--images", type=Path, help="Flickr30k image folder (default: SRC/flickr30k-images)")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    images = require_dir(args.images if args.images is not None else src / "flickr30k-images", "--images")
    splits = {}
    for split in SPLITS:
        folder = _split_folder(src, split)
        if folder is None:
            continue
        ids = find_file(folder, "--src", f"Flickr30k-CN {split} id list", [f"ImageSets/{folder.name}.txt"],
                        ["ImageSets/*.txt", "**/ImageSets/*.txt"])
        text = find_file(folder, "--src", f"Flickr30k-CN {split} captions",
                         [f"TextData/seg.{folder.name}.caption.txt"],
                         ["TextData/seg.*caption*.txt", "TextData/*caption*.txt", "**/*caption*.txt"])
        captions = read_captions(text, clean=clean_caption)
        image_ids = [strip_image_ext(i) for i in read_ids(ids)]
        splits[split] = caption_rows(image_ids, captions, lambda image_id: images / f"{image_id}.jpg")
    if not splits:
        raise FileNotFoundError(f"no Flickr30k-CN split folder ({', '.join(FOLDERS.values())}) in {src} (--src)")
    return splits


def _split_folder(src: Path, split: str) -> Path | None:
    if (src / FOLDERS[split]).is_dir():
        return src / FOLDERS[split]
    found = sorted(p for p in src.glob(f"*{split}") if p.is_dir())
    if len(found) > 1:
        raise ValueError(f"several {split} folders in {src} (--src): {', '.join(p.name for p in found)}")
    return found[0] if found else None


def clean_caption(text: str) -> str:
    """`一个 男人:n 在 骑 自行车` -> `一个男人在骑自行车`.

    Tags are removed only from a line whose words are mostly tagged, so a colon that belongs
    to an untagged caption (`12:30`) stays. Spaces between two ASCII words are kept.
    """
    words = text.split()
    if not words:
        return ""
    tagged = [POS_TAGGED.fullmatch(w) for w in words]
    if 2 * sum(m is not None for m in tagged) >= len(words):
        words = [m.group(1) if m else w for w, m in zip(words, tagged)]
    out = words[0]
    for word in words[1:]:
        if out[-1].isascii() and out[-1].isalnum() and word[0].isascii() and word[0].isalnum():
            out += " "
        out += word
    return out
