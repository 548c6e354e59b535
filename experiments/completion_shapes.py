"""Text-guided completion on the shapes benchmark, read by the shapes oracle (issue 26, section 3).

    python experiments/completion_shapes.py --ckpt logs/quickstart/gpt/checkpoints/last.ckpt --data data/shapes \
        [--images 200] [--candidates 1 4] [--seed 0]

Two tasks on the split's test images, at the checkpoint's own sampling options (sampling seed --seed):
- edit: the object's box masked (where an object of its position and size can lie: its position's centre,
  its size's half-side, widened by the renderer's jitter bounds; in pixels, so every code cell it touches is
  sampled), prompted for another colour and another shape at the same place, size and background (a caption
  from the data's own templates). The first --images test images.
- outpaint: the right half masked on test images whose object lies wholly in the right half (the left half is
  background only), prompted for a new object (random colour, shape and size) in the top or bottom right
  corner on the same background. The first --images such images.
Each row completes every image with `T2IPipeline.complete` at one `region_candidates` K (1: plain completion;
K > 1: the best of K draws of the region by the likelihood the model gives the known codes after it). The
oracle reads the completed images against the prompted attributes: colour, shape, position, size, background,
all (colour, shape and position, as the t2i evaluation's "all") and all five; "kept" is the share of images
whose codes outside the region are the image's own VQGAN codes, "outside dB" the mean PSNR of the completed
images against the originals over the pixels outside the region. A reference row samples the same prompts from
scratch (task=generate's path, no image).
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

NAMES = ("color", "shape", "position", "size", "background")


def test_images(data: str, size: int) -> tuple[list[np.ndarray], list[dict]]:
    """The split's test images (uint8 [size, size, 3], as the models read them) and their true attributes."""
    dm = ShardDataModule({"name": "shapes", "root": data, "image_size": size, "batch_size": 100, "num_workers": 0,
                          "shuffle_buffer": 0, "seed": 0})
    dm.use_tokenizer(None)
    images, attributes = [], []
    for batch in dm.loader("test"):
        images += list(batch["image"].permute(0, 2, 3, 1).numpy())
        attributes += [meta["attributes"] for meta in batch["meta"]]
    return images, attributes


def object_box(attrs: dict, size: int) -> list[float]:
    """[x0, y0, x1, y1] in pixels: where an object of this position and size can lie (the jitter's bounds)."""
    cx, cy = shapes.POSITION_CENTRES[attrs["position"]]
    half = shapes.SIZE_RADIUS[attrs["size"]] * (1 + shapes.SCALE_JITTER) + shapes.CENTRE_JITTER
    return [max(0.0, (cx - half) * size), max(0.0, (cy - half) * size), min(size, (cx + half) * size),
            min(size, (cy + half) * size)]


def other(values, value, rng) -> str:
    choices = [v for v in values if v != value]
    return choices[rng.integers(len(choices))]


def edit_tasks(images, attributes, count: int, size: int, seed: int):
    """(image, box in pixels, prompted attributes, prompt) for the first `count` images: another colour and shape
    in the object's box."""
    tasks = []
    for index, (image, attrs) in enumerate(zip(images[:count], attributes)):
        rng = np.random.default_rng([seed, 0, index])
        wanted = {**attrs, "color": other(shapes.ATTRIBUTES["color"], attrs["color"], rng),
                  "shape": other(shapes.ATTRIBUTES["shape"], attrs["shape"], rng)}
        tasks.append((image, object_box(attrs, size), wanted, shapes.caption(wanted, rng)))
    return tasks


def outpaint_tasks(images, attributes, count: int, size: int, seed: int):
    """(image, the right half, prompted attributes, prompt) for the first `count` images whose object lies in the
    right half: a new object in a right-hand corner on the same background."""
    tasks = []
    for index, (image, attrs) in enumerate(zip(images, attributes)):
        if object_box(attrs, size)[0] < size / 2:
            continue
        rng = np.random.default_rng([seed, 1, index])
        wanted = {name: values[rng.integers(len(values))] for name, values in shapes.ATTRIBUTES.items()}
        wanted["position"] = ("top_right", "bottom_right")[rng.integers(2)]
        wanted["background"] = attrs["background"]
        tasks.append((image, [size / 2, 0, size, size], wanted, shapes.caption(wanted, rng)))
        if len(tasks) == count:
            break
    return tasks


def score(images: torch.Tensor, wanted: list[dict]) -> dict:
    """The oracle's readings of uint8 images [N, 3, H, W] against the prompted attributes, in %."""
    reads = [shapes.read_attributes(image.permute(1, 2, 0).numpy()) for image in images]
    hits = {name: np.mean([read[name] == want[name] for read, want in zip(reads, wanted)]) for name in NAMES}
    hits["all"] = np.mean([all(read[n] == want[n] for n in ("color", "shape", "position"))
                           for read, want in zip(reads, wanted)])
    hits["all 5"] = np.mean([all(read[n] == want[n] for n in NAMES) for read, want in zip(reads, wanted)])
    return {name: 100 * value for name, value in hits.items()}


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


def run_task(pipeline: T2IPipeline, name: str, tasks, sampling, candidates: list[int], batch_size: int) -> list[dict]:
    images = [image for image, _, _, _ in tasks]
    regions = [pipeline.region(box=box, box_units="pixels") for _, box, _, _ in tasks]
    wanted = [attrs for _, _, attrs, _ in tasks]
    prompts = [prompt for _, _, _, prompt in tasks]
    # the image's codes as the pipeline encodes them (check_image's layout: a transposed copy can round a near-tie
    # to the other code, which would count as a changed code here)
    pixels = torch.stack([check_image(image, pipeline.image_size) for image in images]).to(pipeline.device)
    truth = pipeline.vqgan.encode(pixels.float() / 127.5 - 1).cpu()
    mask = torch.stack(regions)
    rows = []
    start = time.perf_counter()
    generated = pipeline.sample(prompts, sampling, batch_size)
    rows.append({"task": name, "how": "generated from scratch (reference)", **score(generated.images, wanted),
                 "kept": float("nan"), "outside dB": float("nan"), "s": time.perf_counter() - start})
    for k in candidates:
        start = time.perf_counter()
        samples = pipeline.complete(prompts, images, regions, sampling, batch_size, region_candidates=k)
        kept = [(codes[~m] == t[~m]).all().item() for codes, m, t in zip(samples.codes.cpu(), mask, truth)]
        how = "plain (known fed, region sampled)" if k == 1 else f"best of {k} by p(codes after the region)"
        rows.append({"task": name, "how": how, **score(samples.images, wanted), "kept": 100 * np.mean(kept),
                     "outside dB": outside_psnr(samples.images, images, mask), "s": time.perf_counter() - start})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the shapes GPT (e.g. logs/quickstart/gpt/checkpoints/last.ckpt)")
    parser.add_argument("--data", required=True, help="the shapes image shards (make quickstart's DATA/shapes)")
    parser.add_argument("--images", type=int, default=200, help="images per task")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1, 4], help="region_candidates to compare")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (and the prompts' draws)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    pipeline = T2IPipeline.from_checkpoint(args.ckpt)
    sampling = resolve_sampling({"seed": args.seed, "samples_per_prompt": 1}, pipeline.record.sampling)
    size = pipeline.image_size
    images, attributes = test_images(args.data, size)
    rows = []
    for name, tasks in (("edit", edit_tasks(images, attributes, args.images, size, args.seed)),
                        ("outpaint", outpaint_tasks(images, attributes, args.images, size, args.seed))):
        rows += run_task(pipeline, name, tasks, sampling, args.candidates, args.batch_size)
        print(f"{name}: {len(tasks)} images", flush=True)
    print(f"\nsampling: temperature {sampling.temperature}, top-k {sampling.top_k}, "
          f"guidance {sampling.guidance_scale}, seed {sampling.seed}\n")
    print("| task | how | colour | shape | position | size | background | all | all 5 | kept | outside dB | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kept = "-" if np.isnan(row["kept"]) else f"{row['kept']:.0f}"
        outside = "-" if np.isnan(row["outside dB"]) else f"{row['outside dB']:.1f}"
        print(f"| {row['task']} | {row['how']} | " + " | ".join(f"{row[n]:.1f}" for n in (*NAMES, "all", "all 5"))
              + f" | {kept} | {outside} | {row['s']:.0f} |")


if __name__ == "__main__":
    main()
