"""The CUDA paths: skipped without a GPU; experiments/gpu_check.sh runs them (pytest -m gpu)."""

import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig, VQModel
from t2i.models.int8 import quantize_weights
from t2i.sampling import SamplingConfig, frozen_step, generate_codes
from t2i.stages.configs import GPTStageConfig
from t2i.stages.gpt_stage import GPTStage

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TINY = dict(n_image_codes=64, n_text_tokens=50, text_len=6, image_len=16, n_layer=2, n_head=2, n_embd=64)


def _fit(steps: int, **switches) -> tuple[GPTStage, float]:
    torch.manual_seed(0)
    cfg = GPTConfig(**TINY)
    stage = GPTStage(cfg, GPTStageConfig(warmup_steps=1, min_lr_ratio=1.0, cond_drop=0.0, **switches),
                     functools.partial(torch.optim.AdamW, lr=1e-3))
    data = [{"codes": torch.randint(0, 64, (16,)), "text": torch.randint(1, 50, (6,))} for _ in range(8 * steps)]
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stage, DataLoader(data, batch_size=8))
    return stage, float(trainer.callback_metrics["train/loss"])


def test_compiled_fused_bf16_training_matches_eager():
    eager, eager_loss = _fit(4)
    compiled, compiled_loss = _fit(4, compile=True, activation_checkpointing=True)
    assert compiled.trainer.optimizers[0].defaults["fused"]  # auto: fused AdamW on CUDA
    assert compiled_loss == pytest.approx(eager_loss, rel=2e-2)  # bf16: kernels differ, the steps agree


def test_vq_codes_are_exact_under_tf32_and_autocast():
    cfg = VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32,
                      embed_dim=16, n_embed=1024)
    torch.manual_seed(0)
    model = VQModel(cfg).cuda().eval()
    model.quantize.embedding.weight.data.normal_()
    x = torch.rand(64, 3, 32, 32, device="cuda") * 2 - 1
    exact = model.encode(x)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(model.encode(x), exact)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(exact.cpu(), model.cpu().encode(x.cpu()))  # the GPU picks the CPU's codes


def test_cuda_graph_decoding_samples_what_eager_decoding_samples():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, norm="sandwich")).cuda().eval()
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0]], device="cuda")
    for cfg in (SamplingConfig(greedy=True, guidance_scale=3.0), SamplingConfig(seed=0, top_k=20, samples_per_prompt=2)):
        seeds = None if cfg.seed is None else [0, 1]
        eager = generate_codes(model, text, cfg, seeds=seeds)
        assert torch.equal(generate_codes(model, text, cfg, seeds=seeds, step="compiled"), eager)
        assert torch.equal(generate_codes(model, text, cfg, seeds=seeds, step="compiled"), eager)  # replayed, not recaptured


@torch.no_grad()
def test_bf16_cuda_graph_step_computes_the_eager_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).cuda().to(torch.bfloat16).eval()
    tokens = torch.randint(0, 64, (4, 12), device="cuda")
    caches = [model.new_cache(4), model.new_cache(4)]
    for cache in caches:
        model(tokens[:, :8], cache)
    step = torch.compile(model.forward_at, mode="reduce-overhead", fullgraph=True)
    for position in range(8, 12):
        eager = model(tokens[:, position:position + 1], caches[0], head_rows=64)[:, -1].float()
        torch.compiler.cudagraph_mark_step_begin()
        graphed = step(tokens[:, position:position + 1], torch.tensor([position], device="cuda"), caches[1], 64)[:, -1].float()
        torch.testing.assert_close(graphed, eager, atol=3e-2, rtol=3e-2)


@torch.no_grad()
@pytest.mark.parametrize("weights", ["unchanged", "int8"])
def test_frozen_step_on_cuda_computes_the_eager_step(weights):
    # step=frozen on a GPU: max-autotune + CUDA graph + frozen weights; int8: torch's weight-only int8 product
    torch.manual_seed(0)
    model = quantize_weights(GPT(GPTConfig(**TINY, mlp="swiglu")).cuda().to(torch.bfloat16).eval(), weights)
    tokens = torch.randint(0, 64, (4, 12), device="cuda")
    cache = model.new_cache(4)
    model(tokens[:, :8], cache)
    with frozen_step(model, 4) as (step, frozen_cache):
        model(tokens[:, :8], frozen_cache)
        for position in range(8, 12):
            eager = model(tokens[:, position:position + 1], cache, head_rows=64)[:, -1].float()
            frozen = step(tokens[:, position:position + 1], torch.tensor([position], device="cuda"), frozen_cache, 64)[:, -1]
            torch.testing.assert_close(frozen.float(), eager, atol=3e-2, rtol=3e-2)
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0]], device="cuda")
    codes = generate_codes(model, text, SamplingConfig(top_k=20, guidance_scale=3.0), seeds=[0, 1], step="frozen")
    assert codes.shape == (2, 16) and codes.max() < 64


@torch.no_grad()
def test_pb_relax_fp16_runs_through_the_fused_kernels():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, norm="sandwich", pb_relax=True)).cuda().eval()
    tokens = torch.randint(0, 64, (4, model.cfg.block_size - 1), device="cuda")
    reference = model(tokens).float()
    half = model.half()(tokens).float()  # flash / memory-efficient attention only (never the fp16 math path)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half, reference, atol=5e-2, rtol=5e-2)
