"""Train one stage of the pipeline: python train.py [stage=<gpt|tokenizer|vqgan>] data=<name> [key=value ...]

The GPT is the default stage: python train.py model=large data=muge trainer.devices=8 trains the large
GPT on MUGE's code shards over 8 GPUs. The plan it resolved (t2i.plan) is printed before it starts.
"""

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from t2i.callbacks import AtomicCheckpointIO, fit_outcome, hpc_checkpoint, last_checkpoint, saved_wandb_run_id
from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.data.tokenizer import fit_tokenizer
from t2i.command_line import check_command_line
from t2i.extras import require_logger
from t2i.plan import resolve_run, run_plan
from t2i.precision import set_matmul_precision
from t2i.stages.gpt_stage import GPTStage
from t2i.stages.vqgan_stage import VQGANStage

log = logging.getLogger("train")

LIGHTNING_STAGES = {"vqgan": VQGANStage, "gpt": GPTStage}


def train_tokenizer(cfg: DictConfig) -> dict:
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    if data.tokenizer_path.exists() and not cfg.stage.overwrite:
        raise FileExistsError(f"{data.tokenizer_path} exists (models and code shards of data={data.name} may use it): "
                              "kept. To replace it, add stage.overwrite=true; to train another one, set "
                              "data.tokenizer.path=NEW_PATH")
    stats = fit_tokenizer(
        data.captions("train"), data.tokenizer_path, data.tokenizer.vocab_size, data.tokenizer.model_type,
        text_len=data.text_len, character_coverage=cfg.stage.character_coverage,
        max_sentences=cfg.stage.max_sentences, seed=cfg.seed,
    )
    log.info("tokenizer: %s", json.dumps(stats, ensure_ascii=False))
    return stats


def make_logger(cfg: DictConfig, ckpt_path: str | None):
    """The configured logger, or False; a resumed W&B run continues the run its checkpoint names
    (unless logger.id names one)."""
    if not cfg.logger:
        return False
    resume = {}
    if ckpt_path and Path(ckpt_path).is_file() and cfg.logger._target_.endswith("WandbLogger") \
            and not cfg.logger.get("id"):
        run_id = saved_wandb_run_id(ckpt_path)
        if run_id:
            log.info("continuing W&B run %s", run_id)
            resume = {"id": run_id, "resume": "allow"}
    return instantiate(cfg.logger, **resume)


def refuse_local_processes_in_multirun(trainer: L.Trainer) -> None:
    """Stop a Hydra multirun (-m) job that would start this machine's other processes itself.

    Lightning starts them by running the command line again, -m and the whole sweep included, so
    every one of them would run every job of the sweep (Lightning-AI/pytorch-lightning#18175).
    Processes started by SLURM (hydra/launcher=slurm) or torchrun are fine.
    """
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
        return
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_devices > 1 and environment is not None and not environment.creates_processes_externally:
        raise RuntimeError(
            f"a multirun (-m) job with trainer.devices={trainer.num_devices} local processes: Lightning would start "
            f"the other {trainer.num_devices - 1} by running this command again, -m included, and each of them would "
            "run the whole sweep (Lightning-AI/pytorch-lightning#18175). Sweep with hydra/launcher=slurm (SLURM starts "
            "each job's processes: pip install -e '.[sweeps]'), or run the jobs one at a time without -m "
            "(python train.py <overrides> trainer.devices=N, or under torchrun), or sweep with trainer.devices=1")


def train_lightning_stage(cfg: DictConfig) -> dict:
    devices = resolve_run(cfg)  # devices checked, precision and the GPT's shards chosen: before anything is built
    require_logger(cfg.logger)
    options = instantiate(cfg.trainer, _convert_="all")  # presets may hold objects (the fsdp strategy)
    # the same seed in every process: the same initial weights (FSDP shards them without a broadcast);
    # ResumeState seeds each process for its rank when training starts
    L.seed_everything(cfg.seed, workers=True)
    datamodule = ShardDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    stage = LIGHTNING_STAGES[cfg.stage.name].from_config(cfg, datamodule)
    plan = run_plan(cfg, options, devices, stage)
    if rank_zero_only.rank == 0:  # set from the launcher's environment, as Lightning's own rank-zero logging
        log.info("the plan:\n  %s", "\n  ".join(plan.lines()))
        plan.save(options["default_root_dir"])
    if cfg.dry_run:
        return {}
    callbacks = [instantiate(callback) for callback in cfg.callbacks.values()]
    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":  # resolved here (as Lightning would) so the W&B run id comes from the same file
        ckpt_path = last_checkpoint(callbacks)
        if ckpt_path is None:
            log.warning("ckpt_path=last: no last.ckpt in this run dir, training from scratch "
                        "(resume a run in its own dir: hydra.run.dir=<its run dir>)")
    resumed_from = ckpt_path
    if ckpt_path is None and SLURMEnvironment.detect():  # a requeued job: Lightning resumes from hpc_ckpt_N.ckpt
        resumed_from = hpc_checkpoint(options["default_root_dir"])
    logger = make_logger(cfg, resumed_from)
    trainer = L.Trainer(**options, logger=logger, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()])  # a killed run never leaves a truncated checkpoint
    refuse_local_processes_in_multirun(trainer)  # before anything is logged or trained
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the resolved config (W&B: the run config)
        logger.log_hyperparams({f"plan/{key}": value for key, value in asdict(plan).items()})
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path)
    if isinstance(logger, WandbLogger):  # the next job of a multirun (same process) must start its own run
        logger.experiment.finish()
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    log.info("final metrics: %s", json.dumps(metrics))
    report_outcome(trainer, metrics)
    return metrics


def report_outcome(trainer: L.Trainer, metrics: dict) -> None:
    """Say how the run ended (a warning when it stopped before its steps: that model is not the recipe's)
    and keep it, with the final metrics, in <run dir>/fit.json for scripts (the quickstart's summary)."""
    outcome = fit_outcome(trainer)
    if outcome["stopped_early"]:
        log.warning("training stopped early, at step %d of trainer.max_steps=%d: %s", outcome["steps"],
                    outcome["max_steps"], outcome["reason"])
    else:
        log.info("training ran to the end: step %d, %s", outcome["steps"], outcome["reason"])
    if trainer.is_global_zero:
        Path(trainer.default_root_dir, "fit.json").write_text(json.dumps({**outcome, "metrics": metrics}, indent=1))


def objective(cfg: DictConfig, metrics: dict) -> float | None:
    """The value a sweeper minimises or maximises (`optimized_metric`, e.g. val/loss)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name} was not logged; logged: {', '.join(sorted(metrics))}")
    return metrics[name]


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    set_matmul_precision(cfg.matmul_precision)
    if cfg.stage.name == "tokenizer":
        return train_tokenizer(cfg)
    metrics = train_lightning_stage(cfg)
    value = objective(cfg, metrics)
    return metrics if value is None else value


if __name__ == "__main__":
    check_command_line("train", sys.argv[1:])  # renamed settings and sweep plugins, before Hydra composes
    main()
