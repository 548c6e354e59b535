"""Speculative Jacobi decoding (sampling.method=sjd): greedy codes, the sampling distribution, batching,
model calls, each in the step modes (eager windows, and fixed-shape ones: static, compiled, frozen)."""

import itertools
from dataclasses import replace

import pytest
import torch

from t2i.models.gpt import GPT, GPTConfig
from t2i.sampling import SamplingConfig, SamplingStats, filter_logits, generate_codes, guidance_scales

TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=6, image_len=9, n_layer=2, n_head=2, n_embd=32)
TEXT = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def tiny(layout="t2i", sharpen=1.0, **overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **overrides}, norm="sandwich", layout=layout)).eval()
    with torch.no_grad():  # random weights predict near-uniform codes; a larger head makes the context matter
        model.head.weight.mul_(sharpen)
    return model


@pytest.mark.parametrize("layout", ["t2i", "paipainter"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("step", ["eager", "static"])  # static: every window one shape, each row at its position
def test_greedy_sjd_gives_the_greedy_codes(layout, guidance, window, step):
    model = tiny(layout)
    plain = generate_codes(model, TEXT, SamplingConfig(greedy=True, guidance_scale=guidance))
    stats = SamplingStats()
    sjd = generate_codes(model, TEXT, SamplingConfig(greedy=True, guidance_scale=guidance, method="sjd",
                                                     sjd_window=window), stats=stats, step=step)
    assert torch.equal(sjd, plain)
    assert stats.token_by_token_calls == 9 and 1 < stats.model_calls <= 10  # the prompt, then >= 1 code a call


@pytest.mark.parametrize("step", ["compiled", "frozen"])  # ~10 s of compiling each
def test_compiled_sjd_windows_give_the_greedy_codes_and_compile_once(step):
    model = tiny(pos="rope2d")  # rotary coordinates looked up per row too
    cfg = SamplingConfig(greedy=True, guidance_scale=3.0, guidance_interval=[0.0, 0.5], method="sjd", sjd_window=4)
    plain = generate_codes(model, TEXT, replace(cfg, method="ar"))
    assert torch.equal(generate_codes(model, TEXT, cfg, step=step), plain)
    with torch.compiler.set_stance("fail_on_recompile"):  # one shape for every window, the last ones too
        assert torch.equal(generate_codes(model, TEXT.flip(0), cfg, step=step), plain.flip(0))


def test_greedy_sjd_with_a_guidance_interval_and_schedule():
    model = tiny()
    for options in (dict(guidance_interval=[0.2, 0.6]), dict(guidance_schedule="power_cosine", guidance_power=2.0)):
        cfg = SamplingConfig(greedy=True, guidance_scale=4.0, **options)
        plain = generate_codes(model, TEXT, cfg)
        # greedy: the argmax is accepted, whatever the drafts' coupling or groups
        for sjd in (dict(), dict(sjd_coupling="none"), dict(sjd_group_size=2)):
            assert torch.equal(generate_codes(model, TEXT, replace(cfg, method="sjd", sjd_window=4, **sjd)), plain)


def exact_distribution(model, text, cfg):
    """Every code sequence's probability under token-by-token sampling with cfg (enumerated)."""
    gpt, layout = model.cfg, model.layout
    sequences = torch.tensor(list(itertools.product(range(gpt.n_image_codes), repeat=gpt.image_len)))
    m = len(sequences)
    cond = torch.cat([layout.prefix(text).expand(m, -1), sequences], 1)
    uncond = torch.cat([layout.prefix(layout.null_text(text)).expand(m, -1), sequences], 1)
    first = cond.shape[1] - gpt.image_len - 1  # the output that predicts code 0
    with torch.no_grad():
        lc = model(cond)[:, first:-1, :gpt.n_image_codes]
        lu = model(uncond)[:, first:-1, :gpt.n_image_codes]
    scale = guidance_scales(cfg, gpt.image_len)[:, None]
    logits = torch.where(scale == 1, lc, lu + scale * (lc - lu))
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return probs.gather(-1, sequences[..., None]).squeeze(-1).double().prod(-1)  # [V ** T]


def chi_square(codes, exact, n_codes):
    """Pearson's statistic of the sampled sequences against their exact probabilities (cells with fewer than
    5 expected samples pooled into one)."""
    index = torch.zeros(len(codes), dtype=torch.long)
    for column in codes.T:
        index = index * n_codes + column
    observed = torch.bincount(index, minlength=len(exact)).double()
    expected = exact * len(codes)
    big = expected >= 5
    observed = torch.cat([observed[big], observed[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected > 0
    return float(((observed - expected)[keep] ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


@pytest.fixture(scope="module")
def enumerated():
    """3 codes x 5 positions (top-2 of 3: 32 sequences possible), whose exact probabilities come by enumeration,
    and 20000 token-by-token samples of them."""
    model = tiny(sharpen=10.0, n_image_codes=3, image_len=5)
    text = TEXT[:1]
    cfg = SamplingConfig(temperature=0.8, top_k=2, guidance_scale=2.0, guidance_schedule="linear",
                         samples_per_prompt=20000, seed=0)
    exact = exact_distribution(model, text, cfg)
    assert torch.isclose(exact.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert exact.max() < 0.3  # drafts get rejected and resampled
    statistic, df = chi_square(generate_codes(model, text, cfg, seeds=[0]), exact, 3)
    assert df >= 25 and statistic < 80, (statistic, df)  # the test itself passes token-by-token sampling
    return model, text, cfg, exact


@pytest.mark.parametrize("coupling, window, step", [("none", 3, "eager"), ("maximal", 5, "eager"),
                                                   ("maximal", 5, "static")])  # compiled/frozen: greedy above
def test_sjd_keeps_the_sampling_distribution(enumerated, coupling, window, step):
    model, text, cfg, exact = enumerated
    sjd = generate_codes(model, text, replace(cfg, method="sjd", sjd_window=window, sjd_coupling=coupling),
                         seeds=[0], step=step)
    # df ~ 29: a statistic above 80 has probability < 1e-6 for an unbiased sampler. A biased rule is far
    # above it. Measured with independent drafts (window 3): resampling from p instead of the residual ~950,
    # accepting with p(x) instead of p(x) / q(x) ~1400; the correct rule 27-36 over three seeds. Coupled
    # drafts (window 5: every position redrawn by coupling): keeping the previous draft with probability p(x)
    # instead of p(x) / q(x) 141, the keep test with the uniform of the position before (tested) 127; the
    # correct rule 20-46 over three seeds (redrawing from p instead of the residual, 54, is too small a bias
    # here to be told apart).
    statistic, df = chi_square(sjd, exact, 3)
    assert df >= 25 and statistic < 80, (statistic, df)
    # and a small bias is told apart: the distribution at a temperature 10% higher is rejected
    hotter = exact_distribution(model, text, replace(cfg, temperature=0.88))
    assert chi_square(sjd, hotter, 3)[0] > 80


def total_variation(codes, exact, n_codes):
    index = torch.zeros(len(codes), dtype=torch.long)
    for column in codes.T:
        index = index * n_codes + column
    observed = torch.bincount(index, minlength=len(exact)).double() / len(codes)
    return 0.5 * float((observed - exact).abs().sum())


def test_grouped_acceptance_deviates_from_the_sampling_distribution_by_a_bounded_amount():
    # 5 codes x 3 positions, no filtering: a group of 3 codes (size 1) is 60% of the vocabulary, the worst
    # case for GSD (a 512-code model's group of 3 is 0.6%)
    model = tiny(sharpen=20.0, n_image_codes=5, image_len=3)
    cfg = SamplingConfig(guidance_scale=2.0, samples_per_prompt=4000, seed=0, method="sjd", sjd_window=3)
    exact = exact_distribution(model, TEXT[:1], cfg)
    lossless = total_variation(generate_codes(model, TEXT[:1], cfg, seeds=[0]), exact, 5)
    grouped = total_variation(generate_codes(model, TEXT[:1], replace(cfg, sjd_group_size=1), seeds=[0]), exact, 5)
    # measured (seeds 0-2): SJD's sampling noise 0.03-0.05 over 125 sequences; GSD (size 1) 0.17-0.19
    assert lossless < 0.07 and 0.1 < grouped < 0.25, (lossless, grouped)


@pytest.mark.parametrize("options, step", [(dict(), "eager"), (dict(sjd_coupling="none"), "eager"),
                                           (dict(sjd_group_size=2), "eager"), (dict(), "static")])
def test_sjd_sequences_do_not_depend_on_their_batch(options, step):
    model = tiny(sharpen=20.0)
    cfg = SamplingConfig(method="sjd", sjd_window=4, samples_per_prompt=4, top_k=10, temperature=0.7,
                         guidance_scale=2.0, **options)
    seeds = [11, 12, 13]
    together = generate_codes(model, TEXT, cfg, seeds=seeds, step=step)
    alone = torch.cat([generate_codes(model, TEXT[i:i + 1], cfg, seeds=seeds[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone)  # and a fixed-shape step (rows at their own positions) the eager codes
    # a prompt's first samples are the same however many it has (eval's reranking candidates extend them)
    fewer = generate_codes(model, TEXT, SamplingConfig(**{**cfg.__dict__, "samples_per_prompt": 2}), seeds=seeds)
    assert torch.equal(fewer.view(3, 2, -1), together.view(3, 4, -1)[:, :2])
    assert not torch.equal(together, generate_codes(model, TEXT, cfg, seeds=[21, 22, 23]))
    assert len(set(map(tuple, together.tolist()))) > 6  # the samples of a prompt differ


def test_sjd_needs_fewer_model_calls_when_predictions_are_easy():
    model = tiny(sharpen=20.0, image_len=32)
    stats = SamplingStats()
    generate_codes(model, TEXT, SamplingConfig(method="sjd", sjd_window=8, temperature=0.05, seed=0), stats=stats,
                   seeds=list(range(len(TEXT))))
    assert stats.token_by_token_calls == 32
    assert stats.speedup >= 2, stats  # near-deterministic predictions: the Jacobi iteration converges


def test_sjd_options_are_checked():
    with pytest.raises(ValueError, match="sampling.method"):
        SamplingConfig(method="jacobi")
    with pytest.raises(ValueError, match="sampling.sjd_window"):
        SamplingConfig(method="sjd", sjd_window=0)
    with pytest.raises(ValueError, match="sampling.sjd_coupling must be one of maximal, none"):
        SamplingConfig(method="sjd", sjd_coupling="independent")
    with pytest.raises(ValueError, match="sampling.sjd_group_size"):
        SamplingConfig(method="sjd", sjd_group_size=-1)
    with pytest.raises(ValueError, match="use_cache"):
        generate_codes(tiny(), TEXT, SamplingConfig(method="sjd", greedy=True), use_cache=False)
