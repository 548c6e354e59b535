"""The LightningDataModule over image or code shards: config, shard lists, decoding, loaders.

Batches are dicts: `image` [B, 3, S, S], `text` long [B, text_len] (token ids, 0 = padding),
`caption` list of str, `key` list of str, `meta` list of dict (the sample JSON); after
`decode_also_at(sizes)`, also `image_<size>` [B, 3, size, size] for each of those sizes (the same
images, each decoded and resized from the stored one as `image` is). Images leave the
loader as uint8 and become float in [-1, 1] once on the training device
(`on_after_batch_transfer`, which Lightning calls; call it yourself when you iterate a loader
without a Trainer).

Code shards (written by `python -m t2i.pretokenize`, manifest kind "codes") give `codes`
long [B, h, w] (VQGAN code indices) in place of `image`: the manifest decides, no setting needed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
import webdataset as wds
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from t2i.data.shards import IMAGE_EXTENSIONS, MANIFEST, read_manifest
from t2i.data.stream import (
    DieWithParent,
    ResumableLoader,
    Shard,
    ShardStream,
    collate,
    complete_samples,
    decode_codes,
    decode_image,
    to_unit_range,
)
from t2i.data.tokenizer import FixedLengthTokenizer, TextTokenizer

log = logging.getLogger(__name__)

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; ours is
# exact because ShardStream plans every worker's slice.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

ROLES = ("train", "val", "test")


@dataclass
class TokenizerConfig:
    path: str | None = None  # SentencePiece model; default <root>/tokenizer.model
    vocab_size: int = 16000  # ceiling used when `train.py stage=tokenizer` trains it
    model_type: str = "unigram"


@dataclass
class DataConfig:
    name: str = "shapes"
    root: str | None = None  # folder with manifest.json written by a converter (or by pretokenize)
    source: str | None = None  # converter that builds `root`, or "pretokenize" (for error messages)
    codes_root: str | None = None  # this data's code shards (python -m t2i.pretokenize --out): a GPT run reads them
    splits: dict = field(default_factory=lambda: {"train": "train", "val": "val", "test": "test"})
    urls: dict = field(default_factory=dict)  # role -> brace pattern / URL list, bypassing the manifest
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_len: int = 32
    image_size: int = 256
    batch_size: int = 32
    eval_batch_size: int | None = None  # default: batch_size
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = False  # endless random shards (needs epoch_samples with urls)
    epoch_samples: int | None = None  # samples per epoch; default: the manifest's count
    crop: str = "center"  # or "random"
    crop_scale: float = 0.8  # random crops take this..1 of the shorter side
    hflip: bool = False  # off: captions say 左/右
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown data config key(s) {sorted(unknown)}; known keys: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("tokenizer"), dict):
            d["tokenizer"] = TokenizerConfig(**d["tokenizer"])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"data.crop_scale must be in (0, 1], got {self.crop_scale}")
        for key in ("text_len", "image_size", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")

    @property
    def tokenizer_path(self) -> Path:
        if self.tokenizer.path:
            return Path(self.tokenizer.path)
        return self.root_dir() / "tokenizer.model"

    def root_dir(self) -> Path:
        if self.root is None:
            raise ValueError(f"data.root is not set for dataset {self.name!r}: set data.root=PATH (the converter's --out)")
        root = Path(self.root)
        if not root.is_dir():
            if self.source == "pretokenize":
                hint = (f"pre-tokenize image shards into it with `python -m t2i.pretokenize --data IMAGE_SHARDS "
                        f"--out {root} --vqgan CKPT`, or ")
            elif self.source:
                hint = f"convert it with `python -m t2i.data.convert {self.source} --src RAW --out {root}`, or "
            else:
                hint = ""
            raise FileNotFoundError(
                f"data.root={root} does not exist ({self.name}): {hint}set data.root=PATH or paths.data_dir=DIR")
        return root

    def manifest(self) -> dict:
        """The manifest.json of `root` (shard paths resolved)."""
        return read_manifest(self.root_dir())

    def kind(self) -> str:
        """What the shards hold, from the manifest: "image", or "codes" (pre-tokenized).

        Training straight from `data.urls` with no manifest under the root reads image shards.
        """
        if self.urls and (self.root is None or not (Path(self.root) / MANIFEST).is_file()):
            return "image"
        return self.manifest().get("kind", "image")

    def shards(self, role: str) -> list[Shard]:
        """Shards (with sample counts) for a role: from `urls` if given, else the manifest."""
        if self.urls.get(role):
            if not self.resampled or role != "train":
                raise ValueError(
                    f"data.urls.{role} has no per-shard counts: URL lists work for training with "
                    f"data.resampled=true and data.epoch_samples=N; give evaluation splits a manifest "
                    "(python -m t2i.data.convert img2dataset --reuse makes one)")
            if not self.epoch_samples:
                raise ValueError("data.urls.train needs data.epoch_samples=N (samples per epoch)")
            return [Shard(url, 0) for url in wds.shardlists.expand_urls(self.urls[role])]
        split = self.splits.get(role)
        if split is None:
            raise ValueError(f"dataset {self.name!r} has no {role} split (data.splits.{role} is null)")
        manifest = read_manifest(self.root_dir())
        if split not in manifest["splits"]:
            raise ValueError(f"data.splits.{role}={split!r} is not in {self.root}/manifest.json "
                             f"(it has: {', '.join(manifest['splits'])})")
        shards = [Shard(s["path"], s["samples"]) for s in manifest["splits"][split]["shards"]]
        if not shards:
            raise ValueError(f"split {split!r} of {self.root} has no samples")
        return shards

    def captions(self, role: str) -> Iterator[str]:
        """The captions of a role's shards, read without decoding images."""
        for shard in self.shards(role):
            for sample in complete_samples(shard.url):
                yield sample["txt"].decode("utf-8")


class ImageTextDecoder:
    """Raw webdataset sample -> {image, text, caption, key, meta}. Picklable for worker processes.

    `extra_sizes`: the image is also decoded at each of these sizes, as `image_<size>`. With centre crops
    and no flips these are exactly the images data.image_size=size gives; random crops and flips are
    drawn for each size apart (so they also move the draws of the samples after).
    """

    def __init__(self, tokenizer: FixedLengthTokenizer | None, image_size: int, crop: str = "center",
                 crop_scale: float = 0.8, hflip: bool = False, extra_sizes: tuple[int, ...] = ()):
        self.tokenizer = tokenizer
        self.image_size, self.crop, self.crop_scale, self.hflip = image_size, crop, crop_scale, hflip
        self.extra_sizes = extra_sizes

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError("sample has no image")
        caption = sample["txt"].decode("utf-8")
        out = {
            "image": decode_image(sample[ext], self.image_size, self.crop, self.crop_scale, self.hflip, rng),
            "caption": caption,
            "key": sample["__key__"],
            "meta": json.loads(sample["json"]) if "json" in sample else {},
        }
        for size in self.extra_sizes:
            out[f"image_{size}"] = decode_image(sample[ext], size, self.crop, self.crop_scale, self.hflip, rng)
        if self.tokenizer is not None:  # None: no token ids (ShardDataModule.use_tokenizer)
            out["text"] = self.tokenizer(caption)
        return out


class CodeTextDecoder:
    """Raw code-shard sample -> {codes, text, caption, key, meta}. Picklable for worker processes.

    `codes` is the long [h, w] grid of VQGAN code indices; its shape comes from the sample JSON's
    `codes_shape` (every code sample has a JSON). Shards pre-tokenized with `--superres-size` also give
    `hr_codes`, the same image's grid at the larger size (`hr_codes_shape`).
    """

    def __init__(self, tokenizer: FixedLengthTokenizer | None):
        self.tokenizer = tokenizer

    def __call__(self, sample: dict, rng: random.Random) -> dict:
        if "codes" not in sample or "json" not in sample:
            raise ValueError("sample has no code grid or no JSON (is this a code shard?)")
        meta = json.loads(sample["json"])
        caption = sample["txt"].decode("utf-8")
        out = {
            "codes": decode_codes(sample["codes"], meta["codes_shape"]),
            "caption": caption,
            "key": sample["__key__"],
            "meta": meta,
        }
        if self.tokenizer is not None:
            out["text"] = self.tokenizer(caption)
        if "hrcodes" in sample:
            out["hr_codes"] = decode_codes(sample["hrcodes"], meta["hr_codes_shape"])
        return out


def image_keys(batch: dict) -> list[str]:
    """The batch's pixel tensors: `image`, and `image_<size>` at the sizes of `decode_also_at`."""
    return [key for key in batch if key == "image" or key.startswith("image_")]


def collate_image_batch(samples: list[dict]) -> dict:
    batch = collate(samples)
    for key in image_keys(batch):
        batch[key] = batch[key].permute(0, 3, 1, 2)  # [B, 3, H, W] view of channels-last pixels
    return batch


class ShardDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig | dict):
        super().__init__()
        self.cfg = cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
        self.save_hyperparameters({"data": asdict(self.cfg)})
        self._tokenizer: FixedLengthTokenizer | None = None
        self._text_ids = True  # batches carry token ids ("text"); off for tasks that read only pixels or codes
        self._extra_sizes: tuple[int, ...] = ()  # image_<size> keys beside `image` (decode_also_at)
        self._train_loader: ResumableLoader | None = None  # the current epoch's
        self._resume_position: dict | None = None  # from a checkpoint, for the loader of its epoch

    @property
    def tokenizer(self) -> FixedLengthTokenizer:
        """The data's SentencePiece model (data.tokenizer.path), unless use_tokenizer gave another."""
        if self._tokenizer is None:
            self._tokenizer = TextTokenizer.from_file(self.cfg.tokenizer_path, self.cfg.text_len)
        return self._tokenizer

    def use_tokenizer(self, tokenizer: FixedLengthTokenizer | None) -> None:
        """Tokenize captions with a model's own tokenizer (fine-tuning or evaluating an existing checkpoint), or
        None: batches keep their captions but carry no token ids, and no tokenizer model is needed (tasks that
        read only the images or codes)."""
        self._tokenizer, self._text_ids = tokenizer, tokenizer is not None
        if tokenizer is not None:
            self.cfg.text_len = tokenizer.text_len

    def decode_also_at(self, sizes) -> None:
        """Image batches also carry `image_<size>` [B, 3, size, size] for each size (besides `image` at
        data.image_size): each decoded and resized from the stored image exactly as data.image_size=size
        would make it, so that one model can train on several sizes of the same data (VQGANStage's
        stage.image_sizes)."""
        sizes = [int(size) for size in sizes]
        if any(size < 1 for size in sizes):
            raise ValueError(f"image sizes must be >= 1, got {sizes}")
        self._extra_sizes = tuple(sorted(set(sizes) - {self.cfg.image_size}))

    def dataset(self, role: str, rank: int | None = None, world_size: int | None = None) -> ShardStream:
        """The stream for `role` (train/val/test); rank and world default to the trainer's."""
        if rank is None and self.trainer is not None:
            rank, world_size = self.trainer.global_rank, self.trainer.world_size
        cfg = self.cfg
        training = role == "train"
        tokenizer = self.tokenizer if self._text_ids else None
        if cfg.kind() == "codes":
            if cfg.hflip or cfg.crop != "center":
                raise ValueError(
                    f"{cfg.root} holds code shards: data.hflip and data.crop=random need images (flipped copies "
                    "are made when pre-tokenizing, with --hflip); set data.hflip=false data.crop=center")
            if self._extra_sizes:
                raise ValueError(f"{cfg.root} holds code shards: images at other sizes ({list(self._extra_sizes)}) "
                                 "need image shards (set data.root to the converter's --out)")
            decoder, collate_fn = CodeTextDecoder(tokenizer), collate
        else:
            decoder = ImageTextDecoder(tokenizer, cfg.image_size,
                                       crop=cfg.crop if training else "center", crop_scale=cfg.crop_scale,
                                       hflip=cfg.hflip and training, extra_sizes=self._extra_sizes)
            collate_fn = collate_image_batch
        mode = ("resampled" if cfg.resampled else "train") if training else "eval"
        return ShardStream(
            self.cfg.shards(role), decoder,
            batch_size=cfg.batch_size if training else (cfg.eval_batch_size or cfg.batch_size),
            mode=mode, shuffle_buffer=cfg.shuffle_buffer if training else 0, seed=cfg.seed,
            epoch_samples=cfg.epoch_samples if training else None, rank=rank, world_size=world_size,
            collate_fn=collate_fn,
        )

    def loader(self, role: str) -> DataLoader:
        """A loader for any role outside the Trainer's hooks (evaluation scripts)."""
        return self.loader_for(self.dataset(role))

    def loader_for(self, dataset: ShardStream, resumable: bool = False) -> DataLoader:
        """The loader (workers, pinning, prefetch) for any stream of this data, e.g. a cut of a split."""
        workers = self.cfg.num_workers
        # Lightning adds its worker seeding (seed_everything(workers=True)) only to loaders without a
        # worker_init_fn: composed here, by its own rule, with the one that ends orphaned workers
        seeding = pl_worker_init_function if int(os.environ.get("PL_SEED_WORKERS", 0)) else None
        options = {"num_workers": workers, "pin_memory": torch.cuda.is_available(),
                   "prefetch_factor": 4 if workers else None, "worker_init_fn": DieWithParent(seeding)}
        if resumable:  # its position in the epoch travels in checkpoints
            return ResumableLoader(dataset, **options)
        return DataLoader(dataset, batch_size=None, **options)

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        # Trainer(reload_dataloaders_every_n_epochs=1) calls this every epoch: a new shuffle
        # order per epoch, and the right one when a run resumes mid-training.
        if self.trainer is not None:
            dataset.set_epoch(self.trainer.current_epoch)
        if dataset.epoch == 0:
            log.info("train: %d batches per rank per epoch, %d samples left out to keep ranks equal",
                     len(dataset), dataset.left_out())
        self._train_loader = self.loader_for(dataset, resumable=True)
        if self._resume_position is not None and self._resume_position["epoch"] == dataset.epoch:
            self._train_loader.load_state_dict(self._resume_position)
            self._resume_position = None
        return self._train_loader

    # The train loader's position is kept here as well as by Lightning (which saves the states of
    # stateful train loaders): Lightning only hands a saved state to a loader it builds after
    # restoring the checkpoint, and `trainer.estimated_stepping_batches` (the GPT's LR schedule)
    # builds the first one before that (Lightning-AI/pytorch-lightning#20550).

    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        position = state_dict.get("train_loader")
        if position is None:
            return
        loader = self._train_loader
        if loader is not None and not loader.started and loader.dataset.epoch == position["epoch"]:
            loader.load_state_dict(position)
        else:
            self._resume_position = position

    def val_dataloader(self) -> DataLoader:
        return self.loader_for(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        return self.loader_for(self.dataset("test"))

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int = 0) -> dict:
        for key in image_keys(batch):  # code batches have no image
            if batch[key].dtype == torch.uint8:
                batch[key] = to_unit_range(batch[key])
        return batch
