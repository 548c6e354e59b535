"""The paper-style table from eval.py results: one row per model (plain and reranked), one column
group per dataset (FID, IS, Caption Loss).

    python experiments/paper_table.py logs/eval/*/*/results.json [--out table.md]

Rows are named by each run's `name` (eval.py name=..., default the checkpoint's run folder);
columns follow COCO-CN, MUGE, Flickr8k-CN, Flickr30k-CN, then any other dataset evaluated. A
missing cell (a model not evaluated on a dataset, or a metric it could not compute) is "-".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATASETS = {"coco_cn": "COCO-CN", "muge": "MUGE", "flickr8k_cn": "Flickr8k-CN", "flickr30k_cn": "Flickr30k-CN"}
METRICS = (("fid", "FID↓", "{:.1f}"), ("is_mean", "IS↑", "{:.2f}"), ("caption_loss", "CapLoss↓", "{:.3f}"))


def rows_of(results: dict) -> dict[str, dict]:
    """{row name: metrics} for one results.json: the plain set, and each reranked set."""
    name = results["name"]
    rows = {name: results["plain"]}
    for key, metrics in results.items():
        if key.startswith("rerank_"):
            rows[f"{name} + rerank {key.split('_')[1]}"] = metrics
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
    order = [d for d in DATASETS if d in datasets] + [d for d in datasets if d not in DATASETS]
    header = ["model"] + [f"{DATASETS.get(d, d)} {label}" for d in order for _, label, _ in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, by_dataset in cells.items():
        values = [row]
        for dataset in order:
            metrics = by_dataset.get(dataset, {})
            values += [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in METRICS]
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
