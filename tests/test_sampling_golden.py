"""The sampler's outputs pinned: a quickstart-size GPT (the shapes recipe's 4 layers x 96, 512 codes on an 8x8 grid,
26 text positions) samples with every step mode, method, filtering, guidance schedule and caption strategy, and
the codes must equal those recorded in tests/data/sampling_golden.json.

The file was written by the sampler before it became a package (T2I_WRITE_GOLDEN=1 writes it again): a change
that moves any sampled code, caption or super-resolution window fails here.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from t2i.models.gpt import GPT, GPTConfig
from t2i.models.int8 import quantize_weights
from t2i.models.layout import SuperresGrid
from t2i.sampling import CaptionConfig, SamplingConfig, generate_codes, generate_text, superres_codes

GOLDEN = Path(__file__).parent / "data" / "sampling_golden.json"
QUICKSTART = dict(n_image_codes=512, n_text_tokens=60, text_len=26, image_len=64, n_layer=4, n_head=4, n_embd=96,
                  norm="sandwich")
SEEDS = [11, 12]  # per prompt, as t2i.sampling.prompt_seeds gives them
CONFIGS = {
    "greedy_guided": SamplingConfig(greedy=True, guidance_scale=3.0, samples_per_prompt=2),
    "topk_linear": SamplingConfig(top_k=50, temperature=1.2, guidance_scale=3.0, guidance_schedule="linear",
                                  samples_per_prompt=2),
    "topp_cosine_interval": SamplingConfig(top_p=0.9, guidance_scale=2.0, guidance_schedule="power_cosine",
                                           guidance_interval=(0.0, 0.5), samples_per_prompt=2),
}


def _sharpened(model: GPT, factor: float) -> GPT:
    # sharper distributions than the init's: a greedy pick or a drawn code is not at a near tie, so the last bits
    # of a compiled step's products cannot move it
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _sharpened(GPT(GPTConfig(**QUICKSTART)), 2.0)


@pytest.fixture(scope="module")
def text():
    return torch.tensor([[5, 6, 7, 8, 9, 10, 11] + [0] * 19, [40, 3, 22] + [0] * 23])


def _superres_case() -> list:
    grid = SuperresGrid(low=(2, 2), high=(4, 4), window=(2, 4), stride=(1, 4))  # 3 overlapping windows
    torch.manual_seed(1)
    model = _sharpened(GPT(GPTConfig(n_image_codes=12, n_text_tokens=6, text_len=3, image_len=grid.window_len,
                                     n_layer=2, n_head=2, n_embd=16, layout="superres", low_len=grid.low_len,
                                     windows=grid.windows)), 8.0)
    text, low = torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])
    cfg = SamplingConfig(top_k=6, guidance_scale=2.0, samples_per_prompt=2)
    return superres_codes(model, grid, text, low, cfg, seeds=SEEDS).tolist()


def outputs(model: GPT, text: torch.Tensor) -> dict:
    """Every case's codes (or caption ids) as lists, by name."""
    out = {}
    for name, cfg in CONFIGS.items():
        for step in ("eager", "static", "compiled", "frozen"):
            out[f"ar/{name}/{step}"] = generate_codes(model, text, cfg, seeds=SEEDS, step=step).tolist()
        out[f"ar/{name}/recomputed"] = generate_codes(model, text, cfg, seeds=SEEDS, use_cache=False).tolist()
        out[f"ar/{name}/second_sample"] = generate_codes(model, text, cfg, seeds=SEEDS, samples=range(1, 2)).tolist()
        # "sjd/": recorded with independent drafts (before coupling became the default); "sjd_coupled/": added with
        # the coupling (the default), by a one-off script that kept every other entry
        for key, coupling in (("sjd", "none"), ("sjd_coupled", "maximal")):
            out[f"{key}/{name}"] = generate_codes(model, text, replace(cfg, method="sjd", sjd_coupling=coupling),
                                                  seeds=SEEDS).tolist()
    out["ar/int8"] = generate_codes(quantize_weights(model, "int8"), text, CONFIGS["topk_linear"], seeds=SEEDS).tolist()
    images = generate_codes(model, text, CONFIGS["greedy_guided"], seeds=SEEDS).view(-1, 8, 8)
    out["caption/greedy"] = generate_text(model, images, CaptionConfig()).tolist()
    out["caption/sample"] = generate_text(model, images, CaptionConfig(strategy="sample", top_k=20),
                                          seeds=[1, 2, 3, 4]).tolist()
    out["caption/beam"] = generate_text(model, images, CaptionConfig(strategy="beam", num_beams=3)).tolist()
    out["superres/windows"] = _superres_case()
    return out


@torch.no_grad()
def test_every_step_mode_method_and_caption_strategy_samples_the_recorded_codes(model, text):
    got = outputs(model, text)
    if os.environ.get("T2I_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, separators=(",", ":")) + "\n")
    recorded = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(recorded)
    changed = [name for name in recorded if got[name] != recorded[name]]
    assert not changed, f"sampled outputs changed: {changed}"
    # every step mode, and recomputation without the cache, samples what the eager step samples
    for name in CONFIGS:
        for step in ("static", "compiled", "frozen", "recomputed"):
            assert recorded[f"ar/{name}/{step}"] == recorded[f"ar/{name}/eager"], (name, step)
    # the cases are not trivially alike: sampling differs from greedy, and guidance schedules from each other
    assert recorded["ar/greedy_guided/eager"] != recorded["ar/topk_linear/eager"] != recorded["ar/topp_cosine_interval/eager"]
