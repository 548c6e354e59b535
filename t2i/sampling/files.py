"""Samples -> files: a PNG per sample, the codes, and the captioned grid (the last step of the one path from
prompts to files; T2IPipeline.sample makes the Samples)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torchvision

from t2i.grids import save_captioned_grid
from t2i.sampling.pipeline import Samples


def write_samples(samples: Samples, folder: str | Path, grid_name: str = "grid", suffix: str = "",
                  each_sample: bool = True) -> dict:
    """Write `samples` into `folder`: the captioned grid `<grid_name><suffix>.png` (a row per prompt, with its
    `.md`), and with `each_sample` also `NNNN_SS<suffix>.png` per sample (prompt NNNN, sample SS) and the codes
    `codes<suffix>.npy` (int64 [P * S, h, w]). Returns the written paths: grid, and files and codes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    if each_sample:
        written["codes"] = str(folder / f"codes{suffix}.npy")
        np.save(written["codes"], samples.codes.cpu().numpy().astype(np.int64))
        written["files"] = []
        for index, image in enumerate(samples.images):
            prompt, sample = divmod(index, samples.samples_per_prompt)
            written["files"].append(str(folder / f"{prompt:04d}_{sample:02d}{suffix}.png"))
            torchvision.utils.save_image(image.float() / 255, written["files"][-1])
    grid = folder / f"{grid_name}{suffix}.png"
    save_captioned_grid(samples.images, samples.prompts, grid, samples.samples_per_prompt)
    written["grid"] = str(grid)
    return written
