"""Lightning callbacks the configs instantiate (conf/callbacks/): throughput and MFU, checkpoints and resumes,
SLURM's requeue signal; and the pieces train.py resumes runs with:
the atomic checkpoint writer and reader, `ckpt_path=last`, the W&B run id kept in checkpoints; and the Hydra callback
(conf/hydra/default.yaml) that checks a SLURM sweep's request before anything is submitted."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.experimental.callback import Callback as HydraCallback
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, Timer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig

from t2i.checkpoints import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)

WANDB_RUN_ID = "wandb_run_id"  # checkpoint key: the W&B run a resumed run continues


class TrainingThroughput(Callback):
    """Training speed as users compare it: samples/s, tokens/s, FLOP/s and MFU (model FLOPs utilisation:
    the model's FLOP/s over the device's peak), per device, in the logs, W&B and (MFU, tokens/s) the
    progress bar.

    Rates come from Lightning's `Throughput` (rolling averages over the last `window` batches) and the
    peak from Lightning's table of devices for the trainer's compute dtype (bf16 for bf16-mixed, ...);
    `peak_flops` gives it where the table has no entry (it names CUDA chips only, not every variant:
    a plain "NVIDIA H200", say) or to compare against another figure. Lightning's ThroughputMonitor
    wraps the same class but writes to the logger alone and cannot take a peak.
    The stage says what a batch is worth: `throughput_counts(batch) -> (samples, tokens, flops)` for
    this device. Time counts from the end of one training batch to the end of the next (data loading
    included), validation excluded.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None):
        if window < 2:
            raise ValueError(f"callbacks.throughput.window must be >= 2 batches, got {window}")
        self.window, self.peak_flops = window, peak_flops
        self._throughput: Throughput | None = None
        self._elapsed, self._last = 0.0, None
        self._samples = self._tokens = self._batches = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        peak = self.peak_flops
        if peak is None and trainer.strategy.root_device.type == "cuda":
            peak = get_available_flops(trainer.strategy.root_device, _compute_dtype(trainer))
        self._throughput = Throughput(available_flops=peak, world_size=trainer.world_size, window_size=self.window)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()  # the next batch's time starts after validation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # the batch's kernels, not only their launches
        now = time.perf_counter()
        self._elapsed += now - self._last
        self._last = now
        samples, tokens, flops = pl_module.throughput_counts(batch)
        self._samples, self._tokens, self._batches = self._samples + samples, self._tokens + tokens, self._batches + 1
        # all per device: Throughput multiplies the FLOPs by the world size itself (its global figure) and
        # divides them back for the device's FLOP/s and MFU
        self._throughput.update(time=self._elapsed, batches=self._batches, samples=self._samples,
                                lengths=self._tokens, flops=flops)
        metrics = self._throughput.compute()
        logged = {"train/samples_per_s": metrics.get("device/samples_per_sec"),
                  "train/tokens_per_s": metrics.get("device/items_per_sec"),
                  "train/flops_per_s": metrics.get("device/flops_per_sec")}
        pl_module.log_dict({k: v for k, v in logged.items() if v is not None}, rank_zero_only=True)
        if "device/items_per_sec" in metrics:
            pl_module.log("tok/s", metrics["device/items_per_sec"], prog_bar=True, logger=False, rank_zero_only=True)
        if "device/mfu" in metrics:
            pl_module.log("train/mfu", metrics["device/mfu"], prog_bar=True, rank_zero_only=True)


def _compute_dtype(trainer: L.Trainer) -> torch.dtype:
    """The dtype the matmuls run in under the trainer's precision: the peak MFU is measured against."""
    precision = str(trainer.precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


class LastCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` always holds the newest state of a run.

    Lightning's own `save_last` writes last.ckpt only together with another checkpoint (a validation
    that improved the monitored metric, every_n_train_steps, ...) and, at the end of training, only when
    it never wrote one: a run killed after a validation that did not improve, or one that reaches
    max_steps between two validations, would leave last.ckpt at an earlier step, and sampling or
    resuming from it would lose the steps after that. Here last.ckpt is written by this class, through
    Lightning's public `trainer.save_checkpoint`: after every validation, with every other checkpoint
    the callback writes, at the end of an epoch without validation, and at the end of training;
    never twice for one step. (`save_last="link"` writes a file too.)
    """

    def __init__(self, *args, save_last: bool | str | None = None, **kwargs):
        super().__init__(*args, save_last=False, **kwargs)  # last.ckpt is this class's
        self.keep_last = bool(save_last)
        self._last_step: int | None = None  # the global step last.ckpt holds, once this process wrote it
        self._saved_step: int | None = None  # the global step of the newest checkpoint written

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step  # every trainer.save_checkpoint: the top-k ones as well

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._saved_step == trainer.global_step:  # every_n_train_steps / train_time_interval saved
            self.save_last_checkpoint(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._saved_step == trainer.global_step:  # an epoch-end checkpoint (runs without validation)
            self.save_last_checkpoint(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.save_last_checkpoint(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.save_last_checkpoint(trainer)

    def save_last_checkpoint(self, trainer: L.Trainer) -> None:
        """Write last.ckpt unless it holds this step already (collective: every process calls it)."""
        if not self.keep_last or self._last_step == trainer.global_step or trainer.fast_dev_run \
                or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = {**trainer.callback_metrics, "epoch": torch.tensor(trainer.current_epoch),
                   "step": torch.tensor(trainer.global_step)}
        path = self.format_checkpoint_name(metrics, self.CHECKPOINT_NAME_LAST)
        previous, self.last_model_path = self.last_model_path, path  # set first: it is part of the saved state
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_step = trainer.global_step
        if previous and previous != path:  # a CHECKPOINT_NAME_LAST with a step in it
            trainer.strategy.remove_checkpoint(previous)


class ResumeState(Callback):
    """Keeps in checkpoints what an exact resume needs beyond Lightning's own state, and gives every
    process its own random streams.

    * The random generators (torch, CUDA, numpy, Python) of every process: dropout, conditioning
      dropout and pkeep draw from them. When training starts each process seeds them from (`seed`,
      its rank), so no two processes draw the same masks (train.py seeds all processes alike before,
      for identical initial weights). Each checkpoint keeps every process's states (gathered: only
      rank 0 writes), and a resumed run gives each process its own back, just before the first
      resumed step, so nothing the resumed run does while setting up shifts them. A checkpoint of
      fewer processes has no states for the others: those are seeded afresh.
    * The W&B run id, for train.py to continue that run (`saved_wandb_run_id`).
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed  # None: no seeding per process (the generators stay as they are)
        self._saved_rng: list[dict] | None = None

    def state_dict(self) -> dict:
        # called on every process while a checkpoint is assembled (trainer.save_checkpoint is collective)
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {"rng": gathered}
        return {"rng": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("rng")
        self._saved_rng = [saved] if isinstance(saved, dict) else saved  # a dict: rank 0's (older checkpoints)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank = trainer.global_rank
        if self._saved_rng is not None and rank < len(self._saved_rng):
            if len(self._saved_rng) != trainer.world_size and rank == 0:
                warnings.warn(f"the checkpoint holds the random states of {len(self._saved_rng)} processes, this run "
                              f"has {trainer.world_size}: the random streams do not continue exactly")
            set_rng_states(self._saved_rng[rank])
        elif self.seed is not None:
            seed_process(self.seed, rank)
        self._saved_rng = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:  # only rank 0 writes checkpoints, and only it has the W&B run
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    checkpoint[WANDB_RUN_ID] = logger.experiment.id


def process_seed(seed: int, rank: int) -> int:
    """A 32-bit seed for process `rank` of a run seeded with `seed`: different for every (seed, rank)
    pair (seed + rank would give rank 1 of seed 0 the streams of rank 0 of seed 1)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def seed_process(seed: int, rank: int) -> None:
    """Seed this process's torch (CPU and CUDA), numpy and Python generators for its rank."""
    value = process_seed(seed, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)  # every CUDA device too


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

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """The checkpoint a run resumes from, read weights-only whatever `weights_only` says (nothing in the
        file runs); a file t2i's train.py did not write, or cannot be read, is refused naming it."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        checkpoint = read_checkpoint(path, foreign_objects=False)
        missing = [key for key in ("state_dict", "t2i") if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{path} is not a checkpoint of a t2i training run (no {', '.join(missing)}: "
                                  "another project's, or weights only): resume only a run's own checkpoints; start "
                                  "from other weights with init_ckpt")
        return checkpoint


def last_checkpoint(callbacks: list[Callback]) -> str | None:
    """The file Lightning's `ckpt_path="last"` loads: the newest last*.ckpt in the folders of the
    ModelCheckpoint callbacks, or None."""
    found = []
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and Path(callback.dirpath).is_dir():
            found += [path for path in Path(callback.dirpath).glob("*" + callback.FILE_EXTENSION)
                      if path.stem.startswith(callback.CHECKPOINT_NAME_LAST)]
    return str(max(found, key=lambda path: path.stat().st_mtime)) if found else None


def fit_outcome(trainer: L.Trainer) -> dict:
    """How a finished `trainer.fit` ended: the steps done and, when it stopped before trainer.max_steps (or,
    with no step limit, before trainer.max_epochs), why, in words a user can act on."""
    steps, max_steps, epochs = trainer.global_step, trainer.max_steps, trainer.current_epoch
    timers = [callback for callback in trainer.callbacks if isinstance(callback, Timer)]
    remaining = timers[0].time_remaining() if timers else None
    if trainer.interrupted:
        reason = "interrupted"
    elif max_steps > 0 and steps >= max_steps:
        reason = None
    elif remaining is not None and remaining <= 0:
        reason = f"time limit reached (trainer.max_time, after {timers[0].time_elapsed():.0f} s of training)"
    elif any(callback.stopped_epoch > 0 for callback in trainer.callbacks if isinstance(callback, EarlyStopping)):
        reason = "early stopping"
    elif max_steps > 0 and trainer.max_epochs is not None and epochs >= trainer.max_epochs:
        reason = f"trainer.max_epochs={trainer.max_epochs} reached first"
    elif max_steps > 0:
        reason = "stopped before max_steps"
    else:
        reason = None  # an epoch-limited run that ran its epochs
    done = f"max_steps={max_steps} reached" if max_steps > 0 else f"max_epochs={trainer.max_epochs} reached"
    return {"steps": steps, "max_steps": max_steps, "epochs": epochs, "stopped_early": reason is not None,
            "reason": reason or done}


def hpc_checkpoint(folder: str | Path) -> str | None:
    """The hpc_ckpt_N.ckpt (highest N) that Lightning saves on SLURM's requeue signal and resumes from
    by itself when a requeued job starts with no ckpt_path; None when there is none."""
    found = [(int(path.stem.rsplit("_", 1)[1]), path) for path in Path(folder).glob("hpc_ckpt_*.ckpt")
             if path.stem.rsplit("_", 1)[1].isdigit()]
    return str(max(found)[1]) if found else None


class SlurmRequeue(Callback):
    """On SLURM's warning signal (sbatch --signal=SIGUSR1@300) save hpc_ckpt_N.ckpt and requeue the job, at the
    end of a training step, so the requeued job resumes to the weights of a run that was never stopped.

    Lightning's own handler saves inside the signal handler, wherever the step is: between the backward
    and the optimizer step, say, with the data loader one batch ahead of the weights, and the requeued
    job would skip or repeat a batch. This callback installs its handler before Lightning registers its
    own (Lightning then keeps it); the handler only notes the signal, and the end of the step saves
    through trainer.save_checkpoint (the atomic writer) and runs `scontrol requeue` as Lightning does.
    SLURM signals each task on its own: with several processes they agree (any signalled) at every step,
    so all save at the same one. A requeued job started without ckpt_path resumes from the highest
    hpc_ckpt_N.ckpt (Lightning). Active only when Lightning runs under SLURM with auto-requeue.
    """

    def __init__(self):
        self._signal: int | None = None
        self._previous_handler = None
        self._signalled = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if environment is None and SLURMEnvironment.detect():  # one device: no strategy environment
            environment = SLURMEnvironment()
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue \
                or environment.requeue_signal is None or threading.current_thread() is not threading.main_thread():
            return
        self._signal = environment.requeue_signal
        self._previous_handler = signal.signal(self._signal, self._note)

    def _note(self, signum, frame) -> None:
        self._signalled = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._signal is None:
            return
        signalled = trainer.strategy.reduce_boolean_decision(self._signalled, all=False)
        if not signalled:
            return
        self._signalled = False
        found = hpc_checkpoint(trainer.default_root_dir)
        number = int(Path(found).stem.rsplit("_", 1)[1]) + 1 if found else 1  # Lightning's numbering
        trainer.save_checkpoint(Path(trainer.default_root_dir) / f"hpc_ckpt_{number}.ckpt")
        if trainer.is_global_zero:
            requeue_slurm_job()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous_handler or signal.SIG_DFL)
            self._signal = None


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job (an array job's task: ARRAYJOB_TASK), as Lightning's handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.call(["scontrol", "requeue", job])
    except FileNotFoundError:
        result = None
    if result == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("could not requeue SLURM job %s (scontrol %s): resubmit it by hand; it resumes from its "
                    "hpc checkpoint", job, "not found" if result is None else f"exit status {result}")


def saved_wandb_run_id(path: str | Path) -> str | None:
    """The W&B run id ResumeState kept in a checkpoint (None: another logger, or an older checkpoint)."""
    # weights-only, as Lightning reads it next; mmap: the small entries are read without loading the weights
    return read_checkpoint(path, mmap=True, foreign_objects=False).get(WANDB_RUN_ID)


class SlurmRequestCheck(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml): before a sweep submits anything through
    hydra/launcher=slurm, refuse a request SLURM cannot take.

    The launcher asks for trainer.devices tasks and GPUs per node; trainer=ddp says devices=-1 ("every
    GPU of this machine"), which the submitting machine cannot know for the compute nodes. The sweep
    stops with a message naming the setting, before the launcher submits anything.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        launcher = config.hydra.get("launcher")
        if launcher is None or not str(launcher.get("_target_", "")).endswith("SlurmLauncher"):
            return
        for key, setting in (("nodes", "trainer.num_nodes"), ("tasks_per_node", "trainer.devices"),
                             ("gpus_per_node", "trainer.devices")):
            value = launcher.get(key)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                # SystemExit: Hydra turns a callback's exceptions into warnings and would submit anyway
                raise SystemExit(
                    f"error: hydra/launcher=slurm would ask SLURM for {key}={value} ({setting}={value}): set {setting} "
                    f"to the count per node, e.g. trainer.devices=8 for nodes of 8 GPUs (one task per GPU; devices=-1 "
                    f"means every GPU of the machine it runs on, which the sweep cannot know when it submits), or "
                    f"set hydra.launcher.{key} yourself")
