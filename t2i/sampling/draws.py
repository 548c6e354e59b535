"""From logits to a code: top-k / top-p filtering and the inverse-CDF draw from a given uniform."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k and the top-p nucleus to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep until the mass reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row of probs [B, V], the first index whose cumulative probability
    exceeds uniforms [B] (in [0, 1)) times the row's total. Zero-probability indices are never drawn."""
    # float64: the tail of a 16k-code distribution keeps its mass, and a float32 u (at most 1 - 2^-24)
    # times the total stays below the total, so some index always exceeds it.
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
