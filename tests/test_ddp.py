"""Both stages under 2-process DDP on the CPU (gloo), started the way users start them: train.py
with a trainer preset. A probe callback (tests/ddp_probe.py) records what every rank saw."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
TINY_VQGAN = dict(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
                  embed_dim=8, n_embed=64)


def _train_ddp(run_dir: Path, *overrides: str) -> tuple[list[dict], str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run(
        [sys.executable, "train.py", "trainer=ddp_cpu", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0",
         "+callbacks.probe._target_=ddp_probe.RankProbe", f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    probes = [json.loads((run_dir / f"probe-rank{rank}.json").read_text()) for rank in (0, 1)]
    return probes, result.stdout + result.stderr


def _check_ranks(probes: list[dict], train_samples: int, batch_size: int, val_metric: str) -> None:
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes)
    assert all(p["global_step"] == 6 for p in probes)
    per_epoch = train_samples // (2 * batch_size)  # batches per rank per epoch
    for epoch in ("0", "1"):
        keys = [probes[0]["keys"][epoch], probes[1]["keys"][epoch]]
        assert len(keys[0]) == len(keys[1])  # same number of batches: no rank waits on the other
        seen = keys[0] + keys[1]
        assert len(seen) == len(set(seen)), f"a sample was read twice in epoch {epoch}"
    assert len(probes[0]["keys"]["0"]) == per_epoch * batch_size
    # epoch 0 covered the whole split (its size is a multiple of the global batch here)
    assert len(probes[0]["keys"]["0"]) + len(probes[1]["keys"]["0"]) == train_samples
    # the ranks' models are one model: DDP averaged every gradient
    assert probes[0]["param_sum"] == pytest.approx(probes[1]["param_sum"], rel=1e-6)
    assert probes[0]["param_abs_sum"] == pytest.approx(probes[1]["param_abs_sum"], rel=1e-6)
    # synced losses are the same number on both ranks
    synced = [k for k in probes[0]["metrics"] if k.startswith(("train/", "val/")) and "per_s" not in k]
    assert "train/loss" in synced and val_metric in synced
    for key in synced:
        assert probes[0]["metrics"][key] == pytest.approx(probes[1]["metrics"][key], rel=1e-5), key


@pytest.mark.slow
def test_gpt_stage_under_two_process_ddp(codes_root, tmp_path):
    run_dir = tmp_path / "gpt"
    probes, output = _train_ddp(run_dir, "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                        "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=8", "data.num_workers=0",
                        "stage.warmup_steps=2", "stage.sample_every_n_steps=3", "stage.num_sample_prompts=2",
                        "stage.sampling.samples_per_prompt=1", "stage.lr_scaling=linear",
                        "stage.lr_reference_batch=8")
    _check_ranks(probes, train_samples=64, batch_size=8, val_metric="val/loss")
    # the scale printed at start: 2 processes x 8, and the lr scaled linearly from a batch of 8
    assert "effective batch 16 = 8 per device x 1 accumulated x 2 processes; lr 0.0006" in output
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "csv" / "version_0" / "images" / "samples-step0000006.png").is_file()  # rank 0 drew grids


@pytest.mark.slow
def test_vqgan_stage_under_two_process_ddp(codes_root, tmp_path):
    images = codes_root.parent / "shapes"  # the image shards the code shards were made from
    run_dir = tmp_path / "vqgan"
    model = [f"vqgan.{key}={value}".replace(" ", "") for key, value in TINY_VQGAN.items()]
    # disc_start=3: steps without and with the discriminator, both under DDP
    probes, _ = _train_ddp(run_dir, "stage=vqgan", "vqgan=shapes", *model, "data=shapes", f"data.root={images}",
                        "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
                        "stage.loss.perceptual_weight=0", "stage.loss.disc_start=3", "stage.lr_scaling=none",
                        "optim.lr=1e-3", "stage.codebook.restart_every=2")
    _check_ranks(probes, train_samples=64, batch_size=8, val_metric="val/psnr")
    assert {"train/disc", "train/disc_grad_norm", "train/codes_restarted", "val/codebook_used"} <= set(probes[0]["metrics"])
