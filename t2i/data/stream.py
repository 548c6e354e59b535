"""Streaming samples from webdataset shards with an exact plan for every rank and worker.

Three ways to read a split:

* ``train``: finite epochs. All ranks shuffle the shard order with the same (seed, epoch), lay the
  shards end to end, and cut that sequence into one contiguous slice per (rank, worker) of whole
  batches. Every rank therefore yields the same number of batches (no DDP hang), no sample is
  read twice in an epoch, and what is left out is the tail of the sequence, fewer samples than
  one global batch. A shuffle buffer then mixes samples inside each worker.
* ``resampled``: an endless stream for very large data; each worker draws shards at random with
  its own seed and yields its share of `epoch_samples // global batch` batches.
* ``eval``: every sample exactly once, in order, split over ranks and workers; the last batch of
  a rank may be short and ranks may differ by one batch (evaluation gathers at the end).

A sample that cannot be decoded is skipped with a warning and counted. In ``train`` mode the
worker then re-yields an already decoded sample of its slice to keep the batch count exact
(counted as padding): a hang would cost more than one repeated sample.
"""

from __future__ import annotations

import io
import math
import os
import random
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from t2i.data.shards import IMAGE_EXTENSIONS, to_rgb


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _slices(shards: list[Shard], start: int, stop: int) -> list[tuple[str, int, int]]:
    """The (url, first, end) pieces of shards covering positions [start, stop) of their concatenation."""
    pieces, offset = [], 0
    for shard in shards:
        lo, hi = max(start - offset, 0), min(stop - offset, shard.samples)
        if lo < hi:
            pieces.append((shard.url, lo, hi))
        offset += shard.samples
        if offset >= stop:
            break
    return pieces


def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` when n items are cut into `parts` near-equal contiguous parts."""
    return n * index // parts, n * (index + 1) // parts


def complete_samples(url: str) -> Iterator[dict]:
    """Samples of one tar that have an image (or a code grid) and a caption (the ones manifests count)."""
    for sample in wds.tarfile_to_samples(handler=wds.warn_and_continue)([{"url": url}]):
        if "txt" in sample and ("codes" in sample or any(ext in sample for ext in IMAGE_EXTENSIONS)):
            yield sample


class ShardStream(IterableDataset):
    """Batches from shards with counts known in advance (from a manifest).

    `decode(sample, rng)` turns a raw webdataset sample (dict of bytes) into a dict of tensors and
    strings; it may raise to reject a corrupt sample. Rank and world size are taken from
    torch.distributed unless given (tests simulate ranks by giving them).
    """

    def __init__(
        self,
        shards: list[Shard],
        decode: Callable[[dict, random.Random], dict],
        batch_size: int,
        mode: str = "train",
        shuffle_buffer: int = 1000,
        seed: int = 0,
        epoch_samples: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        collate_fn: Callable[[list[dict]], dict] | None = None,
    ):
        if mode not in ("train", "resampled", "eval"):
            raise ValueError(f"mode must be train, resampled or eval, got {mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not shards:
            raise ValueError("no shards to read")
        self.shards = shards
        self.decode = decode
        self.batch_size = batch_size
        self.mode = mode
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.total = sum(s.samples for s in shards)
        self.epoch_samples = epoch_samples or self.total
        if mode == "train" and self.epoch_samples > self.total:
            raise ValueError(f"data.epoch_samples={self.epoch_samples} exceeds the {self.total} samples of the split: "
                             "finite epochs read each sample at most once (data.resampled=true repeats)")
        self.rank, self.world_size = rank, world_size
        self.collate_fn = collate_fn or collate
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        rank, world = dist_rank_world()
        return (rank if self.rank is None else self.rank), (world if self.world_size is None else self.world_size)

    # -- the plan ------------------------------------------------------------------------------

    def batches_per_rank(self) -> int:
        rank, world = self._rank_world()
        if self.mode == "eval":
            start, stop = _split(self.total, world, rank)
            return math.ceil((stop - start) / self.batch_size)
        batches = self.epoch_samples // (self.batch_size * world)
        if batches == 0:
            raise ValueError(
                f"{self.epoch_samples} samples are fewer than one global batch "
                f"({self.batch_size} x {world} ranks): lower data.batch_size"
            )
        return batches

    def left_out(self) -> int:
        """Samples of the epoch no rank reads, to keep ranks equal (< one global batch)."""
        if self.mode == "eval":
            return 0
        _, world = self._rank_world()
        return self.epoch_samples - self.batches_per_rank() * self.batch_size * world

    def __len__(self) -> int:
        return self.batches_per_rank()

    def _worker_batches(self, worker: int, workers: int) -> tuple[int, int]:
        """[first, end) of this worker's batches among its rank's batches (contiguous)."""
        return _split(self.batches_per_rank(), workers, worker)

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._rank_world()
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")  # order
        augment_rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}-augment")  # crops, flips
        first, end = self._worker_batches(worker, workers)
        n_batches = end - first
        if n_batches <= 0:
            return

        if self.mode == "eval":
            rank_start, rank_stop = _split(self.total, world, rank)
            start = rank_start + first * self.batch_size
            stop = min(rank_start + end * self.batch_size, rank_stop)
            samples = self._read(_slices(self.shards, start, stop))
            yield from self._batches(self._decoded(samples, augment_rng), n_batches, partial=True)
            return

        if self.mode == "train":
            order = list(self.shards)
            random.Random(f"{self.seed}-{self.epoch}-shards").shuffle(order)  # same on all ranks
            per_rank = self.batches_per_rank() * self.batch_size
            start = rank * per_rank + first * self.batch_size
            samples = self._read(_slices(order, start, start + n_batches * self.batch_size))
        else:  # resampled: endless random shards, own seed per rank and worker
            samples = self._endless(rng)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        decoded = self._decoded(samples, augment_rng)
        if self.mode == "train":
            decoded = self._padded(decoded, n_batches * self.batch_size, rng)
        yield from self._batches(decoded, n_batches, partial=False)

    def _read(self, pieces: list[tuple[str, int, int]]) -> Iterator[dict]:
        for url, lo, hi in pieces:
            for i, sample in enumerate(complete_samples(url)):
                if i >= hi:
                    break
                if i >= lo:
                    yield sample

    def _endless(self, rng: random.Random) -> Iterator[dict]:
        while True:
            yield from complete_samples(rng.choice(self.shards).url)

    def _decoded(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        corrupt = 0
        for sample in samples:
            try:
                yield self.decode(sample, rng)
            except Exception as e:  # a bad sample must never end a run
                corrupt += 1
                warnings.warn(f"skipped corrupt sample {sample.get('__key__')} in {sample.get('__url__')}: {e!r} "
                              f"({corrupt} in this worker so far)")

    def _padded(self, decoded: Iterator[dict], wanted: int, rng: random.Random) -> Iterator[dict]:
        """Exactly `wanted` samples: re-yield earlier ones if corrupt samples left a gap."""
        recent: list[dict] = []
        count = 0
        for sample in decoded:
            yield sample
            count += 1
            if len(recent) < 64:
                recent.append(sample)
            if count == wanted:
                return
        if count < wanted:
            if not recent:
                raise RuntimeError("a data worker decoded no sample of its slice: are the shards readable?")
            warnings.warn(f"padded {wanted - count} samples with repeats to keep batch counts equal across ranks")
            for _ in range(wanted - count):
                yield rng.choice(recent)

    def _batches(self, samples: Iterator[dict], n_batches: int, partial: bool) -> Iterator[dict]:
        batch: list[dict] = []
        emitted = 0
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate_fn(batch)
                emitted += 1
                batch = []
                if emitted == n_batches:
                    return
        if batch and partial:
            yield self.collate_fn(batch)


def collate(samples: list[dict]) -> dict:
    """Stack tensors, keep everything else (captions, keys, JSON) as lists.

    torch's default_collate stacks straight into shared memory inside a worker process, which
    halves what a batch costs to cross to the main process.
    """
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = default_collate(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ---------------------------------------------------------------------------------------------
# Decoding samples: images, and the code grids of pre-tokenized shards


def decode_image(data: bytes, size: int, crop: str, crop_scale: float, hflip: bool, rng: random.Random) -> torch.Tensor:
    """Encoded image -> uint8 tensor [size, size, 3] (channels last: a batch stacks by memcpy).

    `crop="center"` takes the centre square; `"random"` a square of `crop_scale`..1 of the shorter
    side at a random place. Flipping is off unless asked (captions say 左/右). Pixels stay uint8
    until they reach the training device (see `to_unit_range`): a quarter of the bytes to move
    between processes and to the GPU.
    """
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))  # JPEG: decode at reduced scale when the target is smaller
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    side = min(w, h)
    if crop == "random":
        side = max(1, round(side * rng.uniform(crop_scale, 1.0)))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
    else:
        left, top = (w - side) // 2, (h - side) // 2
    if (side, side) != (w, h) or side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side))
    x = torch.from_numpy(np.array(img))
    if hflip and rng.random() < 0.5:
        x = x.flip(1)
    return x


def decode_codes(data: bytes, shape) -> torch.Tensor:
    """`KEY.codes` bytes -> long tensor [h, w].

    The layout (written by t2i.pretokenize) has no header: h * w little-endian uint16 code
    indices in row-major order; `shape` = (h, w) comes from the sample JSON's `codes_shape`.
    """
    h, w = (int(n) for n in shape)
    if len(data) != 2 * h * w:
        raise ValueError(f"code grid of {len(data)} bytes does not hold {h}x{w} uint16 codes")
    codes = np.frombuffer(data, dtype="<u2").reshape(h, w)
    return torch.from_numpy(codes.astype(np.int64))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any memory layout) -> contiguous float in [-1, 1], on their device."""
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    return out.copy_(images).div_(127.5).sub_(1.0)
