"""Where speculative Jacobi decoding's drafts are rejected (issue 27, section 1): per image cell, window offset,
draft kind and image row, on a trained GPT at its own sampling options.

    python experiments/sjd_rejections.py --ckpt logs/quickstart/gpt/checkpoints/last.ckpt --data data/shapes \
        [--prompts 50] [--window 16] [--seed 0] [--step static]

The first --prompts captions of the data's test split, batch 1, one sample each, sampling seed --seed + i for
the i-th caption, sampling.method=sjd with a window of --window drafts. At batch 1 the sampler's progress
(t2i.sampling.Progress) after each window is the number of codes committed, so consecutive reports give
each call's window (from the codes committed before it) and the drafts it accepted. A draft is tested when
its call's window reaches it and no earlier draft of the call was rejected; the tested drafts are the
accepted ones and the first rejected one. Each image's last call is left out when its window ends at the
image's end, where a rejection at the last position and a full acceptance look alike.

A draft is "refined" when the call before computed it (a window's output), "new" when it entered the window
as a uniformly random code. A grid cell is background when over half its decoded pixels lie within 40 (in
every channel) of the image's most frequent colour.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter

import torch

from t2i.data.datamodule import DataConfig
from t2i.sampling import SamplingConfig, SamplingStats, T2IPipeline, decode_to_uint8, generate_codes

BACKGROUND_DISTANCE = 40  # how far (per channel, of 255) a background pixel may be from the most frequent colour


def background_cells(image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """uint8 image [3, H, W] -> bool [h * w]: each code cell (row-major) whose pixels are mostly background."""
    h, w = grid
    pixels = image.int()
    colours, counts = pixels.flatten(1).T.unique(dim=0, return_counts=True)
    background = colours[counts.argmax()][:, None, None]
    near = ((pixels - background).abs().amax(0) <= BACKGROUND_DISTANCE).float()  # [H, W]
    cell_h, cell_w = pixels.shape[1] // h, pixels.shape[2] // w
    return near.view(h, cell_h, w, cell_w).mean((1, 3)).flatten() > 0.5


def tested_drafts(done: list[int], image_len: int, window: int):
    """Codes committed before each window call, and at the end -> (position, offset, accepted, refined) for every
    draft the calls tested."""
    refined_upto = -1  # offsets up to this one were computed by the call before; the rest are new, random
    for before, after in itertools.pairwise(done):
        count = min(window, image_len - before)  # the drafts this call's window holds
        accepted = after - before - 1  # the call commits its accepted drafts and one code more
        if after == image_len and before + count == image_len:
            continue  # the image's last window: a rejection at its last draft looks like a full acceptance
        for offset in range(min(accepted + 1, count)):
            yield before + offset, offset, offset < accepted, offset <= refined_upto
        refined_upto = count - accepted - 1  # the untested rest of the window, the next call's first drafts


def draft_groups(position: int, offset: int, refined: bool, is_background: torch.Tensor, width: int) -> list[str]:
    """The table rows a tested draft counts in, one per grouping, always in the same order."""
    where = "background" if is_background[position] else "object"
    kind = "refined" if refined else "new"
    return [f"{where} cells", f"{kind} drafts", f"{where} cells, {kind} drafts",
            f"offset {offset}" if offset < 4 else "offsets 4 and on", f"image row {position // width}"]


def table_order(group: tuple[int, str]) -> tuple:
    """(grouping, label) keys in print order: by grouping, then "row 2" before "row 10"."""
    grouping, label = group
    return grouping, len(label), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="a trained GPT checkpoint (its VQGAN decodes the images)")
    parser.add_argument("--data", required=True, help="the image shards whose test captions are the prompts")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--window", type=int, default=16, help="sampling.sjd_window")
    parser.add_argument("--seed", type=int, default=0, help="the first caption's sampling seed (+1 for each next)")
    parser.add_argument("--step", default="static", choices=["eager", "static", "compiled", "frozen"],
                        help="sampling.step of the windows (the codes are the same in every mode)")
    args = parser.parse_args()

    prompts = list(itertools.islice(DataConfig(root=args.data).captions("test"), args.prompts))
    if len(prompts) < args.prompts:
        raise ValueError(f"{args.data}'s test split has {len(prompts)} captions, fewer than --prompts {args.prompts}")
    pipeline = T2IPipeline.from_checkpoint(args.ckpt, step=args.step)
    model, record = pipeline.sampler, pipeline.record
    cfg = SamplingConfig(**{**record.sampling, "samples_per_prompt": 1, "seed": args.seed, "method": "sjd",
                            "sjd_window": args.window})
    tokenizer = record.tokenizer_model()
    image_len, (h, w) = model.cfg.image_len, record.grid

    stats = SamplingStats()
    tested, accepted = Counter(), Counter()
    for i, prompt in enumerate(prompts):
        reports = []
        progress = lambda done, _: reports.append(done)  # noqa: E731  (codes committed after each model call)
        codes = generate_codes(model, tokenizer([prompt]), cfg, seeds=[args.seed + i], stats=stats,
                               step=args.step, progress=progress)
        # every window commits a code or more; a 0 is the text prefix's call, before the first window
        done = [0] + [d for d in reports if d > 0]
        is_background = background_cells(decode_to_uint8(pipeline.vqgan, codes.view(1, h, w))[0], (h, w))
        for position, offset, ok, refined in tested_drafts(done, image_len, args.window):
            for group in enumerate(draft_groups(position, offset, refined, is_background, w)):
                tested[group] += 1
                accepted[group] += ok

    print(f"{args.prompts} test captions, batch 1, window {args.window}, "
          f"seeds {args.seed}..{args.seed + args.prompts - 1}; "
          f"temperature {cfg.temperature}, top-k {cfg.top_k}, guidance {cfg.guidance_scale}; "
          f"{stats.model_calls} model calls for {stats.token_by_token_calls} positions ({stats.speedup:.2f}x)")
    print("| drafts | tested | accepted | acceptance |\n|---|---|---|---|")
    for group in sorted(tested, key=table_order):
        print(f"| {group[1]} | {tested[group]:,} | {accepted[group]:,} | {accepted[group] / tested[group]:.1%} |")


if __name__ == "__main__":
    main()
