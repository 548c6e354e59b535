"""EasyNLP text-to-image TSV files (what pai-painter users already have).

Raw layout: one file per split, lines `idx<TAB>text<TAB>imgbase64`, e.g.
`MUGE_train_text_imgbase64.tsv`, `MUGE_val_text_imgbase64.tsv`. Files in `--src` are assigned
to a split by name (`*train*`, `*val*`/`*valid*`, `*test*`); `--train/--val/--test FILE` name
them explicitly (and win over the folder). Images stay on disk: rows point at their line.
"""

from __future__ import annotations

from pathlib import Path

from t2i.data.convert.common import require_dir
from t2i.data.shards import Row, Skip, TsvRef

DESCRIPTION = "EasyNLP TSV"
SPLITS = ("train", "val", "test")
NAME_PATTERNS = {"train": ("train",), "val": ("val",), "test": ("test",)}  # "val" also matches "valid"


def add_arguments(parser):
    parser.add_argument("--src", help="folder with *train*.tsv, *val*.tsv, *test*.tsv files")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=Path, help=f"the {split} TSV file (instead of finding it in --src)")


def read_splits(args) -> dict:
    files = _files_in_folder(require_dir(args.src)) if args.src is not None else {}
    for split in SPLITS:
        path = getattr(args, split, None)
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"--{split} {path} is not a file")
            files[split] = Path(path)
    if not files:
        where = f"in {args.src} (--src)" if args.src is not None else "(give --src or --train/--val/--test)"
        raise FileNotFoundError(f"EasyNLP: no *train*/*val*/*test* .tsv file found {where}")
    return {split: _rows(files[split]) for split in SPLITS if split in files}


def _files_in_folder(src: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(src.glob("*.tsv")):
        stem = path.stem.lower()
        matches = [s for s in SPLITS if any(p in stem for p in NAME_PATTERNS[s])]
        if len(matches) > 1:
            raise ValueError(f"{path.name} matches splits {matches}: name the files with --train/--val/--test")
        if matches:
            split = matches[0]
            if split in files:
                raise ValueError(f"both {files[split].name} and {path.name} look like the {split} split "
                                 f"in {src}: name the file with --{split}")
            files[split] = path
    return files


def _rows(path: Path):
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            first = line.find(b"\t")
            second = line.find(b"\t", first + 1) if first >= 0 else -1
            idx = line[:first] if first >= 0 else line[:40]
            idx = idx.decode("utf-8", errors="replace").lstrip("\ufeff").strip()
            if second < 0:
                yield Skip("malformed_row", idx)
                continue
            text = line[first + 1:second].decode("utf-8", errors="replace")
            yield Row(idx, text, TsvRef(str(path), start, column=2))  # the image stays in the file
