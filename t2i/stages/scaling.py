"""What one optimizer step sees across all processes: the batch, the learning rate that follows
from it, and the throughput."""

from __future__ import annotations

import math
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

LR_SCALING = ("none", "linear", "sqrt")


def effective_batch_size(trainer: L.Trainer, batch_size: int) -> int:
    """Samples per optimizer step: per-device batch x accumulated batches x processes."""
    return batch_size * trainer.accumulate_grad_batches * trainer.world_size


def scaled_lr(lr: float, effective_batch: int, rule: str, reference_batch: int) -> float:
    """`lr` as given (rule "none"), or scaled by (effective / reference batch), or by its square root.

    taming's VQGAN recipe is "linear" with reference 1 (4.5e-6 x batch x GPUs); GPT recipes state
    the lr for a reference batch and scale linearly or by the square root (Adam) from there.
    """
    if rule not in LR_SCALING:
        raise ValueError(f"stage.lr_scaling must be one of {LR_SCALING}, got {rule!r}")
    if rule == "none":
        return lr
    if reference_batch < 1:
        raise ValueError(f"stage.lr_reference_batch must be >= 1, got {reference_batch}")
    ratio = effective_batch / reference_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def apply_lr_scaling(stage: L.LightningModule, optimizers: list, rule: str, reference_batch: int,
                     tokens_per_sample: int | None = None) -> None:
    """Set every param group's lr from the optimizers' configured lr, then print and log the run's scale.

    Called from configure_optimizers, when the trainer knows its processes. The batch size per
    device is the datamodule's (`data.batch_size`).
    """
    trainer = stage.trainer
    datamodule = trainer.datamodule
    if datamodule is None:
        if rule != "none":
            raise ValueError(f"stage.lr_scaling={rule} needs the batch size: fit with a ShardDataModule")
        return
    batch_size = datamodule.cfg.batch_size
    batch = effective_batch_size(trainer, batch_size)
    base_lr = optimizers[0].defaults["lr"]
    lr = scaled_lr(base_lr, batch, rule, reference_batch)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * lr / base_lr
    facts = {"run/world_size": trainer.world_size, "run/batch_per_device": batch_size,
             "run/accumulate_grad_batches": trainer.accumulate_grad_batches, "run/effective_batch_size": batch,
             "run/lr_scaling": rule, "run/base_lr": base_lr, "run/lr": lr}
    line = (f"effective batch {batch} = {batch_size} per device x {trainer.accumulate_grad_batches} accumulated x "
            f"{trainer.world_size} processes; lr {lr:.3g} (stage.lr_scaling={rule}, optim.lr={base_lr:.3g})")
    if tokens_per_sample:
        facts["run/tokens_per_step"] = batch * tokens_per_sample
        line += f"; {batch * tokens_per_sample:,} tokens per optimizer step"
    rank_zero_info(line)
    if stage.logger is not None:
        stage.logger.log_hyperparams(facts)


class StepClock:
    """Seconds since the previous tick (None at the first): a step's wall time for throughput logs."""

    def __init__(self):
        self._last: float | None = None

    def tick(self) -> float | None:
        now = time.perf_counter()
        last, self._last = self._last, now
        return None if last is None else now - last
