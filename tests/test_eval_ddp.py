"""python eval.py trainer.devices=2: two CPU processes (gloo), their data workers started with spawn
(as on macOS and in Python 3.14 on Linux), give the one-process results, and only the main one
writes and logs (W&B offline, read back from the run file)."""

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb_reader import read_records

from t2i.data.datamodule import DataConfig

REPO = Path(__file__).parents[1]
PROMPTS, SAMPLES, RERANK, GRID_PROMPTS = 7, 2, 2, 3  # 7 prompts: 3 on rank 0, 4 on rank 1

# Imported by every Python process that finds it on PYTHONPATH (the eval processes and their data
# workers): makes spawn the start method, and leaves a file for each spawned worker.
SPAWN_EVERYWHERE = """
import multiprocessing, os, pathlib, sys
multiprocessing.set_start_method("spawn", force=True)
if "--multiprocessing-fork" in sys.orig_argv:
    pathlib.Path(os.environ["SPAWNED_WORKERS"], str(os.getpid())).write_text("")
"""


def _evaluate(args, out, env):
    return subprocess.run([sys.executable, "eval.py", *args, f"hydra.run.dir={out}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env}, check=False)


def _processes_running_in(folder: Path) -> list[str]:
    """Command lines of live processes that name `folder` (the eval processes pass it as hydra.run.dir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if str(folder) in text:
            found.append(text)
    return found


@pytest.fixture(scope="module")
def runs(codes_root, gpt_run, inception_weights, chinese_clip, tmp_path_factory):
    """The same evaluation in one process and in two (the second logging to W&B offline)."""
    root = tmp_path_factory.mktemp("eval_ddp")
    common = [f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}", "data=shapes", f"data.root={codes_root.parent / 'shapes'}",
              "sampling.batch_size=8", "split=val", f"eval.num_prompts={PROMPTS}",
              f"sampling.samples_per_prompt={SAMPLES}", f"eval.rerank={RERANK}", f"eval.grid_prompts={GRID_PROMPTS}",
              f"eval.inception_weights={inception_weights}", "eval.fid_layer=64", "eval.isc_splits=2",
              f"eval.clip_model={chinese_clip}", "eval.rprecision_distractors=5", "trainer.accelerator=cpu"]
    # separate real-statistics caches: both runs gather and compute the real features themselves
    env = {"WANDB_SILENT": "true", "WANDB_DATA_DIR": str(root / "wandb_data")}  # W&B's staging files stay here
    one = _evaluate([*common, "trainer.devices=1", "data.num_workers=0", f"eval.stats_cache={root / 'stats_one'}"],
                    root / "one", env)
    assert one.returncode == 0, one.stderr[-3000:]
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SPAWN_EVERYWHERE)
    (root / "spawned").mkdir()
    spawn = {"PYTHONPATH": os.pathsep.join(filter(None, [str(root / "site"), os.environ.get("PYTHONPATH")])),
             "SPAWNED_WORKERS": str(root / "spawned")}
    two = _evaluate([*common, "trainer.devices=2", "data.num_workers=1", f"eval.stats_cache={root / 'stats_two'}",
                     "logger=wandb", "logger.offline=true"], root / "two", {**env, **spawn})
    return root, two


def _assert_same(ours, theirs, path=""):
    """Equal results; floats to 1e-5 (the processes batch the Inception network differently)."""
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), path
        for key in ours:
            if key != "real_statistics":  # the path of each run's own cache
                _assert_same(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(ours, float):
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-8), path
    else:
        assert ours == theirs, path


def test_two_processes_give_the_one_process_results_and_exit_cleanly(runs):
    root, two = runs
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Traceback" not in two.stderr
    assert "Starting with 2 processes" in two.stderr
    assert len(list((root / "spawned").iterdir())) >= 2  # each process's data worker was spawned
    one_results, two_results = (json.loads((root / run / "results.json").read_text()) for run in ("one", "two"))
    assert two_results["prompts"] == PROMPTS and two_results["images_per_set"] == PROMPTS * SAMPLES
    assert two_results["plain"]["protocol"]["real_images"] == PROMPTS
    assert two_results[f"rerank_{RERANK}"]["protocol"]["generated_images"] == PROMPTS * SAMPLES
    _assert_same(two_results, one_results)
    for name in ("grid.md", f"grid_rerank_{RERANK}.md", "results.md"):  # the same prompts in the same order
        assert (root / "two" / name).read_text() == (root / "one" / name).read_text()
    # the second process wrote nothing but its log
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(
        [p.name for p in (root / "one").iterdir()] + ["train_ddp_process_1.log", "wandb"])
    deadline = time.monotonic() + 15  # and it ended: no process is left behind
    while _processes_running_in(root / "two") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_running_in(root / "two")


def test_main_process_logs_metrics_and_a_sample_table_to_wandb(runs, codes_root):
    root, two = runs
    assert two.returncode == 0, two.stderr[-3000:]
    results = json.loads((root / "two" / "results.json").read_text())
    (run_file,) = (root / "two").glob("wandb/offline-run-*/run-*.wandb")  # one run: the main process's
    records = read_records(run_file)
    items = [item for r in records if r.HasField("history") for item in r.history.item]
    logged = {item.key or item.nested_key[0]: item for item in items}
    reranked = results[f"rerank_{RERANK}"]
    expected = {"eval/fid": results["plain"]["fid"], "eval/is_mean": results["plain"]["is_mean"],
                "eval/caption_loss": results["plain"]["caption_loss"],
                "eval/attributes/all": results["plain"]["attributes"]["all"],
                f"eval/rerank_{RERANK}/fid": reranked["fid"],
                f"eval/rerank_{RERANK}/caption_loss": reranked["caption_loss"],
                "eval/clip_score": results["plain"]["clip_score"], "eval/r_precision": results["plain"]["r_precision"],
                f"eval/rerank_{RERANK}/clip_score": reranked["clip_score"],
                "eval/real/clip_score": results["real"]["clip_score"]}
    for key, value in expected.items():
        assert json.loads(logged[key].value_json) == pytest.approx(value), key

    # the table: a row per grid image (the first prompts of the split), plain and reranked side by side
    table = {item.nested_key[1]: json.loads(item.value_json) for item in items
             if list(item.nested_key[:1]) == ["eval/samples"] and len(item.nested_key) == 2}
    assert table["_type"] == "table-file" and table["nrows"] == GRID_PROMPTS * SAMPLES and table["ncols"] == 6
    (artifact,) = [r.artifact for r in records if r.HasField("artifact")]
    files = {entry.path: entry.local_path for entry in artifact.manifest.contents}
    content = json.loads(Path(files["eval/samples.table.json"]).read_text())
    assert content["columns"] == ["prompt", "sample", "image", "caption_loss", f"rerank_{RERANK}_image",
                                  f"rerank_{RERANK}_caption_loss"]
    first_prompts = list(itertools.islice(DataConfig(root=str(codes_root.parent / "shapes")).captions("val"),
                                          GRID_PROMPTS))
    assert [row[:2] for row in content["data"]] == [[p, s] for p in first_prompts for s in range(SAMPLES)]
    images = [row[column] for row in content["data"] for column in (2, 4)]
    assert all(image["_type"] == "image-file" and image["path"] in files for image in images)
    config = {item.key: item.value_json for r in records if r.HasField("config") for item in r.config.update}
    assert json.loads(config["eval"])["num_prompts"] == PROMPTS  # the resolved eval config is the run config
