"""Sampling speed of the text-to-image GPT: recomputation vs the KV cache, and the memory-bandwidth floor.

    python experiments/bench_generate.py                      # base size, fp32 CPU, batches 1 and 8 (~16 min)
    python experiments/bench_generate.py --quick              # tiny model, a smoke test in seconds
    python experiments/bench_generate.py --recompute-steps 32 # estimate recomputation from 32 of its 256 forwards
    python experiments/bench_generate.py --layout paipainter  # pai-painter-base: EasyNLP's loop vs t2i's sampler
    python experiments/bench_generate.py --device cuda --steps-table --batches 1 64 256  # GPU decoding (bf16)
    python experiments/bench_generate.py --device cuda --steps-table --batches 1 64 --step-modes compiled frozen --weights int8
    python experiments/bench_generate.py --break-even --quickstart --batches 1 2 4 8 16  # when frozen pays off (auto)
    python experiments/bench_generate.py --sjd-ckpt logs/quickstart/gpt/checkpoints/last.ckpt  # + SJD on a trained model
    python experiments/bench_generate.py --sjd-only --sjd-step frozen --sjd-window 16 8 --sjd-temperatures \
      --sjd-ckpt logs/quickstart/gpt/checkpoints/last.ckpt  # SJD with frozen windows vs frozen AR steps only

Random weights at the base size (12 layers, 12 heads, 768 wide, 32 text + 256 image positions,
16,384 image codes, 16,000 text ids): speed does not depend on the weights. For each batch (number
of prompts, one sample each, no guidance, top-k 100, seed 0) it times generate_codes with
use_cache=False, which recomputes the whole sequence at every step as EasyNLP's loop does, and with
the KV cache. The floor is the time to read, once per generated code, every weight a one-position
forward touches (blocks, final LayerNorm, output head), at the memory bandwidth measured in the same
run (best .sum() over a 1 GB fp32 tensor). Peak memory at the largest batch is measured in fresh
subprocesses (peak RSS with and without sampling) on the CPU, max_memory_allocated on a GPU.
With `--layout paipainter` the model is pai-painter-base's GPT exactly (pre-LN, 32 text + 256 image
positions, a 37,512-id vocabulary of 16,384 codes + 21,128 BERT ids, a head over the image codes
only), so recomputation is EasyNLP's own generation algorithm on its own architecture.
Targets: KV cache >= 12x faster than recomputation at batch 1 and >= 20x at batch 8; KV-cache
batch 1 within 1.5x of the floor.

The batch-1 table interleaves the methods compared there (`--interleave N` rounds, each method once
per round; median and spread), with the floor measured in every round too (the bandwidth moves a lot
on a shared machine): recomputation (estimated from `--recompute-steps` forwards, default 32), the KV
cache with eager, compiled and frozen steps (sampling.step), and taming-transformers' KV
sampler as an algorithm on t2i's own module (`taming_style_codes`: per layer the past keys and values
concatenated with the new ones at every step, attention written out, the whole head projected).
Targets there: >= 12x recompute, <= 1.5x the fp32 floor, >= 1.3x faster than taming's sampler.

`--steps-table` times the step modes instead (sampling.step: eager, static, compiled = a CUDA
graph on GPUs, frozen; `--weights int8` for sampling.weights), in bf16 on a GPU (fp32 on the CPU),
with guidance 3 (both halves in one batch): ms per image step at each batch, images/s including the VQGAN f16 decode (bf16 autocast, the VQ lookup
exact), the memory floor per step (weights read once at the bandwidth measured) and peak memory.
GPU goal: <= 1 ms per step at batch 1 with guidance, base size, on one H100.

The int8 row is sampling.weights=int8 (t2i.models.int8: int8 weights per output channel, bf16
activations) with frozen steps, where inductor runs torch's weight-only int8 product. Target: <= 0.6x
the fp32 floor.

`--break-even` times when frozen steps pay back their compile (sampling.step=auto's rule on a CPU,
t2i.sampling.options.FROZEN_BREAK_EVEN): per batch, with guidance 3, eager and frozen steps
and the frozen step's compile (cold: into an empty inductor cache; cached: found on disk), and the
break-even in sampled positions per batch size compiled; `--quickstart` for the shapes quickstart
model's size.

The SJD rows time speculative Jacobi decoding (sampling.method=sjd) against the KV sampler at batch 1,
the two interleaved: random weights predict near-uniform codes, where almost no draft is accepted, so
they are timed at temperature 1 and at 0.05 (near-deterministic predictions); `--sjd-ckpt` adds a
trained GPT with its own sampling options. Target: SJD >= 1.5x faster. `--sjd-step` runs both the
token-by-token steps and SJD's windows in that step mode (frozen: one compiled window of W + 1 positions; the
compiles happen in the warm-up, untimed), `--sjd-window` takes several windows (a row each), and `--sjd-only`
skips every other table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from t2i.models.gpt import GPT, GPTConfig
from t2i.models.int8 import WEIGHTS, quantize_weights
from t2i.models.vqgan import VQModel
from t2i.pretokenize import load_vqgan_config
from t2i.sampling import STEP_MODES, SamplingConfig, SamplingStats, decode_to_uint8, filter_logits, generate_codes
from t2i.sampling.steps import release_steps

BASE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "text_len": 32, "image_len": 256, "n_image_codes": 16384,
        "n_text_tokens": 16000}
# the shapes quickstart model's size (conf/model/shapes.yaml on the shapes data; tests/test_sampling_golden.py's GPT)
QUICKSTART = {"n_layer": 4, "n_head": 4, "n_embd": 96, "text_len": 26, "image_len": 64, "n_image_codes": 512,
              "n_text_tokens": 60, "norm": "sandwich"}
QUICK = {"n_layer": 2, "n_head": 4, "n_embd": 128, "text_len": 8, "image_len": 64, "n_image_codes": 1024,
         "n_text_tokens": 1000}
TARGETS = {1: 12.0, 8: 20.0}  # speed-up of the KV cache over recomputation, per batch size
FLOOR_TARGET = 1.5
SJD_TARGET = 1.5  # SJD's wall-clock speed-up over the KV sampler at batch 1
MB = 1e6


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


PAIPAINTER = {"layout": "paipainter", "norm": "pre", "n_text_tokens": 21128}  # on top of BASE (or QUICK)


def build(quick: bool, device: str, layout: str = "t2i", quickstart: bool = False) -> GPT:
    torch.manual_seed(0)
    size = {**(QUICKSTART if quickstart else QUICK if quick else BASE), **(PAIPAINTER if layout == "paipainter" else {})}
    return GPT(GPTConfig(**size)).eval().to(device)


def prompts(model: GPT, batch: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    cfg = model.cfg
    return torch.randint(1, cfg.n_text_tokens, (batch, cfg.text_len), generator=generator).to(device)


def sampling(top_k: int) -> SamplingConfig:
    return SamplingConfig(top_k=top_k, seed=0)


def sample(model: GPT, text: torch.Tensor, cfg: SamplingConfig, **options) -> torch.Tensor:
    """generate_codes with prompt i seeded cfg.seed + i: the seeds the figures in experiments/RESULTS.md were
    drawn with (the sampler's default for token ids then), so that they stay reproducible."""
    return generate_codes(model, text, cfg, seeds=[cfg.seed + i for i in range(len(text))], **options)


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def recompute_estimate(model: GPT, text: torch.Tensor, cfg: SamplingConfig, steps: int, device: str) -> float:
    """Seconds for generate_codes(use_cache=False) from `steps` of its image_len forwards, spread over the lengths.

    Its forwards run the prefix and then every longer sequence up to one short of the full one; each is
    followed by the same sampling of the last position.
    """
    gpt = model.cfg
    prefix = model.layout.prefix(text)
    codes = torch.randint(0, gpt.n_image_codes, (len(text), gpt.image_len - 1), device=device)
    full = torch.cat([prefix, codes], 1)
    lengths = torch.linspace(prefix.shape[1], full.shape[1], steps).round().long().unique().tolist()
    generator = torch.Generator(device=device).manual_seed(0)

    def step(length: int) -> None:
        logits = model(full[:, :length])[:, -1, : gpt.n_image_codes].float()
        probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
        torch.multinomial(probs, 1, generator=generator)

    model(full[:, : lengths[-1]])  # warm-up at the longest length
    return sum(timed(partial(step, length), device) for length in lengths) / len(lengths) * gpt.image_len


def generation_seconds(model: GPT, batch: int, cfg: SamplingConfig, use_cache: bool, repeats: int, device: str,
                       recompute_steps: int | None) -> tuple[float, str]:
    """Best wall seconds of one generate_codes call for `batch` prompts, and how it was obtained."""
    text = prompts(model, batch, device)
    image_len = model.cfg.image_len
    if not use_cache and recompute_steps and recompute_steps < image_len:
        return recompute_estimate(model, text, cfg, recompute_steps, device), f"est. from {recompute_steps} forwards"
    if use_cache:
        sample(model, text, cfg)  # warm-up
    else:
        with torch.no_grad():  # warm-up at the longest length: the full loop is too long to run twice for it
            model(torch.zeros(batch, model.cfg.block_size - 1, dtype=torch.long, device=device))
    best = min(timed(lambda: sample(model, text, cfg, use_cache=use_cache), device) for _ in range(repeats))
    return best, f"best of {repeats}" if repeats > 1 else "1 run"


@torch.no_grad()
def taming_style_codes(model: GPT, text: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """taming-transformers' sampling algorithm (`forward_with_past`, which EasyNLP carries) on t2i's blocks:
    every step concatenates each layer's past keys and values with the new ones (new tensors each step),
    writes attention out, projects the whole head and samples with torch.multinomial. Learned positions,
    pre-LN or Sandwich-LN (the benchmark's model)."""
    gpt = model.cfg
    past: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * gpt.n_layer
    generator = torch.Generator(device=text.device).manual_seed(0)

    def forward(tokens: torch.Tensor, start: int) -> torch.Tensor:
        x = model.tok_emb(tokens) + model.pos_emb[:, start:start + tokens.shape[1]]
        for layer, block in enumerate(model.blocks):
            attn, h = block.attn, block.ln1(x)
            b, t, c = h.shape
            q, k, v = (proj(h).view(b, t, attn.n_head, attn.head_dim).transpose(1, 2)
                       for proj in (attn.query, attn.key, attn.value))
            if past[layer] is not None:
                k, v = torch.cat([past[layer][0], k], -2), torch.cat([past[layer][1], v], -2)
            past[layer] = (k, v)
            scores = q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim)
            if t > 1:
                scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            a = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c))
            x = x + (block.ln3(a) if hasattr(block, "ln3") else a)
            m = block.mlp(block.ln2(x))
            x = x + (block.ln4(m) if hasattr(block, "ln4") else m)
        return model.head(model.ln_f(x))[:, -1, :gpt.n_image_codes]

    tokens = model.layout.prefix(text)
    logits = forward(tokens, 0)
    codes = []
    for i in range(gpt.image_len):
        probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
        codes.append(torch.multinomial(probs, 1, generator=generator))
        if i < gpt.image_len - 1:
            logits = forward(codes[-1], tokens.shape[1] + i)
    return torch.cat(codes, 1)


FLOOR_ROW = "fp32 floor (weights at the round's .sum() bandwidth)"


def batch_one_table(args: argparse.Namespace, model: GPT) -> None:
    """Batch 1, the methods interleaved over `args.interleave` rounds: median s/image and spread, ratios.
    The floor is measured in every round too (best of 3 reads), and the ratios are to its median."""
    text = prompts(model, 1, args.device)
    cfg = sampling(args.top_k)
    steps = args.recompute_steps or 32
    int8 = quantize_weights(model)
    read = bytes_per_step(model) * model.cfg.image_len
    methods = {
        FLOOR_ROW: lambda: read / bandwidth(args.device, args.bandwidth_gb, repeats=3),
        f"recompute (est. from {steps} forwards)": lambda: recompute_estimate(model, text, cfg, steps, args.device),
        "KV cache, eager steps": lambda: timed(lambda: sample(model, text, cfg), args.device),
        "KV cache, compiled steps": lambda: timed(lambda: sample(model, text, cfg, step="compiled"),
                                                  args.device),
        "KV cache, frozen steps": lambda: timed(lambda: sample(model, text, cfg, step="frozen"),
                                                args.device),
        "KV cache, frozen steps, int8 weights": lambda: timed(lambda: sample(int8, text, cfg, step="frozen"),
                                                              args.device),
        "taming-style KV (concatenated)": lambda: timed(lambda: taming_style_codes(model, text, cfg), args.device),
    }
    for mode in ("compiled", "frozen"):  # compiles (not timed)
        sample(model, text, cfg, step=mode)
    sample(int8, text, cfg, step="frozen")
    taming_style_codes(model, text, cfg)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.interleave):
        for name, run in methods.items():
            times[name].append(run())
    median = {name: statistics.median(values) for name, values in times.items()}
    floor = median[FLOOR_ROW]
    recompute, taming = median[f"recompute (est. from {steps} forwards)"], median["taming-style KV (concatenated)"]
    rows = []
    for name, values in times.items():
        rows.append([name, f"{median[name]:.3f}", f"{min(values):.3f}-{max(values):.3f}", f"{recompute / median[name]:.1f}x",
                     f"{taming / median[name]:.2f}x", f"{median[name] / floor:.2f}x"])
    table(["batch 1, no guidance", "median s/image", f"spread ({args.interleave} rounds)", "vs recompute",
           "vs taming-style", "x fp32 floor"], rows)
    best = min(median[name] for name in methods if name.startswith("KV cache") and "int8" not in name)
    print(f"\ntargets (the fastest fp32 KV row): >= 12x recompute: {recompute / best:.1f}x; <= 1.5x floor: "
          f"{best / floor:.2f}x; >= 1.3x taming-style: {taming / best:.2f}x")
    greedy = replace(cfg, greedy=True)
    agree = (sample(int8, text, greedy, step="frozen") == sample(model, text, greedy)).float().mean()
    print(f"int8 weights (sampling.weights=int8, bf16 activations): greedy codes agree with fp32's on {agree:.1%} "
          f"of the positions (random weights: not the quality test); <= 0.6x the fp32 floor: "
          f"{median['KV cache, frozen steps, int8 weights'] / floor:.2f}x; they read {bytes_per_step(int8) / MB:.1f} MB "
          f"per step (int8 weights and scales, bf16 norms and biases): their own floor "
          f"{floor * bytes_per_step(int8) / bytes_per_step(model):.3f} s/image")


def sjd_row(label: str, model: GPT, text: torch.Tensor, cfg: SamplingConfig, window: int, repeats: int,
            device: str, step: str = "eager") -> list:
    """SJD vs the KV sampler on one prompt (batch 1), both in step mode `step`, interleaved: best seconds of
    each, model calls."""
    sjd = replace(cfg, method="sjd", sjd_window=window)
    stats = SamplingStats()
    sample(model, text, sjd, stats=stats, step=step)  # warm-up (compiles), and its model calls (seeded: every run the same)
    sample(model, text, cfg, step=step)
    times = {"ar": [], "sjd": []}
    for _ in range(repeats):
        times["ar"].append(timed(lambda: sample(model, text, cfg, step=step), device))
        times["sjd"].append(timed(lambda: sample(model, text, sjd, step=step), device))
    ar, fast = min(times["ar"]), min(times["sjd"])
    return [label, window, f"{ar:.3f}", f"{fast:.3f}", f"{ar / fast:.2f}x",
            f"{stats.model_calls} / {stats.token_by_token_calls}", f">= {SJD_TARGET}x",
            "met" if ar / fast >= SJD_TARGET else "MISSED"]


def sjd_rows(args: argparse.Namespace, model: GPT) -> None:
    """The SJD table: random weights at each --sjd-temperatures, and the --sjd-ckpt model (its own sampling),
    at each window."""
    text = prompts(model, 1, args.device)
    rows = [sjd_row(f"random weights, T={t:g}", model, text, replace(sampling(args.top_k), temperature=t),
                    window, args.repeats, args.device, args.sjd_step)
            for t in args.sjd_temperatures for window in args.sjd_window]
    if args.sjd_ckpt:
        from t2i.checkpoints import load_gpt

        trained, record = load_gpt(args.sjd_ckpt)
        trained = trained.eval().to(args.device)
        prompt = "画面左上角有一个红色的小圆形，背景是白色的"  # experiments/prompts/shapes.txt's first
        cfg = SamplingConfig(**{**record.sampling, "samples_per_prompt": 1, "seed": 0})
        for window in args.sjd_window:
            rows.append(sjd_row(f"{Path(args.sjd_ckpt).parent.parent.name} (its sampling: T={cfg.temperature:g}, "
                                f"top-k {cfg.top_k}, guidance {cfg.guidance_scale:g})", trained,
                                record.tokenizer_model()([prompt]).to(args.device), cfg, window, args.repeats,
                                args.device, args.sjd_step))
    table([f"batch 1, {args.sjd_step} steps", "window", "KV s/image", "SJD s/image", "speed-up",
           "SJD model calls / token by token", "target", "met"], rows)


def bandwidth(device: str, gigabytes: float, repeats: int = 10) -> float:
    """Bytes per second of the best full read of a large fp32 tensor (a sum, so nothing is written)."""
    x = torch.ones(int(gigabytes * 1e9) // 4, device=device)
    x.sum()
    best = min(timed(x.sum, device) for _ in range(repeats))
    return x.numel() * 4 / best


def linears_alone(model: GPT, batch: int, device: str, repeats: int = 5) -> float:
    """Best seconds for one position through every linear layer and nothing else, each called as the model calls it.

    The head is cut to the rows a sampling step reads. What the matrix-vector products alone cost per step:
    between the floor and the real step.
    """
    head = type(model.head)(model.cfg.n_embd, head_rows_read(model), bias=False, device=device)
    head.weight = torch.nn.Parameter(model.head.weight[: head.out_features])  # a view: no copy
    layers = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)] + [head]
    inputs = {n: torch.randn(batch, 1, n, device=device) for n in {m.in_features for m in layers}}

    def run() -> None:
        for m in layers:
            m(inputs[m.in_features])

    with torch.no_grad():
        run()
        return min(timed(run, device) for _ in range(repeats))


def head_rows_read(model: GPT) -> int:
    """Rows of the output head a sampling step reads: the image codes (generate_codes passes head_rows)."""
    return model.cfg.n_image_codes


def bytes_per_step(model: GPT) -> int:
    """Weights one single-position forward reads: the blocks, the final LayerNorm and the output head's rows.

    The token and position embeddings contribute one row each and are left out.
    """
    params = [*model.blocks.parameters(), *model.blocks.buffers(), *model.ln_f.parameters()]  # int8: weights are buffers
    head = head_rows_read(model) * model.cfg.n_embd * model.head.weight.element_size()
    return sum(p.numel() * p.element_size() for p in params) + head


def kv_read_per_step(model: GPT, batch: int) -> float:
    """Mean bytes of cached keys and values the attention reads per image step (it grows with the position)."""
    cfg = model.cfg
    prefix = cfg.block_size - cfg.image_len
    mean_positions = prefix + (cfg.image_len - 1) / 2  # step i (prefix forward = 0) attends to prefix + i positions
    return 2 * cfg.n_layer * batch * mean_positions * cfg.n_embd * model.tok_emb.weight.element_size()


def cache_bytes(model: GPT, batch: int) -> int:
    cache = model.new_cache(batch)
    return sum(t.numel() * t.element_size() for t in cache.keys + cache.values)


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: build the model (and sample when asked), then print the peak RSS in bytes."""
    model = build(args.quick, "cpu", args.layout)
    text = prompts(model, args.probe_batch, "cpu")
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool in both probes
    if args.memory_probe == "sample":
        sample(model, text, sampling(args.top_k))
    print(json.dumps({"peak": peak_rss()}))


def peak_rss() -> int:
    """This process's peak resident set, bytes.

    VmHWM where there is one: ru_maxrss survives exec, so a child spawned from this large parent would
    report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(args: argparse.Namespace, model: GPT, batch: int) -> tuple[int, int]:
    """(peak with the model built, peak while sampling with the KV cache), bytes."""
    if args.device == "cuda":
        text = prompts(model, batch, "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        built = torch.cuda.max_memory_allocated()
        sample(model, text, sampling(args.top_k))
        torch.cuda.synchronize()
        return built, torch.cuda.max_memory_allocated()
    peaks = []
    for mode in ("build", "sample"):
        command = [sys.executable, __file__, "--memory-probe", mode, "--probe-batch", str(batch),
                   "--top-k", str(args.top_k), "--layout", args.layout, *(["--quick"] if args.quick else []),
                   *(["--threads", str(args.threads)] if args.threads else [])]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        peaks.append(json.loads(out.strip().splitlines()[-1])["peak"])
    return peaks[0], peaks[1]


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"CPU {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}"


def profile(model: GPT, steps: int, device: str, rows: int) -> None:
    """The top operators of `steps` single-position KV-cache forwards at batch 1, mid-sequence."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    steps = min(steps, model.cfg.image_len - 1)
    options = {"head_rows": head_rows_read(model)}  # as generate_codes calls it
    cache = model.new_cache(1)
    prefix = model.layout.prefix(prompts(model, 1, device))
    new = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        model(prefix, cache)
        for _ in range(model.cfg.image_len // 2 - steps):
            model(new, cache, **options)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                model(new, cache, **options)
            sync(device)
    print(f"\nprofile of {steps} KV-cache forwards at batch 1 (positions {cache.length - steps}..{cache.length - 1})\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def table(headers: list[str], rows: list[list]) -> None:
    """A markdown table, columns padded to their widest cell, numbers right-aligned."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    right = [all(row[i][:1].isdigit() or row[i] == "-" for row in cells[1:]) for i in range(len(headers))]
    print()
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


@torch.no_grad()
def steps_table(args: argparse.Namespace, model: GPT) -> dict:
    """ms per image step for each decode mode and batch (guidance 3), images/s with the VQGAN decode, the floor:
    printed, and returned (experiments/gpu_check.py reads them)."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = quantize_weights(model.to(dtype), args.weights)  # int8: bf16 activations on every device
    vqgan_cfg = replace(load_vqgan_config("shapes" if args.quick else "f16_16384"), n_embed=model.cfg.n_image_codes)
    vqgan = VQModel(vqgan_cfg).to(device).eval()
    cfg = SamplingConfig(top_k=args.top_k, seed=0, guidance_scale=3.0)
    steps = model.cfg.image_len
    rows, best, results = [], {}, {"steps": {}, "images": {}}
    for batch in args.batches:
        text = prompts(model, batch, device)
        for mode in args.step_modes:
            run = partial(sample, model, text, cfg, step=mode)
            started = time.perf_counter()
            run()  # warm-up: compiles and captures for this batch
            warmup = time.perf_counter() - started
            seconds = min(timed(run, device) for _ in range(args.repeats))
            best[batch] = min(best.get(batch, (float("inf"), "")), (seconds, mode))
            results["steps"][batch, mode] = {"ms_per_step": seconds / steps * 1e3, "images_per_s": batch / seconds}
            rows.append([batch, mode, f"{seconds / steps * 1e3:.3f}", f"{batch / seconds:.1f}", f"{warmup:.1f}"])
    table(["batch (x2 guidance)", "step", "ms / step", "images/s, codes only", "first call s"], rows)

    rows = []
    for batch, (seconds, mode) in best.items():
        text = prompts(model, batch, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        grid = int(steps ** 0.5)
        codes = sample(model, text, cfg, step=mode).view(-1, grid, grid)

        def images() -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                for chunk in codes.split(64):
                    decode_to_uint8(vqgan, chunk)

        images()
        pixels = min(timed(images, device) for _ in range(args.repeats))
        peak = f"{torch.cuda.max_memory_allocated() / MB:.0f}" if device == "cuda" else "-"
        rows.append([batch, mode, f"{batch / (seconds + pixels):.1f}", f"{pixels / batch * 1e3:.2f}", peak])
        results["images"][batch] = {"step": mode, "images_per_s": batch / (seconds + pixels), "peak_mb": peak}
    table(["batch", "step", "images/s with VQGAN decode", "VQGAN ms / image", "peak MB (sampling + decode)"], rows)

    read = bytes_per_step(model)
    rate = bandwidth(device, args.bandwidth_gb)
    one = best.get(1)
    table(["weights read per step", "bandwidth", "floor ms / step", "batch 1 ms / step", "x floor"],
          [[f"{read / MB:.1f} MB ({str(dtype).split('.')[-1]})", f"{rate / 1e9:.0f} GB/s", f"{read / rate * 1e3:.3f}",
            "-" if one is None else f"{one[0] / steps * 1e3:.3f} ({one[1]})",
            "-" if one is None else f"{one[0] / steps / (read / rate):.1f}x"]])
    results.update(floor_ms=read / rate * 1e3, weights_mb=read / MB, bandwidth_gbs=rate / 1e9)
    return results


@torch.no_grad()
def break_even_table(args: argparse.Namespace, model: GPT) -> None:
    """When frozen steps pay back their compile on this device (sampling.step=auto's rule on a CPU): for each
    batch (guidance 3, both halves in one batch, as eval.py samples a trained checkpoint) the first frozen call
    `--repeats` times, the steps released before each (the first into an empty inductor cache: cold; the
    others find its FX graphs and autotuning on disk: cached), then eager and frozen generations interleaved
    (`--repeats` each, the fastest counts). The compile is the first call's excess over a warm one. A frozen
    step saves (eager - frozen) per step, i.e. per `batch` sampled positions; the break-even is the compile over
    that saving, in sampled positions (sequences x image_len) per batch size compiled."""
    # an empty inductor cache, so that the first compile of a batch size is a cold one (torch sets this variable
    # itself once it has read it: it cannot tell whether a user set it)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-break-even-")
    device = args.device
    cfg = SamplingConfig(top_k=args.top_k, seed=0, guidance_scale=3.0)
    image_len = model.cfg.image_len
    rows = []
    for batch in args.batches:
        text = prompts(model, batch, device)
        eager_run = partial(sample, model, text, cfg, step="eager")
        frozen_run = partial(sample, model, text, cfg, step="frozen")
        eager_run()  # warm-up
        first = []
        for _ in range(max(args.repeats, 2)):
            release_steps(model)
            first.append(timed(frozen_run, device))
        eager, frozen = [], []
        for _ in range(args.repeats):
            eager.append(timed(eager_run, device))
            frozen.append(timed(frozen_run, device))
        release_steps(model)
        eager_s, frozen_s = min(eager), min(frozen)
        cold, cached = first[0] - frozen_s, min(first[1:]) - frozen_s
        saving = (eager_s - frozen_s) / (batch * image_len)  # seconds per sampled position

        def break_even(compile_s: float) -> str:
            return f"{compile_s / saving:,.0f}" if saving > 0 else "never"

        rows.append([batch, f"{eager_s / image_len * 1e3:.2f}", f"{frozen_s / image_len * 1e3:.2f}",
                     f"{eager_s / frozen_s:.2f}x", f"{cold:.1f} / {cached:.1f}", f"{saving * 1e3:.3f}",
                     f"{break_even(cold)} / {break_even(cached)}"])
    table(["batch (x2 guidance)", "eager ms / step", "frozen ms / step", "frozen speed-up",
           "compile s, cold / cached", "saved ms / position", "break-even positions, cold / cached"], rows)
    print(f"\nbreak-even positions = compile s / saved s per sampled position (sequences x {image_len} image "
          f"positions), per batch size compiled; inductor's cache: {os.environ['TORCHINDUCTOR_CACHE_DIR']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny model (2 layers, 128 wide, 64 codes): a smoke test")
    parser.add_argument("--quickstart", action="store_true",
                        help="the shapes quickstart model's size (4 layers, 96 wide, 26 text + 64 image positions)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--layout", choices=["t2i", "paipainter"], default="t2i",
                        help="paipainter: pai-painter-base's own GPT (EasyNLP's layout and vocabulary)")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="KV-cache runs per batch; the fastest counts")
    parser.add_argument("--recompute-repeats", type=int, default=1, help="recomputation runs per batch")
    parser.add_argument("--recompute-steps", type=int, default=None,
                        help="time only this many of recomputation's forwards, spread over the lengths, and "
                             "extrapolate (default: run generate_codes(use_cache=False) whole)")
    parser.add_argument("--bandwidth-gb", type=float, default=1.0, help="size of the tensor read for the bandwidth")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also print a torch.profiler summary of this many batch-1 KV-cache steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--interleave", type=int, default=5, metavar="ROUNDS",
                        help="rounds of the interleaved batch-1 table (0: skip it)")
    parser.add_argument("--steps-table", action="store_true",
                        help="time the step modes (--step-modes) with guidance instead; bf16 on CUDA")
    parser.add_argument("--break-even", action="store_true",
                        help="time eager against frozen steps and frozen's compile: when frozen pays off (auto's rule)")
    parser.add_argument("--step-modes", nargs="+", default=["eager", "compiled"], choices=STEP_MODES)
    parser.add_argument("--weights", default="unchanged", choices=WEIGHTS,
                        help="the steps table's sampling.weights (int8: pair it with --step-modes frozen)")
    parser.add_argument("--sjd-window", type=int, nargs="+", default=[16],
                        help="SJD's draft windows, a row each (0: skip the SJD rows)")
    parser.add_argument("--sjd-step", default="eager", choices=[mode for mode in STEP_MODES if mode != "auto"],
                        help="the step mode of the SJD rows: SJD's windows and the KV sampler's steps")
    parser.add_argument("--sjd-temperatures", type=float, nargs="*", default=[1.0, 0.05],
                        help="the random-weight SJD rows' temperatures (none: only --sjd-ckpt's rows)")
    parser.add_argument("--sjd-only", action="store_true", help="only the SJD rows")
    parser.add_argument("--sjd-ckpt", default=None, help="also time SJD on this trained GPT checkpoint")
    parser.add_argument("--memory-probe", choices=["build", "sample"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-batch", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return

    model = build(args.quick, args.device, args.layout, args.quickstart)
    cfg, sample_cfg = model.cfg, sampling(args.top_k)
    size = ("quickstart" if args.quickstart else "quick" if args.quick else "base") + \
        (" pai-painter" if args.layout == "paipainter" else "")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{machine(args.device)}")
    print(f"{size} GPT: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, {cfg.text_len} text + "
          f"{cfg.image_len} image positions, vocabulary {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters, fp32, "
          f"{args.device}; top-k {args.top_k}, seed 0, one sample per prompt, "
          + ("guidance 3, bf16 on CUDA" if args.steps_table else "guidance 3" if args.break_even else "no guidance"))
    if args.break_even:
        break_even_table(args, model)
        return
    if args.sjd_only:
        sjd_rows(args, model)
        return
    if args.steps_table:
        steps_table(args, model)
        return

    speed = {}
    for batch in args.batches:
        slow, slow_how = generation_seconds(model, batch, sample_cfg, False, args.recompute_repeats, args.device,
                                            args.recompute_steps)
        fast, fast_how = generation_seconds(model, batch, sample_cfg, True, args.repeats, args.device, None)
        speed[batch] = (slow / batch, slow_how, fast / batch, fast_how)

    read = bytes_per_step(model)
    rate = bandwidth(args.device, args.bandwidth_gb)
    floor = read / rate * cfg.image_len
    matvecs = linears_alone(model, 1, args.device) * cfg.image_len

    rows = []
    for batch, (slow, slow_how, fast, fast_how) in speed.items():
        target = TARGETS.get(batch)
        rows.append([batch, f"{slow:.3f}", slow_how, f"{fast:.4f}", fast_how, f"{slow / fast:.1f}x",
                     "-" if target is None else f">= {target:.0f}x",
                     "-" if target is None else ("met" if slow / fast >= target else "MISSED")])
    table(["batch", "recompute s/image", "how", "KV cache s/image", "how", "speed-up", "target", "met"], rows)

    kv = speed[1][2] if 1 in speed else None
    table(["weights read per step", "bandwidth", "floor s/image", "linears alone s/image", "KV batch 1 s/image",
           "KV / floor", "target", "met"],
          [[f"{read / MB:.1f} MB", f"{rate / 1e9:.1f} GB/s", f"{floor:.4f}", f"{matvecs:.4f}",
            "-" if kv is None else f"{kv:.4f}", "-" if kv is None else f"{kv / floor:.2f}x", f"<= {FLOOR_TARGET}x",
            "-" if kv is None else ("met" if kv / floor <= FLOOR_TARGET else "MISSED")]])
    kv_read = kv_read_per_step(model, 1)
    print(f"\nfloor = {read / MB:.1f} MB (blocks, final LayerNorm, {head_rows_read(model)} of {model.head.out_features} head "
          f"rows) x {cfg.image_len} steps / {rate / 1e9:.1f} GB/s (best of 10 sums over {args.bandwidth_gb:g} GB).\n"
          f"The batch-1 attention also reads {kv_read / MB:.1f} MB of cached keys and values per step on average "
          f"({kv_read / read:.1%} more), not counted.\nLinears alone: one position through every linear layer and "
          f"nothing else, x {cfg.image_len} (torch's matrix-vector kernels; best of 5).")

    if args.interleave and args.layout == "t2i":
        batch_one_table(args, model)

    if not args.no_memory:
        batch = max(args.batches)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        built, sampled = peak_memory(args, model, batch)
        what = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
        table(["batch", "weights MB", "KV cache MB (computed)", f"{what} built MB", f"{what} sampling MB",
               "sampling adds MB"],
              [[batch, f"{weights / MB:.1f}", f"{cache_bytes(model, batch) / MB:.1f}", f"{built / MB:.1f}",
                f"{sampled / MB:.1f}", f"{(sampled - built) / MB:.1f}"]])

    if 0 not in args.sjd_window:
        sjd_rows(args, model)
    if args.quick:
        print("\n(--quick: the targets are for the base size; these figures only show the script runs)")
    if args.profile:
        profile(model, args.profile, args.device, rows=15)


if __name__ == "__main__":
    main()
