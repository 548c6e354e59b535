"""Text-guided completion on the shapes benchmark, read by the shapes oracle (issue 26, section 3).

    python experiments/completion_shapes.py --ckpt logs/quickstart/gpt/checkpoints/last.ckpt --data data/shapes \
        [--split val|test] [--images 200] [--candidates 1 4] [--caption-ckpt CAPTIONER.ckpt --rerank 1 4 8] \
        [--guidance G] [--temperature T] [--top-k K] [--widen CELLS] [--seed 0]

Two tasks on the --split's images (choose settings on val, report on test), at the checkpoint's own sampling
options unless --guidance / --temperature / --top-k say otherwise (sampling seed --seed):
- edit: the object's box masked (where an object of its position and size can lie: its position's centre,
  its size's half-side, widened by the renderer's jitter bounds; in pixels, so every code cell it touches is
  sampled), prompted for another colour and another shape at the same place, size and background (a caption
  from the data's own templates). The first --images test images.
- outpaint: the right half masked on test images whose object lies wholly in the right half (the left half is
  background only), prompted for a new object (random colour, shape and size) in the top or bottom right
  corner on the same background. The first --images such images.
Each row completes every image with `T2IPipeline.complete` at one `region_candidates` K (1: plain completion;
K > 1: the best of K draws of the region by the likelihood the model gives the known codes after it) and one
--rerank R (R > 1: the best of R completions by Caption Loss under --caption-ckpt, CogView's reranking). The
oracle reads the completed images against the prompted attributes: colour, shape, position, size, background,
all (colour, shape and position, as the t2i evaluation's "all") and all five; "old colour" / "old shape" are the
shares of images in which it reads the original image's colour / shape where another was prompted (the old object
winning); "kept" is the share of images whose codes outside the region are the image's own VQGAN codes, "outside
dB" the mean PSNR of the completed images against the originals over the pixels outside the region. A reference
row samples the same prompts from scratch (task=generate's path, no image). --widen N grows the edit's box by N
code cells on every side (clipped to the image): fewer known codes near the old object. --erase adds a diagnostic
edit row: the known codes taken from the image with its object painted over (its background over the region's
cells), which says how much of the old object the codes outside the region carry (the VQGAN's encoder and decoder
have a global attention layer, so any code may). --ceiling adds a diagnostic row per task: the prompted object drawn
by the data's renderer (no jitter) and encoded, its codes spliced into the region and the image's own codes kept
outside, decoded: the best any sampler can reach while the codes outside the region stay the image's.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from t2i.data import shapes
from t2i.data.datamodule import ShardDataModule
from t2i.sampling import T2IPipeline, resolve_sampling
from t2i.sampling.complete import check_image
from t2i.scorers import CaptionScorer

NAMES = ("color", "shape", "position", "size", "background")


def split_images(data: str, split: str, size: int) -> tuple[list[np.ndarray], list[dict]]:
    """The split's images (uint8 [size, size, 3], as the models read them) and their true attributes."""
    dm = ShardDataModule({"name": "shapes", "root": data, "image_size": size, "batch_size": 100, "num_workers": 0,
                          "shuffle_buffer": 0, "seed": 0})
    dm.use_tokenizer(None)
    images, attributes = [], []
    for batch in dm.loader(split):
        images += list(batch["image"].permute(0, 2, 3, 1).numpy())
        attributes += [meta["attributes"] for meta in batch["meta"]]
    return images, attributes


def object_box(attrs: dict, size: int) -> list[float]:
    """[x0, y0, x1, y1] in pixels: where an object of this position and size can lie (the jitter's bounds)."""
    return [size * edge for edge in shapes.object_bounds(attrs)]


def other(values, value, rng) -> str:
    choices = [v for v in values if v != value]
    return choices[rng.integers(len(choices))]


def widened(box: list[float], cells: int, cell: int, size: int) -> list[float]:
    """A box in pixels grown by `cells` code cells (of `cell` pixels) on every side, clipped to the image."""
    grow = cells * cell
    return [max(0.0, box[0] - grow), max(0.0, box[1] - grow), min(size, box[2] + grow), min(size, box[3] + grow)]


def edit_tasks(images, attributes, count: int, size: int, seed: int, widen: int = 0, cell: int = 1):
    """(image, box in pixels, prompted attributes, prompt, original attributes) for the first `count` images:
    another colour and shape in the object's box (grown by `widen` cells of `cell` pixels)."""
    tasks = []
    for index, (image, attrs) in enumerate(zip(images[:count], attributes)):
        rng = np.random.default_rng([seed, 0, index])
        wanted = {**attrs, "color": other(shapes.ATTRIBUTES["color"], attrs["color"], rng),
                  "shape": other(shapes.ATTRIBUTES["shape"], attrs["shape"], rng)}
        box = widened(object_box(attrs, size), widen, cell, size)
        tasks.append((image, box, wanted, shapes.caption(wanted, rng), attrs))
    return tasks


def outpaint_tasks(images, attributes, count: int, size: int, seed: int):
    """(image, the right half, prompted attributes, prompt, original attributes) for the first `count` images whose
    object lies in the right half: a new object in a right-hand corner on the same background."""
    tasks = []
    for index, (image, attrs) in enumerate(zip(images, attributes)):
        if object_box(attrs, size)[0] < size / 2:
            continue
        rng = np.random.default_rng([seed, 1, index])
        wanted = {name: values[rng.integers(len(values))] for name, values in shapes.ATTRIBUTES.items()}
        wanted["position"] = ("top_right", "bottom_right")[rng.integers(2)]
        wanted["background"] = attrs["background"]
        tasks.append((image, [size / 2, 0, size, size], wanted, shapes.caption(wanted, rng), attrs))
        if len(tasks) == count:
            break
    return tasks


def score(images: torch.Tensor, wanted: list[dict], originals: list[dict]) -> dict:
    """The oracle's readings of uint8 images [N, 3, H, W] against the prompted attributes, in %, and how often it
    reads the original's colour / shape where the prompt asked for another (an image whose colour or shape the
    prompt kept counts as not old)."""
    reads = [shapes.read_attributes(image.permute(1, 2, 0).numpy()) for image in images]
    hits = shapes.attribute_accuracy(reads, wanted)  # each attribute, and "all": colour, shape and position
    hits["all 5"] = np.mean([all(read[n] == want[n] for n in NAMES) for read, want in zip(reads, wanted)])
    for name in ("color", "shape"):
        hits[f"old {name}"] = np.mean([read[name] == old[name] != want[name]
                                       for read, want, old in zip(reads, wanted, originals)])
    return {name: 100 * value for name, value in hits.items()}


def erased(image: np.ndarray, region: torch.Tensor, background: str) -> np.ndarray:
    """The image with every pixel of the region's cells (bool [h, w]) painted its background: the old object gone,
    every pixel outside the region as it was."""
    cell = image.shape[0] // region.shape[0]
    pixels = region.repeat_interleave(cell, 0).repeat_interleave(cell, 1).numpy()
    out = image.copy()
    out[pixels] = shapes.BACKGROUND_RGB[background]
    return out


def outside_psnr(completed: torch.Tensor, images: list[np.ndarray], masks: torch.Tensor) -> float:
    """Mean PSNR (dB) of the completed images against the originals over the pixels outside the region: what the
    VQGAN's decoder keeps of the unchanged part (its reconstruction, and what the new region spills over it)."""
    originals = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float()
    cell = originals.shape[-1] // masks.shape[-1]
    outside = ~masks.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, None].expand_as(originals)
    values = []
    for done, original, keep in zip(completed.float(), originals, outside):
        mse = ((done - original)[keep] ** 2).mean().clamp(min=1e-10)
        values.append(10 * torch.log10(255 ** 2 / mse).item())
    return float(np.mean(values))


def run_task(pipeline: T2IPipeline, name: str, tasks, sampling, candidates: list[int], reranks: list[int],
             scorer: CaptionScorer | None, batch_size: int, erase: bool = False, ceiling: bool = False,
             reference: bool = True) -> list[dict]:
    images = [image for image, _, _, _, _ in tasks]
    regions = [pipeline.region(box=box, box_units="pixels") for _, box, _, _, _ in tasks]
    wanted = [attrs for _, _, attrs, _, _ in tasks]
    prompts = [prompt for _, _, _, prompt, _ in tasks]
    originals = [attrs for _, _, _, _, attrs in tasks]
    # the image's codes as the pipeline encodes them (check_image's layout: a transposed copy can round a near-tie
    # to the other code, which would count as a changed code here)
    pixels = torch.stack([check_image(image, pipeline.image_size) for image in images]).to(pipeline.device)
    truth = pipeline.vqgan.encode(pixels.float() / 127.5 - 1).cpu()
    mask = torch.stack(regions)
    rows = []
    if reference:
        start = time.perf_counter()
        generated = pipeline.sample(prompts, sampling, batch_size)
        rows.append({"task": name, "how": "generated from scratch (reference)",
                     **score(generated.images, wanted, originals), "kept": float("nan"), "outside dB": float("nan"),
                     "s": time.perf_counter() - start})
    if ceiling:  # diagnostic: the best a sampler can do with the image's codes kept outside the region
        drawn = torch.stack([check_image(shapes.render(attrs, pipeline.image_size), pipeline.image_size)
                             for attrs in wanted]).to(pipeline.device)
        drawn_codes = pipeline.vqgan.encode(drawn.float() / 127.5 - 1).cpu()
        spliced = pipeline.decode(torch.where(mask, drawn_codes, truth), batch_size)
        rows.append({"task": name, "how": "diagnostic: the prompted object drawn and encoded, its codes in the "
                     "region, the image's outside", **score(spliced, wanted, originals),
                     "kept": 100.0, "outside dB": outside_psnr(spliced, images, mask), "s": 0.0})
    if erase:  # diagnostic: the known codes of the image without its object (not the image's own codes)
        blank = [erased(image, region, attrs["background"]) for image, region, attrs in zip(images, regions, originals)]
        pixels = torch.stack([check_image(image, pipeline.image_size) for image in blank]).to(pipeline.device)
        blank_codes = pipeline.vqgan.encode(pixels.float() / 127.5 - 1).cpu()
        changed = 100 * ((blank_codes != truth) & ~mask).sum().item() / (~mask).sum().item()
        print(f"{name}: erasing the object changes {changed:.1f}% of the codes outside the region "
              f"({100 * np.mean([((b != t) & ~m).any().item() for b, t, m in zip(blank_codes, truth, mask)]):.1f}% "
              f"of images have one changed)", flush=True)
        start = time.perf_counter()
        samples = pipeline.complete(prompts, blank, regions, sampling, batch_size)
        kept = [(codes[~m] == t[~m]).all().item() for codes, m, t in zip(samples.codes.cpu(), mask, truth)]
        rows.append({"task": name, "how": "diagnostic: the object erased before encoding (outside codes not kept)",
                     **score(samples.images, wanted, originals), "kept": 100 * np.mean(kept),
                     "outside dB": outside_psnr(samples.images, images, mask), "s": time.perf_counter() - start})
    for k in candidates:
        for r in reranks:
            start = time.perf_counter()
            samples = pipeline.complete(prompts, images, regions, sampling, batch_size, scorer=scorer if r > 1 else None,
                                        rerank=r, region_candidates=k)
            kept = [(codes[~m] == t[~m]).all().item() for codes, m, t in zip(samples.codes.cpu(), mask, truth)]
            how = [f"best of {k} by p(codes after the region)"] if k > 1 else []
            how += [f"best of {r} by Caption Loss"] if r > 1 else []
            rows.append({"task": name, "how": ", then ".join(how) or "plain (known fed, region sampled)",
                         **score(samples.images, wanted, originals), "kept": 100 * np.mean(kept),
                         "outside dB": outside_psnr(samples.images, images, mask), "s": time.perf_counter() - start})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the shapes GPT (e.g. logs/quickstart/gpt/checkpoints/last.ckpt)")
    parser.add_argument("--data", required=True, help="the shapes image shards (make quickstart's DATA/shapes)")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="whose images: choose settings on val, report on test")
    parser.add_argument("--tasks", nargs="+", choices=("edit", "outpaint"), default=["edit", "outpaint"])
    parser.add_argument("--images", type=int, default=200, help="images per task")
    parser.add_argument("--candidates", type=int, nargs="*", default=[1, 4],
                        help="region_candidates to compare (none: only the diagnostic rows)")
    parser.add_argument("--rerank", type=int, nargs="+", default=[1],
                        help="Caption-Loss rerank sizes to compare (> 1 needs --caption-ckpt or a self-captioning GPT)")
    parser.add_argument("--caption-ckpt", help="the captioning GPT that reranks (over the same VQGAN)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the checkpoint's)")
    parser.add_argument("--temperature", type=float, help="temperature (default: the checkpoint's)")
    parser.add_argument("--top-k", type=int, help="top-k (default: the checkpoint's)")
    parser.add_argument("--widen", type=int, default=0, help="grow the edit's box by this many code cells a side")
    parser.add_argument("--erase", action="store_true",
                        help="edit: add a diagnostic row completing the image with its object erased (painted its "
                             "background over the region's cells) before encoding")
    parser.add_argument("--ceiling", action="store_true",
                        help="add a diagnostic row: the prompted object drawn by the renderer and encoded, its codes "
                             "spliced into the region, the image's codes outside (what kept codes allow at best)")
    parser.add_argument("--no-reference", action="store_true", help="skip the row generated from scratch")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (and the prompts' draws)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    pipeline = T2IPipeline.from_checkpoint(args.ckpt)
    sampling = resolve_sampling({"seed": args.seed, "samples_per_prompt": 1, "guidance_scale": args.guidance,
                                 "temperature": args.temperature, "top_k": args.top_k}, pipeline.record.sampling)
    scorer = None
    if max(args.rerank) > 1:
        scorer, source = CaptionScorer.for_pipeline(pipeline, args.caption_ckpt)
        if scorer is None:
            parser.error(f"--rerank {max(args.rerank)} needs a captioning model: {source}")
    size = pipeline.image_size
    cell = size // pipeline.record.grid[1]
    images, attributes = split_images(args.data, args.split, size)
    makers = {"edit": lambda: edit_tasks(images, attributes, args.images, size, args.seed, args.widen, cell),
              "outpaint": lambda: outpaint_tasks(images, attributes, args.images, size, args.seed)}
    rows = []
    for name in args.tasks:
        tasks = makers[name]()
        rows += run_task(pipeline, name, tasks, sampling, args.candidates, args.rerank, scorer, args.batch_size,
                         erase=args.erase and name == "edit", reference=not args.no_reference,
                         ceiling=args.ceiling)
        print(f"{name}: {len(tasks)} {args.split} images", flush=True)
    print(f"\nsampling: temperature {sampling.temperature}, top-k {sampling.top_k}, "
          f"guidance {sampling.guidance_scale}, seed {sampling.seed}; split {args.split}, edit box widened by "
          f"{args.widen} cells; reranked by {scorer.source if scorer else '-'}\n")
    columns = (*NAMES, "all", "all 5", "old color", "old shape")
    print("| task | how | colour | shape | position | size | background | all | all 5 | old colour | old shape "
          "| kept | outside dB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kept = "-" if np.isnan(row["kept"]) else f"{row['kept']:.0f}"
        outside = "-" if np.isnan(row["outside dB"]) else f"{row['outside dB']:.1f}"
        print(f"| {row['task']} | {row['how']} | " + " | ".join(f"{row[n]:.1f}" for n in columns)
              + f" | {kept} | {outside} | {row['s']:.0f} |")


if __name__ == "__main__":
    main()
