"""EasyNLP text-to-image TSV files (what pai-painter users already have).

Raw layout: one file per split, lines `idx<TAB>text<TAB>imgbase64`, e.g.
`MUGE_train_text_imgbase64.tsv`, `MUGE_val_text_imgbase64.tsv` (the painter tutorial) or
`T2I_train.txt`, `T2I_val.txt` (the artist tutorial). Files in `--src` ending in `.tsv` or `.txt`
are assigned to a split by name (`*train*`, `*val*`/`*valid*`, `*test*`; other names are not
read); `--train/--val/--test FILE` name them explicitly (and win over the folder). Images stay
on disk: rows point at their line.

A text-only file, lines `idx<TAB>text` (the tutorials' test files `MUGE_test.text.tsv`,
`T2I_test.txt`), holds prompts without images: it is written as `<out>/prompts/<split>.txt`, one
prompt per line for `eval.py task=generate prompts_file=...`, with the ids line for line in
`<out>/prompts/<split>.ids.txt`, instead of a split of shards.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path

from t2i.data.convert.common import Prompts, require_dir
from t2i.data.shards import Row, Skip, TsvRef

DESCRIPTION = "EasyNLP TSV"
SPLITS = ("train", "val", "test")
NAME_PATTERNS = {"train": ("train",), "val": ("val",), "test": ("test",)}  # "val" also matches "valid"
EXTENSIONS = ("*.tsv", "*.txt")
SNIFF_LINES = 100  # lines read to tell a text-only file from one with images


def add_arguments(parser):
    parser.add_argument("--src", help="folder with *train*, *val*, *test* .tsv/.txt files")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=Path,
                            help=f"the {split} file (instead of finding it in --src); idx<TAB>text only: prompts")


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
        raise FileNotFoundError(f"EasyNLP: no *train*/*val*/*test* .tsv or .txt file found {where}")
    return {split: Prompts(_prompts(files[split]), str(files[split])) if text_only(files[split])
            else _rows(files[split]) for split in SPLITS if split in files}


def _files_in_folder(src: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted({p for pattern in EXTENSIONS for p in src.glob(pattern) if p.is_file()}):
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


def _lines(path: Path):
    """(byte offset, line) of every non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if line.strip():
                yield start, line.rstrip(b"\r\n")


def text_only(path: Path) -> bool:
    """Whether a file holds `idx<TAB>text` lines (no image field) in its first lines."""
    fields = [line.count(b"\t") + 1 for _, line in islice(_lines(path), SNIFF_LINES)]
    return bool(fields) and max(fields) == 2


def _idx(line: bytes, first: int) -> str:
    idx = line[:first] if first >= 0 else line[:40]
    return idx.decode("utf-8", errors="replace").lstrip("\ufeff").strip()


def _rows(path: Path):
    for start, line in _lines(path):
        first = line.find(b"\t")
        second = line.find(b"\t", first + 1) if first >= 0 else -1
        if second < 0:
            yield Skip("malformed_row", _idx(line, first))
            continue
        text = line[first + 1:second].decode("utf-8", errors="replace")
        yield Row(_idx(line, first), text, TsvRef(str(path), start, column=2))  # the image stays in the file


def _prompts(path: Path):
    for _, line in _lines(path):
        fields = line.split(b"\t")
        if len(fields) != 2:
            yield Skip("malformed_row", _idx(line, line.find(b"\t")))
            continue
        yield _idx(line, len(fields[0])), fields[1].decode("utf-8", errors="replace")
