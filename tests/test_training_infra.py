"""Training infrastructure: the one LR schedule of both stages and the length it needs, weight-decay groups
and the gradient norm under FSDP (2 processes over gloo), sample grids under gradient accumulation,
every process's own random streams under DDP and their resume, last.ckpt after every validation, and the
multirun guard."""

import copy
import importlib.util
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from t2i import callbacks
from t2i.callbacks import process_seed
from t2i.models.gpt import GPT, GPTConfig
from t2i.stages.configs import GPTStageConfig
from t2i.stages.gpt_stage import GPTStage
from t2i.stages.scaling import grad_norm, run_steps, warmup_cosine, weight_decay_groups
from lora_factors import move_from_zero

REPO = Path(__file__).parents[1]
TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=4, image_len=6, n_layer=2, n_head=2, n_embd=16)


def _config(codes_root, run_dir: Path, *overrides):
    """The train.py config of a tiny GPT run writing to run_dir (Hydra's run-dir settings given directly)."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=0",
            "trainer=cpu", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "stage.warmup_steps=2", "stage.sample_every_n_steps=0",
            f"trainer.default_root_dir={run_dir}", f"callbacks.model_checkpoint.dirpath={run_dir / 'checkpoints'}",
            f"logger.save_dir={run_dir}", *overrides])


def _train(cfg, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import train

    return train.train_lightning_stage(cfg)


# -- the learning-rate schedule -------------------------------------------------------------------


def _gpt_schedule_before(step, warmup, total, min_ratio):  # GPTStage.configure_optimizers' own, until it moved
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _vqgan_schedule_before(step, warmup, decay_steps):  # VQGANStage._set_lr's own, until it moved
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay_steps and step >= warmup:
        progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
        scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return scale


@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_one_schedule_gives_both_stages_their_numbers(warmup):
    for total in (1, 5, 40):
        for step in range(60):
            for min_ratio in (0.1, 0.0, 0.5):
                assert warmup_cosine(step, warmup, total, min_ratio) == pytest.approx(
                    _gpt_schedule_before(step, warmup, total, min_ratio), rel=1e-12, abs=1e-15)
            assert warmup_cosine(step, warmup, total, 0.1) == pytest.approx(
                _vqgan_schedule_before(step, warmup, total), rel=1e-12)
    for step in range(30):  # taming's constant lr after the warmup
        assert warmup_cosine(step, warmup, None, 0.1) == _vqgan_schedule_before(step, warmup, 0)


def test_a_run_bounded_by_time_alone_asks_for_a_length(codes_root, tmp_path, monkeypatch):
    # max_time only: Lightning's estimate of the run's steps is infinite (int() of it overflowed)
    cfg = _config(codes_root, tmp_path, "trainer.max_time=00:00:01:00", "trainer.max_steps=-1", "trainer.max_epochs=null")
    with pytest.raises(ValueError, match=r"no length in optimizer steps \(trainer.max_steps=-1, max_epochs=-1: bounded "
                                         r"by trainer.max_time alone.*set trainer.max_steps=N .* or stage.min_lr_ratio=1 "):
        _train(cfg, monkeypatch)
    # nothing decays: no length needed, the lr stays after the warmup
    trainer = L.Trainer(max_time="00:00:01:00", max_steps=-1, max_epochs=None, logger=False,
                        enable_checkpointing=False, accelerator="cpu", devices=1)
    stage = GPTStage(GPTConfig(**TINY), GPTStageConfig(warmup_steps=2, min_lr_ratio=1.0), torch.optim.AdamW)
    stage.trainer = trainer
    schedule = stage.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert [schedule.lr_lambdas[0](step) for step in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    # a length in steps: the cosine ends at max_steps
    trainer = L.Trainer(max_steps=10, max_epochs=None, logger=False, enable_checkpointing=False,
                        accelerator="cpu", devices=1)
    assert run_steps(trainer, constant="x") == 10


# -- weight decay and gradient norm, also under FSDP ---------------------------------------------------


@pytest.mark.parametrize("tie_head", [False, True])
def test_weight_decay_goes_to_the_matrices_of_linear_layers(tie_head):
    gpt = GPT(GPTConfig(**TINY, tie_head=tie_head))
    decay, no_decay = weight_decay_groups(gpt, 0.01)
    names = {id(p): name for name, p in gpt.named_parameters()}
    # the shape rule the GPT stage used before FSDP: the same groups on an unwrapped model
    assert {names[id(p)] for p in decay["params"]} == {
        name for name, p in gpt.named_parameters() if p.dim() == 2 and "emb" not in name}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fsdp_process(rank: int, world_size: int, port: int, out: str, lora: bool) -> None:
    """One of 2 processes: the GPT (with a LoRA adapter when `lora`) wrapped as the trainer=fsdp preset wraps it,
    over gloo on the CPU."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from t2i.adapters import LoraConfig, add_lora

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            strategy = instantiate(compose("train", overrides=["trainer=fsdp"]).trainer.strategy)
        torch.manual_seed(0)  # the same model and batch in both processes
        model = GPT(GPTConfig(**TINY))
        if lora:  # frozen base weights and trainable adapter weights in the same FSDP units
            # moved from zero, so that every adapter weight gets a gradient
            move_from_zero(add_lora(model, LoraConfig(rank=2, targets=["attention", "mlp", "head"])), std=1.0, seed=0)
        reference = copy.deepcopy(model)
        tokens = torch.randint(0, model.cfg.vocab_size, (4, 10))
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"),  # Lightning's kwargs
                                           sharding_strategy=strategy.sharding_strategy, **strategy.kwargs)
        decay, no_decay = weight_decay_groups(wrapped, 0.01)
        wrapped(tokens).logsumexp(-1).mean().backward()
        reference(tokens).logsumexp(-1).mean().backward()
        record = {
            "flat": all(p.dim() == 1 for p in wrapped.parameters()),
            "shape_rule_decay": sum(p.numel() for p in wrapped.parameters() if p.dim() == 2),
            "decay": sum(p.numel() for p in decay["params"]), "no_decay": sum(p.numel() for p in no_decay["params"]),
            "grad_norm": float(grad_norm(wrapped.parameters(), wrapped)),
            "shard_norm": float(grad_norm(wrapped.parameters())),
            "expected_norm": float(grad_norm(reference.parameters())),
            "expected_decay": sum(p.numel() for n, p in reference.named_parameters()
                                  if p.requires_grad and p.dim() == 2 and "emb" not in n),
            "total": sum(p.numel() for p in reference.parameters() if p.requires_grad),
            "frozen_with_gradients": sum(p.grad is not None for p in wrapped.parameters() if not p.requires_grad),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("lora", [False, True], ids=["whole", "lora"])
def test_fsdp_weight_decay_groups_and_global_grad_norm(tmp_path, lora):
    """Under FSDP the optimizer gets the trainable weights' shards in the right groups and the logged norm is the
    whole gradient's; with a LoRA adapter (stage.lora under trainer=fsdp) those are the adapter's alone."""
    torch.multiprocessing.spawn(_fsdp_process, args=(2, _free_port(), str(tmp_path), lora), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["flat"] and r["shape_rule_decay"] == 0 for r in ranks)  # what p.dim() == 2 found: nothing
    expected = ranks[0]
    # the shards of every linear weight decay, and only those: over both processes, the unwrapped groups
    assert sum(r["decay"] for r in ranks) == expected["expected_decay"] > 0
    assert sum(r["decay"] + r["no_decay"] for r in ranks) == expected["total"]
    for r in ranks:  # the whole gradient's norm on every process (both saw the same batch)
        assert r["grad_norm"] == pytest.approx(expected["expected_norm"], rel=1e-5)
        assert r["shard_norm"] < r["grad_norm"]  # one process's shard: what was logged before
        assert r["frozen_with_gradients"] == 0


# -- sample grids with gradient accumulation ----------------------------------------------------------


def test_sample_grids_are_drawn_once_per_optimizer_step(codes_root, tmp_path, monkeypatch):
    cfg = _config(codes_root, tmp_path, "trainer.accumulate_grad_batches=2", "trainer.max_steps=4",
                  "stage.sample_every_n_steps=2", "stage.num_sample_prompts=1", "stage.sampling.samples_per_prompt=1")
    drawn = []
    log_samples = GPTStage.log_samples

    def counted(self):
        drawn.append(self.global_step)
        return log_samples(self)

    monkeypatch.setattr(GPTStage, "log_samples", counted)
    _train(cfg, monkeypatch)
    # 4 batches an epoch, 2 optimizer steps; drawn after the batches that completed steps 2 and 4 (before:
    # at step 0 too, and twice at step 2)
    assert drawn == [2, 4]
    assert sorted(p.name for p in (tmp_path / "csv").glob("version_*/images/samples-step*.png")) == [
        "samples-step0000002.png", "samples-step0000004.png"]


# -- last.ckpt ------------------------------------------------------------------------------------


class _Killed(Exception):
    pass


def test_last_checkpoint_follows_every_validation(codes_root, tmp_path, monkeypatch):
    # save_top_k=0: no validation "improves", so Lightning's save_last would never have written last.ckpt
    cfg = _config(codes_root, tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=2",
                  "callbacks.model_checkpoint.save_top_k=0")
    training_step = GPTStage.training_step

    def killed_at_5(self, batch, batch_idx):
        if self.global_step == 5:
            raise _Killed
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(GPTStage, "training_step", killed_at_5)
    with pytest.raises(_Killed):
        _train(cfg, monkeypatch)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4  # the validation at step 4, the last before the "kill"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]


# -- how a run ended: fit.json, the warning, and the quickstart's summary ------------------------------


def test_a_run_says_how_it_ended_and_the_quickstart_summary_names_an_early_stop(codes_root, tmp_path, monkeypatch,
                                                                                  caplog):
    full = tmp_path / "full"
    _train(_config(codes_root, full, "trainer.max_steps=3"), monkeypatch)
    fit = json.loads((full / "fit.json").read_text())
    assert (fit["steps"], fit["stopped_early"], fit["reason"]) == (3, False, "max_steps=3 reached")
    assert "train/loss" in fit["metrics"]
    epochs = tmp_path / "epochs"  # 64 training samples: 4 steps per epoch
    _train(_config(codes_root, epochs, "trainer.max_steps=100", "trainer.max_epochs=1"), monkeypatch)
    fit = json.loads((epochs / "fit.json").read_text())
    assert (fit["steps"], fit["stopped_early"], fit["reason"]) == (4, True, "trainer.max_epochs=1 reached first")

    training_step = GPTStage.training_step

    def slow_step(self, batch, batch_idx):
        time.sleep(0.4)
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(GPTStage, "training_step", slow_step)
    runs = tmp_path / "runs"
    with caplog.at_level(logging.WARNING, logger="train"):
        _train(_config(codes_root, runs / "gpt", "trainer.max_steps=100", "trainer.max_time=00:00:00:01"), monkeypatch)
    fit = json.loads((runs / "gpt" / "fit.json").read_text())
    assert fit["stopped_early"] and 0 < fit["steps"] < 100
    assert fit["reason"].startswith("time limit reached (trainer.max_time, after ")
    assert f"training stopped early, at step {fit['steps']} of trainer.max_steps=100: time limit" in caplog.text

    spec = importlib.util.spec_from_file_location("quickstart", REPO / "experiments" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    report = quickstart.summary(runs, 0, {"data": 12.0, "GPT": 70.5})
    assert f"| GPT | 1 min 10.5 s | **STOPPED EARLY** {fit['steps']} of 100 steps: time limit reached" in report
    assert "| **total** | **1 min 22.5 s** |" in report
    assert f"Note: the GPT training stopped at step {fit['steps']} of 100 (time limit reached" in report


# -- random streams of every process (2-process DDP over gloo) --------------------------------------


def _train_ddp(run_dir: Path, codes_root, *overrides: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run(
        [sys.executable, "train.py", "trainer=ddp_cpu", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
         "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.dropout=0.1",
         "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=8", "data.num_workers=0",
         "stage.warmup_steps=2", "stage.sample_every_n_steps=0", "stage.pkeep=0.9",
         "+callbacks.rng_probe._target_=rng_probe.RngProbe", f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((run_dir / f"rng-rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_every_process_has_its_own_random_streams_and_gets_them_back(codes_root, tmp_path):
    straight = _train_ddp(tmp_path / "straight", codes_root, "trainer.max_steps=5")
    for step in map(str, range(5)):  # dropout, cond_drop and pkeep draw differently on the two processes
        for generator in ("torch", "numpy", "python"):
            assert straight[0][step][generator] != straight[1][step][generator], (step, generator)

    # the checkpoint the straight run saved after step 3's validation: resuming from it must continue its streams
    ckpt = tmp_path / "straight" / "checkpoints" / "step0000003.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    (rng,) = [state["rng"] for key, state in saved["callbacks"].items() if key.startswith("ResumeState")]
    assert len(rng) == 2  # both processes' states, though only rank 0 writes
    resumed = _train_ddp(tmp_path / "resumed", codes_root, "trainer.max_steps=5", f"ckpt_path={ckpt}")
    for rank in (0, 1):  # each process continues its own streams (before: rank 0's on both)
        assert {step: resumed[rank][step] for step in ("3", "4")} == {step: straight[rank][step] for step in ("3", "4")}


def test_process_seeds_differ_across_ranks_and_seeds():
    seeds = {process_seed(seed, rank) for seed in range(4) for rank in range(8)}
    assert len(seeds) == 32 and all(0 <= s < 2 ** 32 for s in seeds)  # seed 0 rank 1 is not seed 1 rank 0


# -- Hydra multirun with local processes ----------------------------------------------------------


def test_multirun_refuses_to_start_local_processes(codes_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "trainer=ddp_cpu", "stage=gpt", "model=shapes", "model.n_layer=1",
         "model.n_embd=32", "model.n_head=2", "data=shapes_codes", f"data.root={codes_root}", "data.num_workers=0",
         "trainer.max_steps=2", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Lightning would start the other 1 by running this command again, -m included" in result.stderr
    assert "hydra/launcher=slurm" in result.stderr
    assert not list(tmp_path.glob("*/checkpoints")) and not list(tmp_path.glob("*/csv"))  # before any training


class _Recorder:
    """What TrainingThroughput asks of a LightningModule: its batch's counts, and somewhere to log."""

    def __init__(self, counts):
        self.counts, self.logged = counts, {}

    def throughput_counts(self, batch):
        return self.counts

    def log_dict(self, metrics, **kwargs):
        self.logged.update(metrics)

    def log(self, name, value, **kwargs):
        self.logged[name] = value


@pytest.mark.parametrize("world_size", [1, 2, 8])
def test_throughput_reports_each_devices_flops_and_mfu_at_any_world_size(world_size, monkeypatch):
    clock = iter(float(t) / 2 for t in range(100))  # a batch every 0.5 s
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    trainer = SimpleNamespace(world_size=world_size, precision="32-true",
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    monitor = callbacks.TrainingThroughput(window=3, peak_flops=1e10)
    module = _Recorder(counts=(4, 4 * 63, 10 ** 9))  # each device: 4 sequences, 252 tokens, 1e9 FLOPs a batch
    monitor.setup(trainer, module, "fit")
    monitor.on_train_start(trainer, module)
    for batch in range(5):
        monitor.on_train_batch_end(trainer, module, None, None, batch)
    assert module.logged["train/flops_per_s"] == pytest.approx(2e9)  # 1e9 FLOPs in 0.5 s, on each device
    assert module.logged["train/mfu"] == pytest.approx(0.2)  # over a peak of 1e10
    assert module.logged["train/tokens_per_s"] == pytest.approx(504)
