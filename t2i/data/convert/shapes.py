"""The built-in synthetic shapes dataset (t2i.data.shapes), generated straight into shards.

No download: every sample is drawn from (seed, split, index), so the same options always give
the same shards. Images are drawn at their final size (`--size`, 64 by default) and stored as
PNG; each sample's JSON carries its true attributes under "attributes", for the oracle.
`--hold-out color=purple` leaves one concept out of every split (a base model that never saw it),
`--only color=purple` keeps only that concept (a small set to teach it): the counts are of the
samples kept, and a kept sample is the same image and caption as in the full split. `--replay N`
(with --only) adds to the training split the first N samples without the concept, in index order
among the concept's: what a fine-tuning on the concept replays of what the base was trained on.
"""

from __future__ import annotations

import argparse
import heapq

from t2i.data import shapes
from t2i.data.shards import Row

DESCRIPTION = "built-in synthetic shapes dataset (no download)"
IMAGE_DEFAULTS = {"size": 64, "format": "png", "min_size": 0}


def add_arguments(parser):
    parser.add_argument("--train", type=int, default=20000, metavar="N", help="training samples")
    parser.add_argument("--val", type=int, default=1000, metavar="N", help="validation samples")
    parser.add_argument("--test", type=int, default=1000, metavar="N", help="test samples")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed: same seed, same samples")
    concept = parser.add_mutually_exclusive_group()
    concept.add_argument("--hold-out", metavar="ATTRIBUTE=VALUE", type=_concept,
                         help="leave out every sample with this value, e.g. color=purple")
    concept.add_argument("--only", metavar="ATTRIBUTE=VALUE", type=_concept,
                         help="keep only the samples with this value")
    parser.add_argument("--replay", type=int, default=0, metavar="N",
                        help="with --only: N more training samples without the value (the base's training set)")


def _concept(text: str) -> tuple[str, str]:
    try:
        return shapes.parse_concept(text)
    except ValueError as error:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(error)) from None


def read_splits(args) -> dict:
    if args.size < shapes.MIN_IMAGE_SIZE:
        raise ValueError(f"--size must be >= {shapes.MIN_IMAGE_SIZE} for shapes, got {args.size}")
    counts = {"train": args.train, "val": args.val, "test": args.test}
    for name, n in {**counts, "replay": args.replay}.items():
        if n < 0:
            raise ValueError(f"--{name} must be >= 0, got {n}")
    if args.replay and not args.only:
        raise ValueError(f"--replay N adds samples without the --only value to its training split: got --replay "
                         f"{args.replay} without --only")
    return {split: _rows(split, n, args) for split, n in counts.items() if n > 0 or (split == "train" and args.replay)}


def _rows(split: str, n: int, args):
    indices = shapes.concept_indices(n, split, args.seed, without=args.hold_out, only=args.only)
    if split == "train" and args.replay:  # both streams ascend: merged, the replayed samples spread among the rest
        indices = heapq.merge(indices, shapes.concept_indices(args.replay, split, args.seed, without=args.only))
    for index in indices:
        attrs, caption, image = shapes.sample(index, split, args.seed, args.size)
        yield Row(f"shapes-{split}-{index}", caption, image, meta={"attributes": attrs})
