"""The paper-style table from eval.py results: one row per model (plain and reranked), one column
group per dataset (FID, IS, Caption Loss, and where evaluated the Chinese-CLIP score and R-precision,
with the real images' row as the reference).

    python experiments/paper_table.py logs/eval/*/*/results.json [--out table.md]

Rows are named by each run's `name` (eval.py name=..., default the checkpoint's run folder);
columns follow COCO-CN, MUGE, Flickr8k-CN, Flickr30k-CN, then any other dataset evaluated. A
missing cell (a model not evaluated on a dataset, or a metric it could not compute) is "-". The CLIP
columns appear when some result has them; compare them only between runs scored by one CLIP model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DATASETS = {"coco_cn": "COCO-CN", "muge": "MUGE", "flickr8k_cn": "Flickr8k-CN", "flickr30k_cn": "Flickr30k-CN"}
METRICS = (("fid", "FID↓", "{:.1f}"), ("is_mean", "IS↑", "{:.2f}"), ("caption_loss", "CapLoss↓", "{:.3f}"))
CLIP_METRICS = (("clip_score", "CLIP↑", "{:.2f}"), ("r_precision", "R-prec↑", "{:.3f}"))  # when evaluated
REAL = "real images"  # the reference row: the CLIP metrics of the split's own images


def rows_of(results: dict) -> dict[str, dict]:
    """{row name: metrics} for one results.json: the plain set, and each reranked set."""
    name = results["name"]
    rows = {name: results["plain"]}
    by = " by CLIP" if results.get("reranked_by") == "clip_score" else ""
    for key, metrics in results.items():
        if key.startswith("rerank_"):
            rows[f"{name} + rerank {key.split('_')[1]}{by}"] = metrics
    return rows


def table(files: list[Path]) -> str:
    cells: dict[str, dict[str, dict]] = {}  # row -> dataset -> metrics
    datasets: list[str] = []
    for path in files:
        results = json.loads(path.read_text(encoding="utf-8"))
        if results.get("task") != "t2i":
            raise SystemExit(f"{path} is not a text-to-image evaluation (task={results.get('task')})")
        if results["data"] not in datasets:
            datasets.append(results["data"])
        for row, metrics in rows_of(results).items():
            if results["data"] in cells.setdefault(row, {}):
                raise SystemExit(f"{path}: a second result for {row} on {results['data']}; name the runs apart "
                                 "(eval.py name=...)")
            cells[row][results["data"]] = metrics
        if "real" in results:  # the same for every model evaluated on the same prompts with the same CLIP
            known = cells.setdefault(REAL, {}).setdefault(results["data"], results["real"])
            if known != results["real"]:
                print(f"{path}: its real-image CLIP row differs from an earlier file's on {results['data']} (other "
                      "prompts or another CLIP model); the table keeps the first", file=sys.stderr)
    order = [d for d in DATASETS if d in datasets] + [d for d in datasets if d not in DATASETS]
    evaluated = {metric for by_dataset in cells.values() for metrics in by_dataset.values() for metric in metrics}
    metrics_shown = METRICS + tuple(m for m in CLIP_METRICS if m[0] in evaluated)
    if REAL in cells:  # the reference row last
        cells[REAL] = cells.pop(REAL)
    header = ["model"] + [f"{DATASETS.get(d, d)} {label}" for d in order for _, label, _ in metrics_shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, by_dataset in cells.items():
        values = [row]
        for dataset in order:
            metrics = by_dataset.get(dataset, {})
            values += [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in metrics_shown]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="results.json files written by eval.py")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    text = table(args.results)
    print(text, end="")
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
