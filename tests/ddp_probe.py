"""A callback the DDP tests add to train.py (`+callbacks.probe._target_=ddp_probe.RankProbe`): each
rank writes what it saw to <run dir>/probe-rank<N>.json for the test to compare across ranks."""

import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    def __init__(self):
        self.keys: dict[int, list[str]] = {}  # epoch -> sample keys of this rank's training batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys.setdefault(trainer.current_epoch, []).extend(batch["key"])

    def on_train_end(self, trainer, pl_module):
        params = torch.cat([p.detach().flatten().double() for p in pl_module.parameters()])
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
            "keys": self.keys, "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "param_sum": float(params.sum()), "param_abs_sum": float(params.abs().sum()),
        }
        Path(trainer.default_root_dir, f"probe-rank{trainer.global_rank}.json").write_text(json.dumps(record))
