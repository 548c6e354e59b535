"""The precision policy: one configured fp32 matmul precision per run, and the computations that are
always exact fp32 whatever it says.

`matmul_precision` (train.yaml, eval.yaml) is torch's float32 matmul precision: "highest" (IEEE fp32),
"high" (TF32 tensor cores on Ampere and later: ~8x the fp32 rate, 10-bit mantissa inputs) or "medium"
(bf16 inputs). It touches only float32 matmuls; bf16/fp16 autocast regions are what `trainer.precision`
chooses. Runs record it (the logged config, results.json).

Two computations pick discrete answers by comparing numbers and must not lose bits to any of this:
the VQ nearest-code search (a TF32 distance picks a non-nearest code for a few % of vectors) and the
Inception features of FID/IS (torch-fidelity's reference statistics are fp32). They run inside
`exact_fp32()`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(value: str) -> None:
    """Set torch's float32 matmul precision for the run (the `matmul_precision` setting)."""
    if value not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {value!r}")
    torch.set_float32_matmul_precision(value)


@contextmanager
def exact_fp32(device_type: str = "cuda"):
    """Inside: float32 tensors are multiplied and convolved in IEEE fp32, with autocast off for
    `device_type`, whatever the global settings (restored on exit). The settings are process-wide:
    other threads computing meanwhile see them too (slower, never less exact)."""
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        # autocast exists for real devices only (not "meta", where FLOPs are counted)
        with torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else nullcontext():
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
