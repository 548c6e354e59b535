"""Lightning callbacks the configs instantiate (conf/callbacks/), and the pieces train.py resumes runs with:
the atomic checkpoint writer, `ckpt_path=last`, the W&B run id kept in checkpoints."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

WANDB_RUN_ID = "wandb_run_id"  # checkpoint key: the W&B run a resumed run continues


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the final state of a run.

    Lightning writes last.ckpt after each validation and, at the end of training, only when no
    last.ckpt was written before: a run that reaches max_steps between two validations would end
    with last.ckpt at the earlier validation, and sampling or resuming from it would lose the steps
    after that.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and trainer.global_step != self._last_global_step_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class ResumeState(Callback):
    """Keeps in checkpoints what an exact resume needs beyond Lightning's own state.

    * The random generators (torch, CUDA, numpy, Python): dropout and conditioning dropout draw
      from torch's global generator. They are put back when training starts, just before the
      first resumed step, so nothing the resumed run does while setting up (building the model,
      the loaders) shifts them. Rank 0's states are saved and every rank gets them back; train.py
      seeds all ranks alike, so their states do not differ anyway.
    * The W&B run id, for train.py to continue that run (`saved_wandb_run_id`).
    """

    def __init__(self):
        self._saved_rng: dict | None = None

    def state_dict(self) -> dict:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._saved_rng = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._saved_rng is not None:
            set_rng_states(self._saved_rng)
            self._saved_rng = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:  # only rank 0 writes checkpoints, and only it has the W&B run
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    checkpoint[WANDB_RUN_ID] = logger.experiment.id


def rng_states() -> dict:
    """The global random states, as tensors and plain values (checkpoints stay loadable with weights_only=True)."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that never leaves a half-written checkpoint behind.

    The checkpoint is written to a hidden file beside the target, flushed to the disk, and only
    then renamed onto the target (os.replace is atomic within a filesystem): a process killed
    mid-write leaves the previous last.ckpt whole. Remote paths (s3://...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # not named *.ckpt: `ckpt_path=last` never picks the leftover of a killed process
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if os.name == "posix":  # make the rename itself durable
            folder = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def last_checkpoint(callbacks: list[Callback]) -> str | None:
    """The file Lightning's `ckpt_path="last"` loads: the newest last*.ckpt in the folders of the
    ModelCheckpoint callbacks, or None."""
    found = []
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
            found += [path for path in Path(callback.dirpath).glob("*" + callback.FILE_EXTENSION)
                      if path.stem.startswith(callback.CHECKPOINT_NAME_LAST)]
    return str(max(found, key=lambda path: path.stat().st_mtime)) if found else None


def hpc_checkpoint(folder: str | Path) -> str | None:
    """The hpc_ckpt_N.ckpt (highest N) that Lightning saves on SLURM's requeue signal and resumes from
    by itself when a requeued job starts with no ckpt_path; None when there is none."""
    found = [(int(path.stem.rsplit("_", 1)[1]), path) for path in Path(folder).glob("hpc_ckpt_*.ckpt")
             if path.stem.rsplit("_", 1)[1].isdigit()]
    return str(max(found)[1]) if found else None


def saved_wandb_run_id(path: str | Path) -> str | None:
    """The W&B run id ResumeState kept in a checkpoint (None: another logger, or an older checkpoint)."""
    # mmap: the small entries are read without loading the weights
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get(WANDB_RUN_ID)
