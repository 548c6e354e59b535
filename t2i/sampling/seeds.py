"""Random streams: the one seed rule and what is drawn from a seed.

The rule: each prompt samples from its own stream, seeded by `prompt_seeds(seed, prompts)` (the seed, the
prompt's text and how many times that text came before it), so the same prompt and seed give the same images in
any batch, process or task. Functions that take prompts as text (the pipelines) apply it; functions that take
token ids (generate_codes, superres_codes, generate_text) take the seeds themselves (`seeds=`) and refuse a
config seed without them (`require_seeds`), rather than inventing a second rule.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence

import torch


def derived_seed(key: str) -> int:
    """A seed from a text (a seed and what it is for): the first 8 bytes of its sha256, below 2**63 so that any
    torch generator takes it; the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def prompt_seeds(seed: int, prompts: Sequence[str]) -> list[int]:
    """Per prompt, its sampling seed from (seed, its text, how many times that text came before it).

    The same prompt and seed give the same images in any batch, process or task (task=generate,
    an evaluation grid); a prompt repeated in one run gets new images at each repeat.
    """
    seen: Counter[str] = Counter()
    seeds = []
    for prompt in prompts:
        seeds.append(derived_seed(f"{seed}|{seen[prompt]}|{prompt}"))
        seen[prompt] += 1
    return seeds


def require_seeds(seeds: Sequence[int] | None, config_seed: int | None, count: int, what: str) -> None:
    """`seeds` (one per prompt or image) when given; with none, the config must not name a seed either
    (unseeded sampling): a seed alone says nothing about which stream each prompt takes."""
    if seeds is None:
        if config_seed is not None:
            raise ValueError(f"{what} takes one seed per input (seeds=[...]), not the config's seed ({config_seed}) "
                             f"alone: pass seeds=prompt_seeds(seed, prompts) (t2i.sampling.prompt_seeds), or set "
                             f"the seed to None for unseeded sampling")
    elif len(seeds) != count:
        raise ValueError(f"{len(seeds)} seeds for {count} prompts")


def prompt_uniforms(seeds: Sequence[int] | None, n_prompts: int, samples_per_prompt: int, steps: int,
                    device: torch.device) -> torch.Tensor:
    """Uniform draws [n_prompts * samples_per_prompt, steps] in [0, 1): prompt i's rows from its own
    generator seeded with seeds[i] (unseeded: torch's global generator). float32 whatever the default dtype:
    trainer.precision=bf16-true makes it bf16, whose 8-bit mantissa leaves ~190 distinct values in 256 draws."""
    if seeds is None:
        return torch.rand(n_prompts * samples_per_prompt, steps, device=device, dtype=torch.float32)
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    # CPU generators: the same seed gives the same draws on every device.
    draws = [torch.rand(samples_per_prompt, steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
             for seed in seeds]
    return torch.cat(draws).to(device)


def row_generators(seeds: Sequence[int] | None, n_prompts: int, samples_per_prompt: int,
                   greedy: bool) -> list[torch.Generator]:
    """One CPU generator per sequence (sample s of prompt i), seeded from (seeds[i], s): speculative decoding
    draws a varying number of values per sequence, so each needs its own stream for its codes to depend
    neither on the other prompts of its batch nor on how many samples its prompt has."""
    if seeds is None:  # unseeded: from torch's global generator (greedy draws only drafts, which never change its codes)
        seeds = [0] * n_prompts if greedy else torch.randint(2 ** 62, (n_prompts,)).tolist()
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    generators = []
    for seed in seeds:
        for sample in range(samples_per_prompt):
            generators.append(torch.Generator().manual_seed(derived_seed(f"{seed}|sample {sample}")))
    return generators


def window_seed(seed: int, window: int) -> int:
    """Super-resolution window k's seed from its prompt's: window 0 takes the prompt's own (one-pass
    super-resolution samples as generate_codes does), the others one derived from (seed, k)."""
    if window == 0:
        return seed
    return derived_seed(f"{seed}|window {window}")
