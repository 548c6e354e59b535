"""Trainer presets, experiment recipes and the errors a wrong setting gets."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

from run_each import run_each
from t2i.devices import check_devices
from t2i.models.gpt import GPT, Block, GPTConfig
from t2i.stages.configs import SuperresOptions, VQGANStageConfig, typed_stage_config
from t2i.stages.scaling import scaled_lr

REPO = Path(__file__).parents[1]


def _compose(overrides: list[str], name: str = "train"):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("preset, expected", [
    ("cpu", {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true"}),
    ("gpu", {"accelerator": "gpu", "devices": 1, "precision": "auto"}),  # bf16-mixed or 16-mixed: t2i.plan
    ("ddp", {"accelerator": "gpu", "devices": -1, "strategy": "ddp", "num_nodes": 1}),
    ("multi_node", {"accelerator": "gpu", "devices": 8, "strategy": "ddp", "num_nodes": 2}),
    ("ddp_cpu", {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "precision": "32-true"}),
])
def test_trainer_presets(preset, expected):
    trainer = _compose([f"trainer={preset}"]).trainer
    assert {key: trainer[key] for key in expected} == expected
    assert trainer.use_distributed_sampler is False  # the shard streams split the data over ranks


def test_fsdp_preset_wraps_each_transformer_block():
    strategy = instantiate(_compose(["trainer=fsdp"]).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.sharding_strategy.name == "FULL_SHARD"


@pytest.mark.parametrize("recipe, layers, width, nodes, devices", [
    ("shapes", 4, 96, 1, 1),
    ("muge_base", 12, 768, 1, 8),
    ("muge_large", 24, 1024, 4, 8),
    ("coco_cn_base", 12, 768, 1, 8),
    ("flickr30k_cn_base", 12, 768, 1, 8),
])
def test_experiment_recipes_are_complete_runs(recipe, layers, width, nodes, devices):
    cfg = _compose([f"experiment={recipe}"])
    assert cfg.stage.name == "gpt"
    assert (cfg.model.n_layer, cfg.model.n_embd) == (layers, width)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (nodes, devices)
    assert cfg.trainer.max_steps > 0 and cfg.stage.warmup_steps > 0
    assert cfg.data.root.endswith("_codes") and cfg.data.source == "pretokenize"
    assert cfg.stage.caption_prob > 0  # Caption Loss and reranking at evaluation
    assert cfg.stage.sampling.guidance_scale is not None  # the sampling eval.py inherits
    if recipe != "shapes":
        assert cfg.vqgan.n_embed == 16384 and cfg.trainer.precision == "bf16-mixed"
        assert cfg.logger._target_.endswith("WandbLogger") and cfg.logger.group == recipe
        gpt = GPTConfig(**cfg.model, n_image_codes=16384, n_text_tokens=16000, text_len=32, image_len=256)
        assert gpt.block_size == 1 + 32 + 1 + 256


def test_device_requests_beyond_the_machine_name_the_setting():
    with pytest.raises(ValueError, match=r"trainer.devices=4096 .* set trainer.devices to at most"):
        check_devices("cpu", 4096)
    check_devices("cpu", 1)
    check_devices("cpu", -1)  # all of them
    check_devices("cpu", "auto")


def test_bad_settings_get_messages_that_name_them(tmp_path):
    run = f"hydra.run.dir={tmp_path}"
    unknown_group, unknown_key, too_many, missing_root = run_each(  # train.py each time, in one process
        ["train.py", "model=huge", run], ["train.py", "trainer.devcies=2", run],
        ["train.py", "stage=gpt", "data=shapes_codes", f"data.root={tmp_path}", "trainer.devices=4096", run],
        ["train.py", "stage=gpt", "data=shapes_codes", f"data.root={tmp_path / 'nowhere'}", run])
    assert unknown_group[0] != 0
    assert "Could not find 'model/huge'" in unknown_group[1] and "Available options" in unknown_group[1]
    assert unknown_key[0] != 0 and "Could not override 'trainer.devcies'" in unknown_key[1]
    assert missing_root[0] != 0
    assert f"data.root={tmp_path / 'nowhere'} does not exist" in missing_root[1]
    assert "python -m t2i.pretokenize" in missing_root[1]
    assert too_many[0] != 0 and "trainer.devices=4096 but this machine has" in too_many[1]


def test_stage_settings_are_checked_against_their_schema_when_composed():
    """conf/stage/gpt.yaml and vqgan.yaml are typed (t2i.stages.configs): an unknown key or a value of the wrong
    type fails when the config is composed, naming the key; one added past the schema with + when the stage is built."""
    for overrides, problem in [
        (["stage.warmup_step=5"], "Key 'warmup_step' not in 'GPTStageConfig'\n    full_key: stage.warmup_step"),
        (["stage.warmup_steps=abc"], "could not be converted to Integer\n    full_key: stage.warmup_steps"),
        (["stage.sampling={top_kk: 5}"], "Key 'top_kk' not in 'SamplingConfig'\n    full_key: stage.sampling.top_kk"),
        (["stage=vqgan", "stage.loss={disc_wieght: 1}"], "Key 'disc_wieght' not in 'VQGANLossConfig'\n    full_key: "
                                                         "stage.loss.disc_wieght"),
    ]:
        with pytest.raises(ConfigCompositionException) as refused:
            _compose(overrides)
        assert problem in str(refused.value.__cause__)
    with pytest.raises(ValueError, match="stage=gpt has no setting stage.warmup_step: its settings are"):
        typed_stage_config(_compose(["+stage.warmup_step=5"]).stage)
    with pytest.raises(ValueError, match=r"stage.cond_drop must be in \[0, 1\], got 1.5"):
        typed_stage_config(_compose(["stage.cond_drop=1.5"]).stage)
    assert typed_stage_config(_compose([]).stage).sample_step == "auto"  # the grids' steps, as eval.py's default
    with pytest.raises(ValueError, match="stage.sample_step must be one of auto, eager, static, compiled, frozen, got 'graph'"):
        typed_stage_config(_compose(["stage.sample_step=graph"]).stage)
    superres = typed_stage_config(_compose(["experiment=superres_shapes", "stage.superres.stride=[4,8]"]).stage)
    assert superres.superres == SuperresOptions(window=[8, 8], stride=[4, 8], context="window")
    vqgan = typed_stage_config(_compose(["stage=vqgan", "stage.codebook.restart_every=7"]).stage)
    assert isinstance(vqgan, VQGANStageConfig) and vqgan.codebook.restart_every == 7


def test_lr_scaling_rules():
    assert scaled_lr(3e-4, 512, "none", 256) == 3e-4
    assert scaled_lr(3e-4, 512, "linear", 256) == pytest.approx(6e-4)
    assert scaled_lr(3e-4, 1024, "sqrt", 256) == pytest.approx(6e-4)
    assert scaled_lr(4.5e-6, 64, "linear", 1) == pytest.approx(2.88e-4)  # taming's VQGAN rule
    with pytest.raises(ValueError, match="stage.lr_scaling must be one of"):
        scaled_lr(1e-3, 8, "cubic", 1)


@pytest.mark.parametrize("size, blocks", [("base", ("layer", "gelu", "learned")), ("large", ("layer", "gelu", "learned")),
                                          ("llamagen_b", ("rms", "swiglu", "rope2d"))])
def test_model_sizes_build(size, blocks):
    cfg = _compose(["stage=gpt", f"model={size}"])
    gpt = GPTConfig(**cfg.model, n_image_codes=16384, n_text_tokens=16000, text_len=32, image_len=256)
    assert (gpt.norm_type, gpt.mlp, gpt.pos) == blocks
    if size == "llamagen_b":
        with torch.device("meta"):
            model = GPT(gpt)
        blocks_only = sum(p.numel() for p in model.blocks.parameters())
        assert 80e6 < blocks_only < 90e6  # 12 x (4 x 768^2 attention + 3 x 768 x 2048 SwiGLU): LlamaGen-B's blocks
        assert not any(name.endswith("bias") for name in model.state_dict())
