"""A callback the per-process random state tests add to train.py (`+callbacks.rng_probe._target_=rng_probe.RngProbe`):
each rank writes, for every training step, digests of its torch, numpy and Python random states as the step
starts (reading them draws nothing) to <run dir>/rng-rank<N>.json."""

import hashlib
import json
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch


def digests() -> dict:
    return {"torch": hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16],
            "numpy": hashlib.sha1(np.random.get_state()[1].tobytes()).hexdigest()[:16] + f"@{np.random.get_state()[2]}",
            "python": hashlib.sha1(repr(random.getstate()).encode()).hexdigest()[:16]}


class RngProbe(L.Callback):
    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps[trainer.global_step] = digests()

    def on_train_end(self, trainer, pl_module):
        Path(trainer.default_root_dir, f"rng-rank{trainer.global_rank}.json").write_text(json.dumps(self.steps))
