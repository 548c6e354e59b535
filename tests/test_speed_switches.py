"""The training speed switches and the precision policy, on the CPU: MFU's FLOP count against a counted
forward + backward, activation checkpointing and torch.compile computing what the plain model computes,
the fused optimizer's resolution, and the computations kept in exact fp32 whatever the global settings."""

import csv
import functools
import math

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.throughput import measure_flops
from omegaconf import OmegaConf

from t2i.checkpoints import read_checkpoint
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VectorQuantizer
from t2i.precision import exact_fp32, set_matmul_precision
from t2i.stages.configs import GPTStageConfig
from t2i.stages.gpt_stage import GPTStage
from test_precision import _fit, _gpt_config

TINY = dict(n_image_codes=64, n_text_tokens=50, text_len=6, image_len=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("options", [{}, {"norm": "sandwich", "pb_relax": True}, {"layout": "paipainter"},
                                     {"tie_head": True}])
def test_flops_per_sequence_is_the_counted_forward_and_backward(options):
    cfg = GPTConfig(**TINY, **options)
    with torch.device("meta"):
        model = GPT(cfg)
    length = cfg.block_size - 1
    tokens = torch.randint(0, cfg.vocab_size, (3, length), device="meta")
    counted = measure_flops(model, lambda: model(tokens), lambda logits: logits.sum())
    assert counted == 3 * model.flops_per_sequence(length)


def test_base_size_flops_per_token():
    # pai-painter-base with a 16k text vocabulary: ~6 x 120M matmul weights + attention over 289 positions
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(cfg)
    length = cfg.block_size - 1
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == 12 * 12 * 768 * 768 + 768 * cfg.vocab_size
    assert model.flops_per_sequence(length) / length == 6 * linear + 12 * 12 * 768 * length


@pytest.mark.parametrize("norm", ["pre", "sandwich"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(norm):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, norm=norm, dropout=0.1)).train()
    tokens = torch.randint(0, model.cfg.vocab_size, (4, model.cfg.block_size - 1))
    results = []
    for recompute in (False, True):
        model.checkpoint_activations = recompute
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks: the recomputation replays them
        loss = model(tokens).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.equal(plain, recomputed)
    for a, b in zip(plain_grads, recomputed_grads):
        torch.testing.assert_close(a, b)
    model.eval()  # sampling and evaluation never recompute (no backward)
    with torch.no_grad():
        assert torch.equal(model(tokens), GPT.forward(model, tokens))


def _optimizer_of(fused, factory=functools.partial(torch.optim.AdamW, lr=1e-3)) -> torch.optim.Optimizer:
    stage = GPTStage(GPTConfig(**TINY), GPTStageConfig(fused_optimizer=fused), factory)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    stage.trainer = trainer
    return stage.configure_optimizers()["optimizer"]


def test_fused_optimizer_resolves_by_device_and_class():
    assert not _optimizer_of("auto").defaults["fused"]  # auto: fused on CUDA only
    assert _optimizer_of(True).defaults["fused"]  # torch has a fused AdamW for CPUs too
    assert "fused" not in _optimizer_of("auto", functools.partial(torch.optim.RAdam, lr=1e-3)).defaults
    with pytest.raises(ValueError, match="stage.fused_optimizer=true but RAdam"):
        _optimizer_of(True, functools.partial(torch.optim.RAdam, lr=1e-3))
    with pytest.raises(ValueError, match="stage.fused_optimizer must be"):
        GPTStageConfig(fused_optimizer="yes")


@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_the_checkpoint_keys(codes_root, tmp_path):
    cfg = _gpt_config(codes_root)
    losses = {}
    for compiled in (False, True):
        OmegaConf.update(cfg, "stage.compile", compiled)
        stage, metrics = _fit(GPTStage, cfg, "32-true", tmp_path, steps=3)
        losses[compiled] = metrics["train/loss"]
        assert (stage._compiled_step is not None) == compiled
        assert list(stage.state_dict()) == ["gpt." + key for key in stage.gpt.state_dict()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_throughput_logs_consistent_tokens_flops_and_mfu(gpt_run):
    # gpt_run trains with callbacks.throughput.window=2 and peak_flops=1e9
    with open(gpt_run / "csv" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/mfu")]
    assert rows
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    cfg = GPTConfig(**checkpoint["t2i"]["gpt"])
    length = cfg.block_size - 1
    for row in rows:
        tokens, flops, mfu = (float(row[k]) for k in ("train/tokens_per_s", "train/flops_per_s", "train/mfu"))
        assert flops == pytest.approx(tokens / length * GPT(cfg).flops_per_sequence(length), rel=1e-6)
        assert mfu == pytest.approx(flops / 1e9, rel=1e-6)


def test_exact_fp32_overrides_the_global_settings_and_restores_them():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    set_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with exact_fp32("cpu"):
                assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
                assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # autocast off
            assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        set_matmul_precision("tf32")


def test_vq_search_picks_the_nearest_code_under_reduced_precision():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(512, 8)
    quantizer.embedding.weight.data.normal_()
    z = torch.randn(4096, 8)
    exact = torch.cdist(z.double(), quantizer.embedding.weight.double()).argmin(1)
    before = torch.get_float32_matmul_precision()
    set_matmul_precision("medium")
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(quantizer.nearest(z), exact)
    finally:
        torch.set_float32_matmul_precision(before)


def test_llama_style_blocks_train_in_the_stage_with_captioning(codes_root, tmp_path):
    cfg = _gpt_config(codes_root)
    for key, value in {"model.norm_type": "rms", "model.mlp": "swiglu", "model.pos": "rope2d", "model.bias": False,
                       "model.qk_norm": True, "stage.caption_prob": 0.5}.items():
        OmegaConf.update(cfg, key, value)
    stage, metrics = _fit(GPTStage, cfg, "32-true", tmp_path, steps=3)
    assert stage.gpt.cfg.pos == "rope2d" and math.isfinite(metrics["train/loss"])
    assert metrics["train/text_loss"] > 0  # the captioning rows trained too
