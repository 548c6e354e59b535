"""VQGANStage in real Lightning trainers: train.py end to end, precision, checkpoints, fine-tuning."""

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from t2i.data.convert import run as convert
from t2i.data.datamodule import ShardDataModule
from t2i.data.tokenizer import train_sentencepiece
from t2i.models.losses import VQGANLossConfig
from t2i.models.vqgan import VQGANConfig, load_vqgan, weights_hash
from t2i.stages.vqgan_stage import CodebookConfig, VQGANStage

REPO = Path(__file__).parents[1]
TINY = dict(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
            embed_dim=8, n_embed=64, l2_normalize=True, legacy_beta=False)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    convert(["shapes", "--out", str(root), "--train", "96", "--val", "32", "--test", "0", "--size", "32", "--quiet"])
    captions = [line for line in ["红色的圆形", "蓝色的方块", "绿色三角形"] * 20]
    (root / "tokenizer.model").write_bytes(train_sentencepiece(captions, 300))
    return root


def _datamodule(root):
    return ShardDataModule({"name": "shapes", "root": str(root), "image_size": 32, "batch_size": 16,
                            "num_workers": 0, "shuffle_buffer": 16, "splits": {"train": "train", "val": "val", "test": None}})


def _stage(**loss):
    loss = {"perceptual_weight": 0, "disc_start": 2, **loss}
    return VQGANStage(VQGANConfig(**TINY), VQGANLossConfig(**loss),
                      lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9)),
                      CodebookConfig(restart_every=2), log_images=4)


def _trainer(tmp_path, **kwargs):
    options = dict(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                   num_sanity_val_steps=0, enable_checkpointing=False)
    options.update(kwargs)
    return L.Trainer(**options)


def test_global_step_counts_batches_and_discriminator_starts_late(shapes_root, tmp_path):
    stage = _stage()
    disc_before = [p.clone() for p in stage.loss.discriminator.parameters()]
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(stage, datamodule=_datamodule(shapes_root))
    assert trainer.global_step == 2  # two batches, not two per optimizer
    # disc_start=2: the discriminator has not moved yet
    assert all(torch.equal(a, b) for a, b in zip(disc_before, stage.loss.discriminator.parameters()))
    trainer = _trainer(tmp_path, max_steps=4)
    trainer.fit(stage, datamodule=_datamodule(shapes_root))
    assert trainer.global_step == 4
    assert not all(torch.equal(a, b) for a, b in zip(disc_before, stage.loss.discriminator.parameters()))


def test_bf16_mixed_steps_run(shapes_root, tmp_path):
    # (Lightning runs "16-mixed" as bf16 on a CPU; fp16 autocast itself is tested in test_vqgan.py)
    stage = _stage(disc_start=0)
    trainer = _trainer(tmp_path, max_steps=2, precision="bf16-mixed", limit_val_batches=0)
    trainer.fit(stage, datamodule=_datamodule(shapes_root))
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_train_py_end_to_end_then_load_and_fine_tune(shapes_root, tmp_path):
    overrides = [f"vqgan.{key}={value}".replace(" ", "") for key, value in TINY.items()]
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "stage=vqgan", "data=shapes", f"data.root={shapes_root}", "data.image_size=32",
         "data.batch_size=16", "data.num_workers=0", *overrides, "stage.loss.perceptual_weight=0",
         "optim.lr=1e-3", "stage.lr_scaling=none", "trainer=cpu", "trainer.max_steps=6", "trainer.val_check_interval=3",
         "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    model = load_vqgan(ckpt)  # the config travels in the checkpoint
    assert model.cfg == VQGANConfig(**TINY)
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("val/psnr", "val/ssim", "val/codebook_used", "val/codebook_perplexity", "train/pixel"):
        assert name in metrics
    assert list((run_dir / "csv" / "version_0" / "images").glob("reconstructions-step*.png"))
    # fine-tuning starts from the checkpoint's weights
    stage = VQGANStage(VQGANConfig(**TINY), VQGANLossConfig(perceptual_weight=0), torch.optim.Adam,
                       init_ckpt=str(ckpt))
    assert weights_hash(stage.vqgan) == weights_hash(model)


def test_eval_reconstruct_reports_psnr_and_usage(shapes_root, tmp_path):
    stage = _stage()
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in stage.vqgan.state_dict().items()},
                "t2i": {"vqgan": TINY}}, tmp_path / "v.ckpt")
    result = subprocess.run(
        [sys.executable, "eval.py", "task=reconstruct", f"ckpt={tmp_path / 'v.ckpt'}", "data=shapes",
         f"data.root={shapes_root}", "data.image_size=32", "split=val", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["images"] == 32 and results["grid"] == [16, 16]
    assert 0 < results["codebook_used"] <= 1 and results["psnr"] > 0
    assert set(results["oracle_on_reconstructions"]) >= {"color", "shape", "position", "all"}
