"""MUGE ECommerce-T2I (generation track).

Raw layout: `T2I_{split}.img.tsv` (`img_id<TAB>base64 PNG`) and captions `img_id<TAB>text` in
`T2I_{split}.text.tsv` (baseline code) or `T2I_{split}.txt.tsv` (task page); `T2I_test.tsv`
holds ids only and is not converted. One caption per image. The test captions (same names,
no images) are prompts without images: written as `<out>/prompts/test.txt` (one per line, for
`eval.py task=generate prompts_file=...`) with the image ids line for line in `test.ids.txt`
(with a `T2I_test.img.tsv` beside them, test is a split of shards like the others).
"""

from __future__ import annotations

from t2i.data.convert.common import MissingSplit, Prompts, first_existing, index_tsv, read_lines, require_dir
from t2i.data.shards import Row, Skip

DESCRIPTION = "MUGE ECommerce-T2I"
SPLITS = ("train", "val")


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="folder with T2I_{train,val}.img.tsv and caption TSVs")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    splits = {}
    for split in (*SPLITS, "test"):
        images = src / f"T2I_{split}.img.tsv"
        captions = first_existing(src, [f"T2I_{split}.text.tsv", f"T2I_{split}.txt.tsv"])
        if images.is_file() and captions is not None:
            splits[split] = _rows(images, captions)
        elif split == "test" and captions is not None:  # the release's test set: texts, no images
            splits[split] = Prompts(_prompts(captions), str(captions))
        elif split == "test" and images.is_file():
            splits[split] = MissingSplit(f"T2I_test.text.tsv (or .txt.tsv) is missing in {src}")
        elif images.is_file() or captions is not None:
            missing = images.name if not images.is_file() else f"T2I_{split}.text.tsv (or .txt.tsv)"
            raise FileNotFoundError(f"MUGE {split}: {missing} is missing in {src}")
    if not splits and any(src.glob("T2I_*.txt")):
        raise FileNotFoundError(f"no MUGE T2I_{{train,val}}.img.tsv in {src}; its T2I_*.txt files look like "
                                "the EasyNLP tutorial's (idx<TAB>text<TAB>imgbase64): convert them with `easynlp`")
    return splits


def _prompts(captions_tsv):
    for line in read_lines(captions_tsv):
        fields = line.split("\t")
        if len(fields) < 2:
            yield Skip("malformed_row", fields[0])
            continue
        yield fields[0].strip(), fields[1]


def _rows(images_tsv, captions_tsv):
    images = index_tsv(images_tsv)
    captioned = set()
    for line in read_lines(captions_tsv):
        fields = line.split("\t")
        if len(fields) < 2:
            yield Skip("malformed_row", fields[0])
            continue
        image_id, caption = fields[0].strip(), fields[1]
        captioned.add(image_id)
        yield Row(image_id, caption, images.get(image_id))
    # images nobody wrote a caption for are counted, not silently dropped
    for image_id in images:
        if image_id not in captioned:
            yield Skip("missing_caption", image_id)
