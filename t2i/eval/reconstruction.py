"""How well a VQGAN reconstructs a split: PSNR, SSIM, LPIPS, rFID, codebook usage, and for the shapes
data how much of each attribute survives tokenization (the oracle on reconstructions).

PSNR is each image's, averaged over the images (`image_psnr`: the project's one PSNR, also of validation
and task=superres).

rFID is the FID of the reconstructions against the split's real images, computed as eval.py's FID is
(t2i.eval.fidelity: torch-fidelity's InceptionV3, the real statistics cached, the protocol recorded);
LPIPS is the `lpips` package's VGG LPIPS (t2i.models.losses.build_lpips), averaged over images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm import tqdm

from t2i.data.shapes import oracle_accuracy
from t2i.eval.fidelity import FidelityAccumulator
from t2i.models.vqgan import VQModel, codebook_usage

LPIPS_INPUT = "reconstructions clamped to [-1, 1] against the real images in [-1, 1], at the loaded size"
PSNR = ("the mean over images of each image's PSNR (its MSE over pixels and channels, data range [0, 1]), as "
        "tokenizer and super-resolution papers report it; not the PSNR of the set's pooled MSE")


def image_psnr() -> PeakSignalNoiseRatio:
    """The project's PSNR metric (PSNR above), on images in [0, 1]: torchmetrics' PSNR of each image over its
    (C, H, W) dimensions, averaged. Its default pools the squared errors of the whole set first, which a few
    poor images dominate (two images at 20 and 60 dB: 23 dB pooled, 40 dB per image)."""
    return PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")


@torch.no_grad()
def reconstruction_metrics(model: VQModel, batches: Iterable[dict], prepare: Callable[[dict], dict],
                           device: str = "cpu", oracle: bool = False, fidelity: FidelityAccumulator | None = None,
                           lpips: nn.Module | None = None) -> dict:
    """Metrics over all `batches` (dicts with uint8 `image` and `key`; `prepare` makes the images float
    in [-1, 1]). `fidelity` (an accumulator without IS, one reconstruction per real image) adds rFID,
    `lpips` (a frozen LPIPS module, e.g. build_lpips) the mean LPIPS."""
    model = model.to(device).eval()
    psnr = image_psnr().to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    if lpips is not None:
        lpips = lpips.to(device).eval()
    lpips_sum = torch.zeros((), dtype=torch.float64)
    counts = torch.zeros(model.cfg.n_embed, device=device)
    images, attributes = [], []
    n, grid = 0, [model.cfg.grid, model.cfg.grid]
    for batch in tqdm(batches, desc="reconstruct"):
        real_uint8 = batch["image"]
        batch = prepare({**batch, "image": real_uint8.to(device)})
        codes = model.encode(batch["image"])
        grid = list(codes.shape[-2:])  # the grid at the loaded size (a fully convolutional VQGAN takes any multiple)
        fake = (model.decode(codes).clamp(-1, 1) + 1) / 2
        real = (batch["image"] + 1) / 2
        psnr.update(fake, real)
        ssim.update(fake, real)
        counts += torch.bincount(codes.flatten(), minlength=counts.numel()).float()
        n += len(codes)
        fake_uint8 = (fake * 255).round().byte()
        if fidelity is not None:  # labelled by sample key: the features are read in key order
            keys = list(batch["key"])
            fidelity.add_real(real_uint8.cpu(), keys)
            fidelity.add_generated(fake_uint8.cpu(), keys)
        if lpips is not None:
            lpips_sum += lpips(fake * 2 - 1, batch["image"].float()).flatten().double().sum().cpu()
        if oracle:
            images += list(fake_uint8.permute(0, 2, 3, 1).cpu().numpy())
            attributes += [meta["attributes"] for meta in batch["meta"]]
    usage = codebook_usage(counts)
    results = {"images": n, "psnr": float(psnr.compute()), "psnr_protocol": PSNR, "ssim": float(ssim.compute()),
               "codebook_used": float(usage["used"]), "codebook_perplexity": float(usage["perplexity"]),
               "codebook_size": model.cfg.n_embed, "grid": grid}
    if lpips is not None:
        results["lpips"] = float(lpips_sum) / max(n, 1)
    if fidelity is not None:
        computed = fidelity.compute()
        results["rfid"], results["rfid_protocol"] = computed["fid"], computed["protocol"]
    if oracle:
        results["oracle_on_reconstructions"] = oracle_accuracy(images, attributes)
    return results


def markdown_table(results: dict) -> str:
    """results.md of task=reconstruct: one row, the metrics that were computed (n/a for the others)."""
    columns = [("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"),
               ("rfid", "rFID", "{:.3f}"), ("codebook_used", "codes used %", None),
               ("codebook_perplexity", "perplexity", "{:.1f}")]
    header = ["images"] + [label for _, label, _ in columns]
    row = [str(results["images"])]
    for key, _, form in columns:
        if key not in results:
            row.append("n/a")
        elif key == "codebook_used":
            row.append(f"{100 * results[key]:.1f}")
        else:
            row.append(form.format(results[key]))
    oracle = results.get("oracle_on_reconstructions")
    if oracle:
        header += [f"oracle {a} %" for a in ("color", "shape", "position", "all")]
        row += [f"{100 * oracle[a]:.1f}" for a in ("color", "shape", "position", "all")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"]
    notes = [f"{results.get('ckpt', '')} on split={results.get('split')} of data={results.get('data')}: "
             f"{results['images']} images, {results['grid'][0]}x{results['grid'][1]} codes of {results['codebook_size']}"]
    notes.append(f"PSNR: {results.get('psnr_protocol', PSNR)}")
    if "rfid_protocol" in results:
        protocol = results["rfid_protocol"]
        notes.append(f"rFID: {protocol['feature_extractor']}, layer {protocol['feature_layer']}, weights "
                     f"{protocol['weights']}, {protocol['real_images']} real images at {protocol['real_input_size']}")
    if "lpips_protocol" in results:
        notes.append(f"LPIPS: {results['lpips_protocol']['net']}, backbone {results['lpips_protocol']['backbone']}")
    for key, reason in results.get("not_computed", {}).items():
        notes.append(f"{key} not computed: {reason}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
