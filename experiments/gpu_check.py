"""One short check of the GPU paths, printing one table (run it through experiments/gpu_check.sh).

    bash experiments/gpu_check.sh [WHEELS]         # one GPU, at most ~8 minutes; WHEELS: see the .sh
    python experiments/gpu_check.py --quick        # tiny sizes on the CPU: the script itself works

Rows:
  * GPT base (12/12/768) training steps in bf16, eager and with stage.compile: tokens/s and MFU from the
    stage's own TrainingThroughput callback (fused AdamW: stage.fused_optimizer=auto); large (24/16/1024)
    with activation checkpointing, and its peak memory beside the same steps without.
  * a VQGAN f16_16384 training step in bf16-mixed and in 16-mixed (finite losses, LPIPS off: no VGG
    weights offline), and its codes: encode() under bf16 autocast and TF32 matmuls vs plain fp32.
  * sampling: experiments/bench_generate.py's step-mode table (eager vs compiled = a CUDA graph, bf16,
    guidance 3) at batch 1, 64 and 256, with the VQGAN decode and the memory floor.
  * eval.py with FID on 64 shapes test prompts on the GPU and on the CPU, from a small GPT trained here
    on shapes codes of a random VQGAN; the Inception weights are random too unless --inception-weights
    names torch-fidelity's file (no download offline): a GPU-vs-CPU agreement check, not a quality figure.
Each check runs on its own: one that fails prints its error in its row and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import bench_generate  # noqa: E402
from t2i.callbacks import TrainingThroughput  # noqa: E402
from t2i.models.gpt import GPTConfig  # noqa: E402
from t2i.models.losses import VQGANLossConfig  # noqa: E402
from t2i.models.vqgan import VQModel  # noqa: E402
from t2i.pretokenize import load_vqgan_config  # noqa: E402
from t2i.stages.configs import GPTStageConfig, VQGANStageConfig  # noqa: E402
from t2i.stages.gpt_stage import GPTStage  # noqa: E402
from t2i.stages.vqgan_stage import VQGANStage  # noqa: E402

SIZES = {"base": dict(n_layer=12, n_head=12, n_embd=768), "large": dict(n_layer=24, n_head=16, n_embd=1024),
         "quick": dict(n_layer=2, n_head=2, n_embd=64)}
ROWS: list[list[str]] = []


def row(check: str, setting: str, figures: str, verdict: str = "") -> None:
    ROWS.append([check, setting, figures, verdict])
    print(f"[{time.strftime('%H:%M:%S')}] {check} | {setting} | {figures} | {verdict}", flush=True)


def guarded(check: str):
    """Run a check; an exception becomes its row instead of ending the script."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - every failure is reported in the table
                traceback.print_exc()
                row(check, "-", f"FAILED: {type(error).__name__}: {str(error)[:160]}", "FAILED")
            print(f"    ({check}: {time.perf_counter() - started:.0f} s)", flush=True)
        return run
    return wrap


def peak_flops(args) -> float | None:
    return args.peak_tflops * 1e12 if args.peak_tflops else None


def random_batches(cfg: GPTConfig, batch: int, count: int):
    generator = torch.Generator().manual_seed(0)
    return [{"codes": torch.randint(0, cfg.n_image_codes, (cfg.image_len,), generator=generator),
             "text": torch.randint(1, cfg.n_text_tokens, (cfg.text_len,), generator=generator)}
            for _ in range(batch * count)]


def fit_gpt(args, size: str, batch: int, steps: int, **switches) -> dict:
    """A few GPTStage steps through a real Trainer; the stage's throughput callback's last figures."""
    torch.manual_seed(0)
    cfg = GPTConfig(**SIZES[size], text_len=32, image_len=64 if args.quick else 256,
                    n_image_codes=1024 if args.quick else 16384, n_text_tokens=1000 if args.quick else 16000)
    stage = GPTStage(cfg, GPTStageConfig(warmup_steps=1, min_lr_ratio=1.0, **switches),
                     functools.partial(torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.95)))
    window = max(2, steps - 5)  # the first steps (compilation, allocator warm-up) fall outside the window
    trainer = L.Trainer(accelerator=args.device, devices=1, precision=args.precision, max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TrainingThroughput(window, peak_flops(args))])
    loader = DataLoader(random_batches(cfg, batch, steps), batch_size=batch, drop_last=True)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.fit(stage, loader)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics["wall_s"] = time.perf_counter() - started
    metrics["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else float("nan")
    metrics["fused"] = bool(trainer.optimizers[0].defaults.get("fused"))
    return metrics


def describe(metrics: dict) -> str:
    mfu = metrics.get("train/mfu")
    return (f"{metrics.get('train/tokens_per_s', float('nan')):,.0f} tokens/s, MFU "
            + ("n/a (give --peak-tflops)" if mfu is None else f"{100 * mfu:.1f}%")
            + f", loss {metrics['train/loss']:.3f}, peak {metrics['peak_gb']:.1f} GB, fused AdamW {metrics['fused']},"
            f" {metrics['wall_s']:.0f} s wall")


@guarded("GPT training")
def gpt_training(args) -> None:
    batch, steps = (4, 8) if args.quick else (args.gpt_batch, args.gpt_steps)
    size = "quick" if args.quick else "base"
    for compiled in (False, True):
        metrics = fit_gpt(args, size, batch, steps, compile=compiled)
        mfu = metrics.get("train/mfu")
        verdict = "" if mfu is None or not compiled else ("met" if mfu >= 0.40 else "MISSED (goal 40%)")
        row("GPT training", f"{size}, batch {batch}, {args.precision}, compile={compiled}", describe(metrics), verdict)
        if not math.isfinite(metrics["train/loss"]):
            row("GPT training", "loss", "non-finite", "FAILED")


@guarded("GPT large, activation checkpointing")
def gpt_large(args) -> None:
    batch, steps = (4, 6) if args.quick else (args.large_batch, 10)
    size = "quick" if args.quick else "large"
    plain = fit_gpt(args, size, batch, steps)
    recomputed = fit_gpt(args, size, batch, steps, activation_checkpointing=True)
    row("GPT training", f"{size}, batch {batch}, {args.precision}, no checkpointing", describe(plain))
    row("GPT training", f"{size}, batch {batch}, {args.precision}, activation checkpointing", describe(recomputed),
        f"memory x{recomputed['peak_gb'] / plain['peak_gb']:.2f}" if args.device == "cuda" else "")


@guarded("VQGAN f16")
def vqgan_steps(args) -> None:
    cfg = load_vqgan_config("shapes" if args.quick else "f16_16384")
    size = cfg.resolution
    images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for precision in ("bf16-mixed", "16-mixed"):
        torch.manual_seed(0)
        stage = VQGANStage(cfg, VQGANStageConfig(loss=VQGANLossConfig(perceptual_weight=0.0), log_images=0),
                           functools.partial(torch.optim.Adam, lr=4.5e-6, betas=(0.5, 0.9)))
        trainer = L.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=3, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        started = time.perf_counter()
        trainer.fit(stage, DataLoader([{"image": x} for x in images], batch_size=4))
        losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        finite = all(math.isfinite(v) for v in losses.values())
        row("VQGAN training", f"{cfg.resolution}px f{cfg.downsample} {cfg.n_embed} codes, batch 4, {precision}",
            f"loss {losses.get('train/loss', float('nan')):.3f}, {len(losses)} logged values finite: {finite}, "
            f"{time.perf_counter() - started:.0f} s for 3 steps", "met" if finite else "FAILED")
    model = VQModel(cfg).to(args.device).eval()
    model.quantize.embedding.weight.data.normal_()  # codes spread over the codebook, as trained ones are
    x = images.to(args.device)
    exact = model.encode(x)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls, as Lightning advises GPU users
    try:
        dtype = torch.bfloat16
        with torch.autocast(args.device, dtype=dtype):
            under_autocast = model.encode(x)
            z = model.latents(x).float()  # the training forward's latents, in bf16 convolutions
        in_training = model.quantize.nearest(z.permute(0, 2, 3, 1))
    finally:
        torch.set_float32_matmul_precision("highest")
    equal = (under_autocast == exact).float().mean().item()
    row("VQGAN codes", "encode() under bf16 autocast + TF32 vs fp32", f"{100 * equal:.2f}% equal",
        "met" if equal == 1.0 else "FAILED")
    row("VQGAN codes", "bf16 training forward's codes vs fp32 encode",
        f"{100 * (in_training == exact).float().mean().item():.1f}% equal", "(information: bf16 latents)")


@guarded("sampling")
def sampling(args) -> None:
    bench_args = argparse.Namespace(device=args.device, quick=args.quick, top_k=100, repeats=2, bandwidth_gb=1.0,
                                    batches=[1, 4] if args.quick else [1, 64, 256], step_modes=["eager", "compiled"])
    model = bench_generate.build(args.quick, args.device)
    results = bench_generate.steps_table(bench_args, model)
    for (batch, mode), figures in sorted(results["steps"].items()):
        verdict = ""
        if batch == 1 and mode == "compiled" and not args.quick:
            verdict = "met" if figures["ms_per_step"] <= 1.0 else "MISSED (goal 1 ms)"
        row("sampling", f"batch {batch} x2 guidance, {mode}", f"{figures['ms_per_step']:.3f} ms/step, "
            f"{figures['images_per_s']:.1f} images/s codes only", verdict)
    for batch, figures in sorted(results["images"].items()):
        row("sampling", f"batch {batch}, {figures['step']}, with VQGAN decode",
            f"{figures['images_per_s']:.1f} images/s, peak {figures['peak_mb']} MB")
    row("sampling", "memory floor per step (batch 1)", f"{results['floor_ms']:.3f} ms "
        f"({results['weights_mb']:.0f} MB at {results['bandwidth_gbs']:.0f} GB/s)")


def run(command: list[str], folder: Path) -> None:
    result = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {result.stderr[-1500:]}")


@guarded("eval FID GPU vs CPU")
def fid_gpu_vs_cpu(args) -> None:
    from t2i import pretokenize
    from t2i.data.convert import run as convert
    from t2i.data.datamodule import DataConfig
    from t2i.data.tokenizer import train_sentencepiece
    from t2i.eval.fidelity import save_random_inception

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    images = work / "shapes"
    convert(["shapes", "--out", str(images), "--train", "512", "--val", "16", "--test", "64", "--quiet"])
    captions = list(DataConfig(root=str(images)).captions("train"))
    (images / "tokenizer.model").write_bytes(train_sentencepiece(captions, 400))
    cfg = load_vqgan_config("shapes")
    torch.manual_seed(0)
    vqgan = VQModel(cfg)
    vqgan.quantize.embedding.weight.data.normal_()
    vqgan_ckpt = work / "vqgan.ckpt"
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in vqgan.state_dict().items()}, "t2i": {"vqgan": asdict(cfg)}},
               vqgan_ckpt)
    codes = work / "shapes_codes"
    pretokenize.main(["--data", str(images), "--out", str(codes), "--vqgan", str(vqgan_ckpt), "--quiet"])
    steps = 10 if args.quick else 300
    run(["train.py", "stage=gpt", "model=shapes", "data=shapes_codes", f"data.root={codes}", "data.num_workers=2",
         f"trainer.accelerator={args.device}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
         "trainer.enable_progress_bar=false", "stage.sample_every_n_steps=0", "stage.warmup_steps=10",
         f"trainer.precision={args.precision}", f"hydra.run.dir={work / 'gpt'}"], work)
    # random weights unless given: no download offline (what the tests do)
    weights = args.inception_weights or save_random_inception(work / "inception_random.pth")
    results = {}
    for device in ([args.device, "cpu"] if args.device != "cpu" else ["cpu", "cpu"]):
        out = work / f"eval_{device}_{len(results)}"
        run(["eval.py", f"ckpt={work / 'gpt' / 'checkpoints' / 'last.ckpt'}", "data=shapes", f"data.root={images}",
             "split=test", "eval.num_prompts=64", f"eval.inception_weights={weights}", "eval.isc_splits=4",
             f"eval.stats_cache={out / 'stats'}", "eval.save_images=true", f"trainer.accelerator={device}",
             "eval.clip=false",  # no Chinese-CLIP weights on an offline GPU machine
             f"hydra.run.dir={out}"], work)
        results[str(out)] = json.loads((out / "results.json").read_text())
    (gpu_dir, gpu), (cpu_dir, cpu) = results.items()
    same = sum((Path(gpu_dir) / "samples" / p.name).read_bytes() == p.read_bytes()
               for p in (Path(cpu_dir) / "samples").glob("*.png"))
    fid_gpu, fid_cpu = gpu["plain"]["fid"], cpu["plain"]["fid"]
    attributes = gpu["plain"].get("attributes", {}).get("all"), cpu["plain"].get("attributes", {}).get("all")
    row("eval FID", f"64 shapes prompts, {args.device} vs cpu, fp32",
        f"FID {fid_gpu:.3f} vs {fid_cpu:.3f} (diff {abs(fid_gpu - fid_cpu):.3f}); {same}/64 images identical; "
        f"all-attributes {attributes[0]} vs {attributes[1]}",
        "weights: " + ("given" if args.inception_weights else "random Inception (agreement check only)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU try of the script)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak for MFU when Lightning's table lacks it")
    parser.add_argument("--gpt-batch", type=int, default=64)
    parser.add_argument("--gpt-steps", type=int, default=30)
    parser.add_argument("--large-batch", type=int, default=32)
    parser.add_argument("--inception-weights", default=None)
    parser.add_argument("--only", nargs="+", default=["gpt", "sampling", "vqgan", "large", "fid"],
                        help="checks to run, in this order")
    args = parser.parse_args()
    args.precision = "bf16-mixed" if args.device == "cuda" else "32-true"
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, lightning {L.__version__}", flush=True)
    started = time.perf_counter()
    checks = {"gpt": gpt_training, "large": gpt_large, "vqgan": vqgan_steps, "sampling": sampling,
              "fid": fid_gpu_vs_cpu}
    for key in args.only:
        checks[key](args)
    print(f"\nGPU check on {name} ({time.perf_counter() - started:.0f} s)")
    bench_generate.table(["check", "setting", "figures", "verdict"], ROWS)


if __name__ == "__main__":
    main()
