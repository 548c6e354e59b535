"""DataLoader workers die with the process that started them: every loader the project builds (training,
validation, evaluation prompts) gets the worker_init_fn that asks Linux for it, composed with Lightning's
worker seeding. (A killed real run leaving no worker: tests/test_resume.py's GPT kill test.)"""

import ctypes
import os
import signal
import sys

import pytest
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, IterableDataset

from t2i.data.datamodule import ShardDataModule
from t2i.data.stream import DieWithParent
from t2i.eval.text_to_image import prompt_loader, select_prompts

PR_GET_PDEATHSIG = 2  # <linux/prctl.h>


def _datamodule(codes_root) -> ShardDataModule:
    return ShardDataModule({"name": "shapes_codes", "root": str(codes_root), "batch_size": 16, "num_workers": 2,
                            "splits": {"train": "train", "val": "val", "test": "val"}})


def test_every_loader_gets_the_worker_init_and_keeps_lightnings_seeding(codes_root, monkeypatch):
    monkeypatch.delenv("PL_SEED_WORKERS", raising=False)  # set by any in-process training run before
    dm = _datamodule(codes_root)
    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader(),
               "loader(val)": dm.loader("val"),
               "eval prompts": prompt_loader(dm, select_prompts(dm, "val", 4), batch_size=2)}
    for name, loader in loaders.items():
        assert isinstance(loader.worker_init_fn, DieWithParent), name
        assert loader.worker_init_fn.then is None, name
    monkeypatch.setenv("PL_SEED_WORKERS", "1")  # what seed_everything(workers=True) sets (train.py)
    assert dm.train_dataloader().worker_init_fn.then is pl_worker_init_function
    assert dm.val_dataloader().worker_init_fn.then is pl_worker_init_function


class _WorkerFacts(IterableDataset):
    """Yields, from inside the worker: its parent's pid, the signal the kernel sends it when that parent
    dies (prctl PR_GET_PDEATHSIG) and its torch seed (set by the composed worker_init_fn)."""

    def __iter__(self):
        value = ctypes.c_int(0)
        ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
        yield {"ppid": os.getppid(), "pdeathsig": value.value, "seed": torch.initial_seed()}


def _seed(worker_id: int) -> None:
    torch.manual_seed(1234 + worker_id)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_are_set_to_die_with_their_parent_and_run_the_composed_init():
    loader = DataLoader(_WorkerFacts(), batch_size=None, num_workers=1, worker_init_fn=DieWithParent(_seed))
    (facts,) = list(loader)
    assert facts == {"ppid": os.getpid(), "pdeathsig": signal.SIGKILL, "seed": 1234}
