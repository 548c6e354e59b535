"""Flickr30k-CN: Chinese sentences for the Flickr30k images (layout not verified on a download).

Raw layout: split folders `flickr30kzhbbosontrain/`, `flickr30kzhbbosonval/`,
`flickr30kzhmbosontest/` (found by glob `*train`, `*val`, `*test` if named differently), each
with `ImageSets/<folder>.txt` (numeric image ids) and `TextData/seg.<folder>.caption.txt` lines
`<id>#zhb#<n> <space-separated words>` (test: `#zhm#`, words tagged `词:n`). Captions are turned
back into plain text: word spaces and part-of-speech tags dropped, and a gap of two or more
spaces (where train/val lost a Chinese comma) made "，" again. Images: `--images`
(default SRC/flickr30k-images) as `<id>.jpg`. One row per caption; caption lines of images not
in the folder's id list are ignored. A missing split folder leaves that split out (warned).
"""

from __future__ import annotations

import re
from pathlib import Path

from t2i.data.convert.common import (MissingSplit, caption_rows, find_file, read_captions, read_ids, require_dir,
                                     strip_image_ext)

DESCRIPTION = "Flickr30k-CN"
SPLITS = ("train", "val", "test")
FOLDERS = {"train": "flickr30kzhbbosontrain", "val": "flickr30kzhbbosonval", "test": "flickr30kzhmbosontest"}
POS_TAGGED = re.compile(r"(.+):([A-Za-z]{1,6})")  # word:tag, the tag after the last colon
CLAUSE_GAP = re.compile(r"\s{2,}")  # where train/val captions had a Chinese comma
PUNCTUATION = set("，,。.！!？?；;：:、…")


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
            splits[split] = MissingSplit(f"no {FOLDERS[split]}/ (or other *{split} folder) in {src}")
            continue
        ids = find_file(folder, "--src", f"Flickr30k-CN {split} id list", [f"ImageSets/{folder.name}.txt"],
                        ["ImageSets/*.txt", "**/ImageSets/*.txt"])
        text = find_file(folder, "--src", f"Flickr30k-CN {split} captions",
                         [f"TextData/seg.{folder.name}.caption.txt"],
                         ["TextData/seg.*caption*.txt", "TextData/*caption*.txt", "**/*caption*.txt"])
        captions = read_captions(text, clean=clean_caption)
        image_ids = [strip_image_ext(i) for i in read_ids(ids)]
        splits[split] = caption_rows(image_ids, captions, lambda image_id: images / f"{image_id}.jpg")
    if all(isinstance(s, MissingSplit) for s in splits.values()):
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
    """`一个 男人:n 在 骑 自行车` -> `一个男人在骑自行车`;
    `两 个 男人  一个 穿 绿色 衬衫` -> `两个男人，一个穿绿色衬衫`.

    A single space separates words and is dropped; a gap of two or more spaces marks where the
    release removed a Chinese comma, and becomes "，" again (unless punctuation is already there).
    Tags are removed only from a line whose words are mostly tagged, so a colon that belongs
    to an untagged caption (`12:30`) stays. Spaces between two ASCII words are kept.
    """
    clauses = [clause.split() for clause in CLAUSE_GAP.split(text.strip())]
    clauses = [words for words in clauses if words]
    if not clauses:
        return ""
    words = [w for clause in clauses for w in clause]
    if 2 * sum(POS_TAGGED.fullmatch(w) is not None for w in words) >= len(words):
        clauses = [[_untagged(w) for w in clause] for clause in clauses]
    out = ""
    for clause in clauses:
        text = _join_words(clause)
        if out and out[-1] not in PUNCTUATION and text[0] not in PUNCTUATION:
            out += "，"
        out += text
    return out


def _untagged(word: str) -> str:
    match = POS_TAGGED.fullmatch(word)
    return match.group(1) if match else word


def _join_words(words: list[str]) -> str:
    out = words[0]
    for word in words[1:]:
        if out[-1].isascii() and out[-1].isalnum() and word[0].isascii() and word[0].isalnum():
            out += " "
        out += word
    return out
