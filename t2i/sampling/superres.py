"""Super-resolution: a superres-layout GPT samples the 2x code grid from text and low-resolution codes, in one
pass or in CogView's sliding windows (`superres_codes`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from t2i.models.gpt import GPT
from t2i.models.layout import SuperresGrid
from t2i.sampling.ar import generate_codes
from t2i.sampling.options import SamplingConfig, SamplingStats
from t2i.sampling.progress import Progress, progress_part
from t2i.sampling.seeds import require_seeds, window_seed


@torch.no_grad()
def superres_codes(model: GPT, grid: SuperresGrid, text: torch.Tensor, low: torch.Tensor, cfg: SamplingConfig,
                   seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                   step: str = "eager", progress: Progress | None = None) -> torch.Tensor:
    """A super-resolution GPT: text ids [P, text_len] and low-resolution codes [P, h, w] -> the 2x grid's codes
    [P * samples_per_prompt, H, W] (samples of a prompt adjacent).

    One pass when one window covers the grid; else CogView's sliding windows: the windows are sampled in
    raster order, each given the whole low-resolution grid and its own [WIN_k] token, and the codes it shares
    with windows already sampled are fed as they are (generate_codes' `known`), so neighbouring windows agree
    on their overlap. Prompt i's window k draws from its own stream (seeds[i] for window 0; with no seeds
    cfg.seed must be None: unseeded). `progress(done, total)`: positions fixed over all windows (generate_codes).
    """
    layout = model.layout
    if layout.kind != "superres":
        raise ValueError(f"super-resolution needs a superres-layout GPT (python train.py experiment=superres_shapes), "
                         f"not a {layout.kind} one")
    if (layout.windows, layout.image_len, layout.low_len) != (grid.windows, grid.window_len, grid.low_len):
        raise ValueError(f"the GPT's layout ({layout.windows} windows of {layout.image_len} codes after {layout.low_len} "
                         f"low-resolution codes) does not match the grid {grid.to_dict()}")
    if tuple(low.shape[1:]) != grid.low:
        raise ValueError(f"low-resolution codes must be [N, {grid.low[0]}, {grid.low[1]}], got {tuple(low.shape)}")
    require_seeds(seeds, cfg.seed, len(text), "superres_codes")
    high = torch.full((len(text) * cfg.samples_per_prompt, *grid.high), -1, dtype=torch.long, device=low.device)
    for window in range(grid.windows):
        known = grid.crop(high, window)
        codes = generate_codes(model, text, cfg, seeds=None if seeds is None else [window_seed(s, window) for s in seeds],
                               stats=stats, step=step, low=grid.low_context(low, window), window=window,
                               known=known if bool((known >= 0).any()) else None,
                               progress=progress_part(progress, window * grid.window_len, grid.windows * grid.window_len))
        grid.paste(high, window, codes)
    return high
