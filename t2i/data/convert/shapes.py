"""The built-in synthetic shapes dataset (t2i.data.shapes), generated straight into shards.

No download: every sample is drawn from (seed, split, index), so the same options always give
the same shards. Images are drawn at their final size (`--size`, 64 by default) and stored as
PNG; each sample's JSON carries its true attributes under "attributes", for the oracle.
"""

from __future__ import annotations

from t2i.data import shapes
from t2i.data.shards import Row

DESCRIPTION = "built-in synthetic shapes dataset (no download)"
IMAGE_DEFAULTS = {"size": 64, "format": "png", "min_size": 0}


def add_arguments(parser):
    parser.add_argument("--train", type=int, default=20000, metavar="N", help="training samples")
    parser.add_argument("--val", type=int, default=1000, metavar="N", help="validation samples")
    parser.add_argument("--test", type=int, default=1000, metavar="N", help="test samples")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: same seed, same samples")


def read_splits(args) -> dict:
    if args.size < shapes.MIN_IMAGE_SIZE:
        raise ValueError(f"--size must be >= {shapes.MIN_IMAGE_SIZE} for shapes, got {args.size}")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"--{split} must be >= 0, got {n}")
    return {split: _rows(split, n, args.seed, args.size) for split, n in counts.items() if n > 0}


def _rows(split: str, n: int, seed: int, image_size: int):
    for index, (attrs, caption, image) in enumerate(shapes.generate(n, split, seed, image_size)):
        yield Row(f"shapes-{split}-{index}", caption, image, meta={"attributes": attrs})
