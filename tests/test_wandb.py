"""logger=wandb with the real wandb package, offline: metrics, sample grids and the config reach the run file,
and a resumed run continues the same W&B run."""

import json
import os
import subprocess
import sys
from pathlib import Path

from wandb_reader import read_records

from t2i.callbacks import saved_wandb_run_id
from t2i.data.datamodule import DataConfig

REPO = Path(__file__).parents[1]


def test_gpt_run_logs_metrics_samples_and_config_offline(codes_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
         "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=0", "trainer=cpu",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "stage.sample_every_n_steps=2", "stage.num_sample_prompts=2",
         "callbacks.throughput.window=2", "callbacks.throughput.peak_flops=1e9",
         "logger=wandb", "logger.tags=[test]", "logger.log_model=true", f"hydra.run.dir={tmp_path}"],
        # offline through wandb's own switch: Lightning refuses logger.offline=true with log_model
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_records(run_file)
    items = [item for r in records if r.HasField("history") for item in r.history.item]
    logged = {item.key or item.nested_key[0] for item in items}  # media are logged as nested fields
    assert {"train/loss", "train/image_loss", "train/text_loss", "train/tokens_per_s", "train/mfu", "val/loss"} <= logged
    captions = [json.loads(item.value_json) for item in items if list(item.nested_key) == ["val/samples", "captions"]]
    first_prompt = next(DataConfig(root=str(codes_root)).captions("val"))
    assert captions and first_prompt in captions[0]  # the sample grid panel, captioned with its prompts
    images = list(run_file.parent.glob("files/media/images/val/samples_*.png"))
    assert len(images) >= 2  # one captioned image per prompt
    config = {item.key: item.value_json for r in records if r.HasField("config") for item in r.config.update}
    assert json.loads(config["data"])["name"] == "shapes_codes" and json.loads(config["model"])["n_layer"] == 1
    runs = [r.run for r in records if r.HasField("run")]
    assert runs and list(runs[0].tags) == ["test"] and runs[0].project == "t2i"
    # logger.log_model=true: the checkpoints became a model artifact of the run
    artifacts = [r.artifact for r in records if r.HasField("artifact")]
    assert artifacts and artifacts[0].type == "model" and artifacts[0].name.startswith("model-")
    assert "latest" in artifacts[0].aliases and [f.path for f in artifacts[0].manifest.contents] == ["model.ckpt"]


def test_resumed_run_continues_the_same_wandb_run(codes_root, tmp_path):
    command = [
        sys.executable, "train.py", "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
        "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=0", "trainer=cpu",
        "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        "stage.sample_every_n_steps=0", "logger=wandb", "logger.offline=true"]
    env = {**os.environ, "WANDB_SILENT": "true", "WANDB_MODE": "offline"}
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    for extra in (["trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'first'}"],
                  ["trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'second'}", f"ckpt_path={ckpt}"]):
        result = subprocess.run(command + extra, check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    (first,) = (tmp_path / "first").glob("wandb/offline-run-*")
    (second,) = (tmp_path / "second").glob("wandb/offline-run-*")
    run_id = first.name.rsplit("-", 1)[1]  # offline-run-<date>_<time>-<id>
    assert saved_wandb_run_id(ckpt) == run_id
    assert second.name.endswith(f"-{run_id}")
    (run_file,) = second.glob("run-*.wandb")
    runs = [r.run for r in read_records(run_file) if r.HasField("run")]
    assert runs and runs[0].run_id == run_id
