"""Where the shapes benchmark loses shape accuracy: the oracle's readings by true size and shape (issue 26, 4).

    python experiments/shape_errors.py --data DATA/shapes --vqgan VQGAN.ckpt [--gpt GPT.ckpt] [--images 1000]

--vqgan: the val split's images (the first --images) reconstructed, as eval.py task=reconstruct scores them
(its oracle_on_reconstructions), and also decoded from the unquantised latents (no codebook): if those lose a
shape too, the autoencoder loses it, not the codebook. --gpt: eval.py's 200 test prompts, one image each with
the checkpoint's own sampling (eval.py's plain set). One row per true size and shape: images, shape read right,
and what the wrong ones were read as.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
import torch.nn.functional as F

from rerank_shapes import oracle_reads, prompts_and_seeds
from t2i.checkpoints import load_vqgan
from t2i.data import shapes
from t2i.data.datamodule import ShardDataModule
from t2i.sampling import T2IPipeline, resolve_sampling
from t2i.sampling.pipeline import decode_to_uint8, pixels_to_uint8


def table(title: str, reads: list[dict], truths: list[dict]) -> None:
    images, wrong = Counter(), {}
    for read, truth in zip(reads, truths):
        kind = (truth["size"], truth["shape"])
        images[kind] += 1
        if read["shape"] != truth["shape"]:
            wrong.setdefault(kind, Counter())[read["shape"]] += 1
    right = sum(images.values()) - sum(sum(c.values()) for c in wrong.values())
    print(f"\n{title}: shape right in {100 * right / len(truths):.1f}% of {len(truths)}\n")
    print("| size | shape | images | shape right | wrong ones read as |")
    print("|---|---|---|---|---|")
    for kind in sorted(images):
        errors = wrong.get(kind, Counter())
        read_as = ", ".join(f"{name} {count}" for name, count in errors.most_common()) or "-"
        share = 100 * (1 - sum(errors.values()) / images[kind])
        print(f"| {kind[0]} | {kind[1]} | {images[kind]} | {share:.1f}% | {read_as} |")


@torch.no_grad()
def reconstructions(vqgan_ckpt: str, data: str, count: int) -> None:
    model = load_vqgan(vqgan_ckpt).eval()
    dm = ShardDataModule({"name": "shapes", "root": data, "image_size": model.cfg.resolution, "batch_size": 100,
                          "num_workers": 0})
    quantised, continuous, truths = [], [], []
    for batch in dm.loader("val"):
        x = dm.on_after_batch_transfer(batch)["image"]  # in [-1, 1]
        z = model.latents(x)
        unquantised = F.normalize(z, dim=1) if model.cfg.l2_normalize else z
        codes = model.quantize.nearest(unquantised.permute(0, 2, 3, 1))  # VQModel.encode's codes
        quantised += oracle_reads(decode_to_uint8(model, codes))  # as task=reconstruct decodes them
        continuous += oracle_reads(pixels_to_uint8(model.decoder(model.post_quant_conv(unquantised))))
        truths += [meta["attributes"] for meta in batch["meta"]]
        if len(truths) >= count:
            break
    table(f"VQGAN reconstructions of val images ({vqgan_ckpt})", quantised[:count], truths[:count])
    table("the same, decoded from the unquantised latents", continuous[:count], truths[:count])


def samples(gpt_ckpt: str, data: str, prompts: int) -> None:
    pipeline = T2IPipeline.from_checkpoint(gpt_ckpt)
    sampling = resolve_sampling({"seed": 0, "samples_per_prompt": 1}, pipeline.record.sampling)
    captions, seeds = prompts_and_seeds(data, "test", prompts, 0)
    images = pipeline.decode(pipeline.sample_codes(captions, sampling, 64, seeds=seeds), 64)
    table(f"GPT samples for test prompts ({gpt_ckpt}; temperature {sampling.temperature}, guidance "
          f"{sampling.guidance_scale})", oracle_reads(images), [shapes.read_caption(c) for c in captions])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="the shapes image shards (make quickstart's DATA/shapes)")
    parser.add_argument("--vqgan", help="a shapes VQGAN checkpoint: its reconstructions of the val split")
    parser.add_argument("--gpt", help="a shapes GPT checkpoint: its samples for eval.py's test prompts")
    parser.add_argument("--images", type=int, default=1000, help="val images to reconstruct")
    parser.add_argument("--prompts", type=int, default=200, help="test prompts to sample (eval.num_prompts)")
    args = parser.parse_args(argv)
    if not (args.vqgan or args.gpt):
        parser.error("give --vqgan, --gpt or both")
    if args.vqgan:
        reconstructions(args.vqgan, args.data, args.images)
    if args.gpt:
        samples(args.gpt, args.data, args.prompts)


if __name__ == "__main__":
    main()
