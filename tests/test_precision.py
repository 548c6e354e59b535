"""Mixed precision for both stages in real Lightning trainers on the CPU.

Lightning turns precision="16-mixed" into bf16 on a CPU, so fp16 autocast with its GradScaler is
requested through the precision plugin itself: the same code path a GPU takes. The gradient norm
the stages log (and clip) must be the unscaled one: close to the fp32 run's, not 256 times it (a
small initial loss scale, so that the first step does not overflow and get skipped).
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins import MixedPrecision
from omegaconf import OmegaConf

from t2i.data.datamodule import ShardDataModule
from t2i.models import losses
from t2i.models.losses import adaptive_weight
from t2i.stages.gpt_stage import GPTStage
from t2i.stages.vqgan_stage import VQGANStage

REPO = Path(__file__).parents[1]
TINY_VQGAN = dict(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
                  embed_dim=8, n_embed=64)
PRECISIONS = {
    "32-true": {"precision": "32-true"},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=256.0))]},
}


def _config(overrides: list[str]):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def _fit(stage_cls, cfg, precision: str, tmp_path, steps: int = 2) -> tuple[L.LightningModule, dict]:
    torch.manual_seed(0)
    datamodule = ShardDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    stage = stage_cls.from_config(cfg, datamodule)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=tmp_path, **PRECISIONS[precision])
    trainer.fit(stage, datamodule=datamodule)
    assert trainer.global_step == steps
    assert all(torch.isfinite(p).all() for p in stage.parameters())
    return stage, {k: float(v) for k, v in trainer.callback_metrics.items()}


def _gpt_config(codes_root):
    return _config(["stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                    "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=8", "data.num_workers=0",
                    "stage.sample_every_n_steps=0", "stage.warmup_steps=1", "trainer.gradient_clip_val=1.0"])


def _vqgan_config(codes_root):
    model = [f"vqgan.{key}={value}".replace(" ", "") for key, value in TINY_VQGAN.items()]
    return _config(["stage=vqgan", "vqgan=shapes", *model, "data=shapes", f"data.root={codes_root.parent / 'shapes'}",
                    "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "stage.loss.perceptual_weight=0",
                    "stage.loss.disc_start=0", "stage.lr_scaling=none", "optim.lr=1e-3"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_gpt_stage_mixed_precision_steps(codes_root, tmp_path, precision):
    cfg = _gpt_config(codes_root)
    _, fp32 = _fit(GPTStage, cfg, "32-true", tmp_path, steps=1)
    _, mixed = _fit(GPTStage, cfg, precision, tmp_path, steps=1)
    assert mixed["train/grad_norm"] == pytest.approx(fp32["train/grad_norm"], rel=0.1)
    assert mixed["train/loss"] == pytest.approx(fp32["train/loss"], rel=0.05)
    _fit(GPTStage, cfg, precision, tmp_path, steps=3)  # and keeps stepping


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_vqgan_stage_mixed_precision_steps(codes_root, tmp_path, precision, monkeypatch):
    # the adaptive GAN weight's gradients are taken of losses scaled as the GradScaler scales them
    # (fp16: 256, the scaler's initial scale here; without a scaler: 1), see test_vqgan.py
    scales = []

    def recording(*args, loss_scale=1.0, **kwargs):
        scales.append(loss_scale)
        return adaptive_weight(*args, loss_scale=loss_scale, **kwargs)

    monkeypatch.setattr(losses, "adaptive_weight", recording)
    cfg = _vqgan_config(codes_root)
    _, fp32 = _fit(VQGANStage, cfg, "32-true", tmp_path, steps=1)
    _, mixed = _fit(VQGANStage, cfg, precision, tmp_path, steps=1)
    assert scales == [1.0, 256.0 if precision == "16-mixed" else 1.0]
    # after unscaling, near the fp32 values (the bug this guards against is a factor of 256); the adaptive weight is a
    # ratio of two gradient norms, which bf16's 8-bit mantissa moved by 11% on an Intel Xeon
    tolerance = {"train/adaptive_weight": 0.25 if precision == "bf16-mixed" else 0.1}
    for name in ("train/grad_norm", "train/disc_grad_norm", "train/adaptive_weight"):
        assert mixed[name] == pytest.approx(fp32[name], rel=tolerance.get(name, 0.1)), name
    _fit(VQGANStage, cfg, precision, tmp_path, steps=3)
