"""MUGE ECommerce-T2I (generation track).

Raw layout: `T2I_{split}.img.tsv` (`img_id<TAB>base64 PNG`) and captions `img_id<TAB>text` in
`T2I_{split}.text.tsv` (baseline code) or `T2I_{split}.txt.tsv` (task page); `T2I_test.tsv`
holds ids only and is not converted. One caption per image.
"""

from __future__ import annotations

from t2i.data.convert.common import first_existing, index_tsv, read_lines, require_dir
from t2i.data.shards import Row, Skip

DESCRIPTION = "MUGE ECommerce-T2I"
SPLITS = ("train", "val")


def add_arguments(parser):
    parser.add_argument("--src", required=True, help="folder with T2I_{train,val}.img.tsv and caption TSVs")


def read_splits(args) -> dict:
    src = require_dir(args.src)
    splits = {}
    for split in SPLITS:
        images = src / f"T2I_{split}.img.tsv"
        captions = first_existing(src, [f"T2I_{split}.text.tsv", f"T2I_{split}.txt.tsv"])
        if images.is_file() and captions is not None:
            splits[split] = _rows(images, captions)
        elif images.is_file() or captions is not None:
            missing = images.name if not images.is_file() else f"T2I_{split}.text.tsv (or .txt.tsv)"
            raise FileNotFoundError(f"MUGE {split}: {missing} is missing in {src}")
    return splits


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
