"""How well a VQGAN reconstructs a split: PSNR, SSIM, codebook usage, and for the shapes data
how much of each attribute survives tokenization (the oracle on reconstructions)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from tqdm import tqdm

from t2i.data.shapes import oracle_accuracy
from t2i.models.vqgan import VQModel, codebook_usage


@torch.no_grad()
def reconstruction_metrics(model: VQModel, batches: Iterable[dict], prepare: Callable[[dict], dict],
                           device: str = "cpu", oracle: bool = False) -> dict:
    """Metrics over all `batches` (dicts with uint8 `image`; `prepare` makes them float in [-1, 1])."""
    model = model.to(device).eval()
    psnr = PeakSignalNoiseRatio(data_range=1.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    counts = torch.zeros(model.cfg.n_embed, device=device)
    images, attributes = [], []
    n = 0
    for batch in tqdm(batches, desc="reconstruct"):
        batch = prepare({**batch, "image": batch["image"].to(device)})
        codes = model.encode(batch["image"])
        fake = (model.decode(codes).clamp(-1, 1) + 1) / 2
        real = (batch["image"] + 1) / 2
        psnr.update(fake, real)
        ssim.update(fake, real)
        counts += torch.bincount(codes.flatten(), minlength=counts.numel()).float()
        n += len(codes)
        if oracle:
            images += list((fake * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
            attributes += [meta["attributes"] for meta in batch["meta"]]
    usage = codebook_usage(counts)
    results = {"images": n, "psnr": float(psnr.compute()), "ssim": float(ssim.compute()),
               "codebook_used": float(usage["used"]), "codebook_perplexity": float(usage["perplexity"]),
               "codebook_size": model.cfg.n_embed, "grid": [model.cfg.grid, model.cfg.grid]}
    if oracle:
        results["oracle_on_reconstructions"] = oracle_accuracy(images, attributes)
    return results
