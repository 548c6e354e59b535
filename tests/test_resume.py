"""Resuming runs: a run interrupted mid-epoch and resumed ends exactly where the uninterrupted run does,
`ckpt_path=last` resumes a Hydra run dir, and checkpoint files are replaced atomically; real faults
(SIGKILL at random moments and mid-write, for both stages; SLURM's requeue signal) end with the weights
of the uninterrupted run, and a killed run leaves no data worker behind."""

import csv
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from t2i.callbacks import AtomicCheckpointIO, hpc_checkpoint, last_checkpoint
from t2i.checkpoints import read_checkpoint
from t2i.stages.gpt_stage import GPTStage

REPO = Path(__file__).parents[1]
STEPS = 7  # 64 samples / 16 = 4 batches per epoch: the runs end mid-epoch 1
QUIET = ["~callbacks.throughput", "~callbacks.lr_monitor"]


class Interrupted(Exception):
    """Stands for the process being killed."""


def _config(codes_root, run_dir: Path, *overrides, val_every: int = 3, quiet: bool = False):
    """The train.py config of a tiny GPT run writing to run_dir, the Hydra run-dir settings given directly
    (`quiet`: no throughput or LR monitor, which cost more than the tiny steps)."""
    logging = [f"logger.save_dir={run_dir}", *(QUIET if quiet else [])]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.dropout=0.1",  # with stage.cond_drop: randomness a resume has to continue
            "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=2",
            "trainer=cpu", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={val_every}",
            "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.deterministic=true",
            "trainer.enable_progress_bar=false", "stage.warmup_steps=2", "stage.sample_every_n_steps=0",
            f"trainer.default_root_dir={run_dir}", f"callbacks.model_checkpoint.dirpath={run_dir / 'checkpoints'}",
            *logging, *overrides])


def _train(cfg, monkeypatch, interrupt_at: int | None = None) -> list[list[str]]:
    """Run train.py's training on `cfg` in this process; the sample keys of each step it trained."""
    monkeypatch.syspath_prepend(str(REPO))
    import train

    keys = []
    training_step = GPTStage.training_step

    def recorded_step(self, batch, batch_idx):
        if self.global_step == interrupt_at:
            raise Interrupted
        keys.append(batch["key"])
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(GPTStage, "training_step", recorded_step)
    try:
        train.train_lightning_stage(cfg)
    except Interrupted:
        pass
    finally:
        monkeypatch.setattr(GPTStage, "training_step", training_step)
    return keys


def _checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("interrupt", [3, 6])  # mid-epoch 0 (then across the epoch end), mid-epoch 1
def test_interrupted_run_resumes_exactly(codes_root, tmp_path, monkeypatch, interrupt):
    val_every = interrupt if interrupt < 4 else 2  # validations (and last.ckpt) at the interruption step
    straight = _train(_config(codes_root, tmp_path / "a", val_every=val_every), monkeypatch)
    assert len(straight) == STEPS

    before = _train(_config(codes_root, tmp_path / "b", val_every=val_every), monkeypatch, interrupt_at=interrupt)
    assert before == straight[:interrupt]
    saved = _checkpoint(tmp_path / "b")
    assert saved["global_step"] == interrupt  # the last.ckpt of the validation before the "kill"
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": interrupt // 4, "batches": interrupt % 4, "workers": 2}]

    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    after = _train(_config(codes_root, tmp_path / "b", f"ckpt_path={ckpt}", val_every=val_every), monkeypatch)
    assert after == straight[interrupt:]  # the rest of the epoch (and the next): the same batches

    expected, resumed = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert resumed["global_step"] == expected["global_step"] == STEPS
    assert expected["state_dict"].keys() == resumed["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    assert resumed["lr_schedulers"][0]["_last_lr"] == expected["lr_schedulers"][0]["_last_lr"]


def test_ckpt_path_last_resumes_a_hydra_run_dir(codes_root, tmp_path):
    command = [
        sys.executable, "train.py", "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=0",
        "trainer=cpu", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "stage.sample_every_n_steps=0",
        f"hydra.run.dir={tmp_path}"]
    for extra in (["trainer.max_steps=2"], ["trainer.max_steps=3", "ckpt_path=last"]):
        result = subprocess.run(command + extra, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert _checkpoint(tmp_path)["global_step"] == 3

    def logged_steps(version: str) -> set[int]:
        with open(tmp_path / "csv" / version / "metrics.csv") as f:
            return {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")}

    assert logged_steps("version_0") == {0, 1}
    assert logged_steps("version_1") == {2}  # the second run went on from the first one's step


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.arange(4)}, "t2i": {}}, target)
    assert torch.equal(io.load_checkpoint(target)["state_dict"]["w"], torch.arange(4))

    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.zeros(4)}, "t2i": {}}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["global_step"] == 1  # the previous checkpoint, whole
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # and no partial file

    # the leftover of a process killed outright is never taken for a last checkpoint
    (target.parent / ".last.ckpt.123.partial").write_bytes(b"PK\x03\x04")
    assert last_checkpoint([LearningRateMonitor(), ModelCheckpoint(dirpath=target.parent)]) == str(target)


def test_hpc_checkpoint_is_the_highest_numbered(tmp_path):
    assert hpc_checkpoint(tmp_path) is None
    for n in (2, 10, 9):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"")
    (tmp_path / "hpc_ckpt_x.ckpt").write_bytes(b"")
    assert hpc_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_10.ckpt")  # as Lightning picks it


# ---------------------------------------------------------------------------------------------
# Real faults: training processes SIGKILLed at random moments (one of them mid-write), and SLURM's
# requeue signal. Each run is a fork of a fork server that has imported train.py (no start-up cost per
# run), computing on one thread so that every run does the same arithmetic.

FORK_SERVER = multiprocessing.get_context("forkserver")
FORK_SERVER.set_forkserver_preload(["train"])  # imported once, in the server: each training starts at once
GPT_STEPS, VQGAN_STEPS = 12, 6


def _gpt_config(codes_root, run_dir: Path, *overrides):
    return _config(codes_root, run_dir, f"trainer.max_steps={GPT_STEPS}", *overrides, val_every=2, quiet=True)


def _vqgan_config(codes_root, run_dir: Path, *overrides):
    tiny = ["vqgan.ch=8", "vqgan.ch_mult=[1,2]", "vqgan.z_channels=8", "vqgan.n_embed=32"]
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "stage=vqgan", "vqgan=shapes", *tiny, "stage.loss.perceptual_weight=0", "stage.loss.disc_start=2",
            "stage.loss.disc_channels=8", "stage.loss.disc_num_layers=1",
            "stage.log_images=0", "data=shapes", f"data.root={codes_root.parent / 'shapes'}", "data.image_size=32",
            "data.batch_size=16", "data.num_workers=0", "trainer=cpu", f"trainer.max_steps={VQGAN_STEPS}",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
            "trainer.deterministic=true", "trainer.enable_progress_bar=false", f"trainer.default_root_dir={run_dir}",
            f"callbacks.model_checkpoint.dirpath={run_dir / 'checkpoints'}", f"logger.save_dir={run_dir}", *QUIET,
            *overrides])


def _training_process(cfg, env: dict | None, slow_writes: float, requeue_signal_at: int | None) -> None:
    """The body of a training process (_fork_training)."""
    import train

    multiprocessing.set_start_method("fork", force=True)  # its data workers: forks of it, as in a plain run
    torch.set_num_threads(1)
    os.environ.update(env or {})
    if slow_writes:
        save = torch.save

        def slow_save(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            time.sleep(slow_writes)

        torch.save = slow_save
    if requeue_signal_at is not None:
        stage = train.LIGHTNING_STAGES[cfg.stage.name]
        hook = stage.on_before_optimizer_step

        def signalled(self, optimizer):
            hook(self, optimizer)
            if self.global_step == requeue_signal_at:
                os.kill(os.getpid(), signal.SIGUSR1)

        stage.on_before_optimizer_step = signalled
    train.train_lightning_stage(cfg)


def _fork_training(cfg, env: dict | None = None, slow_writes: float = 0.0, requeue_signal_at: int | None = None):
    """train.py's training of `cfg` in a process forked from a fork server. `slow_writes`: seconds each
    checkpoint write takes (a slow disk: a kill can land mid-write); `requeue_signal_at`: SLURM's SIGUSR1 arrives
    at that step, between the backward and the optimizer step.

    Why a fork server: a process that has run a compiled backward (another test in this worker may have) cannot
    run autograd in a plain fork of itself; the server is a fresh process that has only imported train.py."""
    process = FORK_SERVER.Process(target=_training_process, args=(cfg, env, slow_writes, requeue_signal_at))
    process.start()
    return process


def _last_step(run_dir: Path) -> int:
    """The step last.ckpt holds (-1: none yet); it must always be readable."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return read_checkpoint(path, foreign_objects=False)["global_step"] if path.exists() else -1


def _wait(condition, what: str, process, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert process.exitcode is None, f"the run ended (exit {process.exitcode}) before {what}"
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def _children(pid: int) -> set[int]:
    """The live child processes of `pid` (its data workers)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited: only its exit status is left


def _weights(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt", foreign_objects=False)["state_dict"]


def _assert_same_weights(expected: dict, resumed: dict) -> None:
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name


def _run_to_the_end(cfg) -> None:
    process = _fork_training(cfg)
    process.join(300)
    assert process.exitcode == 0


def _kill_and_resume(config_for, run_dir: Path, kills: list[str], rng: random.Random, workers: bool) -> None:
    """Start, SIGKILL, resume with ckpt_path=last ... for each kill ("random": a random moment after the run
    got past its previous checkpoint; "write": while a checkpoint is being written), then run to the end.
    After each kill: last.ckpt readable, and (`workers`) no data worker of the killed run left."""
    previous = -1
    for kill in kills:
        process = _fork_training(config_for(run_dir, "ckpt_path=last"), slow_writes=0.3 if kill == "write" else 0)
        if kill == "write":  # the next last.ckpt: the previous one must survive
            _wait(lambda: any(run_dir.glob("checkpoints/.last.ckpt.*.partial")), "a write of last.ckpt", process)
        else:
            _wait(lambda: _last_step(run_dir) > previous, "a new checkpoint", process)
            time.sleep(rng.uniform(0.0, 0.4))
        assert process.exitcode is None, "the run ended before the kill"
        workers_of_run = _children(process.pid) if workers else set()
        os.kill(process.pid, signal.SIGKILL)
        process.join()
        previous = _last_step(run_dir)  # readable: the kill never leaves a half-written last.ckpt
        if workers:
            assert workers_of_run, "the run had no data workers to check"
            end = time.monotonic() + 3
            while any(_alive(pid) for pid in workers_of_run) and time.monotonic() < end:
                time.sleep(0.05)
            assert not [pid for pid in workers_of_run if _alive(pid)], "data workers outlived the killed run"
    _run_to_the_end(config_for(run_dir, "ckpt_path=last"))


@pytest.fixture(scope="module")
def gpt_reference(codes_root, tmp_path_factory):
    """The weights of an uninterrupted GPT run."""
    run_dir = tmp_path_factory.mktemp("gpt_straight")
    _run_to_the_end(_gpt_config(codes_root, run_dir))
    return _weights(run_dir)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and PR_SET_PDEATHSIG are Linux's")
def test_gpt_run_killed_at_random_moments_ends_with_the_uninterrupted_weights(codes_root, gpt_reference, tmp_path):
    _kill_and_resume(partial(_gpt_config, codes_root), tmp_path, ["random", "write", "random"],
                     random.Random(0), workers=True)
    assert _last_step(tmp_path) == GPT_STEPS
    _assert_same_weights(gpt_reference, _weights(tmp_path))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc are Linux's")
def test_vqgan_run_killed_at_random_moments_ends_with_the_uninterrupted_weights(codes_root, tmp_path):
    _run_to_the_end(_vqgan_config(codes_root, tmp_path / "straight"))
    _kill_and_resume(partial(_vqgan_config, codes_root), tmp_path / "killed", ["random", "write"],
                     random.Random(1), workers=False)
    assert _last_step(tmp_path / "killed") == VQGAN_STEPS
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "killed"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and SIGUSR1 are POSIX's")
def test_slurm_requeue_signal_saves_the_hpc_checkpoint_and_the_requeued_job_resumes_exactly(
        codes_root, gpt_reference, tmp_path):
    bin_dir = tmp_path / "bin"  # scontrol: records the request, then stops the job as SLURM does (SIGTERM)
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "requeued"}\nkill -TERM $PPID\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t2i", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "localhost", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run_dir = tmp_path / "job"
    first = _fork_training(_gpt_config(codes_root, run_dir), env=env, requeue_signal_at=5)  # mid-step 5
    first.join(300)
    assert (tmp_path / "requeued").read_text() == "requeue 4242\n"
    saved = read_checkpoint(run_dir / "hpc_ckpt_1.ckpt", foreign_objects=False)
    assert saved["global_step"] == 6  # saved when step 5 had finished, not inside it
    assert _last_step(run_dir) < GPT_STEPS  # the job stopped
    requeued = _fork_training(_gpt_config(codes_root, run_dir), env=env)  # no ckpt_path: the hpc checkpoint
    requeued.join(300)
    assert requeued.exitcode == 0 and _last_step(run_dir) == GPT_STEPS
    _assert_same_weights(gpt_reference, _weights(run_dir))
