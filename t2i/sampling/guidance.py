"""Classifier-free guidance: the scale at each image position (the schedules) and the guided mix of the
conditional and null-text halves.

Guidance schedules move the scale over the image positions t = 0 .. T-1, from 1 at the first to the given
scale g at the last: constant (g everywhere), a linear ramp (VAR: 1 + (g - 1) t / (T - 1)), power-cosine
(RAR: 1 + (g - 1) (1 - cos(pi (t / (T - 1))^p)) / 2), and an interval (LlamaGen's cfg_interval: positions with
start <= t / T < end) outside which the scale is 1.
"""

from __future__ import annotations

import math

import torch

from t2i.sampling.options import SamplingConfig


def guidance_scales(cfg: SamplingConfig, image_len: int) -> torch.Tensor:
    """The guidance scale at each image position [image_len] (float32, as the logits are guided)."""
    position = torch.arange(image_len, dtype=torch.float64)
    ramp = position / max(image_len - 1, 1)  # 0 at the first position, 1 at the last: the ramps end at g exactly
    g = cfg.guidance_scale
    if cfg.guidance_schedule == "constant":
        scales = torch.full_like(ramp, g)
    elif cfg.guidance_schedule == "linear":
        scales = 1 + (g - 1) * ramp
    else:  # power_cosine
        scales = 1 + (g - 1) * (1 - torch.cos(math.pi * ramp ** cfg.guidance_power)) / 2
    start, end = cfg.guidance_interval
    inside = (position / image_len >= start) & (position / image_len < end)
    return torch.where(inside, scales, torch.ones_like(scales)).float()


def guided_until(scales: torch.Tensor) -> int:
    """How many image positions run the null-text half: up to the last whose scale is not 1 (0 when none is)."""
    guided = (scales != 1).nonzero()
    return int(guided.max()) + 1 if len(guided) else 0


def guided_logits(logits: torch.Tensor, n: int, scales: torch.Tensor) -> torch.Tensor:
    """Rows [cond (n); uncond (n)] -> uncond + scale * (cond - uncond); where the scale is 1 (or the
    unconditional half is no longer run) the conditional logits as they are, so every path agrees."""
    cond, uncond = logits[:n], logits[n:]
    if not len(uncond):
        return cond
    return torch.where(scales == 1, cond, uncond + scales * (cond - uncond))
