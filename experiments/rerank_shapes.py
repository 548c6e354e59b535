"""Why self-reranking helps or not, read by the shapes oracle (issue 26, section 1).

    python experiments/rerank_shapes.py --ckpt GPT.ckpt --data DATA/shapes [--caption-ckpt CAPTIONER.ckpt] \
        [--prompts 200] [--candidates 4] [--temperatures 0.3 0.7 1.0] [--seed 0]

eval.py's prompts and seeds (`select_prompts`: one caption of each of the split's first --prompts images; each
prompt's candidates one run of its seed stream, candidate 0 being the plain image): K candidates per prompt at
each temperature (the checkpoint's other sampling options), every candidate read by the oracle against the
prompt's attributes (read back from the caption's words, which `read_caption` does exactly for the data's own
captions) and scored by Caption Loss (the model's own captioning direction, or --caption-ckpt's).

Per temperature (all = colour, shape and position right, in %):
- plain: candidate 0 (eval.py's plain set); mean: all candidates; reranked: the lowest Caption Loss of the K
  (eval.py's rerank_K set); best possible: some candidate right (what any reranker could reach);
- mixed: the prompts whose candidates are not all right nor all wrong (the only ones a reranker can change);
  picked right: among those, how often Caption Loss keeps a right one, against chance (the share of right
  candidates among them): the scorer's skill, apart from how alike the candidates are;
- agree: how often the scorer's own greedy caption of a candidate names the colour, shape and position the oracle
  reads in it (does the captioner see in generated images what the oracle sees?).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from t2i.data import shapes
from t2i.data.datamodule import ShardDataModule
from t2i.eval.text_to_image import select_prompts
from t2i.sampling import T2IPipeline, resolve_sampling
from t2i.sampling.captions import generate_text
from t2i.sampling.options import CaptionConfig
from t2i.scorers import CaptionScorer

def prompts_and_seeds(data: str, split: str, count: int, seed: int) -> tuple[list[str], list[int]]:
    """eval.py's prompts of the split (one caption of each of its first `count` images) and their seeds."""
    dm = ShardDataModule({"name": "shapes", "root": data, "batch_size": 100, "num_workers": 0,
                          "shuffle_buffer": 0, "seed": 0})
    chosen = select_prompts(dm, split, count)
    seeds = chosen.seeds(seed)
    return [pick.caption for pick in chosen.picks], [seeds[pick.key] for pick in chosen.picks]


def same(a: dict, b: dict) -> bool:
    """Colour, shape and position alike: the evaluation's "all" (shapes.attribute_accuracy)."""
    return shapes.attribute_accuracy([a], [b])["all"] == 1.0


def oracle_reads(images: torch.Tensor) -> list[dict]:
    return [shapes.read_attributes(image.permute(1, 2, 0).numpy()) for image in images]


def captioner_reads(scorer: CaptionScorer, codes: torch.Tensor, batch_size: int) -> list[dict]:
    """The attributes the scorer's own greedy captions of the codes name."""
    ids = torch.cat([generate_text(scorer.gpt, chunk, CaptionConfig()) for chunk in codes.split(batch_size)])
    return [shapes.read_caption(scorer.tokenizer.decode(row)) for row in ids]


def analyse(hits: np.ndarray, losses: np.ndarray) -> dict:
    """The table's columns from the oracle's hits [prompts, k] and the Caption Losses [prompts, k]."""
    chosen = hits[np.arange(len(hits)), np.nanargmin(losses, 1)]
    mixed = hits.any(1) & ~hits.all(1)
    return {"plain": 100 * hits[:, 0].mean(), "mean": 100 * hits.mean(), "reranked": 100 * chosen.mean(),
            "best possible": 100 * hits.any(1).mean(), "mixed": 100 * mixed.mean(),
            "picked right": 100 * chosen[mixed].mean() if mixed.any() else float("nan"),
            "chance": 100 * hits[mixed].mean() if mixed.any() else float("nan")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the shapes GPT (e.g. logs/quickstart/gpt/checkpoints/last.ckpt)")
    parser.add_argument("--data", required=True, help="the shapes image shards (make quickstart's DATA/shapes)")
    parser.add_argument("--caption-ckpt", help="a captioning GPT over the same VQGAN (default: the model itself)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", help="default: the checkpoint's")
    parser.add_argument("--seed", type=int, default=0, help="the sampling seed (eval.py's sampling.seed)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.candidates < 2:
        parser.error("--candidates must be >= 2: reranking chooses among candidates")
    pipeline = T2IPipeline.from_checkpoint(args.ckpt)
    scorer, source = CaptionScorer.for_pipeline(pipeline, args.caption_ckpt)
    if scorer is None:
        parser.error(f"no Caption Loss: {source}")
    base = resolve_sampling({"seed": args.seed, "samples_per_prompt": args.candidates}, pipeline.record.sampling)
    prompts, seeds = prompts_and_seeds(args.data, args.split, args.prompts, args.seed)
    wanted = [shapes.read_caption(prompt) for prompt in prompts]
    k = args.candidates
    rows = []
    for temperature in args.temperatures or [base.temperature]:
        start = time.perf_counter()
        sampling = replace(base, temperature=temperature)
        codes = pipeline.sample_codes(prompts, sampling, args.batch_size, seeds=seeds)  # prompt i's at i * k + c
        reads = oracle_reads(pipeline.decode(codes, args.batch_size))
        hits = np.array([same(read, want) for read, want in zip(reads, np.repeat(wanted, k))]).reshape(-1, k)
        losses = scorer([p for p in prompts for _ in range(k)], codes, args.batch_size).cpu().numpy().reshape(-1, k)
        agree = np.mean([same(a, b) for a, b in zip(reads, captioner_reads(scorer, codes, args.batch_size))])
        rows.append({"temperature": temperature, **analyse(hits, losses), "agree": 100 * agree,
                     "s": time.perf_counter() - start})
        print(f"temperature {temperature}: done", flush=True)
    print(f"\n{len(prompts)} {args.split} prompts x {k} candidates; top-k {base.top_k}, guidance {base.guidance_scale}, "
          f"seed {base.seed}; Caption Loss by {source}\n")
    names = ("plain", "mean", "reranked", "best possible", "mixed", "picked right", "chance", "agree")
    print("| temperature | " + " | ".join(names) + " | s |")
    print("|---" * (len(names) + 2) + "|")
    for row in rows:
        print(f"| {row['temperature']} | " + " | ".join(f"{row[name]:.1f}" for name in names) + f" | {row['s']:.0f} |")


if __name__ == "__main__":
    main()
