"""Sampling: KV cache equivalence, filtering, guidance, seeds, batching."""

import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from t2i.models.gpt import GPT, GPTConfig
from t2i.sampling import (CaptionConfig, SamplingConfig, SamplingStats, ar, draw, filter_logits, frozen_step, generate_codes,
                          generate_text, guidance_scales, prompt_uniforms)
from t2i.sampling.options import FROZEN_BREAK_EVEN, auto_step_mode

REPO = Path(__file__).parents[1]


def seeds_of(cfg, text):
    """Prompt i's seed cfg.seed + i (None: unseeded): generate_codes takes seeds, not the config's seed alone."""
    return None if cfg.seed is None else [cfg.seed + i for i in range(len(text))]


TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=6, image_len=9, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(**TINY, norm="sandwich")).eval()


@pytest.fixture(scope="module")
def text():
    return torch.tensor([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_with_cache_equals_recomputation(model, text, guidance):
    cfg = SamplingConfig(greedy=True, guidance_scale=guidance)
    cached = generate_codes(model, text, cfg)
    recomputed = generate_codes(model, text, cfg, use_cache=False)
    assert cached.shape == (3, 9)
    assert torch.equal(cached, recomputed)
    assert cached.max() < 40  # image codes only


def test_seeded_sampling_is_reproducible_and_batched(model, text):
    cfg = SamplingConfig(samples_per_prompt=4, seed=7, top_k=10, temperature=1.5)
    seeds = seeds_of(cfg, text)
    a, b = generate_codes(model, text, cfg, seeds=seeds), generate_codes(model, text, cfg, seeds=seeds)
    assert a.shape == (12, 9) and torch.equal(a, b)
    assert not torch.equal(a, generate_codes(model, text, cfg, seeds=[8, 9, 10]))
    # with the same seeds, cached and recomputed sampling draw the same codes
    assert torch.equal(a, generate_codes(model, text, cfg, seeds=seeds, use_cache=False))
    # the config's seed alone does not say which stream each prompt takes: the error names the fix
    with pytest.raises(ValueError, match=r"seeds=prompt_seeds\(seed, prompts\)"):
        generate_codes(model, text, cfg)
    with pytest.raises(ValueError, match="seeds="):
        generate_text(model, a[:3], CaptionConfig(strategy="sample", seed=0))


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.85)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits)).any()


def test_guidance_scale_one_equals_unguided_and_scale_changes_result(model, text):
    plain = generate_codes(model, text, SamplingConfig(greedy=True))
    assert torch.equal(plain, generate_codes(model, text, SamplingConfig(greedy=True, guidance_scale=1.0)))
    assert not torch.equal(plain, generate_codes(model, text, SamplingConfig(greedy=True, guidance_scale=8.0)))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)


# the t2i layout's step modes are checked on a quickstart-size model by tests/test_sampling_golden.py
@pytest.mark.parametrize("layout", ["paipainter"])
@pytest.mark.parametrize("step", ["static", "compiled"])
def test_fixed_shape_steps_sample_what_the_eager_step_samples(text, layout, step):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, norm="sandwich", layout=layout)).eval()
    for cfg in (SamplingConfig(greedy=True, guidance_scale=3.0), SamplingConfig(seed=3, top_k=10, samples_per_prompt=2)):
        seeds = seeds_of(cfg, text)
        assert torch.equal(generate_codes(model, text, cfg, seeds=seeds, step=step),
                           generate_codes(model, text, cfg, seeds=seeds))
    with pytest.raises(ValueError, match="sampling.step must be one of auto, eager, static, compiled, frozen"):
        generate_codes(model, text, SamplingConfig(), step="graph")


def test_auto_picks_the_step_mode_for_the_device_the_work_and_the_weights(model, text):
    enough = FROZEN_BREAK_EVEN[1]
    assert auto_step_mode("cpu", enough - 1) == "eager"  # a one-off does not pay back frozen's compile
    assert auto_step_mode("cpu", enough) == "frozen"
    assert auto_step_mode("cpu", enough, compilations=2) == "eager"  # each batch size compiles its own step
    assert auto_step_mode("cpu", 2 * enough, compilations=2) == "frozen"
    assert auto_step_mode("cpu", enough, batch_size=2) == "eager"  # larger batches gain less per position
    assert auto_step_mode("cpu", FROZEN_BREAK_EVEN[8], batch_size=7) == "frozen"
    assert auto_step_mode("cpu", 10 ** 9, batch_size=max(FROZEN_BREAK_EVEN) + 1) == "eager"  # never pays there
    assert auto_step_mode("cpu", 1, weights="int8") == "frozen"  # int8's fast kernels come with frozen steps
    assert auto_step_mode("cuda", 1, batch_size=64) == "compiled"  # a CUDA graph, whatever the work
    assert auto_step_mode("cuda", 1, weights="int8") == "frozen"
    assert auto_step_mode("mps", 10 ** 9) == "eager"
    # the pipelines resolve auto; a generation runs a concrete mode
    with pytest.raises(ValueError, match="step=auto is chosen by the pipelines"):
        generate_codes(model, text, SamplingConfig(), step="auto")


@pytest.mark.parametrize("layout", ["paipainter"])  # the t2i layout's: tests/test_sampling_golden.py
@torch.no_grad()
def test_frozen_steps_compute_the_static_step_and_compile_once_per_batch_size(text, layout):
    # frozen steps' products are whichever kernel autotuning timed fastest, so their last bits (and at a near
    # tie a sampled code) can differ from the eager step's: the step is compared, then the sampler's use of it
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, norm="sandwich", layout=layout)).eval()
    prefix = model.layout.prefix(text)
    token = torch.tensor([[3], [4], [5]])
    cache = model.new_cache(len(prefix))
    model(prefix, cache, last=1, head_rows=40)
    position = torch.tensor([cache.length])
    static = model.forward_at(token, position, cache, 40)
    with frozen_step(model, len(prefix)) as (step, frozen_cache):
        model(prefix, frozen_cache, last=1, head_rows=40)
        frozen_logits = step(token, position, frozen_cache, 40)
    assert torch.allclose(static, frozen_logits, rtol=1e-4, atol=1e-5)
    cfg = SamplingConfig(seed=1, top_k=10, guidance_scale=3.0, guidance_interval=(0.0, 0.5))
    seeds = seeds_of(cfg, text)
    generate_codes(model, text, cfg, seeds=seeds, step="frozen")
    other = text.flip(0)
    with torch.compiler.set_stance("fail_on_recompile"):  # the same step and cache: no new compilation
        frozen = generate_codes(model, other, cfg, seeds=seeds, step="frozen")
    assert (frozen == generate_codes(model, other, cfg, seeds=seeds)).float().mean() >= 0.9
    # the weights really are compiled in: changed afterwards, the frozen step still computes with the old ones
    model.head.weight.data.zero_()
    assert not model.forward_at(token, position, cache, 40).any()
    with frozen_step(model, len(prefix)) as (step, frozen_cache):  # its cache still holds the prefix
        assert torch.equal(step(token, position, frozen_cache, 40), frozen_logits)


# Run in a process of its own: in the whole suite's process (never in any subset tried) something an earlier test
# left behind held the dropped model's weight, which is not what this checks.
FREED_CHECK = """
import gc, weakref, torch
from t2i.models.gpt import GPT, GPTConfig
from t2i.sampling import SamplingConfig, frozen_step, generate_codes, steps

steps.FROZEN_BATCH_SIZES = 1  # one compilation fewer than the default to show it
torch.manual_seed(0)
model = GPT(GPTConfig(**TINY)).eval()
text = torch.tensor(TEXT)
cfg = SamplingConfig(top_k=10)


def cache_ref(batch_size):  # a weak reference to the keys of the frozen cache at this batch size
    with frozen_step(model, batch_size) as (_, cache):
        return weakref.ref(cache.keys[0])


with torch.no_grad():
    generate_codes(model, text[:1], cfg, step="compiled")
    kept = []
    for batch_size in (1, 2):
        generate_codes(model, text[:batch_size], cfg, step="frozen")
        kept.append(cache_ref(batch_size))
gc.collect()
# the older batch size is dropped, its compilation (which held the cache and the weights) with it
assert kept[0]() is None and kept[1]() is not None, "the older batch size's frozen step was kept"
model_ref, weight_ref = weakref.ref(model), weakref.ref(model.head.weight)
del model
gc.collect()
assert model_ref() is None and weight_ref() is None and kept[1]() is None, "the dropped model's steps were kept"
print("freed")
"""


def test_compiled_and_frozen_steps_are_freed_with_their_model_and_frozen_ones_kept_for_few_batch_sizes(text):
    code = f"TINY = {({**TINY, 'n_layer': 1})!r}\nTEXT = {text.tolist()!r}\n" + FREED_CHECK
    # Two ways inductor itself keeps the frozen weights after their model is dropped, which this test would read as
    # our steps keeping them (torch 2.14, CPU): a compilation loaded from its on-disk caches (a machine that compiled
    # the same graphs before), and a matrix product whose autotuning picks ATen's mkl linear over the C++ kernel
    # (timing-dependent: it happened in a loaded test run; TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN does it every
    # time, and gc finds no Python object holding the weight). So: caches off, and the C++ gemm kernels only.
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS": "CPP"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0 and result.stdout.strip().endswith("freed"), result.stderr[-3000:]


def test_one_frozen_generation_per_model_at_a_time(model, text, monkeypatch):
    cfg = SamplingConfig(seed=0, top_k=10)
    alone = generate_codes(model, text[:1], cfg, seeds=[0], step="frozen")
    paused, resume = threading.Event(), threading.Event()
    draw = ar.draw

    def pausing_draw(probs, uniforms):  # the thread "first" stops at its first draw until resumed
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()
            resume.wait(60)
        return draw(probs, uniforms)

    monkeypatch.setattr(ar, "draw", pausing_draw)  # the token-by-token loop's draw
    codes = {}

    def generate():
        codes[threading.current_thread().name] = generate_codes(model, text[:1], cfg, seeds=[0], step="frozen")

    first = threading.Thread(target=generate, name="first", daemon=True)
    first.start()
    assert paused.wait(60)
    second = threading.Thread(target=generate, name="second", daemon=True)
    second.start()
    second.join(1.0)
    still_waiting = second.is_alive()  # the two would write the same cache
    resume.set()
    first.join(60)
    second.join(60)
    assert still_waiting
    assert torch.equal(codes["first"], alone) and torch.equal(codes["second"], alone)


@pytest.mark.parametrize("options", [{"norm_type": "rms", "mlp": "swiglu", "pos": "rope2d", "bias": False},
                                     {"pos": "rope", "qk_norm": True, "layout": "paipainter"}])
def test_llama_style_models_sample_alike_on_every_path(text, options):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "image_len": 9, "n_embd": 64, "n_head": 4}, **options)).eval()
    cfg = SamplingConfig(greedy=True, guidance_scale=3.0)
    eager = generate_codes(model, text, cfg)
    assert torch.equal(generate_codes(model, text, cfg, use_cache=False), eager)
    for step in ("static", "compiled"):
        assert torch.equal(generate_codes(model, text, cfg, step=step), eager)


# -- guidance schedules ----------------------------------------------------------------------------

def reference_codes(model, text, scale_at, seeds=None, temperature=1.0, top_k=0):
    """Token-by-token sampling as it was before the schedules, the whole sequence recomputed at every
    step, with the guidance scale of position t given by scale_at(t) (greedy when seeds is None)."""
    layout, n_codes = model.layout, model.cfg.n_image_codes
    cond, uncond = layout.prefix(text), layout.prefix(layout.null_text(text))
    uniforms = None if seeds is None else prompt_uniforms(seeds, len(text), 1, model.cfg.image_len, text.device)
    codes = torch.empty(len(text), 0, dtype=torch.long)
    with torch.no_grad():
        for t in range(model.cfg.image_len):
            logits = model(torch.cat([cond, codes], 1))[:, -1, :n_codes]
            scale = scale_at(t)
            if scale != 1:
                unguided = model(torch.cat([uncond, codes], 1))[:, -1, :n_codes]
                logits = unguided + scale * (logits - unguided)
            if seeds is None:
                step = logits.argmax(-1)
            else:
                step = draw(filter_logits(logits / temperature, top_k).softmax(-1), uniforms[:, t])
            codes = torch.cat([codes, step[:, None]], 1)
    return codes


def test_constant_schedule_is_the_plain_guidance(model, text):
    seeds = [4, 5, 6]
    cfg = SamplingConfig(guidance_scale=1.7, top_k=10, temperature=1.5)
    assert torch.equal(generate_codes(model, text, cfg, seeds=seeds),
                       reference_codes(model, text, lambda t: 1.7, seeds, temperature=1.5, top_k=10))
    assert torch.equal(generate_codes(model, text, SamplingConfig(guidance_scale=1.7, greedy=True)),
                       reference_codes(model, text, lambda t: 1.7))


def test_schedule_scales_follow_their_formulas():
    import math
    g, T = 4.0, 16
    cases = {
        "constant": (dict(), lambda t: g),
        "linear": (dict(guidance_schedule="linear"), lambda t: 1 + (g - 1) * t / (T - 1)),
        "power_cosine": (dict(guidance_schedule="power_cosine", guidance_power=2.5),
                         lambda t: 1 + (g - 1) * (1 - math.cos(math.pi * (t / (T - 1)) ** 2.5)) / 2),
        "interval": (dict(guidance_schedule="linear", guidance_interval=[0.25, 0.75]),
                     lambda t: 1 + (g - 1) * t / (T - 1) if 4 <= t < 12 else 1.0),
    }
    for name, (options, formula) in cases.items():
        scales = guidance_scales(SamplingConfig(guidance_scale=g, **options), T)
        expected = torch.tensor([formula(t) for t in range(T)], dtype=torch.float32)
        assert torch.allclose(scales, expected, rtol=1e-6), name
    assert guidance_scales(SamplingConfig(guidance_scale=g, guidance_schedule="linear"), T)[0] == 1  # t = 0: none


@pytest.mark.parametrize("schedule, first", [("constant", 4.0), ("linear", 1.0), ("power_cosine", 1.0)])
def test_every_schedule_ends_at_the_given_scale(schedule, first):
    for image_len in (2, 9, 256):
        scales = guidance_scales(SamplingConfig(guidance_scale=4.0, guidance_schedule=schedule), image_len)
        assert scales[0] == first and scales[-1] == 4.0, image_len


@pytest.mark.parametrize("options", [dict(guidance_schedule="linear"),
                                     dict(guidance_schedule="power_cosine", guidance_power=3.0),
                                     dict(guidance_interval=[0.0, 0.5]),  # the null-text half stops half way
                                     dict(guidance_interval=[0.3, 0.7], guidance_schedule="linear")])
def test_schedules_guide_each_position_with_its_scale(model, text, options):
    cfg = SamplingConfig(greedy=True, guidance_scale=6.0, **options)
    scales = guidance_scales(cfg, 9).tolist()
    expected = reference_codes(model, text, lambda t: scales[t])
    assert torch.equal(generate_codes(model, text, cfg), expected)
    assert torch.equal(generate_codes(model, text, cfg, use_cache=False), expected)
    assert not torch.equal(expected, generate_codes(model, text, SamplingConfig(greedy=True, guidance_scale=6.0)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "power_cosine"])
def test_schedules_at_scale_one_are_unguided(model, text, schedule):
    cfg = SamplingConfig(guidance_scale=1.0, guidance_schedule=schedule, guidance_interval=[0.2, 0.9], seed=3,
                         samples_per_prompt=2)
    assert torch.equal(generate_codes(model, text, cfg, seeds=[3, 4, 5]),
                       generate_codes(model, text, SamplingConfig(seed=3, samples_per_prompt=2), seeds=[3, 4, 5]))


def test_bad_schedule_options_are_named():
    with pytest.raises(ValueError, match="sampling.guidance_schedule"):
        SamplingConfig(guidance_schedule="cosine")
    with pytest.raises(ValueError, match="sampling.guidance_power"):
        SamplingConfig(guidance_power=0)
    for interval in ([0.5, 0.5], [0.2], [-0.1, 1.0], [0.0, 1.5]):
        with pytest.raises(ValueError, match="sampling.guidance_interval"):
            SamplingConfig(guidance_interval=interval)


@pytest.mark.parametrize("step", ["static", "compiled"])
def test_fixed_shape_steps_follow_a_guidance_interval(text, step):
    # past the interval the eager step drops the null-text half; the fixed-shape step keeps it at scale 1
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    cfg = SamplingConfig(seed=5, top_k=10, guidance_scale=3.0, guidance_interval=(0.0, 0.5))
    seeds = seeds_of(cfg, text)
    assert torch.equal(generate_codes(model, text, cfg, seeds=seeds, step=step), generate_codes(model, text, cfg, seeds=seeds))


# -- precision ------------------------------------------------------------------------------------

def test_random_numbers_and_beam_scores_stay_float32_under_a_bf16_default_dtype(model, text):
    # trainer.precision=bf16-true (Lightning's Fabric) makes bf16 torch's default dtype around evaluation
    codes = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    sampled = SamplingConfig(seed=3, samples_per_prompt=8)
    runs = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.set_default_dtype(dtype)
        try:
            runs.append([prompt_uniforms([1, 2], 2, 1, 256, torch.device("cpu")),
                         generate_codes(model, text, sampled, seeds=[3, 4, 5]),
                         generate_codes(model, text, replace(sampled, method="sjd", sjd_window=4), seeds=[3, 4, 5]),
                         generate_text(model, codes, CaptionConfig(strategy="sample", seed=0), seeds=[0, 1]),
                         generate_text(model, codes, CaptionConfig(strategy="beam", num_beams=3, length_penalty=0.6))])
        finally:
            torch.set_default_dtype(torch.float32)
    uniforms = runs[1][0]
    assert uniforms.dtype == torch.float32 and all(len(row.unique()) >= 250 for row in uniforms)
    for fp32, bf16 in zip(*runs):
        assert torch.equal(fp32, bf16)


# -- progress -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ar", "sjd"])
def test_progress_reports_the_positions_fixed_after_each_model_call(model, text, method):
    # frozen at batch 1, as test_one_frozen_generation_per_model_at_a_time compiles it (SJD's windows run eagerly)
    cfg = SamplingConfig(top_k=10, method=method, sjd_window=3)
    for step, prompts in (("eager", text), ("frozen", text[:1])):
        calls, stats = [], SamplingStats()
        generate_codes(model, prompts, cfg, seeds=seeds_of(replace(cfg, seed=0), prompts), step=step, stats=stats,
                       progress=lambda done, total: calls.append((done, total)))
        done = [d for d, _ in calls]
        assert len(calls) == stats.model_calls and done == sorted(done), (step, calls)
        assert calls[-1] == (9, 9) and {total for _, total in calls} == {9}, (step, calls)


def test_the_sampler_and_the_scorers_import_no_lightning_torchmetrics_hydra_or_gradio():
    # docs/architecture.md: a script samples and reranks with torch alone
    code = ("import sys, t2i.sampling, t2i.scorers\n"
            "print(sorted(m for m in ('lightning', 'torchmetrics', 'hydra', 'gradio') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr[-2000:]
