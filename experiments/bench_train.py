"""GPT training throughput: code shards (fast path) vs image shards encoded on the fly by a frozen
VQGAN (slow path, EasyNLP's way), through the real config, DataModule, GPTStage and Trainer.

    python experiments/bench_train.py                   # shapes and base sizes, fp32 CPU (~10 min)
    python experiments/bench_train.py --sizes shapes    # only the shapes size (~1 min)

shapes: model=shapes on data/shapes (32 px) vs data/shapes_codes with the quickstart VQGAN
        (make quickstart first; or pass --shapes-vqgan CKPT).
base:   model=base (12/12/768, text_len 32) on 256 px shapes images with a randomly initialised
        f16_16384 VQGAN (16x16 codes; speed does not depend on the weights), built in a temp folder.
Tokens/s counts every input position of every sequence (2 + text_len + image_len - 1 per sample),
timed over the steps after the first (warm-up) ones, data loading included.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i import pretokenize
from t2i.data.convert import run as convert
from t2i.data.datamodule import ShardDataModule
from t2i.models.vqgan import VQModel
from t2i.pretokenize import load_vqgan_config
from t2i.stages.gpt_stage import GPTStage

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of the training steps after the first `warmup` (each includes fetching its batch)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.tokens = warmup, None, None, 0

    def on_train_batch_end(self, trainer, stage, outputs, batch, batch_idx):
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.end = time.perf_counter()
            self.tokens += len(batch["text"]) * (stage.gpt.cfg.block_size - 1)


def tokens_per_second(overrides: list[str], steps: int, warmup: int, device: str) -> tuple[float, float]:
    """(tokens/s, s/step) of `train.py stage=gpt <overrides>` for `steps` timed steps."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["stage=gpt", "stage.sample_every_n_steps=0", "data.num_workers=1", *overrides])
    datamodule = ShardDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    stage = GPTStage.from_config(cfg, datamodule)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator=device, devices=1, max_steps=warmup + steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(stage, datamodule=datamodule)
    elapsed = timer.end - timer.start
    return timer.tokens / elapsed, elapsed / steps


def base_data(folder: Path, tokenizer: Path, samples: int) -> tuple[Path, Path, Path]:
    """256 px image shards, a random f16_16384 VQGAN checkpoint, and the code shards it makes."""
    images = folder / "shapes256"
    convert(["shapes", "--out", str(images), "--train", str(samples), "--val", "0", "--test", "0", "--size", "256",
             "--quiet"])
    shutil.copy(tokenizer, images / "tokenizer.model")
    cfg = load_vqgan_config("f16_16384")
    torch.manual_seed(0)
    ckpt = folder / "vqgan_f16_random.ckpt"
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in VQModel(cfg).state_dict().items()},
                "t2i": {"vqgan": asdict(cfg)}}, ckpt)
    codes = folder / "shapes256_codes"
    pretokenize.run(["--data", str(images), "--out", str(codes), "--vqgan", str(ckpt), "--batch-size", "8", "--quiet"])
    return images, codes, ckpt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["shapes", "base"], choices=["shapes", "base"])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--shapes-vqgan", type=Path, default=REPO / "logs/quickstart/vqgan/checkpoints/last.ckpt")
    parser.add_argument("--steps", type=int, default=20, help="timed steps at the shapes size (base: a quarter)")
    parser.add_argument("--base-batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")

    rows = []
    if "shapes" in args.sizes:
        for path in (args.data_dir / "shapes", args.data_dir / "shapes_codes", args.shapes_vqgan):
            if not path.exists():
                raise SystemExit(f"{path} is missing: run `make quickstart` first (or pass --data-dir/--shapes-vqgan)")
        common = ["model=shapes", f"paths.data_dir={args.data_dir}", "data.batch_size=64"]
        model = OmegaConf.load(REPO / "conf" / "model" / "shapes.yaml")
        label = f"shapes ({model.n_layer}/{model.n_head}/{model.n_embd}), batch 64"
        rows.append((label, "code shards",
                     *tokens_per_second([*common, "data=shapes_codes"], args.steps, 3, args.device)))
        rows.append((label, "image shards + VQGAN",
                     *tokens_per_second([*common, "data=shapes", f"vqgan_ckpt={args.shapes_vqgan}"],
                                        args.steps, 3, args.device)))
    if "base" in args.sizes:
        steps = max(2, args.steps // 4)
        with tempfile.TemporaryDirectory() as tmp:
            images, codes, ckpt = base_data(Path(tmp), args.data_dir / "shapes" / "tokenizer.model",
                                            samples=args.base_batch * (steps + 2) * 2)
            common = ["model=base", "data=shapes", "data.image_size=256", "data.text_len=32",
                      f"data.batch_size={args.base_batch}"]
            label = f"base (12/12/768), batch {args.base_batch}"
            rows.append((label, "code shards",
                         *tokens_per_second([*common, f"data.root={codes}"], steps, 1, args.device)))
            rows.append((label, "image shards + VQGAN f16",
                         *tokens_per_second([*common, f"data.root={images}", f"vqgan_ckpt={ckpt}"],
                                            steps, 1, args.device)))

    print(f"\nGPT training throughput, fp32, {args.device}, {torch.get_num_threads()} threads\n")
    print(f"| {'size':<28} | {'data':<24} | {'tokens/s':>9} | {'s/step':>7} | {'vs code shards':>14} |")
    print(f"|{'-' * 30}|{'-' * 26}|{'-' * 11}|{'-' * 9}|{'-' * 16}|")
    fast = {}
    for size, data, rate, per_step in rows:
        fast.setdefault(size, rate)
        print(f"| {size:<28} | {data:<24} | {rate:>9.0f} | {per_step:>7.2f} | {rate / fast[size]:>13.2f}x |")


if __name__ == "__main__":
    main()
