"""Fine-tune a shapes GPT for text-guided completion on spliced sequences (issue 26, section 3).

    python experiments/completion_finetune.py --ckpt logs/quickstart/gpt/checkpoints/last.ckpt \
        --out /tmp/complete-ft/last.ckpt [--steps 300] [--batch-size 32] [--lr 3e-4] [--splice 0.5] [--seed 0]

Why: the VQGAN's encoder has a global attention layer, so every code of a shapes image carries its object
(painting the object over changes ~98% of the codes outside its box: experiments/completion_shapes.py --erase).
A GPT trained only on whole images continues such codes with the object they describe, whatever the text says.
Spliced codes with the image's own codes outside a region and another object's codes inside decode to the new
object (completion_shapes.py --ceiling), so what is missing is a GPT that samples them.

What it trains on, all from the data generator's train split (t2i.data.shapes.sample; never val or test): an
image, a region holding its object (the object's box, where an object of its position and size can lie, or the
half of the image that holds that box), and a new object for the region (the data's own attribute draw, its
position and size kept for a box, a position whose box lies in the half for a half; the background kept), drawn
by the same renderer and resized as the shards are. The sequence is the new object's caption, then the image's
codes outside the region and the new drawing's codes inside it: the case a completion asks for. With probability
1 - --splice a row is the plain whole image with its own caption (the text-to-image task as trained); the text is
dropped for the null text at the checkpoint's cond_drop (classifier-free guidance keeps working). The loss is the
cross-entropy of every image code, as in training. The checkpoint keeps the base's record (sampling options,
tokenizer, VQGAN), with its origin saying how it was made.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.checkpoints import load_gpt, load_record_vqgan, save_gpt
from t2i.data import shapes

IMAGE_SIZE_STORED = 64  # the shards' side: images are drawn at it and resized as the data module reads them


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """A drawing at the shards' side resized to the model's as the data module reads it."""
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def object_box_cells(attrs: dict, grid: int) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1) in code cells: every cell an object of this position and size can touch (jitter bounds)."""
    x0, y0, x1, y1 = shapes.object_bounds(attrs)
    return math.floor(x0 * grid), math.floor(y0 * grid), math.ceil(x1 * grid), math.ceil(y1 * grid)


def inside(box: tuple[int, int, int, int], region: tuple[int, int, int, int]) -> bool:
    return region[0] <= box[0] and region[1] <= box[1] and box[2] <= region[2] and box[3] <= region[3]


def spliced_example(index: int, seed: int, size: int, grid: int):
    """(original image, its caption, new image, region [x0, y0, x1, y1) in cells, new caption) for train sample
    `index`."""
    rng = np.random.default_rng([seed, 7, index])
    attrs, caption, image = shapes.sample(index, "train", seed, IMAGE_SIZE_STORED)
    box = object_box_cells(attrs, grid)
    new = shapes.random_attributes(rng)
    new["background"] = attrs["background"]
    if rng.random() < 0.5:  # the object's box: the new object where the old one was, at its size
        region = box
        new["position"], new["size"] = attrs["position"], attrs["size"]
    else:  # the half holding the box: the new object anywhere its box fits in that half
        halves = [(0, 0, grid // 2, grid), (grid // 2, 0, grid, grid), (0, 0, grid, grid // 2), (0, grid // 2, grid, grid)]
        region = [h for h in halves if inside(box, h)] or [(0, 0, grid, grid)]
        region = region[rng.integers(len(region))]
        fits = [(p, s) for p in shapes.POSITION_CENTRES for s in shapes.SIZE_RADIUS
                if inside(object_box_cells({"position": p, "size": s}, grid), region)]
        new["position"], new["size"] = fits[rng.integers(len(fits))] if fits else (attrs["position"], attrs["size"])
    return (resized(image, size), caption, resized(shapes.render(new, IMAGE_SIZE_STORED, rng), size), region,
            shapes.caption(new, rng))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the shapes GPT to fine-tune")
    parser.add_argument("--out", required=True, help="where the fine-tuned checkpoint goes")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--splice", type=float, default=0.5, help="share of rows that are spliced completions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 <= args.splice <= 1:
        parser.error(f"--splice is a share of rows in [0, 1], got {args.splice}")
    torch.manual_seed(args.seed)
    gpt, record = load_gpt(args.ckpt)
    vqgan = load_record_vqgan(record, args.ckpt).eval()
    tokenizer = record.tokenizer_model()
    layout, grid = gpt.layout, record.grid[0]
    size = grid * vqgan.cfg.downsample
    cond_drop = record.training.cond_drop or 0.0
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=args.lr, weight_decay=0.0)
    gpt.train()
    rng = np.random.default_rng([args.seed, 8])
    start = time.perf_counter()
    for step in range(args.steps):
        indices = range(step * args.batch_size, (step + 1) * args.batch_size)
        examples = [spliced_example(i, args.seed, size, grid) for i in indices]
        spliced = torch.as_tensor(rng.random(len(examples)) < args.splice)
        with torch.no_grad():
            pixels = torch.as_tensor(np.stack([e[0] for e in examples] + [e[2] for e in examples]))
            codes = vqgan.encode(pixels.permute(0, 3, 1, 2).float() / 127.5 - 1)
        old, new = codes[:len(examples)], codes[len(examples):]
        masks = torch.zeros_like(old, dtype=torch.bool)
        for mask, (_, _, _, (x0, y0, x1, y1), _) in zip(masks, examples):
            mask[y0:y1, x0:x1] = True
        # a spliced row: the new object's caption, the new codes in the region; a plain row: the original as trained
        captions = [e[4] if s else e[1] for e, s in zip(examples, spliced)]
        targets = torch.where(masks & spliced[:, None, None], new, old).flatten(1)
        text = tokenizer(captions)
        null = torch.rand(len(examples), 1) < cond_drop
        text = torch.where(null, layout.null_text(text), text)
        sequence = layout.text_to_image(text, targets)
        logits = gpt(sequence[:, :-1], last=record.gpt.image_len, head_rows=layout.n_image_codes)
        loss = F.cross_entropy(logits.float().transpose(1, 2), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    origin = (f"fine-tuned for completion from {args.ckpt} by experiments/completion_finetune.py (steps {args.steps}, "
              f"batch {args.batch_size}, lr {args.lr}, splice {args.splice}, seed {args.seed})")
    save_gpt(args.out, gpt.eval(), replace(record, training=replace(record.training, origin=origin)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
