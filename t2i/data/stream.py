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

Resuming mid-epoch (`ResumableLoader`, whose position Lightning keeps in checkpoints): each worker
skips the batches it had already delivered, after its shuffle buffer (so the order stays that of
the interrupted epoch) and before decoding (so skipped samples cost a tar read, not a decode).
Random crops and flips draw from a generator seeded per sample (seed, epoch, rank, key), so they do
not depend on which samples were skipped. The resumed tail is exactly the interrupted epoch's
unless a corrupt sample was dropped before the resume point (the batches then shift by a sample).
"""

from __future__ import annotations

import ctypes
import io
import itertools
import logging
import math
import multiprocessing
import os
import random
import signal
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    default_collate,
    get_worker_info,
)

from t2i.data.shards import IMAGE_EXTENSIONS, to_rgb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def delivered_per_worker(worker_batches: list[int], delivered: int) -> tuple[list[int], int]:
    """(batches each worker had delivered, the worker whose turn is next) after a DataLoader's first
    `delivered` batches.

    A DataLoader over an IterableDataset takes batches from its workers in turn (worker 0, 1, ...,
    then 0 again); a worker that has run out drops out of the turns. `worker_batches` are the
    workers' batch counts.
    """
    taken = [0] * len(worker_batches)
    turn = 0
    for _ in range(min(delivered, sum(worker_batches))):
        while taken[turn] == worker_batches[turn]:  # ran out: not its turn any more
            turn = (turn + 1) % len(worker_batches)
        taken[turn] += 1
        turn = (turn + 1) % len(worker_batches)
    return taken, turn


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
        self.skip_batches = 0  # batches of this rank's epoch already delivered (a resumed run)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.skip_batches = 0  # a position belongs to one epoch

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

    def _resumed_worker(self, worker: int, workers: int) -> tuple[int, int]:
        """(the worker whose slice this one reads, batches of that slice to skip) when resuming.

        The resumed loader starts its turns at worker 0 again, so worker 0 reads the slice whose turn
        was next, worker 1 the one after...: the turns then go on as in the interrupted epoch.
        """
        if not self.skip_batches:
            return worker, 0
        counts = [end - first for first, end in (self._worker_batches(w, workers) for w in range(workers))]
        taken, turn = delivered_per_worker(counts, self.skip_batches)
        source = (worker + turn) % workers
        return source, taken[source]

    # -- iteration -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker, skip = self._resumed_worker(worker, workers)
        rank, world = self._rank_world()
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")  # order
        first, end = self._worker_batches(worker, workers)
        n_batches = end - first - skip  # batches this worker yields
        if n_batches <= 0:
            return

        if self.mode == "eval":  # no shuffling: a resumed worker starts further into its slice
            rank_start, rank_stop = _split(self.total, world, rank)
            start = rank_start + (first + skip) * self.batch_size
            stop = min(rank_start + end * self.batch_size, rank_stop)
            samples = self._read(_slices(self.shards, start, stop))
            yield from self._batches(self._decoded(samples, rank), n_batches, partial=True)
            return

        if self.mode == "train":
            order = list(self.shards)
            random.Random(f"{self.seed}-{self.epoch}-shards").shuffle(order)  # same on all ranks
            per_rank = self.batches_per_rank() * self.batch_size
            start = rank * per_rank + first * self.batch_size
            samples = self._read(_slices(order, start, start + (end - first) * self.batch_size))
        else:  # resampled: endless random shards, own seed per rank and worker
            samples = self._endless(rng)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        # skipped samples still pass through the shuffle buffer (its state decides the order after them)
        samples = itertools.islice(samples, skip * self.batch_size, None)
        decoded = self._decoded(samples, rank)
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

    def _decoded(self, samples: Iterator[dict], rank: int) -> Iterator[dict]:
        corrupt = 0
        for sample in samples:
            # crops and flips seeded per sample: the same whichever samples before it were skipped
            augment_rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{sample.get('__key__')}-augment")
            try:
                yield self.decode(sample, augment_rng)
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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal the kernel sends a process when its parent dies


class DieWithParent:
    """A DataLoader `worker_init_fn` that makes each worker die with the process that started it (Linux),
    then runs `then` (another worker_init_fn, e.g. Lightning's worker seeding).

    torch's workers poll for their parent, but after a SIGKILL (or the OOM killer) a worker whose result
    feeder thread is blocked on a full pipe, whose read end a sibling keeps open, never finishes
    exiting and holds its memory for good. `prctl(PR_SET_PDEATHSIG, SIGKILL)` has the kernel kill the
    worker when the thread that forked it dies (loaders are iterated on the main thread); a parent
    that died before the call is caught by comparing os.getppid() with the pid multiprocessing
    recorded when it started the worker. Elsewhere only `then` runs.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                warnings.warn(f"data worker {worker_id}: prctl(PR_SET_PDEATHSIG) failed "
                              f"({os.strerror(ctypes.get_errno())}): it may outlive a killed run")
            parent = multiprocessing.parent_process()
            if parent is not None and os.getppid() != parent.pid:
                os._exit(1)  # orphaned already: the parent died before the kernel could be told
        if self.then is not None:
            self.then(worker_id)


class ResumableLoader(DataLoader):
    """A DataLoader over a ShardStream that knows how far into the epoch it is.

    Lightning keeps `state_dict()` of the train loader in checkpoints and, when a run resumes,
    hands it to the new loader's `load_state_dict()`: the stream then skips the batches already
    trained on, so the resumed run sees the rest of the interrupted epoch. Batches are counted in
    the main process, as the training loop receives them.

    Workers start at the first batch, not at `iter()`, so a position given after Lightning built
    the loader still counts (ShardDataModule.load_state_dict). The loader seeds its workers from its
    own generator: it never draws from torch's global one, whose state a resumed run restores.
    """

    def __init__(self, dataset: ShardStream, **kwargs):
        super().__init__(dataset, batch_size=None, generator=torch.Generator(), **kwargs)
        self.delivered = 0
        self.started = False

    def __iter__(self) -> Iterator[dict]:
        self.started = True
        self.generator.manual_seed(random.Random(f"{self.dataset.seed}-{self.dataset.epoch}-loader").getrandbits(63))
        self.delivered = self.dataset.skip_batches
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch, "batches": self.delivered, "workers": self.num_workers}

    def load_state_dict(self, state: dict) -> None:
        if self.started:
            raise RuntimeError("the loader is already reading: a resume position has to come before its first batch")
        if state["epoch"] != self.dataset.epoch:
            # Lightning counts an epoch cut short by max_steps as finished: the run goes on with the next one
            log.info("train loader position is from epoch %d, this loader reads epoch %d: starting it from the "
                     "beginning", state["epoch"], self.dataset.epoch)
            return
        if state.get("workers", self.num_workers) != self.num_workers:
            # each worker reads its own slice through its own shuffle buffer
            warnings.warn(f"resuming with data.num_workers={self.num_workers} instead of {state['workers']}: the rest "
                          "of this epoch skips as many batches but not the same samples")
        self.dataset.skip_batches = self.delivered = state["batches"]
        log.info("resuming epoch %d after its first %d batches", self.dataset.epoch, state["batches"])


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
