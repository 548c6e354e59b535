"""VQGAN throughput, and (with --train) the shapes VQGAN target run.

    python experiments/bench_vqgan.py            # encode/decode images/s, fp32 CPU, batch 16 (~5 min)
    python experiments/bench_vqgan.py --train    # instead: train.py experiment=vqgan_shapes, timed,
                                                 # then eval.py task=reconstruct on the val split
    python experiments/bench_vqgan.py --compile  # instead: the shapes recipe's training step (autoencoder
                                                 # forward, loss, backward, Adam), eager vs stage.compile

Throughput uses random weights (speed does not depend on them): the f16_16384 architecture at
256x256 and the shapes VQGAN at 64x64. The target run needs the shapes dataset in
data/shapes (make quickstart, or python -m t2i.data.convert shapes --out data/shapes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from t2i.models.vqgan import VQModel
from t2i.pretokenize import load_vqgan_config

REPO = Path(__file__).resolve().parents[1]


def images_per_second(fn, batch: torch.Tensor, repeats: int) -> float:
    fn(batch[:2])  # warm-up (one-time allocations), cheap even for the 256x256 model
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return len(batch) / best


def throughput(batch_size: int, repeats: int) -> None:
    print(f"\nVQGAN throughput, fp32, {torch.get_num_threads()} threads, batch {batch_size}, best of {repeats}\n")
    print(f"| {'config':<12} | {'input':>9} | {'codes':>7} | {'params':>7} | {'encode img/s':>12} | {'decode img/s':>12} |")
    print(f"|{'-' * 14}|{'-' * 11}|{'-' * 9}|{'-' * 9}|{'-' * 14}|{'-' * 14}|")
    for name in ("f16_16384", "shapes"):
        cfg = load_vqgan_config(name)
        model = VQModel(cfg).eval()
        images = torch.rand(batch_size, 3, cfg.resolution, cfg.resolution) * 2 - 1
        codes = model.encode(images)
        encode = images_per_second(model.encode, images, repeats)
        decode = images_per_second(model.decode, codes, repeats)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"| {name:<12} | {cfg.resolution:>4}x{cfg.resolution:<4} | {cfg.grid:>3}x{cfg.grid:<3} | {params:>6.1f}M "
              f"| {encode:>12.1f} | {decode:>12.1f} |")


def training_steps(steps: int) -> None:
    """Seconds per training step of the shapes VQGAN recipe (experiment=vqgan_shapes, its batch of 32),
    eager and with stage.compile: the stage's own autoencoder pass and generator loss, on random images."""
    from hydra import compose, initialize_config_dir
    from t2i.stages.vqgan_stage import VQGANStage

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=vqgan_shapes"])
    images = torch.rand(cfg.data.batch_size, 3, cfg.vqgan.resolution, cfg.vqgan.resolution) * 2 - 1
    print(f"\nshapes VQGAN training step, fp32, {torch.get_num_threads()} threads, batch {len(images)}, "
          f"{steps} steps after 5 warm-up steps\n")
    print("| stage.compile | s/step | speed-up |")
    print("|---|---|---|")
    eager = None
    for compiled in (False, True):
        cfg.stage.compile = compiled
        torch.manual_seed(0)
        stage = VQGANStage.from_config(cfg)
        stage.configure_model()
        optimizer = stage.optimizer(stage.vqgan.parameters())

        def step():
            _, x_hat, codebook_loss, _ = stage.autoencode(images)
            loss, _ = stage.loss.generator_loss(images, x_hat, codebook_loss, 0, stage.vqgan.decoder.last_layer)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(5):  # compilation, allocations
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - start) / steps
        eager = eager or seconds
        print(f"| {str(compiled).lower()} | {seconds:.3f} | {eager / seconds:.2f}x |")


def target_run(run_dir: Path, overrides: list[str]) -> None:
    """Train the shapes VQGAN as the recipe says, then score its last checkpoint on the whole val split."""
    train = [sys.executable, "train.py", "experiment=vqgan_shapes", f"hydra.run.dir={run_dir}",
             "trainer.enable_progress_bar=false", *overrides]
    print("\n$", " ".join(train[1:]))
    start = time.perf_counter()
    subprocess.run(train, cwd=REPO, check=True)
    minutes = (time.perf_counter() - start) / 60
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    evaluate = [sys.executable, "eval.py", "task=reconstruct", f"ckpt={ckpt}", "data=shapes", "split=val",
                f"hydra.run.dir={run_dir / 'eval'}"]
    print("$", " ".join(evaluate[1:]))
    subprocess.run(evaluate, cwd=REPO, check=True)
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    oracle = results["oracle_on_reconstructions"]
    print("\n| command | train minutes (wall) | val PSNR | val SSIM | codes used | perplexity | oracle colour/shape/position/all |")
    print("|---|---|---|---|---|---|---|")
    print(f"| `train.py experiment=vqgan_shapes` | {minutes:.1f} | {results['psnr']:.2f} dB | {results['ssim']:.3f} "
          f"| {results['codebook_used']:.1%} of {results['codebook_size']} | {results['codebook_perplexity']:.0f} "
          f"| {oracle['color']:.1%} / {oracle['shape']:.1%} / {oracle['position']:.1%} / {oracle['all']:.1%} |")
    met = results["psnr"] >= 30 and results["codebook_used"] >= 0.5 and minutes <= 10
    print(f"\ntarget (PSNR >= 30 dB, >= 50% codes used, <= 10 min): {'met' if met else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train", action="store_true", help="run the shapes target training (~10 min) instead")
    parser.add_argument("--compile", action="store_true", help="time the shapes training step, eager vs compiled")
    parser.add_argument("--steps", type=int, default=100, help="timed training steps (--compile)")
    parser.add_argument("--run-dir", type=Path, default=REPO / "logs" / "bench_vqgan")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides for the target run")
    args = parser.parse_args()
    if args.train:
        target_run(args.run_dir, args.overrides)
    elif args.compile:
        training_steps(args.steps)
    else:
        throughput(args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
