"""Scoring a super-resolution GPT (`eval.py task=superres`) and running it after a text-to-image GPT
(`eval.py task=generate superres_ckpt=...`).

On a split's real images, read twice, at the model's low and high image sizes (the same decoding as
pre-tokenization): the model is fed the real low-resolution codes and its 2x images are compared with
the real high-resolution images (PSNR per image, averaged; SSIM: torchmetrics), beside

    bicubic          the low-resolution reconstruction (VQGAN decode of the low codes), bicubic 2x
    bicubic_real     the real low-resolution image, bicubic 2x (what interpolation of the true image gives)
    vqgan_high       the VQGAN's own reconstruction of the high-resolution image: the ceiling, since the
                     model can at best write the codes it encodes

and on the shapes data the oracle reads every set (and the real images at both sizes). With `ckpt=` (a
text-to-image GPT), the same captions are also generated: the oracle reads the generated low-resolution
images and their 2x images, attribute by attribute (the target: no attribute worse at 2x).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.image import StructuralSimilarityIndexMeasure
from tqdm import tqdm

from t2i.data.shapes import oracle_accuracy
from t2i.eval.reconstruction import PSNR, image_psnr
from t2i.grids import save_captioned_grid
from t2i.sampling import SamplingConfig, Samples, SuperResPipeline, T2IPipeline, write_samples

REFERENCES = ("superres", "bicubic", "bicubic_real", "vqgan_high")


def low_codes_for(resolver: SuperResPipeline, pipeline: T2IPipeline, codes: torch.Tensor,
                  images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The super-resolution model's low-resolution input for a text-to-image GPT's codes [N, h, w] and their
    decoded images [N, 3, S, S]: the codes themselves when both models read the same VQGAN on the same grid,
    else the images re-encoded by the super-resolution model's VQGAN (at its low size). Returns (codes, how)."""
    same = (pipeline.record.vqgan.sha256 == resolver.record.vqgan.sha256
            and tuple(codes.shape[1:]) == resolver.grid.low)
    if same:
        return codes.to(resolver.device), "the text-to-image GPT's codes (the same VQGAN and grid)"
    return resolver.encode_low(images), ("the text-to-image GPT's decoded images re-encoded by the super-resolution "
                                         "model's VQGAN (the two models read different VQGANs or grids)")


def upsample_generated(resolver: SuperResPipeline, pipeline: T2IPipeline, prompts: list[str], codes: torch.Tensor,
                       images: torch.Tensor, sampling: SamplingConfig, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """2x codes and images of a text-to-image GPT's samples (prompts[i] with codes[i]): (codes, uint8 images, how
    the low-resolution codes were obtained). One super-resolution sample per input (samples_per_prompt 1)."""
    low, how = low_codes_for(resolver, pipeline, codes, images)
    sampling = SamplingConfig(**{**asdict(sampling), "samples_per_prompt": 1})
    high = resolver.upsample_codes(prompts, low, sampling, batch_size=batch_size)  # seeded by prompt_seeds
    return high, resolver.decode(high, batch_size), how


def write_generated_2x(resolver: SuperResPipeline, pipeline: T2IPipeline, samples: Samples,
                       sampling: SamplingConfig, batch_size: int, out: Path) -> dict:
    """task=generate's super-resolution pass over its `samples`: NNNN_SS_2x.png, grid_2x.png (+ .md) and
    codes_2x.npy in `out` (write_samples)."""
    per_sample = [p for p in samples.prompts for _ in range(samples.samples_per_prompt)]
    high, high_images, how = upsample_generated(resolver, pipeline, per_sample, samples.codes, samples.images,
                                                sampling, batch_size)
    # seeds None: each 2x sample had its own (prompt_seeds over per_sample), not one per prompt
    written = write_samples(Samples(samples.prompts, None, high, high_images, samples.samples_per_prompt), out,
                            suffix="_2x")
    return {"files_2x": written["files"], "grid_2x": written["grid"], "codes_2x": written["codes"],
            "superres": {"low_codes": how, "grid": resolver.grid.to_dict(), "sampling": asdict(sampling),
                         "size": list(high_images.shape[-2:])}}


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def _bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, 3, s, s] -> uint8 [N, 3, size, size], bicubic (torch's), clamped and rounded."""
    up = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().to(torch.uint8)


def _channels_last(images: torch.Tensor) -> list[np.ndarray]:
    return list(images.permute(0, 2, 3, 1).cpu().numpy())


@torch.no_grad()
def evaluate_superres(resolver: SuperResPipeline, low_batches, high_batches, sampling: SamplingConfig, num_images: int,
                      batch_size: int, out: Path, pipeline: T2IPipeline | None = None,
                      pipeline_sampling: SamplingConfig | None = None, grid_images: int = 8) -> dict:
    """Scores on the first `num_images` images of two loaders over the same split (uint8 `image` at the model's
    low and high sizes, with `key`, `caption`, `meta`); see the module docstring. Writes grid.png: per image,
    a row real high / bicubic / super-resolved (and, with a text-to-image pipeline, generated low / its 2x)."""
    high_size = resolver.record.superres.high_size
    sampling = SamplingConfig(**{**asdict(sampling), "samples_per_prompt": 1})
    metrics = {name: (image_psnr(), StructuralSimilarityIndexMeasure(data_range=1.0))
               for name in REFERENCES}
    attributes, read = [], {name: [] for name in ("real_low", "real_high", *REFERENCES, "generated_low",
                                                     "generated_2x")}
    grid_rows, captions, done, how = [], [], 0, None
    with tqdm(total=num_images, desc="superres") as bar:
        for low_batch, high_batch in zip(low_batches, high_batches):
            if done >= num_images:
                break
            take = min(num_images - done, len(low_batch["key"]))
            if list(low_batch["key"][:take]) != list(high_batch["key"][:take]):
                raise RuntimeError("the low- and high-resolution loaders read the split in different orders")
            prompts = list(low_batch["caption"][:take])
            real_low, real_high = low_batch["image"][:take], high_batch["image"][:take]
            low_codes = resolver.encode_low(real_low)
            sr_codes = resolver.upsample_codes(prompts, low_codes, sampling, batch_size=batch_size)  # prompt_seeds
            sets = {"superres": resolver.decode(sr_codes, batch_size),
                    "bicubic": _bicubic(resolver.decode(low_codes, batch_size), high_size),
                    "bicubic_real": _bicubic(real_low, high_size),
                    "vqgan_high": resolver.decode(resolver.vqgan.encode(_unit(real_high).to(resolver.device) * 2 - 1),
                                                  batch_size)}
            for name, images in sets.items():
                for metric in metrics[name]:
                    metric.update(_unit(images), _unit(real_high))
            metas = list(low_batch["meta"][:take])
            with_attributes = all("attributes" in meta for meta in metas)
            if with_attributes:
                attributes += [meta["attributes"] for meta in metas]
                read["real_low"] += _channels_last(real_low)
                read["real_high"] += _channels_last(real_high)
                for name, images in sets.items():
                    read[name] += _channels_last(images)
            rows = [real_high, sets["bicubic"], sets["superres"]]
            if pipeline is not None:
                base_codes = pipeline.sample_codes(prompts, SamplingConfig(**{**asdict(pipeline_sampling),
                                                                              "samples_per_prompt": 1}),
                                                    batch_size=batch_size)
                base_images = pipeline.decode(base_codes, batch_size)
                _, generated_2x, how = upsample_generated(resolver, pipeline, prompts, base_codes, base_images,
                                                          sampling, batch_size)
                if with_attributes:
                    read["generated_low"] += _channels_last(base_images)
                    read["generated_2x"] += _channels_last(generated_2x)
                rows += [_bicubic(base_images, high_size), generated_2x]
            for i in range(min(take, grid_images - len(captions))):
                grid_rows += [row[i] for row in rows]
                captions.append(prompts[i])
            done += take
            bar.update(take)
    if done == 0:
        raise ValueError("task=superres read no images: check split= and superres.num_images")
    if done < num_images:
        warnings.warn(f"the split has {done} images, fewer than superres.num_images={num_images}")
    results = {"images": done, "size": [high_size, high_size], "low_size": resolver.record.superres.low_size,
               "grid": resolver.grid.to_dict(), "sampling": asdict(sampling), "psnr_protocol": PSNR,
               **{name: {"psnr": float(psnr.compute()), "ssim": float(ssim.compute())}
                  for name, (psnr, ssim) in metrics.items()}}
    results["psnr_gain_over_bicubic"] = results["superres"]["psnr"] - results["bicubic"]["psnr"]
    results["ssim_gain_over_bicubic"] = results["superres"]["ssim"] - results["bicubic"]["ssim"]
    if attributes:
        results["oracle"] = {name: oracle_accuracy(images, attributes) for name, images in read.items() if images}
        if pipeline is not None:
            low, high = results["oracle"]["generated_low"], results["oracle"]["generated_2x"]
            results["generated_2x_minus_low"] = {k: high[k] - low[k] for k in low}
    if pipeline is not None:
        results["generated"] = {"low_codes": how, "sampling": asdict(pipeline_sampling)}
    per_row = len(grid_rows) // max(len(captions), 1)
    save_captioned_grid(torch.stack(grid_rows), captions, out / "grid.png", per_row)
    return results


def markdown_table(results: dict) -> str:
    """results.md of task=superres: PSNR / SSIM per image set, and the oracle's readings."""
    lines = ["| images | PSNR dB | SSIM |", "|---|---|---|"]
    labels = {"superres": "super-resolved (real low-res codes)", "bicubic": "bicubic 2x of the low-res reconstruction",
              "bicubic_real": "bicubic 2x of the real low-res image", "vqgan_high": "VQGAN reconstruction at 2x (ceiling)"}
    for name in REFERENCES:
        lines.append(f"| {labels[name]} | {results[name]['psnr']:.2f} | {results[name]['ssim']:.4f} |")
    text = "\n".join(lines) + "\n"
    if "oracle" in results:
        names = ("color", "shape", "position", "size", "all")
        text += "\n| oracle on | " + " | ".join(f"{n} %" for n in names) + " |\n|---|" + "---|" * len(names) + "\n"
        for key, accuracy in results["oracle"].items():
            text += f"| {key} | " + " | ".join(f"{100 * accuracy[n]:.1f}" for n in names) + " |\n"
    return text + (f"\n{results['images']} images of the split at {results['size'][0]}x{results['size'][1]}; "
                   f"windows {results['grid']}; PSNR: {results.get('psnr_protocol', PSNR)}\n")
