"""Text-to-image evaluation of a GPT checkpoint on a split's captions.

For every caption: `samples_per_prompt` images, each the best of `rerank` candidates by Caption
Loss (CogView: the mean negative log-likelihood per text token of the caption given the image,
under a captioning model). Reported with and without reranking (the first candidate is what
plain sampling gives): FID and IS against the split's real images, mean Caption Loss, and on the
shapes data the oracle's attribute accuracy.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from t2i.data.shapes import oracle_accuracy
from t2i.data.tokenizer import TextTokenizer
from t2i.models.gpt import GPT
from t2i.sampling import Generator, SamplingConfig, load_gpt, save_captioned_grid


@torch.no_grad()
def caption_loss(model: GPT, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per sample: mean NLL of the text tokens (padding excluded) in `[I2T] codes [BOT] text`.

    codes [N, image_len] (or [N, h, w]), text ids [N, text_len] -> [N] (NaN for an empty text).
    As in training, a text position competes only among text ids.
    """
    cfg = model.cfg
    codes = codes.flatten(1)
    n = len(codes)
    sequence = torch.cat([codes.new_full((n, 1), cfg.special("I2T")), codes,
                          codes.new_full((n, 1), cfg.special("BOT")), text + cfg.text_offset], 1)
    logits = model(sequence[:, :-1])[:, -cfg.text_len:, cfg.text_offset: cfg.text_offset + cfg.n_text_tokens]
    nll = F.cross_entropy(logits.float().transpose(1, 2), text, reduction="none")
    real = text > 0
    return (nll * real).sum(1) / real.sum(1)  # 0/0 = NaN: an empty caption has no loss


class CaptionScorer:
    """Caption Loss under a captioning GPT (one trained with stage.caption_prob > 0)."""

    def __init__(self, gpt: GPT, tokenizer: TextTokenizer, source: str):
        self.gpt, self.tokenizer, self.source = gpt.eval(), tokenizer, source

    @classmethod
    def for_generator(cls, generator: Generator, caption_ckpt: str | None) -> tuple["CaptionScorer | None", str]:
        """The evaluated model itself when it learned captioning, else `caption_ckpt`; (None, reason) when neither."""
        if caption_ckpt:
            gpt, meta = load_gpt(caption_ckpt)
            if not meta.get("caption_prob"):
                return None, f"eval.caption_ckpt={caption_ckpt} was trained without the caption direction"
            ours, theirs = generator.meta["vqgan"].get("sha256"), meta["vqgan"].get("sha256")
            if ours != theirs:
                raise ValueError(f"eval.caption_ckpt={caption_ckpt} reads codes of another VQGAN "
                                 f"({str(theirs)[:12]}..., the evaluated model's is {str(ours)[:12]}...)")
            return cls(gpt.to(generator.device), TextTokenizer(meta["tokenizer"], meta["text_len"]),
                       str(caption_ckpt)), str(caption_ckpt)
        if generator.meta.get("caption_prob"):
            return cls(generator.gpt, generator.tokenizer, "self"), "self"
        return None, ("the checkpoint was trained without the caption direction (stage.caption_prob=0) and no "
                      "eval.caption_ckpt was given")

    def __call__(self, prompts: list[str], codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Caption Loss [N] of prompts[i] for codes[i]."""
        text = self.tokenizer(prompts).to(codes.device)
        return torch.cat([caption_loss(self.gpt, c, t) for c, t in zip(codes.split(batch_size), text.split(batch_size))])


@dataclass
class EvalConfig:
    num_prompts: int | None = None  # the first N captions of the split (None: all)
    samples_per_prompt: int = 1
    rerank: int = 1  # candidates per sample; the lowest Caption Loss is kept
    batch_size: int = 16  # sequences per sampling batch
    grid_prompts: int = 16  # prompts shown in the captioned grids
    save_images: bool = False  # every generated image as a PNG under samples/


class _Run:
    """What one image set (plain or reranked) accumulates over the split."""

    def __init__(self, fidelity):
        self.fidelity = fidelity
        self.caption_losses: list[torch.Tensor] = []
        self.images_for_oracle: list = []
        self.grid: list[torch.Tensor] = []

    def add(self, images: torch.Tensor, losses: torch.Tensor | None, keep_for_oracle: bool, grid_rows: int,
            per_prompt: int) -> None:
        if self.fidelity is not None:
            self.fidelity.add_generated(images)
        if losses is not None:
            self.caption_losses.append(losses)
        if keep_for_oracle:
            self.images_for_oracle += list(images.permute(0, 2, 3, 1).numpy())
        self.grid.append(images[: grid_rows * per_prompt])

    def metrics(self, attributes: list[dict] | None, per_prompt: int) -> dict:
        out = {}
        if self.caption_losses:
            losses = torch.cat(self.caption_losses)
            out["caption_loss"] = float(losses[~losses.isnan()].mean())
        if attributes is not None:
            truths = [a for a in attributes for _ in range(per_prompt)]
            out["attributes"] = oracle_accuracy(self.images_for_oracle, truths)
        if self.fidelity is not None:
            out.update(self.fidelity.compute())
        return out


@torch.no_grad()
def evaluate(generator: Generator, batches: Iterable[dict], sampling: SamplingConfig, cfg: EvalConfig,
             out_dir: Path, scorer: CaptionScorer | None = None, fidelity_factory=None) -> dict:
    """Generate for every caption of `batches` (loader batches of a split) and score; see the module doc.

    `fidelity_factory()` makes an accumulator with add_real / add_generated / compute (FID, IS), or
    None to skip them.
    """
    if cfg.rerank < 1 or cfg.samples_per_prompt < 1:
        raise ValueError(f"eval.rerank and eval.samples_per_prompt must be >= 1, got {cfg.rerank}, {cfg.samples_per_prompt}")
    if cfg.rerank > 1 and scorer is None:
        raise ValueError("eval.rerank > 1 needs a captioning model: see caption_loss_unavailable")
    per_prompt, k = cfg.samples_per_prompt, cfg.rerank
    candidates = replace(sampling, samples_per_prompt=per_prompt * k)
    plain = _Run(fidelity_factory() if fidelity_factory else None)
    reranked = _Run(fidelity_factory() if fidelity_factory else None) if k > 1 else None
    prompts, attributes = [], []
    oracle = True
    for batch in tqdm(batches, desc="evaluate"):
        captions = list(batch["caption"])
        if cfg.num_prompts is not None:
            captions = captions[: cfg.num_prompts - len(prompts)]
        if not captions:
            break
        n = len(captions)
        metas = batch["meta"][:n]
        oracle = oracle and all("attributes" in m for m in metas)
        if plain.fidelity is not None and plain.fidelity.needs_real:  # the reranked set reads them from the cache
            if "image" not in batch:
                raise ValueError("FID needs the split's real images: evaluate on image shards (e.g. data=shapes, "
                                 "not data=shapes_codes), or set eval.fid=false")
            plain.fidelity.add_real(batch["image"][:n])
        codes = generator.sample_codes(captions, replace(candidates, seed=_batch_seed(sampling.seed, len(prompts))),
                                       cfg.batch_size)
        losses = scorer([c for c in captions for _ in range(per_prompt * k)], codes) if scorer else None
        codes = codes.view(n, per_prompt, k, *codes.shape[1:])
        grid_rows = max(0, cfg.grid_prompts - len(prompts))
        first = codes[:, :, 0].flatten(0, 1)
        images = generator.decode(first, cfg.batch_size)
        plain.add(images, losses.view(n, per_prompt, k)[:, :, 0].flatten() if losses is not None else None,
                  oracle, grid_rows, per_prompt)
        if reranked is not None:
            chosen, chosen_losses = pick_best(codes, losses.view(n, per_prompt, k))
            reranked.add(generator.decode(chosen.flatten(0, 1), cfg.batch_size), chosen_losses.flatten(), oracle,
                         grid_rows, per_prompt)
        if cfg.save_images:
            _save_images(images, out_dir / "samples", len(prompts), per_prompt)
        prompts += captions
        attributes += [m.get("attributes") for m in metas]
        if cfg.num_prompts is not None and len(prompts) >= cfg.num_prompts:
            break
    if not prompts:
        raise ValueError("the split has no captions to generate from")
    results = {"prompts": len(prompts), "samples_per_prompt": per_prompt, "rerank": k,
               "sampling": asdict(replace(sampling, samples_per_prompt=per_prompt)),
               "images_per_set": len(prompts) * per_prompt}
    truth = attributes if oracle else None
    results["plain"] = plain.metrics(truth, per_prompt)
    save_captioned_grid(torch.cat(plain.grid), prompts[: cfg.grid_prompts], out_dir / "grid.png", per_prompt)
    if reranked is not None:
        results[f"rerank_{k}"] = reranked.metrics(truth, per_prompt)
        save_captioned_grid(torch.cat(reranked.grid), prompts[: cfg.grid_prompts], out_dir / f"grid_rerank_{k}.png",
                            per_prompt)
    return results


def pick_best(codes: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-reranking: codes [n, S, K, h, w] and Caption Losses [n, S, K] -> the lowest-loss candidate of each."""
    best = losses.nan_to_num(float("inf")).argmin(-1)  # [n, S]
    index = best[:, :, None, None, None].expand(-1, -1, 1, *codes.shape[3:])
    return codes.gather(2, index)[:, :, 0], losses.gather(2, best[:, :, None])[:, :, 0]


def _batch_seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed + 1_000_003 * offset  # distinct streams per batch of prompts


def _save_images(images: torch.Tensor, folder: Path, first_prompt: int, per_prompt: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        prompt, sample = divmod(index, per_prompt)
        torchvision.utils.save_image(image.float() / 255, folder / f"{first_prompt + prompt:06d}_{sample:02d}.png")


def markdown_table(results: dict) -> str:
    """results.md: one row per image set (plain, reranked)."""
    sets = [name for name in results if name == "plain" or name.startswith("rerank_")]
    columns = ["fid", "is_mean", "caption_loss"]
    attribute_names = ["color", "shape", "position", "all"]
    has_attributes = any("attributes" in results[s] for s in sets)
    header = ["set", *columns] + ([f"{a} %" for a in attribute_names] if has_attributes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sets:
        metrics = results[name]
        row = [name] + [f"{metrics[c]:.3f}" if c in metrics else "n/a" for c in columns]
        if has_attributes:
            row += [f"{100 * metrics['attributes'][a]:.1f}" for a in attribute_names]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"{results['prompts']} prompts x {results['samples_per_prompt']} samples, sampling {results['sampling']}"]
    if results["rerank"] > 1:
        notes.append(f"rerank_{results['rerank']}: the lowest Caption Loss of {results['rerank']} candidates per image "
                     f"(scored by {results.get('caption_model')})")
    if results.get("caption_loss_unavailable"):
        notes.append(f"Caption Loss and reranking unavailable: {results['caption_loss_unavailable']}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def warn_unavailable(reason: str) -> None:
    warnings.warn(f"Caption Loss and reranking unavailable: {reason}")
