"""The quickstart: the whole pipeline on the built-in shapes data, on the CPU, timed stage by stage.

    python experiments/quickstart.py [--data data] [--runs logs/quickstart] [--seed 0] [--fid]
    (make quickstart [DATA=...] [SEED=...] [FID=true])

Data, tokenizer, the oracle on the real test images (the reference row), the shapes VQGAN and its
reconstructions, code shards, the GPT, a captioned grid for experiments/prompts/shapes.txt, and the
evaluation on 200 held-out test prompts (the checkpoint's sampling options; reranked; no guidance).
Every command is printed before it runs; at the end one summary (also <runs>/summary.md): each
stage's wall time, whether each training ran its steps (a run that stopped early is named, with
the reason: its model is not the recipe's), the VQGAN's reconstructions and the attribute accuracy
against the targets. --seed is the training seed of the VQGAN and the GPT (sampling seeds stay
the evaluation's own, so two training seeds are compared on the same prompts and draws).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the shapes targets (issue 15): on 200 test prompts with the checkpoint's own sampling options
TARGETS = {"color": 0.95, "shape": 0.90, "position": 0.90, "all": 0.80}
ATTRIBUTES = ("color", "shape", "position", "all")


def stages(data: Path, runs: Path, seed: int, fid: bool, clip: bool, vqgan_steps: int | None,
           gpt_steps: int | None) -> list[tuple[str, list[str]]]:
    """(name, command) of each step, in order; commands run from the repository root."""
    py = [sys.executable]
    vqgan, gpt = runs / "vqgan/checkpoints/last.ckpt", runs / "gpt/checkpoints/last.ckpt"
    fid_flag = str(fid).lower()
    evaluation = ["eval.py", f"ckpt={gpt}", "data=shapes", "split=test", "eval.num_prompts=200",
                  f"eval.fid={fid_flag}", f"eval.clip={str(clip).lower()}", f"paths.data_dir={data}"]
    vqgan_steps = [f"trainer.max_steps={vqgan_steps}"] if vqgan_steps else []  # none: the recipe's
    gpt_steps = [f"trainer.max_steps={gpt_steps}"] if gpt_steps else []
    return [
        ("data", py + ["-m", "t2i.data.convert", "shapes", "--out", str(data / "shapes")]),
        # overwrite: a DATA folder used before gets the same model again (the same captions and seed)
        ("tokenizer", py + ["train.py", "stage=tokenizer", "stage.overwrite=true", "data=shapes",
                            f"paths.data_dir={data}", f"hydra.run.dir={runs}/tokenizer"]),
        ("shard manifest", py + ["-m", "t2i.data.shards", str(data / "shapes")]),
        ("oracle on real images", py + ["eval.py", "task=oracle", "data=shapes", f"paths.data_dir={data}",
                                        f"hydra.run.dir={runs}/oracle"]),
        ("VQGAN", py + ["train.py", "experiment=vqgan_shapes", f"seed={seed}", *vqgan_steps,
                        f"paths.data_dir={data}", f"hydra.run.dir={runs}/vqgan"]),
        ("VQGAN reconstructions", py + ["eval.py", "task=reconstruct", f"ckpt={vqgan}", "data=shapes", "split=val",
                                        f"eval.rfid={fid_flag}", f"eval.lpips={fid_flag}", f"paths.data_dir={data}",
                                        f"hydra.run.dir={runs}/vqgan/eval"]),
        ("pre-tokenize", py + ["-m", "t2i.pretokenize", "--data", str(data / "shapes"),
                               "--out", str(data / "shapes_codes"), "--vqgan", str(vqgan)]),
        ("code manifest", py + ["-m", "t2i.data.shards", str(data / "shapes_codes")]),
        ("GPT", py + ["train.py", "experiment=shapes", f"seed={seed}", *gpt_steps, f"paths.data_dir={data}",
                      f"hydra.run.dir={runs}/gpt"]),
        ("grid for prompts", py + ["eval.py", "task=generate", f"ckpt={gpt}",
                                   "prompts_file=experiments/prompts/shapes.txt", "sampling.samples_per_prompt=4",
                                   f"hydra.run.dir={runs}/generate"]),
        ("evaluation", py + evaluation + ["eval.rerank=4", f"hydra.run.dir={runs}/eval"]),
        ("evaluation, no guidance", py + evaluation + ["sampling.guidance_scale=1",
                                                       f"hydra.run.dir={runs}/eval_no_guidance"]),
    ]


def relative_to_repo(path: Path) -> Path:
    """The commands run from the repository root: a path given relative to where this started, as they see it."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def summary(runs: Path, seed: int, times: dict[str, float]) -> str:
    """The final report (markdown): wall times, how the trainings ended, reconstructions, accuracy vs targets."""
    lines = [f"# Quickstart summary (training seed {seed})", "", "| stage | wall | outcome |", "|---|---|---|"]
    early = []
    for name, seconds in times.items():
        outcome = ""
        if name in ("VQGAN", "GPT"):
            fit = read_json(runs / name.lower() / "fit.json")
            if fit is None:
                outcome = "no fit.json: did the run finish?"
            else:
                outcome = f"{fit['steps']} of {fit['max_steps']} steps: {fit['reason']}"
                if fit["stopped_early"]:
                    outcome = "**STOPPED EARLY** " + outcome
                    early.append(f"the {name} training stopped at step {fit['steps']} of {fit['max_steps']} "
                                 f"({fit['reason']}): its model is not the recipe's, and the scores below are not "
                                 "the recipe's either")
        lines.append(f"| {name} | {minutes(seconds)} | {outcome} |")
    lines.append(f"| **total** | **{minutes(sum(times.values()))}** | |")
    reconstruction = read_json(runs / "vqgan/eval/results.json")
    if reconstruction:
        oracle = reconstruction["oracle_on_reconstructions"]
        lines += ["", f"VQGAN on {reconstruction['images']} val images: {reconstruction['psnr']:.2f} dB PSNR, "
                  f"SSIM {reconstruction['ssim']:.3f}, {percent(reconstruction['codebook_used'])} of "
                  f"{reconstruction['codebook_size']} codes used; the oracle reads colour / shape / position / all "
                  f"off its reconstructions at {' / '.join(percent(oracle[a]) for a in ATTRIBUTES)}"]
    rows = [("real test images", read_json(runs / "oracle/results.json"), "accuracy")]
    evaluation, no_guidance = read_json(runs / "eval/results.json"), read_json(runs / "eval_no_guidance/results.json")
    if evaluation:
        rows += [(f"GPT ({evaluation['prompts']} test prompts)", evaluation, "plain")]
        rows += [(f"GPT, reranked (best Caption Loss of {key.split('_')[1]})", evaluation, key)
                 for key in evaluation if key.startswith("rerank_")]
    if no_guidance:
        rows += [("GPT, no guidance", no_guidance, "plain")]
    lines += ["", "| images | colour | shape | position | all three |", "|---|---|---|---|---|"]
    for label, results, key in rows:
        if results:
            accuracy = results[key] if key == "accuracy" else results[key]["attributes"]
            lines.append(f"| {label} | " + " | ".join(percent(accuracy[a]) for a in ATTRIBUTES) + " |")
    lines.append("| target (GPT, the checkpoint's sampling) | " + " | ".join(f">= {percent(TARGETS[a])}"
                                                                          for a in ATTRIBUTES) + " |")
    if evaluation:
        plain = evaluation["plain"]["attributes"]
        missed = [f"{a} {percent(plain[a])} < {percent(TARGETS[a])}" for a in ATTRIBUTES if plain[a] < TARGETS[a]]
        lines += ["", "Targets: " + ("all met." if not missed else "MISSED: " + ", ".join(missed) + ".")]
    lines += [f"\nNote: {note}." for note in early]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data"), help="where the shapes data is written")
    parser.add_argument("--runs", type=Path, default=Path("logs/quickstart"), help="the runs' folders")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the VQGAN and the GPT")
    parser.add_argument("--fid", action="store_true", help="FID/IS, rFID and LPIPS (downloads their weights once)")
    parser.add_argument("--clip", action="store_true", help="the Chinese-CLIP score and R-precision (downloads the model)")
    parser.add_argument("--vqgan-steps", type=int, help="override the VQGAN recipe's trainer.max_steps")
    parser.add_argument("--gpt-steps", type=int, help="override the GPT recipe's trainer.max_steps")
    args = parser.parse_args()
    args.data, args.runs = (relative_to_repo(path) for path in (args.data, args.runs))
    times: dict[str, float] = {}
    for name, command in stages(args.data, args.runs, args.seed, args.fid, args.clip, args.vqgan_steps, args.gpt_steps):
        print(f"\n[quickstart] {name}: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command, cwd=REPO).returncode:
            raise SystemExit(f"[quickstart] the step '{name}' failed (its log is above; the command: "
                             f"{' '.join(command)})")
        times[name] = time.perf_counter() - start
        print(f"[quickstart] {name}: {minutes(times[name])}", flush=True)
    report = summary(REPO / args.runs, args.seed, times)
    (REPO / args.runs / "summary.md").write_text(report, encoding="utf-8")
    print("\n" + report)


if __name__ == "__main__":
    main()
