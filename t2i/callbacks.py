"""Lightning callbacks the configs instantiate (conf/callbacks/)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


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
