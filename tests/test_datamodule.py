"""The streaming DataModule: exact DDP plans over real shards, decoding, resuming mid-epoch, errors."""

import collections
import itertools
import unicodedata

import numpy as np
import pytest
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.data.shards import ImageOptions, Row, write_manifest, write_split
from t2i.data.stream import ResumableLoader, delivered_per_worker
from t2i.data.tokenizer import train_sentencepiece

N_TRAIN, N_VAL, SHARD = 203, 37, 13
COLOURS = ["红色", "绿色", "蓝色", "黄色"]


def _rows(n, split):
    rng = np.random.default_rng(0 if split == "train" else 1)
    for i in range(n):
        pixels = rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)
        yield Row(f"{split}-{i}", f"第{i}张图，{COLOURS[i % 4]}的画面", pixels, {"index": i})


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream")
    opts = ImageOptions(size=32, format="png", min_size=0)
    splits = {split: write_split(_rows(n, split), out, split, opts, source="test", shard_size=SHARD, progress=False)
              for split, n in (("train", N_TRAIN), ("val", N_VAL))}
    write_manifest(out, splits, source="test")
    captions = [f"第{i}张图，{c}的画面" for i in range(N_TRAIN) for c in COLOURS[:1]]
    (out / "tokenizer.model").write_bytes(train_sentencepiece(captions, 400))
    return out


def _module(root, **overrides):
    cfg = dict(name="test", root=str(root), image_size=32, batch_size=8, num_workers=2, shuffle_buffer=50,
               splits={"train": "train", "val": "val", "test": None})
    cfg.update(overrides)
    return ShardDataModule(cfg)


def _epoch(dm, role, rank, world, epoch=0):
    dataset = dm.dataset(role, rank=rank, world_size=world)
    dataset.set_epoch(epoch)
    batches = list(DataLoader(dataset, batch_size=None, num_workers=dm.cfg.num_workers))
    assert len(batches) == len(dataset)
    return batches


def _indices(batches):
    return [m["index"] for b in batches for m in b["meta"]]


def test_finite_epoch_two_ranks_two_workers(dataset_dir):
    dm = _module(dataset_dir)
    world, global_batch = 2, 16
    per_rank = [_epoch(dm, "train", rank, world) for rank in range(world)]
    assert len(per_rank[0]) == len(per_rank[1]) == N_TRAIN // global_batch
    seen = _indices(per_rank[0]) + _indices(per_rank[1])
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    left_out = N_TRAIN - len(seen)
    assert 0 <= left_out < global_batch
    assert dm.dataset("train", rank=0, world_size=world).left_out() == left_out
    batch = per_rank[0][0]
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.uint8
    pixels = batch["image"].clone()
    images = dm.on_after_batch_transfer(batch)["image"]  # what Lightning hands the model
    assert images.dtype == torch.float32 and -1.0 <= images.min() and images.max() <= 1.0
    assert torch.allclose((images + 1) * 127.5, pixels.float(), atol=1e-4)
    assert batch["text"].shape == (8, 32) and batch["text"].dtype == torch.long
    # the text ids decode back to the captions (NFKC folds the full-width comma)
    tokenizer = dm.tokenizer
    assert [tokenizer.decode(t) for t in batch["text"]] == [unicodedata.normalize("NFKC", c) for c in batch["caption"]]


def test_epochs_shuffle_differently_and_deterministically(dataset_dir):
    dm = _module(dataset_dir)
    first = _indices(_epoch(dm, "train", 0, 2, epoch=0))
    again = _indices(_epoch(dm, "train", 0, 2, epoch=0))
    second = _indices(_epoch(dm, "train", 0, 2, epoch=1))
    assert first == again
    assert first != second


def test_resampled_equal_batches_per_rank(dataset_dir):
    dm = _module(dataset_dir, resampled=True, epoch_samples=150)
    counts = [len(_epoch(dm, "train", rank, 2)) for rank in range(2)]
    assert counts == [150 // 16, 150 // 16]


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 2)])
def test_eval_reads_every_sample_once(dataset_dir, world, workers):
    dm = _module(dataset_dir, num_workers=workers, eval_batch_size=5)
    seen = [i for rank in range(world) for i in _indices(_epoch(dm, "val", rank, world))]
    assert sorted(seen) == list(range(N_VAL))


def test_shards_readable_with_plain_webdataset(dataset_dir):
    urls = sorted(str(p) for p in dataset_dir.glob("val-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == N_VAL
    assert all("." not in s["__key__"] for s in samples)
    assert samples[0]["png"].size == (32, 32)
    assert samples[0]["json"]["caption"] == samples[0]["txt"]


def test_corrupt_sample_is_skipped_and_batches_stay_equal(dataset_dir, tmp_path):
    import shutil
    import tarfile, io
    root = tmp_path / "corrupt"
    shutil.copytree(dataset_dir, root)
    # replace one image in the first train shard with garbage bytes
    shard = root / "train-00000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith("0003.png"):
                data = b"not an image"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    dm = _module(root, num_workers=0)
    with pytest.warns(UserWarning, match="corrupt sample"), pytest.warns(UserWarning, match="padded 1 samples"):
        per_rank = [_epoch(dm, "train", rank, 2) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == N_TRAIN // 16


def test_missing_root_names_the_key(tmp_path):
    dm = ShardDataModule({"name": "muge", "source": "muge", "root": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match=r"data\.root=.*convert muge"):
        dm.dataset("train", rank=0, world_size=1)


def test_unknown_key_and_bad_values_are_named():
    with pytest.raises(ValueError, match="batchsize"):
        DataConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="data.crop"):
        DataConfig.from_dict({"crop": "left"})


def test_random_crop_and_flip_change_pixels_but_not_shape(dataset_dir):
    dm = _module(dataset_dir, crop="random", crop_scale=0.5, hflip=True, num_workers=0)
    centre = _module(dataset_dir, num_workers=0)
    a = _epoch(dm, "train", 0, 1)[0]
    b = _epoch(centre, "train", 0, 1)[0]
    assert a["image"].shape == b["image"].shape
    assert a["key"] == b["key"]
    assert not torch.equal(a["image"], b["image"])


def test_real_trainer_gets_float_images_and_new_order_each_epoch(dataset_dir, tmp_path):
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.keys = collections.defaultdict(list)

        def training_step(self, batch, batch_idx):
            assert batch["image"].dtype == torch.float32 and batch["image"].min() >= -1
            self.keys[self.current_epoch] += batch["key"]
            return (self.weight * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = _module(dataset_dir, num_workers=1)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
                        default_root_dir=tmp_path)
    trainer.fit(probe, datamodule=dm)
    assert len(probe.keys[0]) == len(probe.keys[1]) == (N_TRAIN // 8) * 8
    assert probe.keys[0] != probe.keys[1]  # the epoch reached the stream: a new order
    assert len(set(probe.keys[0])) == len(probe.keys[0])


def test_finite_epoch_longer_than_the_split_is_refused(dataset_dir):
    with pytest.raises(ValueError, match="data.epoch_samples"):
        _module(dataset_dir, epoch_samples=N_TRAIN + 1).dataset("train", rank=0, world_size=1)


def test_delivered_per_worker_follows_the_loader_turns():
    assert delivered_per_worker([12, 13], 0) == ([0, 0], 0)
    assert delivered_per_worker([12, 13], 5) == ([3, 2], 1)
    assert delivered_per_worker([12, 13], 24) == ([12, 12], 0)
    assert delivered_per_worker([1, 2, 2], 4) == ([1, 2, 1], 2)  # worker 0 ran out after the first turn
    assert delivered_per_worker([3], 99) == ([3], 0)


def _counting(decode, keys: list):
    """`decode` that also notes the key of every sample it decodes."""
    def counted(sample, rng):
        keys.append(sample["__key__"])
        return decode(sample, rng)
    return counted


@pytest.mark.parametrize("mode, workers", [("train", 0), ("train", 2), ("resampled", 2)])
def test_resumed_loader_yields_the_rest_of_the_epoch(dataset_dir, mode, workers):
    options = {"num_workers": workers, "crop": "random", "crop_scale": 0.5, "hflip": True}  # augmentation must match
    if mode == "resampled":
        options.update(resampled=True, epoch_samples=140)  # 17 batches: 8 + 9 over two workers
    dm = _module(dataset_dir, **options)

    def loader():
        dataset = dm.dataset("train", rank=0, world_size=1)
        dataset.set_epoch(1)
        return ResumableLoader(dataset, num_workers=workers)

    full = list(loader())
    assert len(full) == (N_TRAIN // 8 if mode == "train" else 140 // 8)  # 12 + 13 batches over two workers

    interrupted = loader()
    head = list(itertools.islice(iter(interrupted), 5))
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 5, "workers": workers} and [b["key"] for b in head] == [b["key"] for b in full[:5]]
    del head, interrupted

    for skip in (5, len(full) - 1):  # mid-turn, and only the longer worker's last batch left
        resumed = loader()
        resumed.load_state_dict({**state, "batches": skip})
        decoded = []
        if workers == 0:  # skipped samples are never decoded
            resumed.dataset.decode = _counting(resumed.dataset.decode, decoded)
        tail = list(resumed)
        assert [b["key"] for b in tail] == [b["key"] for b in full[skip:]]
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, full[skip:]))
        assert resumed.state_dict()["batches"] == len(full)
        if workers == 0:
            assert len(decoded) == (len(full) - skip) * 8

    other_epoch = loader()
    other_epoch.load_state_dict({**state, "epoch": 0})  # a position from another epoch is ignored
    assert len(list(other_epoch)) == len(full)
