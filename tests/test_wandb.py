"""logger=wandb with the real wandb package, offline: metrics, sample grids and the config reach the run file."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from t2i.data.datamodule import DataConfig

REPO = Path(__file__).parents[1]


def read_records(path: Path) -> list:
    """The protobuf records of a .wandb file: a 7-byte file header, then LevelDB-log records in 32 KiB blocks
    (each record: crc32 4 bytes, length 2, type 1 = full, 2/3/4 = first/middle/last fragment)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        left_in_block = block - offset % block
        if left_in_block < 7:  # trailer padding
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7: offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_gpt_run_logs_metrics_samples_and_config_offline(codes_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
         "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16", "data.num_workers=0", "trainer=cpu",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
         "trainer.enable_progress_bar=false", "stage.sample_every_n_steps=2", "stage.num_sample_prompts=2",
         "logger=wandb", "logger.offline=true", "logger.tags=[test]", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = read_records(run_file)
    items = [item for r in records if r.HasField("history") for item in r.history.item]
    logged = {item.key or item.nested_key[0] for item in items}  # media are logged as nested fields
    assert {"train/loss", "train/image_loss", "train/text_loss", "train/tokens_per_s", "val/loss"} <= logged
    captions = [json.loads(item.value_json) for item in items if list(item.nested_key) == ["val/samples", "captions"]]
    first_prompt = next(DataConfig(root=str(codes_root)).captions("val"))
    assert captions and first_prompt in captions[0]  # the sample grid panel, captioned with its prompts
    images = list(run_file.parent.glob("files/media/images/val/samples_*.png"))
    assert len(images) >= 2  # one captioned image per prompt
    config = {item.key: item.value_json for r in records if r.HasField("config") for item in r.config.update}
    assert json.loads(config["data"])["name"] == "shapes_codes" and json.loads(config["model"])["n_layer"] == 1
    runs = [r.run for r in records if r.HasField("run")]
    assert runs and list(runs[0].tags) == ["test"] and runs[0].project == "t2i"
