"""Resuming runs: a run interrupted mid-epoch and resumed ends exactly where the uninterrupted run does,
`ckpt_path=last` resumes a Hydra run dir, and checkpoint files are replaced atomically."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from t2i.callbacks import AtomicCheckpointIO, hpc_checkpoint, last_checkpoint
from t2i.stages.gpt_stage import GPTStage

REPO = Path(__file__).parents[1]
STEPS = 7  # 64 samples / 16 = 4 batches per epoch: the runs end mid-epoch 1


class Interrupted(Exception):
    """Stands for the process being killed."""


def _config(codes_root, run_dir: Path, *overrides, val_every: int = 3):
    """The train.py config of a tiny GPT run writing to run_dir, the Hydra run-dir settings given directly."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.dropout=0.1",  # with stage.cond_drop: randomness a resume has to continue
            "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=2",
            "trainer=cpu", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={val_every}",
            "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.deterministic=true",
            "trainer.enable_progress_bar=false", "stage.warmup_steps=2", "stage.sample_every_n_steps=0",
            f"trainer.default_root_dir={run_dir}", f"callbacks.model_checkpoint.dirpath={run_dir / 'checkpoints'}",
            f"logger.save_dir={run_dir}", *overrides])


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
    io.save_checkpoint({"global_step": 1, "weights": torch.arange(4)}, target)
    assert torch.equal(io.load_checkpoint(target)["weights"], torch.arange(4))

    def killed_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 2, "weights": torch.zeros(4)}, target)
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
