"""Image grids with their captions drawn on them, in a font that covers Chinese.

t2i ships no font file: a CJK font comes from a package the machine has (Debian's fonts-noto-cjk or
fonts-wqy-microhei; `make test` installs the latter as root), found through fontconfig or at its
usual path. Without one the captions that need it are left off the picture and `find_cjk_font` says
what to install; `save_captioned_grid` always writes them beside the picture as text too.

`save_captioned_grid` is the one grid writer: evaluation grids, training grids, task=generate, super-resolution.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

# where Debian's packages put their CJK fonts (the first found wins when fontconfig is absent)
KNOWN_CJK_FONTS = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",  # fonts-noto-cjk
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",  # fonts-wqy-microhei
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",  # fonts-wqy-zenhei
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",  # fonts-droid-fallback
    "/usr/share/fonts/truetype/arphic/uming.ttc",  # fonts-arphic-uming
)
FONT_HINT = "install a CJK font package (apt-get install fonts-noto-cjk or fonts-wqy-microhei) or give its path"


@functools.lru_cache(maxsize=None)
def find_cjk_font(path: str | None = None) -> str | None:
    """A font file that draws Chinese: `path` when given (it must exist), else one fontconfig lists
    for Chinese (sans-serif first), else one of KNOWN_CJK_FONTS; None when the machine has none."""
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"font {path} not found: {FONT_HINT}")
        return str(path)
    if shutil.which("fc-list"):
        listed = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=30).stdout
        files = sorted({line.split(":")[0].strip() for line in listed.splitlines() if line.strip()})
        files = [f for f in files if Path(f).is_file()]
        # sans-serif regular weights read best at small sizes
        files.sort(key=lambda f: ("Serif" in f, "Bold" in f or "Light" in f or "Black" in f, f))
        if files:
            return files[0]
    return next((f for f in KNOWN_CJK_FONTS if Path(f).is_file()), None)


def _fits(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """`text` broken into lines no wider than `width` pixels (character by character: Chinese has no spaces)."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for char in paragraph:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
        lines.append(line)
    return lines


def captioned_grid(images: torch.Tensor, captions: list[str], per_row: int, font_path: str | None = None,
                   min_cell: int = 128, padding: int = 4, font_size: int = 16) -> tuple[Image.Image, bool]:
    """uint8 images [N, 3, H, W], a row of `per_row` images per caption -> (the grid, captions drawn).

    Each row is headed by its caption, wrapped to the grid's width. Images smaller than `min_cell`
    pixels are enlarged by a whole factor (nearest neighbour: the pixels stay as generated).
    `font_path`: a font that covers the captions' characters (find_cjk_font()); None: only captions
    in plain ASCII are drawn (Pillow's built-in font), the others are left off and the second
    value is False.
    """
    n, _, h, w = images.shape
    rows = -(-n // per_row)
    if len(captions) != rows:
        raise ValueError(f"{len(captions)} captions for {rows} rows of {per_row} images")
    scale = max(1, -(-min_cell // max(h, w)))
    cell_h, cell_w = h * scale, w * scale
    width = per_row * cell_w + (per_row + 1) * padding
    font = ImageFont.truetype(font_path, font_size) if font_path else ImageFont.load_default(font_size)
    drawn = True
    texts = []
    for caption in captions:
        if font_path is None and not caption.isascii():
            drawn = False
            caption = ""
        texts.append(_fits(caption, font, width - 2 * padding))
    line_h = font_size + 4
    heights = [len(lines) * line_h + padding + cell_h + padding for lines in texts]
    grid = Image.new("RGB", (width, padding + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    pixels = images.permute(0, 2, 3, 1).cpu().numpy()
    y = padding
    for row, lines in enumerate(texts):
        for line in lines:
            draw.text((padding, y), line, fill="black", font=font)
            y += line_h
        y += padding
        for col in range(per_row):
            index = row * per_row + col
            if index < n:
                cell = Image.fromarray(pixels[index]).resize((cell_w, cell_h), Image.NEAREST)
                grid.paste(cell, (padding + col * (cell_w + padding), y))
        y += cell_h + padding
    return grid, drawn



def save_captioned_grid(images: torch.Tensor, captions: list[str], path: str | Path, per_row: int,
                        font_path: str | None = None) -> Path:
    """A PNG grid of uint8 images [N, 3, H, W], a row of `per_row` images under each caption (drawn in
    `font_path`, else in the CJK font find_cjk_font() finds; without one only ASCII captions are drawn), and
    beside it `<name>.md` with the captions, which is there whatever the machine's fonts. Returns the PNG's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid, _ = captioned_grid(images, captions, per_row, font_path or find_cjk_font())
    grid.save(path)
    path.with_suffix(".md").write_text(
        f"![samples]({path.name})\n\nRows, top to bottom:\n\n" + "".join(f"{i + 1}. {c}\n" for i, c in enumerate(captions)),
        encoding="utf-8")
    return path
