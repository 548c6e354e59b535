"""Small helpers the source modules share: finding files, reading id lists and TSVs."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from t2i.data.shards import TsvRef


def require_dir(path: str | Path | None, option: str = "--src") -> Path:
    if path is None:
        raise ValueError(f"{option} is required")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{option} {path} is not a folder: point {option} at the unpacked release")
    return path


def first_existing(folder: Path, names: list[str]) -> Path | None:
    """The first of `names` present in `folder` (releases name the same file differently)."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def read_lines(path: Path) -> Iterator[str]:
    """Non-blank lines without their line ending (a last line without newline included)."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def index_tsv(path: Path, column: int = 1) -> dict[str, TsvRef]:
    """Map the first field of each line to a reference of that line's image field.

    Only byte offsets are kept, so a many-GB image TSV costs a few MB of memory.
    """
    index: dict[str, TsvRef] = {}
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            key = line.split(b"\t", 1)[0].strip().decode("utf-8", errors="replace")
            if key and key not in index:
                index[key] = TsvRef(str(path), offset, column)
            offset += len(line)
    return index
