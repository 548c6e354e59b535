"""Weight-only int8 sampling (sampling.weights=int8): the quantization, the quantized GPT, its frozen step."""

from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from t2i.models.gpt import GPT, GPTConfig
from t2i.models.int8 import Int8Linear, Int8SwiGLU, quantize_weights
from t2i.sampling import SamplingConfig, T2IPipeline, frozen_step, generate_codes, prompt_seeds

TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=6, image_len=9, n_layer=2, n_head=4, n_embd=64)
LLAMA = dict(norm_type="rms", mlp="swiglu", pos="rope2d", bias=False)


def test_int8_linear_rounds_each_weight_to_its_row_scale():
    torch.manual_seed(0)
    linear = nn.Linear(48, 20)
    linear.weight.data[3] *= 100  # rows of very different sizes get their own scales
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and q.scales.shape == (20,) and q.weight.abs().max() == 127
    restored = q.weight.float() * q.scales.float()[:, None]
    assert ((restored - linear.weight).abs() <= q.scales.float()[:, None] / 2 * 1.01).all()
    x = torch.randn(5, 1, 48, dtype=torch.bfloat16)
    expected = F.linear(x.float(), restored, linear.bias)
    assert torch.allclose(q(x).float(), expected, rtol=0.02, atol=0.02)
    assert torch.allclose(q(x, slice(2, 7)).float(), expected[..., 2:7], rtol=0.02, atol=0.02)  # a block of rows


@pytest.mark.parametrize("options", [dict(norm="sandwich"), LLAMA, dict(pos="rope", qk_norm=True, layout="paipainter")])
def test_quantized_gpt_computes_what_the_fp32_one_does(options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, **options)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize_weights(model)
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    assert any(isinstance(m, Int8SwiGLU) for m in quantized.modules()) == (options.get("mlp") == "swiglu")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is left as it was
    assert quantize_weights(model, "unchanged") is model
    tokens = torch.randint(0, 40, (3, 15))
    with torch.no_grad():
        exact, approx = model(tokens), quantized(tokens).float()
    error = (approx - exact).abs() / exact.std()
    assert error.max() < 0.2 and error.mean() < 0.03
    with pytest.raises(ValueError, match="sampling.weights must be one of"):
        quantize_weights(model, "int4")


@torch.no_grad()
def test_frozen_int8_step_computes_the_eager_int8_step():
    # the frozen step is where inductor puts torch's int8 kernels in; Llama blocks: the stacked SwiGLU too
    torch.manual_seed(0)
    quantized = quantize_weights(GPT(GPTConfig(**TINY, **LLAMA)).eval())
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0]])
    prefix = quantized.layout.prefix(text)
    outputs = {}
    for mode in ("static", "frozen"):
        static = nullcontext((quantized.forward_at, quantized.new_cache(len(prefix))))
        with frozen_step(quantized, len(prefix)) if mode == "frozen" else static as (step, cache):
            quantized(prefix, cache, last=1, head_rows=40)
            token, position = torch.tensor([[3], [4]]), torch.tensor([cache.length])
            outputs[mode] = step(token, position, cache, 40).float()
    assert torch.allclose(outputs["frozen"], outputs["static"], rtol=0.05, atol=0.05)
    codes = generate_codes(quantized, text, SamplingConfig(top_k=10), seeds=[0, 1], step="frozen")
    assert codes.shape == (2, 9) and codes.max() < 40


def test_pipeline_samples_with_int8_weights_and_scores_with_the_loaded_ones(gpt_run):
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match="fast only with sampling.step=frozen"):
        pipeline = T2IPipeline.from_checkpoint(ckpt, weights="int8", step="eager")
    assert isinstance(pipeline.sampler.head, Int8Linear) and isinstance(pipeline.gpt.head, nn.Linear)
    prompts = ["画面左上角有一个红色的小圆形", "一个蓝色的方形"]
    progress = []
    samples = pipeline.sample(prompts, SamplingConfig(seed=0), batch_size=1,
                               progress=lambda done, total: progress.append((done, total)))
    images = samples.images
    assert images.dtype == torch.uint8 and images.shape[:2] == (2, 3)
    assert samples.seeds == prompt_seeds(0, prompts) and samples.codes.shape[0] == 2
    # progress over both sampling batches (one prompt each): positions fixed so far, up to both batches' positions
    positions = 2 * pipeline.gpt.cfg.image_len
    assert [done for done, _ in progress] == list(range(1, positions + 1)) and {t for _, t in progress} == {positions}
    with pytest.raises(ValueError, match="sampling.weights must be one of"):
        T2IPipeline.from_checkpoint(ckpt, weights="fp8", step="frozen")
