"""Small helpers the source modules share: finding files, reading id lists, TSVs and captions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from t2i.data.shards import IMAGE_EXTENSIONS, Row, Skip, TsvRef


@dataclass(frozen=True)
class MissingSplit:
    """A split `read_splits` could not convert (its file is not in the release, its captions do not
    cover it, ...): `convert` leaves it out, warns and names it with `reason` in the summary."""

    reason: str


@dataclass
class Prompts:
    """A split of texts without images (a test file `idx<TAB>text`): `convert` writes the texts as a
    prompts file, `<out>/prompts/<split>.txt` (one per line, for `eval.py task=generate
    prompts_file=...`), with their ids in the same order in `<split>.ids.txt`.

    `items` yields (id, text) pairs or Skips; `source` names the file read.
    """

    items: Iterable[tuple[str, str] | Skip]
    source: str


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


def find_file(folder: Path, option: str, what: str, names: list[str], patterns: list[str] = ()) -> Path:
    """`folder/name` for the first name present, else the one file matching a glob pattern.

    Raises FileNotFoundError (or ValueError when a pattern is ambiguous) naming `option`.
    """
    found = first_existing(folder, names)
    if found is not None:
        return found
    for pattern in patterns:
        matches = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(str(p.relative_to(folder)) for p in matches)
            raise ValueError(f"{what}: several candidates in {folder} ({listed}); keep one, or fix {option}")
    raise FileNotFoundError(f"{what}: none of {', '.join(names)} found in {folder}: check {option}")


def read_ids(path: Path) -> list[str]:
    """An id list, one id per line (blank lines ignored, order kept)."""
    return [line.strip() for line in read_lines(path)]


def strip_image_ext(name: str) -> str:
    """`1000268201_693b08cb0e.jpg` -> `1000268201_693b08cb0e` (other names unchanged)."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext.lower() in IMAGE_EXTENSIONS else name


@dataclass(frozen=True)
class Caption:
    text: str
    index: int


def read_captions(path: Path, clean=None) -> dict[str, list[Caption | Skip]]:
    """Captions files of `<image_id>#[tag#]<n><SEP>text` lines, SEP a tab or a space.

    Returns image id (image extension removed) -> its captions in file order. A line whose
    reference cannot be parsed becomes Skip("malformed_row") under the id it starts with, so it
    is counted in whichever split lists that id. `clean` post-processes the text.
    """
    captions: dict[str, list[Caption | Skip]] = {}
    for line in read_lines(path):
        ref, sep, text = _split_ref(line.lstrip())
        parts = ref.split("#")
        image_id = strip_image_ext(parts[0])
        if not sep or len(parts) < 2 or not parts[-1].isdigit():
            captions.setdefault(image_id, []).append(Skip("malformed_row", ref))
            continue
        captions.setdefault(image_id, []).append(Caption(clean(text) if clean else text, int(parts[-1])))
    return captions


def _split_ref(line: str) -> tuple[str, str, str]:
    """Split at the first tab or space: (reference, separator, text)."""
    cut = min((i for i in (line.find("\t"), line.find(" ")) if i >= 0), default=-1)
    if cut < 0:
        return line, "", ""
    return line[:cut], line[cut], line[cut + 1:]


def caption_rows(ids: list[str], captions: dict, image_for) -> Iterator[Row | Skip]:
    """Rows of one split: for each listed id, one Row per caption (file order).

    An id without any caption line is Skip("missing_caption"); `image_for(id)` gives the image
    (a Path that may not exist: the writer counts it as missing_image).
    """
    for image_id in ids:
        entries = captions.get(image_id)
        if not entries:
            yield Skip("missing_caption", image_id)
            continue
        image = image_for(image_id)
        for entry in entries:
            if isinstance(entry, Skip):
                yield entry
            else:
                yield Row(image_id, entry.text, image, {"caption_index": entry.index})
