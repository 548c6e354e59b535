"""The cost and a correctness check of the Chinese-CLIP metrics (t2i/eval/clip.py) on shapes test images.

    python experiments/bench_clip.py --data data/shapes [--image-size 32] [--clip-model PATH] [--images 256] [--out DIR]

Without --clip-model it saves a randomly initialised Chinese-CLIP of the size of
OFA-Sys/chinese-clip-vit-base-patch16 (ViT-B/16 at 224: width 768, 12 layers, 12 heads; a 12-layer
768-wide BERT text tower over a 21,128-token vocabulary; 512-d projections) into --out: the timings
are then those of the real model, the scores are not quality (a folder already there is reused). Images
are read at --image-size (the shapes config's 32, what the GPT generates). It prints:
- seconds per image of the CLIP image pass (the processor's resize to 224 + the ViT) and per caption
  of the text pass, at the batch size eval.py uses (eval.clip_batch_size, 64);
- the largest difference between t2i's per-image CLIP scores and torchmetrics' CLIPScore on the same
  model, images and captions (the same convention, computed by torchmetrics itself);
- R-precision of the real images against their captions with 99 distractors: with random weights it
  should sit near chance (1%), a check that the true caption is not favoured by construction.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score

from t2i.data.datamodule import ShardDataModule
from t2i.eval.clip import (ChineseClip, ClipMetrics, ClipTally, TensorFeatures, draw_distractors,
                          save_random_chinese_clip)
from t2i.eval.text_to_image import prompt_loader, select_prompts

VOCAB = 21128  # BERT-Chinese, the text tower's vocabulary in OFA-Sys's checkpoints


def random_vit_b16(folder: Path, captions: list[str]) -> str:
    """A random Chinese-CLIP of ViT-B/16's size whose vocabulary covers the captions (filled with CJK)."""
    chars = list(dict.fromkeys(c for caption in captions for c in caption))
    filler = (chr(code) for code in range(0x4E00, 0x9FFF))
    vocab = chars + [c for c in filler if c not in set(chars)][: VOCAB - 5 - len(chars)]
    if (folder / "config.json").is_file():
        return str(folder)
    return save_random_chinese_clip(folder, vocab, image_size=224, patch_size=16, width=768, layers=12, heads=12,
                                    projection_dim=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/shapes", help="image shards (a converted dataset)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--clip-model", help="a Chinese-CLIP folder or Hub id (default: a random ViT-B/16-size one)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--check-pairs", type=int, default=16, help="pairs compared with torchmetrics")
    parser.add_argument("--out", default="/tmp/bench_clip", help="where the random model is saved")
    args = parser.parse_args()

    dm = ShardDataModule({"name": "bench", "root": args.data, "num_workers": 0, "image_size": args.image_size})
    prompts = select_prompts(dm, args.split, args.images)
    source = args.clip_model or random_vit_b16(Path(args.out) / "chinese-clip-vit-b16-random",
                                               [text for rows in prompts.captions_by_image.values() for text in rows])
    clip = ChineseClip.load(source, batch_size=args.batch_size)
    images, keys = [], []
    for batch in prompt_loader(dm, prompts, args.batch_size):
        images.append(batch["image"])
        keys += list(batch["key"])
    images = torch.cat(images)
    captions = {pick.key: pick.caption for pick in prompts.picks}

    clip.image_embeddings(images[:2])  # warm-up
    start = time.perf_counter()
    clip.image_embeddings(images)
    image_s = (time.perf_counter() - start) / len(images)
    texts = [captions[key] for key in keys]
    start = time.perf_counter()
    clip.text_embeddings(texts)
    text_s = (time.perf_counter() - start) / len(set(texts))

    ours = ClipMetrics(clip, captions, {key: [] for key in keys})
    pairs = min(args.check_pairs, len(keys))
    adapter = TensorFeatures(clip.model)
    differences = []
    for image, key in zip(images[:pairs], keys[:pairs]):
        mine = float(100 * (clip.image_embeddings(image[None]) * clip.text_embeddings([captions[key]])).sum())
        theirs = float(torchmetrics_clip_score(image, captions[key], lambda: (adapter, clip.processor)).detach())
        differences.append(abs(max(mine, 0.0) - theirs))

    distractors = draw_distractors(prompts.captions_by_image, {p.key: (p.image, p.caption) for p in prompts.picks}, 99)
    ours = ClipMetrics(clip, captions, distractors)
    tally = ClipTally()
    tally.add(ours(images, keys))
    metrics = ClipTally.metrics([tally.state()])

    print(f"| model | {source} ({'random weights' if not args.clip_model else 'given'}) |")
    print("|---|---|")
    print(f"| threads | {torch.get_num_threads()} |")
    print(f"| image pass | {image_s:.4f} s/image ({len(images)} images of {list(images.shape[1:])}, batch "
          f"{args.batch_size}) |")
    print(f"| text pass | {text_s:.4f} s/caption ({len(set(texts))} captions) |")
    print(f"| vs torchmetrics CLIPScore | max abs difference {max(differences):.2e} over {pairs} pairs |")
    print(f"| real images, 99 distractors | CLIP score {metrics['clip_score']:.2f}, R-precision "
          f"{metrics['r_precision']:.3f} (chance 0.010) |")


if __name__ == "__main__":
    main()
