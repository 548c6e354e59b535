"""Text prompts -> image codes: `generate_codes`, the entry that prepares a generation and runs its method,
and token-by-token sampling (method=ar), one image position per model call.

Batched prompts, several samples per prompt in the same batch, temperature, top-k, top-p and classifier-free
guidance (the conditional and the null-text halves run as one batch: logits = uncond + scale * (cond - uncond)).
Image positions can only produce image codes. Each prompt draws from its own random stream (its seed), so its
samples do not depend on which other prompts share its batch or its process. How each step runs (eager, static,
compiled, frozen, or recomputed without the cache) is t2i.sampling.steps'.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from t2i.models.gpt import GPT
from t2i.sampling.draws import draw, filter_logits
from t2i.sampling.guidance import guidance_scales, guided_logits, guided_until
from t2i.sampling.options import SamplingConfig, SamplingStats, check_step_mode
from t2i.sampling.progress import Progress
from t2i.sampling.seeds import prompt_uniforms, require_seeds, row_generators
from t2i.sampling.sjd import sjd_codes
from t2i.sampling.steps import SamplingSteps, sampling_steps


@torch.no_grad()
def generate_codes(model: GPT, text: torch.Tensor, cfg: SamplingConfig, use_cache: bool = True,
                   seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                   step: str = "eager", low: torch.Tensor | None = None, window: int = 0,
                   known: torch.Tensor | None = None, samples: range | None = None,
                   progress: Progress | None = None) -> torch.Tensor:
    """Text ids [P, text_len] -> image codes [P * samples_per_prompt, image_len] (samples of a prompt adjacent).

    Prompt i samples from its own random stream, seeded with seeds[i] (e.g. prompt_seeds(cfg.seed, prompts));
    with no seeds cfg.seed must be None (unseeded). `stats`, when given, counts the model calls. `step`: how
    each step runs (STEP_MODES, t2i.sampling.steps; method=sjd: each window of drafts). `progress(done,
    total)` is called after each model call: image positions fixed for every sequence so far, of image_len.
    `samples`: only these of each prompt's cfg.samples_per_prompt samples (a range; default all), codes
    [P * len(samples), image_len], each sample's the codes the whole call gives it: a prompt's samples may
    be split over calls (`sampling_batches`).

    Conditional sampling (a superres model): `low` [P, low_len] are each prompt's low-resolution codes
    and `window` the window that follows (TokenLayout.prefix); `known` [P * samples_per_prompt, image_len]
    holds codes already fixed (-1 where a code is to be sampled): they are fed as they are, as CogView's
    sliding windows feed the overlap with the windows before (`superres_codes` runs the windows) and as
    text-guided completion feeds an image's codes outside its region (T2IPipeline.complete).
    """
    check_step_mode(step, runs=True)
    gpt = model.cfg
    stats = stats if stats is not None else SamplingStats()
    n_prompts = len(text)
    require_seeds(seeds, cfg.seed, n_prompts, "generate_codes")
    samples = range(cfg.samples_per_prompt) if samples is None else samples
    if samples.step != 1 or not 0 <= samples.start < samples.stop <= cfg.samples_per_prompt:
        raise ValueError(f"samples must be a range of consecutive sample indices within "
                         f"0..{cfg.samples_per_prompt - 1} (sampling.samples_per_prompt), got {samples}")
    text = text.repeat_interleave(len(samples), dim=0)
    if low is not None:
        low = low.flatten(1).repeat_interleave(len(samples), dim=0)
    if known is not None and known.shape != (len(text), gpt.image_len):
        raise ValueError(f"known codes must be [sequences={len(text)}, image_len={gpt.image_len}], got {tuple(known.shape)}")
    layout = model.layout
    prefix = layout.prefix(text, low, window)
    scales = guidance_scales(cfg, gpt.image_len).to(prefix.device)
    until = guided_until(scales)
    if until:  # the null text (all padding) as the unconditional half
        prefix = torch.cat([prefix, layout.prefix(layout.null_text(text), low, window)])
    stats.token_by_token_calls += gpt.image_len
    if cfg.method == "sjd":
        if known is not None:
            raise ValueError("sampling.method=sjd does not take known codes (super-resolution windows, completion): use method=ar")
        if not use_cache:
            raise ValueError("sampling.method=sjd runs on the KV cache (use_cache=True)")
        generators = row_generators(seeds, n_prompts, cfg.samples_per_prompt, cfg.greedy)
        generators = [g for row, g in enumerate(generators) if row % cfg.samples_per_prompt in samples]
        return sjd_codes(model, prefix, len(text), cfg, scales, until, generators, stats, progress, step)
    uniforms = None if cfg.greedy else prompt_uniforms(seeds, n_prompts, cfg.samples_per_prompt, gpt.image_len,
                                                       text.device)
    if uniforms is not None:  # the prompt's streams are drawn whole, then the wanted samples' rows kept
        uniforms = uniforms.view(n_prompts, cfg.samples_per_prompt, -1)[:, samples.start:samples.stop].flatten(0, 1)
    with sampling_steps(model, step, len(prefix), gpt.n_image_codes, use_cache) as steps:
        return ar_codes(steps, prefix, len(text), cfg, scales, until, uniforms, known, stats, progress)


def ar_codes(steps: SamplingSteps, prefix: torch.Tensor, n: int, cfg: SamplingConfig, scales: torch.Tensor,
             guided_until: int, uniforms: torch.Tensor | None, known: torch.Tensor | None, stats: SamplingStats,
             progress: Progress | None = None) -> torch.Tensor:
    """Token-by-token sampling: prefix [n (+ n null-text rows), L] -> codes [n, image_len], one model call per
    position through `steps` (whose head rows are the image codes: image positions produce image codes only)."""
    image_len = len(scales)
    codes = torch.empty(n, image_len, dtype=torch.long, device=prefix.device)
    logits = steps.prefill(prefix)
    stats.model_calls += 1
    for i in range(image_len):
        logits = guided_logits(logits.float(), n, scales[i])
        if cfg.greedy:
            code = logits.argmax(-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            code = draw(probs, uniforms[:, i])
        if known is not None:  # a fixed code is fed as it is (its draw is spent all the same: streams stay aligned)
            code = torch.where(known[:, i] >= 0, known[:, i], code)
        codes[:, i] = code
        if progress is not None:
            progress(i + 1, image_len)
        if i == image_len - 1:
            break
        # past the guided positions only the conditional half runs (the cache's first n rows); a fixed-shape
        # step keeps its batch, both halves (where the scale is 1 the conditional logits are taken as they are)
        halves = 2 if i + 1 < guided_until or (steps.fixed_shape and guided_until) else 1
        logits = steps.forward_one(code.repeat(halves)[:, None])
        stats.model_calls += 1
    return codes
