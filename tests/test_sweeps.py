"""Hydra multirun: a grid of jobs with their own run dirs and W&B runs (grouped), the Optuna search
returning the validation metric, and the SLURM launcher config composing with the trainer."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from wandb_reader import read_records

REPO = Path(__file__).parents[1]


def _tiny_gpt(codes_root) -> list[str]:
    return ["stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data=shapes_codes",
            f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=0", "trainer=cpu",
            "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "stage.sample_every_n_steps=0"]


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_multirun_jobs_get_their_own_dirs_and_grouped_wandb_runs(codes_root, tmp_path):
    _run(["-m", *_tiny_gpt(codes_root), "optim.lr=1e-3,2e-3", "logger=wandb", "logger.offline=true",
          "task_name=lr_sweep", f"hydra.sweep.dir={tmp_path}"], env={"WANDB_SILENT": "true", "WANDB_MODE": "offline"})
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs, run_ids = [], []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        lrs.append(yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optim"]["lr"])
        (run_dir,) = job.glob("wandb/offline-run-*")
        run_ids.append(run_dir.name.rsplit("-", 1)[1])
        (run_file,) = run_dir.glob("run-*.wandb")
        runs = [r.run for r in read_records(run_file) if r.HasField("run")]
        assert runs[0].run_group == "lr_sweep"
    assert lrs == [1e-3, 2e-3]
    assert len(set(run_ids)) == 2  # one W&B run per job, not one run reused


@pytest.mark.slow
def test_optuna_search_minimises_the_returned_validation_loss(codes_root, tmp_path):
    _run(["-m", "hparams_search=gpt_optuna", *_tiny_gpt(codes_root), "hydra.sweeper.n_trials=2",
          "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={tmp_path}"])
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.lr", "stage.warmup_steps", "stage.cond_drop"}
    trials = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(trials) == 2
    assert 0 < results["best_value"] < 20  # a cross-entropy (val/loss), not a placeholder


def test_slurm_launcher_config_follows_the_trainer():
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=multi_node", "trainer.num_nodes=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    # one task per GPU on every node: what Lightning's SLURM environment expects
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (4, 8, 8)
    assert cfg.trainer.strategy == "ddp"
    instantiate(cfg.hydra.callbacks.slurm_request).on_multirun_start(config=cfg)  # a request SLURM can take


def test_slurm_sweep_refuses_all_gpus_before_submitting(tmp_path):
    # trainer=ddp means every GPU of the machine (devices=-1): SLURM would be asked for -1 GPUs per node
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp"], return_hydra_config=True)
    with pytest.raises(SystemExit, match=r"tasks_per_node=-1 \(trainer.devices=-1\): set trainer.devices to the count "
                                         r"per node, e.g. trainer.devices=8"):
        instantiate(cfg.hydra.callbacks.slurm_request).on_multirun_start(config=cfg)
    # train.py: refused before the launcher submits anything
    result = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=slurm", "trainer=ddp",
                             f"hydra.sweep.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "set trainer.devices to the count per node" in result.stderr
    assert not (tmp_path / ".submitit").exists()
