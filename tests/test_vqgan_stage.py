"""VQGANStage in real Lightning trainers: train.py end to end, precision, checkpoints, fine-tuning."""

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from t2i.data.convert import run as convert
from t2i.data.datamodule import ShardDataModule
from t2i.data.tokenizer import train_sentencepiece
from t2i.models.losses import VQGANLossConfig
from t2i.checkpoints import load_vqgan, weights_hash
from t2i.models.vqgan import VQGANConfig
from t2i.stages.configs import CodebookConfig, VQGANStageConfig
from t2i.stages.vqgan_stage import VQGANStage, broadcast_from_rank_zero

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


def _stage(lr_schedule: str = "constant", **loss):
    loss = {"perceptual_weight": 0, "disc_start": 2, **loss}
    stage = VQGANStageConfig(loss=VQGANLossConfig(**loss), codebook=CodebookConfig(restart_every=2),
                             lr_schedule=lr_schedule, log_images=4)
    return VQGANStage(VQGANConfig(**TINY), stage, lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9)))


def _compose(overrides: list[str]):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        del cfg.trainer["default_root_dir"]  # a Hydra run's folder: there is no run here
    return cfg


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
    # the optimizers' own counts: 4 autoencoder steps, 2 discriminator steps (batches 2 and 3)
    opt_ae, opt_disc = trainer.optimizers
    assert {int(state["step"]) for state in opt_ae.state.values()} == {4}
    assert {int(state["step"]) for state in opt_disc.state.values()} == {2}


def test_cosine_lr_schedule_spans_the_runs_max_steps(shapes_root, tmp_path):
    stage = _stage(lr_schedule="cosine", disc_start=0)
    trainer = _trainer(tmp_path, max_steps=5, limit_val_batches=0)
    trainer.fit(stage, datamodule=_datamodule(shapes_root))
    # the last step (4 of 0..4) sets the lr from the run's length, 5 steps: nothing to configure twice
    expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 5)))
    for optimizer in trainer.optimizers:
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="stage.lr_schedule must be one of"):
        _stage(lr_schedule="linear")


@pytest.mark.parametrize("overrides, strategy", [
    (["stage=vqgan"], "auto"),  # one device: no DDP
    (["stage=vqgan", "trainer.devices=8"], "ddp_find_unused_parameters_true"),  # strategy auto, several devices
    (["stage=vqgan", "trainer.devices=[0,1]"], "ddp_find_unused_parameters_true"),
    (["stage=vqgan", "trainer=ddp"], "ddp_find_unused_parameters_true"),
    (["stage=vqgan", "trainer=ddp_cpu"], "ddp_find_unused_parameters_true"),
    (["stage=vqgan", "trainer=multi_node"], "ddp_find_unused_parameters_true"),
    (["stage=vqgan", "trainer=gpu", "trainer.num_nodes=2"], "ddp_find_unused_parameters_true"),
    (["experiment=vqgan_shapes"], "auto"),
    (["stage=gpt", "trainer.devices=8"], "auto"),  # the GPT's DDP needs no search for unused parameters
    (["stage=gpt", "trainer=ddp"], "ddp"),
])
def test_trainer_presets_give_the_vqgan_ddp_that_finds_unused_parameters(overrides, strategy):
    assert instantiate(_compose(overrides).trainer, _convert_="all")["strategy"] == strategy


def test_ddp_that_does_not_find_unused_parameters_is_refused_with_the_setting(shapes_root, tmp_path):
    # one CPU process under DDP (in a child process: DDP initialises torch.distributed and sets env vars)
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_vqgan_stage import _datamodule, _stage, _trainer
from pathlib import Path
trainer = _trainer(Path({str(tmp_path)!r}), strategy="ddp", max_steps=1)
trainer.fit(_stage(), datamodule=_datamodule(Path({str(shapes_root)!r})))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "needs find_unused_parameters=True" in result.stderr
    assert "trainer.strategy=ddp_find_unused_parameters_true" in result.stderr


def _broadcast_on_rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def no_object_collectives(*args, **kwargs):  # pickling rank 0's CUDA tensor lands it on cuda:0 everywhere
        raise AssertionError("the restart picks must travel as a tensor")

    torch.distributed.broadcast_object_list = no_object_collectives
    picks = torch.full((5, 8), float(rank + 1))
    out = broadcast_from_rank_zero(picks)
    torch.save({"out": out, "same_tensor": out is picks}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_restart_picks_are_broadcast_as_a_tensor(tmp_path):
    mp.spawn(_broadcast_on_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["out"], torch.full((5, 8), 1.0))  # rank 0's values, written in place
        assert result["same_tensor"] and result["out"].dtype == torch.float32
    single = torch.ones(2)
    assert broadcast_from_rank_zero(single) is single  # one process: nothing to do


@pytest.mark.parametrize("disc_weight", [0.0, 0.75])  # with the GAN: its adaptive weight differentiates twice
def test_compiled_autoencoder_pass_trains_as_eager_with_the_same_keys(shapes_root, tmp_path, disc_weight):
    losses, keys = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        loss = VQGANLossConfig(perceptual_weight=0, disc_weight=disc_weight, disc_start=1)
        stage = VQGANStage(VQGANConfig(**TINY), VQGANStageConfig(loss=loss, compile=compiled),
                           lambda params: torch.optim.Adam(params, lr=1e-3))
        trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
        trainer.fit(stage, datamodule=_datamodule(shapes_root))
        assert (stage._compiled_autoencode is not None) == compiled
        losses[compiled], keys[compiled] = float(trainer.callback_metrics["train/loss"]), list(stage.state_dict())
    assert keys[True] == keys[False]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


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
    # fine-tuning starts from the checkpoint's weights: init_ckpt
    stage = VQGANStage.from_config(_compose(["stage=vqgan", *overrides, "stage.loss.perceptual_weight=0",
                                             f"init_ckpt={ckpt}"]))
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


@pytest.mark.parametrize("options, restart_every", [
    ({"entropy_weight": 0.1}, 2),
    ({"codebook": "simvq"}, 0),
    ({"codebook": "simvq", "entropy_weight": 0.1}, 2),  # restarts through the projection
])
def test_codebook_options_train_with_finite_losses(shapes_root, tmp_path, options, restart_every):
    settings = VQGANStageConfig(loss=VQGANLossConfig(perceptual_weight=0, disc_start=2),
                                codebook=CodebookConfig(restart_every=restart_every), log_images=0)
    stage = VQGANStage(VQGANConfig(**{**TINY, **options}), settings,
                       lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9)))
    quantizer = stage.vqgan.quantize
    codebook_before = quantizer.codebook().detach().clone()
    basis_before = quantizer.embedding.weight.detach().clone()
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(stage, datamodule=_datamodule(shapes_root))
    assert trainer.global_step == 4
    metrics = trainer.callback_metrics  # every step's (logged_metrics only every log_every_n_steps)
    assert math.isfinite(float(metrics["train/loss"]))
    assert all(torch.isfinite(p).all() for p in stage.parameters())
    if options.get("entropy_weight"):
        entropy = float(metrics["train/entropy"])
        assert entropy == pytest.approx(float(metrics["train/entropy_per_vector"]) - float(metrics["train/entropy_batch"]),
                                        abs=1e-5)
        assert math.isfinite(entropy) and float(metrics["train/entropy_batch"]) > 0
    else:
        assert "train/entropy" not in metrics
    moved = (quantizer.codebook().detach() - codebook_before).abs().sum(1) > 0
    if options.get("codebook") == "simvq":
        assert moved.all()  # every code, used or not
        assert not quantizer.embedding.weight.requires_grad
        if not restart_every:  # the frozen basis is untouched: the projection moved the codes
            assert torch.equal(quantizer.embedding.weight, basis_before)


def test_codebook_options_from_the_hydra_config():
    stage = VQGANStage.from_config(_compose(["stage=vqgan", "vqgan=shapes", "stage.loss.perceptual_weight=0",
                                             "vqgan.codebook=simvq", "vqgan.entropy_weight=0.05",
                                             "vqgan.entropy_temperature=0.02"]))
    cfg = stage.vqgan.cfg
    assert (cfg.codebook, cfg.entropy_weight, cfg.entropy_temperature) == ("simvq", 0.05, 0.02)
    assert stage.vqgan.quantize.kind == "simvq" and stage.vqgan.quantize.entropy_temperature == 0.02
    assert "vqgan.quantize.projection.weight" in dict(stage.named_parameters())
    plain = VQGANStage.from_config(_compose(["stage=vqgan", "vqgan=shapes", "stage.loss.perceptual_weight=0"]))
    assert plain.vqgan.cfg.codebook == "plain" and plain.vqgan.cfg.entropy_weight == 0


# -- one VQGAN for several image sizes (stage.image_sizes) ------------------------------------


@pytest.fixture(scope="module")
def shapes_root_64(tmp_path_factory):
    """Shapes stored at 64x64 (as the quickstart's): 32x32 images are made by resizing them."""
    root = tmp_path_factory.mktemp("data64") / "shapes"
    convert(["shapes", "--out", str(root), "--train", "32", "--val", "16", "--test", "0", "--size", "64", "--quiet"])
    return root


def _sized_datamodule(root, image_size: int):
    datamodule = ShardDataModule({"name": "shapes", "root": str(root), "image_size": image_size, "batch_size": 16,
                                  "num_workers": 0, "shuffle_buffer": 16,
                                  "splits": {"train": "train", "val": "val", "test": None}})
    datamodule.use_tokenizer(None)  # pixels only: no tokenizer model in this folder
    return datamodule


def test_images_at_other_sizes_are_the_ones_data_image_size_gives(shapes_root_64):
    several = _sized_datamodule(shapes_root_64, 64)
    several.decode_also_at([32, 64])
    batch = next(iter(several.loader("val")))
    one = _sized_datamodule(shapes_root_64, 32)
    alone = next(iter(one.loader("val")))
    assert "image_64" not in batch  # data.image_size's images are `image`
    assert batch["image_32"].shape == (16, 3, 32, 32) and batch["image"].shape == (16, 3, 64, 64)
    assert torch.equal(batch["image_32"], alone["image"])  # bit for bit: one resize, the data pipeline's
    moved = several.on_after_batch_transfer(batch)
    assert moved["image_32"].dtype == torch.float32
    assert torch.equal(moved["image_32"], one.on_after_batch_transfer(alone)["image"])


def test_image_sizes_train_each_size_in_turn_and_validate_each(shapes_root_64, tmp_path):
    settings = VQGANStageConfig(loss=VQGANLossConfig(perceptual_weight=0, disc_start=0), image_sizes=[32, 64, 64],
                                log_images=2)
    stage = VQGANStage(VQGANConfig(**TINY), settings, lambda params: torch.optim.Adam(params, lr=1e-3))
    trained = []  # the image size of each training step's batch, as the model sees it
    latents = stage.vqgan.latents

    def record(x):
        if torch.is_grad_enabled():
            trained.append(x.shape[-1])
        return latents(x)

    stage.vqgan.latents = record
    trainer = _trainer(tmp_path, max_steps=4, val_check_interval=2, limit_val_batches=1)
    trainer.fit(stage, datamodule=_sized_datamodule(shapes_root_64, 32))
    assert trained == [32, 64, 64, 32]
    metrics = trainer.callback_metrics
    for size in (32, 64):
        assert 0 < float(metrics[f"val/psnr_{size}"]) < 100 and 0 < float(metrics[f"val/ssim_{size}"]) <= 1
        assert f"val/reconstruction_{size}" in metrics
    mean = (float(metrics["val/psnr_32"]) + float(metrics["val/psnr_64"])) / 2
    assert float(metrics["val/psnr"]) == pytest.approx(mean)  # what stage.monitor keeps the best of
    # the throughput callback counts the size the step trained at
    batch = {"image": torch.zeros(2, 3, 32, 32), "image_64": torch.zeros(2, 3, 64, 64)}
    stage._trained_size = 64
    assert stage.throughput_counts(batch)[:2] == (2, 2 * 32 * 32)


def test_bad_image_sizes_are_refused_with_the_setting(shapes_root_64, tmp_path):
    for sizes in ([], [0, 32]):
        with pytest.raises(ValueError, match="stage.image_sizes must be null or a list of sizes >= 1"):
            VQGANStageConfig(image_sizes=sizes)
    def make(sizes):
        settings = VQGANStageConfig(loss=VQGANLossConfig(perceptual_weight=0), image_sizes=sizes)
        return VQGANStage(VQGANConfig(**TINY), settings, lambda params: torch.optim.Adam(params, lr=1e-3))

    with pytest.raises(ValueError, match=r"stage.image_sizes \[33\] are not multiples of the VQGAN's downsampling"):
        make([32, 33])
    stage = make([32, 64])
    with pytest.raises(ValueError, match="the batch has no 48x48 images"):
        stage.images_at({"image": torch.zeros(1, 3, 32, 32)}, 48)
    loader = _sized_datamodule(shapes_root_64, 32).loader("train")
    with pytest.raises(ValueError, match="stage.image_sizes needs the images at each size from t2i's ShardDataModule"):
        _trainer(tmp_path, max_steps=1).fit(stage, train_dataloaders=loader)
    with pytest.raises(ValueError, match="image sizes must be >= 1"):
        _sized_datamodule(shapes_root_64, 32).decode_also_at([0])
