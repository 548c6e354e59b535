"""eval.py end to end on a small converted shapes dataset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from t2i.data.convert import run

REPO = Path(__file__).parents[1]


def _run(args, tmp_path):
    return subprocess.run([sys.executable, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    run(["shapes", "--out", str(root), "--train", "120", "--val", "10", "--test", "70", "--quiet"])
    return root


def test_oracle_task_reads_every_test_image(shapes_root, tmp_path):
    assert not (shapes_root / "tokenizer.model").exists()  # evaluation reads images and captions, not token ids
    result = _run(["eval.py", "task=oracle", "data=shapes", f"data.root={shapes_root}", "data.batch_size=16"], tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["images"] == 70  # every test image exactly once, the last batch short
    assert results["accuracy"]["all"] >= 0.99


def test_missing_data_root_names_the_setting(tmp_path):
    result = _run(["eval.py", "task=oracle", "data=muge", f"paths.data_dir={tmp_path}"], tmp_path)
    assert result.returncode != 0
    assert "data.root=" in result.stderr and "convert muge" in result.stderr
