"""What one optimizer step sees across all processes: the batch, the learning rate that follows
from it and its schedule over the run, the parameter groups and the gradient norm."""

from __future__ import annotations

import math
from typing import Iterable

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

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


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int | None, min_ratio: float) -> float:
    """The lr multiplier at optimizer step `step` (from 0): the one schedule of both stages.

    Linear warmup ((step + 1) / warmup_steps) over the first `warmup_steps` steps, then a cosine from 1
    down to `min_ratio` at step `decay_steps` (counted from the start, warmup included), `min_ratio`
    after it. `decay_steps` 0 or None: constant 1 after the warmup (taming's VQGAN).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not decay_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_steps(trainer: L.Trainer, constant: str) -> int:
    """The optimizer steps this run takes (trainer.max_steps, or max_epochs x batches per epoch): the
    length of a schedule that decays over the run.

    A run bounded by time alone (trainer.max_time with max_steps=-1 and max_epochs=null, or
    max_epochs=-1) has no length in steps: Lightning's estimate is infinite, and a cosine over it
    would never decay. That is an error naming what to set; `constant` names the setting that keeps
    the lr constant after the warmup instead.
    """
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:
        raise ValueError(
            f"the learning rate decays over the whole run, but this run has no length in optimizer steps "
            f"(trainer.max_steps={trainer.max_steps}, max_epochs={trainer.max_epochs}: bounded by trainer.max_time "
            f"alone, or without end): set trainer.max_steps=N (the schedule's length; max_time still stops the run "
            f"when it comes first), or {constant} for a constant lr after the warmup")
    return int(total)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on the weights of linear layers (the matrices), none on
    biases, norms, embeddings (a linear layer sharing an embedding's weight counts as the embedding)
    or other parameters such as position tables; frozen parameters in neither.

    Decided by module type, not by shape: Lightning's FSDP strategy builds the optimizer after wrapping,
    when every parameter is a flat 1-D shard; its modules keep their parameters (use_orig_params=True,
    Lightning's default), so the layer a shard belongs to is still known.
    """
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    matrices = {id(module.weight) for module in model.modules()
                if isinstance(module, nn.Linear) and id(module.weight) not in embeddings}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # frozen weights (a LoRA run's base) are not the optimizer's
            (decay if id(p) in matrices else no_decay).append(p)
    if matrices and not decay:
        raise ValueError("the optimizer sees none of the model's own parameters (FSDP with use_orig_params=False "
                         "hands it flat parameters that mix weights, biases and norms): keep use_orig_params=True, "
                         "Lightning's default, in the FSDP strategy")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def grad_norm(parameters: Iterable[nn.Parameter], root: nn.Module | None = None) -> torch.Tensor:
    """The 2-norm of the gradients of `parameters`, over all processes.

    `root`: the module the strategy trains (trainer.model). Under FSDP each process holds a shard of
    every gradient, so the norm is FSDP's own (a collective over the shards, which also counts replicated
    parameters once); `parameters` is then ignored. Otherwise (one process, DDP: whole gradients, the
    same on every process) the norm of the local gradients.
    """
    if isinstance(root, FullyShardedDataParallel):
        # max_norm=inf: measures without clipping (the gradients are multiplied by 1)
        return root.clip_grad_norm_(math.inf)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
