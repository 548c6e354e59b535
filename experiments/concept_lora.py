"""Teach the shapes GPT a concept it never saw, with a LoRA adapter and with full fine-tuning (issue 28).

    python experiments/concept_lora.py --vqgan logs/quickstart/vqgan/checkpoints/last.ckpt \
        --tokenizer data/shapes/tokenizer.model [--concept color=purple] [--images 500] [--replay 1500] \
        [--steps 300] [--lora-lr 1e-3] [--lora-targets attention mlp] [--full-lr 1e-4] \
        [--data data/concept] [--runs logs/concept] [--seed 0] [--base GPT.ckpt]

The steps, each a repository command printed before it runs:
1. data: the shapes splits without the concept (the base's training set; its test split gives the old prompts)
   and --images training images of the concept (its test split gives the new prompts) with --replay images
   of the base's own training set beside them (0: the concept alone, which the fine-tunings learn by drawing
   everything in it: measured in experiments/RESULTS.md), with the
   quickstart's tokenizer (fitted on every caption: a tokenizer knows words its GPT never read) and encoded by
   the quickstart's VQGAN (trained on all shapes, as a real VQGAN is trained on broad data);
2. the base GPT: the quickstart's recipe (experiment=shapes) on the data without the concept (--base: take a
   base trained so before);
3. a LoRA adapter (stage.lora) and a full fine-tuning, each --steps steps on the concept's images;
4. each model evaluated on 200 new and 200 old test prompts (eval.py, the checkpoint's own sampling options).
At the end one table (also <runs>/summary.md): accuracy on the new and old prompts, each fine-tuning's wall
time, what it trains and what it stores.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from quickstart import ATTRIBUTES, REPO, minutes, percent, read_json, relative_to_repo

from t2i.checkpoints import read_checkpoint

PROMPTS = 200


def fine_tune(data: Path, base: Path, run: Path, steps: int, seed: int, lr: float, lora: str | None) -> list[str]:
    """The command of one fine-tuning on the concept's code shards: the base recipe, shorter, from `base`."""
    return [sys.executable, "train.py", "experiment=shapes", f"init_ckpt={base}", f"seed={seed}",
            f"data.root={data / 'concept_codes'}", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            # a few batches an epoch: validate by steps, once at the end
            f"trainer.val_check_interval={steps}", "trainer.check_val_every_n_epoch=null",
            "stage.warmup_steps=20", "stage.sample_every_n_steps=0",
            f"optim.lr={lr}", *([f"stage.lora={lora}"] if lora else []), f"hydra.run.dir={run}"]


def evaluate(model: list[str], data: Path, out: Path) -> list[str]:
    return [sys.executable, "eval.py", *model, "data=shapes", f"data.root={data}", "split=test",
            f"eval.num_prompts={PROMPTS}", "eval.fid=false", "eval.clip=false", f"hydra.run.dir={out}"]


def stages(args) -> list[tuple[str, list[str]]]:
    py, data, runs = [sys.executable], args.data, args.runs
    base = args.base or runs / "base/checkpoints/last.ckpt"
    lora, full = runs / "lora/checkpoints/last.ckpt", runs / "full/checkpoints/last.ckpt"
    convert = py + ["-m", "t2i.data.convert", "shapes", "--seed", str(args.data_seed), "--quiet", "--out"]
    steps = [
        ("base: data without the concept", convert + [str(data / "base"), "--hold-out", args.concept]),
        ("concept: data of the concept", convert + [str(data / "concept"), "--only", args.concept,
                                                    "--train", str(args.images), "--replay", str(args.replay),
                                                    "--val", "100", "--test", str(PROMPTS)]),
    ]
    steps += [(f"{name}: the quickstart's tokenizer", ["cp", str(args.tokenizer), str(data / name)])
              for name in ("base", "concept")]
    # the base's codes only to train it (its old prompts are read from the image shards)
    for name in ("concept",) if args.base else ("base", "concept"):
        steps += [(f"{name}: pre-tokenize", py + ["-m", "t2i.pretokenize", "--data", str(data / name),
                                                  "--out", str(data / f"{name}_codes"), "--vqgan", str(args.vqgan)]),
                  (f"{name}: code manifest", py + ["-m", "t2i.data.shards", str(data / f"{name}_codes")])]
    if not args.base:
        steps.append(("base GPT", py + ["train.py", "experiment=shapes", f"seed={args.seed}",
                                        f"data.root={data / 'base_codes'}", f"hydra.run.dir={runs / 'base'}"]))
    targets = ", ".join(args.lora_targets)
    lora_settings = f"{{rank: {args.lora_rank}, alpha: {2 * args.lora_rank}, targets: [{targets}]}}"
    steps.append(("LoRA", fine_tune(data, base, runs / "lora", args.steps, args.seed, args.lora_lr, lora_settings)))
    models = {"base": [f"ckpt={base}"], "lora": [f"ckpt={base}", f"adapter={lora}"]}
    if args.full_lr:
        steps.append(("full fine-tuning", fine_tune(data, base, runs / "full", args.steps, args.seed, args.full_lr,
                                                    lora=None)))
        models["full"] = [f"ckpt={full}"]
    for model, arguments in models.items():
        for prompts, folder in (("new", "concept"), ("old", "base")):
            steps.append((f"evaluate {model} on {prompts} prompts",
                          evaluate(arguments, data / folder, runs / "eval" / f"{model}_{prompts}")))
    return steps


def weights_size(run: Path) -> tuple[int, int]:
    """(trained parameters, their bytes) of a run's last checkpoint (a LoRA run's: the adapter alone)."""
    state = read_checkpoint(run / "checkpoints/last.ckpt")["state_dict"]
    return sum(v.numel() for v in state.values()), sum(v.numel() * v.element_size() for v in state.values())


def summary(args, times: dict[str, float]) -> str:
    runs = REPO / args.runs
    header = " | ".join(f"{prompts} {a}" for prompts in ("new", "old") for a in ATTRIBUTES)
    lines = [f"# A concept the base never saw ({args.concept}; {args.images} images of it, {args.replay} replayed, "
             f"{args.steps} steps)", "",
             f"| model | {header} | fine-tuning wall | trained weights | checkpoint file |",
             "|---|" + "---|" * (2 * len(ATTRIBUTES) + 3)]
    labels = {"base": "base (never saw it)",
              "lora": f"LoRA adapter (rank {args.lora_rank} on {', '.join(args.lora_targets)}; lr {args.lora_lr:g})",
              "full": f"full fine-tuning (lr {args.full_lr:g})"}
    for model, label in labels.items():
        if model == "full" and not args.full_lr:
            continue
        scores = []
        for prompts in ("new", "old"):
            results = read_json(runs / "eval" / f"{model}_{prompts}" / "results.json")
            scores += [percent(results["plain"]["attributes"][a]) for a in ATTRIBUTES]
        wall, trained, stored = "", "", ""
        if model != "base":
            parameters, size = weights_size(runs / model)
            file = (runs / model / "checkpoints/last.ckpt").stat().st_size
            wall = minutes(times["LoRA" if model == "lora" else "full fine-tuning"])
            trained, stored = f"{parameters / 1e6:.3f} M ({size / 2**20:.2f} MiB)", f"{file / 2**20:.2f} MiB"
        lines.append(f"| {label} | " + " | ".join(scores) + f" | {wall} | {trained} | {stored} |")
    lines += ["", "new: test prompts with the concept; old: test prompts without it. The checkpoint file holds the "
              "trained weights, the optimizer's state and the record."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqgan", type=Path, required=True, help="the quickstart's VQGAN checkpoint")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the quickstart's tokenizer.model")
    parser.add_argument("--concept", default="color=purple", help="ATTRIBUTE=VALUE the base never sees")
    parser.add_argument("--images", type=int, default=500, help="training images of the concept")
    parser.add_argument("--replay", type=int, default=1500,
                        help="training images without the concept beside them (of the base's training set)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (batch 64)")
    parser.add_argument("--data", type=Path, default=Path("data/concept"))
    parser.add_argument("--runs", type=Path, default=Path("logs/concept"))
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="the LoRA run's learning rate")
    parser.add_argument("--lora-rank", type=int, default=8, help="the adapter's rank (alpha: twice the rank)")
    parser.add_argument("--lora-targets", nargs="+", default=["attention", "mlp"],
                        help="the layers adapted: some of attention, mlp, head, embedding")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning's learning rate (0: skip it)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--data-seed", type=int, default=0, help="the shapes dataset's seed")
    parser.add_argument("--base", type=Path, help="a base GPT trained without the concept (skips its training)")
    args = parser.parse_args()
    args.data, args.runs = relative_to_repo(args.data), relative_to_repo(args.runs)
    times = {}
    for name, command in stages(args):
        print(f"\n[concept] {name}: {' '.join(command[command[0] == sys.executable:])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command, cwd=REPO).returncode:
            raise SystemExit(f"[concept] the step '{name}' failed (its log is above)")
        times[name] = time.perf_counter() - start
    report = summary(args, times)
    (REPO / args.runs / "summary.md").write_text(report, encoding="utf-8")
    print("\n" + report)


if __name__ == "__main__":
    main()
