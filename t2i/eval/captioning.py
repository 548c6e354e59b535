"""Image captioning with a GPT's image-to-text direction (`[I2T] codes [BOT] text`), and its scores.

The images are a split's (code shards: their codes; image shards: encoded with the checkpoint's
VQGAN) or the image files of a folder (encoded the same way; a same-stem `.txt` beside an image is
its reference, as the folder converter reads it). Captions are decoded by
`t2i.sampling.generate_text` (greedy, sampled or beam search) and scored against every caption row
of their image:

- BLEU-4: torchmetrics' `BLEUScore(n_gram=4)` (corpus BLEU: n-gram counts summed over the images,
  uniform weights, the brevity penalty from the closest reference lengths), over characters;
- CIDEr-D: pycocoevalcap's `Cider` (the COCO caption evaluation's CIDEr, which is CIDEr-D: tf-idf
  n-grams 1..4 with document frequencies from the references of the evaluated images, clipped
  counts, a Gaussian length penalty with sigma 6, times 10), over characters;
- on the shapes data, the attributes a caption names (t2i.data.shapes.read_caption) against the
  image's true ones.

Characters: Chinese has no word spaces, so both metrics read a caption as its characters, spaces and
punctuation (Unicode categories Z* and P*) left out, each character a token (passed to both libraries
joined by spaces). References go through the model's tokenizer and back first (SentencePiece's
NFKC folds "，" to ","; a WordPiece vocabulary lower-cases), so that a caption is compared with
what the model could have written. CIDEr-D's document frequencies come from the evaluated images'
references, so its value depends on the set of images (as in the COCO evaluation).
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.cider.cider import Cider
from torchmetrics.text import BLEUScore
from tqdm import tqdm

from t2i.adapters import load_adapted_gpt
from t2i.checkpoints import load_record_vqgan
from t2i.data.datamodule import ShardDataModule
from t2i.data.shapes import attribute_accuracy, read_caption
from t2i.data.shards import IMAGE_EXTENSIONS, RowError, load_image, resize_center_crop
from t2i.data.stream import to_unit_range
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.eval.text_to_image import prompt_loader, select_prompts
from t2i.models.gpt import GPT
from t2i.models.vqgan import VQModel
from t2i.sampling import CaptionConfig, generate_text, prompt_seeds

TOKENISATION = ("characters (Unicode categories Z* and P* left out); references through the model's "
                "tokenizer and back")


@dataclass
class CaptionBatch:
    """Images to caption: their keys, codes [B, h, w], reference captions and (shapes) true attributes."""
    keys: list[str]
    codes: torch.Tensor
    references: list[list[str]]
    attributes: list[dict] | None


def characters(text: str) -> list[str]:
    """A caption's tokens for BLEU and CIDEr: its characters, without spaces and punctuation."""
    return [c for c in text if not unicodedata.category(c).startswith(("Z", "P")) and not c.isspace()]


def caption_scores(captions: list[str], references: list[list[str]]) -> dict:
    """BLEU-4 and CIDEr-D of captions[i] against references[i] (one or more each), over characters.

    Returns {"bleu4", "cider_d", "cider_d_per_image"} (the per-image values in input order)."""
    if len(captions) != len(references) or not captions:
        raise ValueError(f"caption scores need one or more captions, each with references: got {len(captions)} "
                         f"captions and {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every caption needs at least one reference caption")
    spaced = [" ".join(characters(c)) for c in captions]
    spaced_refs = [[" ".join(characters(r)) for r in refs] for refs in references]
    bleu = BLEUScore(n_gram=4)
    bleu.update(spaced, spaced_refs)
    cider, per_image = Cider().compute_score({i: refs for i, refs in enumerate(spaced_refs)},
                                             {i: [c] for i, c in enumerate(spaced)})
    return {"bleu4": float(bleu.compute()), "cider_d": float(cider), "cider_d_per_image": [float(v) for v in per_image]}


def split_batches(dm: ShardDataModule, split: str, num_images: int | None, batch_size: int,
                  vqgan: VQModel | None, device: torch.device | str) -> tuple[Iterator[CaptionBatch], int]:
    """The split's first `num_images` distinct images (all when None; by source id, as task=t2i chooses
    them), each once with every caption row of its image as references: (batches, images).

    Code shards give their codes; image shards are encoded with `vqgan` (at the data's image size,
    which must be the VQGAN's resolution)."""
    prompts = select_prompts(dm, split, num_images)
    references = dict(zip((pick.key for pick in prompts.picks), prompts.references))
    codes_data = dm.cfg.kind() == "codes"
    if not codes_data:
        if vqgan is None:
            raise ValueError(f"data={dm.cfg.name} holds images: captioning them needs the checkpoint's VQGAN")
        if dm.cfg.image_size != vqgan.cfg.resolution:
            raise ValueError(f"data.image_size={dm.cfg.image_size} but the VQGAN encodes {vqgan.cfg.resolution}x"
                             f"{vqgan.cfg.resolution} images: set data.image_size={vqgan.cfg.resolution}")

    def batches() -> Iterator[CaptionBatch]:
        for batch in prompt_loader(dm, prompts, batch_size):
            keys = list(batch["key"])
            if codes_data:
                codes = batch["codes"].to(device)
            else:
                batch = dm.on_after_batch_transfer({**batch, "image": batch["image"].to(device)})
                codes = vqgan.encode(batch["image"])
            metas = batch["meta"]
            attributes = [m["attributes"] for m in metas] if all("attributes" in m for m in metas) else None
            yield CaptionBatch(keys, codes, [references[k] for k in keys], attributes)

    return batches(), prompts.images


def folder_batches(folder: str | Path, batch_size: int, vqgan: VQModel, device: torch.device | str,
                   num_images: int | None = None) -> tuple[Iterator[CaptionBatch], int]:
    """The first `num_images` image files under `folder` (jpg, jpeg, png, webp; sorted by path; all when
    None), scaled and centre-cropped to the VQGAN's resolution and encoded: (batches, images). A same-stem
    `.txt` is the image's reference."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"images={folder} is not a folder of image files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"images={folder} holds no {', '.join(IMAGE_EXTENSIONS)} files")
    files = files[:num_images]
    size = vqgan.cfg.resolution

    def batches() -> Iterator[CaptionBatch]:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            pixels = torch.stack([torch.from_numpy(_pixels(path, size)) for path in chunk])
            images = to_unit_range(pixels.permute(0, 3, 1, 2).to(device))
            references = []
            for path in chunk:
                text = path.with_suffix(".txt")
                caption = text.read_text(encoding="utf-8-sig", errors="replace").strip() if text.is_file() else ""
                references.append([caption] if caption else [])
            yield CaptionBatch([p.relative_to(root).as_posix() for p in chunk], vqgan.encode(images), references, None)

    return batches(), len(files)


def _pixels(path: Path, size: int) -> np.ndarray:
    """An image file as uint8 [size, size, 3]: the shorter side scaled to `size`, the centre square cut."""
    try:
        image = load_image(path)
    except RowError as error:
        raise ValueError(f"images=: cannot read {path} ({error}): remove or replace it") from None
    return np.array(resize_center_crop(image, size), dtype=np.uint8)


def run_captioning(ckpt: str | Path, cfg: CaptionConfig, out_dir: Path, data: dict | None = None, split: str = "test",
                   images: str | Path | None = None, num_images: int | None = None, batch_size: int = 64,
                   vqgan_ckpt: str | Path | None = None, device: torch.device | str = "cpu",
                   adapter: str | Path | None = None) -> dict:
    """eval.py task=caption: caption the `split` of `data` (a data config), or the files of `images`, with the
    GPT checkpoint `ckpt` (with the LoRA adapter checkpoint `adapter` merged in, when given); writes
    captions.jsonl into `out_dir` and returns the results."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"caption.batch_size must be an integer >= 1 (images per batch), got {batch_size}")
    if num_images is not None and num_images < 1:
        raise ValueError(f"caption.num_images must be >= 1 (or null: all images), got {num_images}")
    gpt, record = load_adapted_gpt(ckpt, adapter)
    if not record.caption_prob:  # with an adapter, its own training: the base's captioning is not what it learned
        raise ValueError(f"{adapter or ckpt} was trained without the image-to-text direction (stage.caption_prob=0): "
                         "caption with a checkpoint trained with stage.caption_prob > 0")
    gpt, tokenizer = gpt.to(device), record.tokenizer_model()
    if images:
        vqgan = load_record_vqgan(record, str(adapter or ckpt), vqgan_ckpt).to(device)
        batches, total = folder_batches(images, batch_size, vqgan, device, num_images)
        source = f"images={images}"
    else:
        dm = ShardDataModule(data)
        dm.use_tokenizer(tokenizer)
        vqgan = None
        if dm.cfg.kind() == "codes":
            theirs, ours = dm.cfg.manifest().get("vqgan_sha256"), record.vqgan.sha256
            if theirs != ours:
                raise ValueError(f"data={dm.cfg.name} ({dm.cfg.root}) holds codes of another VQGAN ({str(theirs)[:12]}..., "
                                 f"the checkpoint's is {str(ours)[:12]}...): caption its image shards instead")
        else:
            vqgan = load_record_vqgan(record, str(adapter or ckpt), vqgan_ckpt).to(device)
        batches, total = split_batches(dm, split, num_images, batch_size, vqgan, device)
        source = f"split={split} of data={dm.cfg.name}"
    results = caption_and_score(gpt, tokenizer, batches, total, cfg, out_dir)
    return {"task": "caption", "ckpt": str(ckpt), "adapter": None if adapter is None else str(adapter),
            "source": source,
            "caption_end_learned": record.training.caption_end, **results,
            "captions_file": str(out_dir / "captions.jsonl")}


@torch.no_grad()
def caption_and_score(gpt: GPT, tokenizer: FixedLengthTokenizer, batches: Iterable[CaptionBatch], total: int,
                      cfg: CaptionConfig, out_dir: Path) -> dict:
    """Caption every image of `batches`, write `captions.jsonl` (a line per image, by key: its caption,
    whether it ended, its references, and on shapes the attributes read and true) and return the scores."""
    rows, started = [], time.perf_counter()
    progress = tqdm(total=total, desc="caption", unit="image")
    for batch in batches:
        seeds = prompt_seeds(cfg.seed, batch.keys) if cfg.strategy == "sample" and cfg.seed is not None else None
        text = generate_text(gpt, batch.codes, cfg, seeds=seeds).cpu()
        for i, key in enumerate(batch.keys):
            caption = tokenizer.decode(text[i])
            row = {"key": key, "caption": caption, "ended": bool((text[i] == 0).any()),
                   "references": [tokenizer.decode(tokenizer.encode(r)) for r in batch.references[i]]}
            if batch.attributes is not None:
                row["attributes_read"], row["attributes_true"] = read_caption(caption), batch.attributes[i]
            rows.append(row)
        progress.update(len(batch.keys))
    progress.close()
    seconds = time.perf_counter() - started
    if not rows:
        raise ValueError("no images to caption")
    rows.sort(key=lambda row: row["key"])  # data workers interleave their batches: one order for any number
    results = {"images": len(rows), "decoding": asdict(cfg), "seconds": round(seconds, 2),
               "mean_caption_chars": sum(len(characters(r["caption"])) for r in rows) / len(rows),
               "ended": sum(r["ended"] for r in rows) / len(rows),
               "tokenisation": TOKENISATION,
               "metrics": {"bleu4": "torchmetrics BLEUScore(n_gram=4), corpus level",
                           "cider_d": "pycocoevalcap Cider (CIDEr-D, sigma 6, x10), idf from these references"}}
    scored = [r for r in rows if r["references"]]
    if scored:
        scores = caption_scores([r["caption"] for r in scored], [r["references"] for r in scored])
        for row, value in zip(scored, scores.pop("cider_d_per_image")):
            row["cider_d"] = value
        results.update(scores, images_with_references=len(scored))
    else:
        results["scores_unavailable"] = "no reference captions (a same-stem .txt beside each image file)"
    if all("attributes_true" in r for r in rows):
        results["attributes"] = attribute_accuracy([r["attributes_read"] for r in rows],
                                                   [r["attributes_true"] for r in rows])
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "captions.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return results


def markdown_table(results: dict, examples: int = 8) -> str:
    """results.md of task=caption: the scores, then the first captions beside their references."""
    header = ["images", "BLEU-4", "CIDEr-D"]
    row = [str(results["images"]), _number(results.get("bleu4"), 4), _number(results.get("cider_d"), 3)]
    attributes = results.get("attributes")
    if attributes:
        names = ("color", "shape", "position", "size", "background", "all")
        header += [f"{name} %" for name in names]
        row += [f"{100 * attributes[name]:.1f}" for name in names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |", ""]
    decoding = results["decoding"]
    notes = [f"{results.get('ckpt')} on {results.get('source')}: decoding {decoding}",
             f"tokens: {results['tokenisation']}; BLEU-4: {results['metrics']['bleu4']}; "
             f"CIDEr-D: {results['metrics']['cider_d']}",
             f"{100 * results['ended']:.1f}% of the captions ended (the model predicted padding) before text_len; "
             f"{results['mean_caption_chars']:.1f} characters on average"]
    if not results.get("caption_end_learned", True):
        notes.append("the checkpoint was trained without stage.caption_end: it never learned where a caption ends, so "
                      "its captions run on to text_len and the words after the description count against BLEU/CIDEr")
    if attributes:
        notes.append("attributes: read from each caption's words (t2i.data.shapes.read_caption, the first word of "
                     "each attribute); all = colour, shape and position right")
    if "scores_unavailable" in results:
        notes.append(f"BLEU-4 and CIDEr-D not computed: {results['scores_unavailable']}")
    lines += [f"- {note}" for note in notes]
    path = results.get("captions_file")
    if path and Path(path).is_file():
        lines += ["", "| key | caption | reference |", "|---|---|---|"]
        with open(path, encoding="utf-8") as f:
            for _, line in zip(range(examples), f):
                item = json.loads(line)
                reference = item["references"][0] if item["references"] else ""
                lines.append(f"| {item['key']} | {item['caption']} | {reference} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
