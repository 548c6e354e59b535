"""Text-guided completion (CogView2's inpainting, outpainting and editing of a region) on a raster model: the
region as a mask on the code grid, the known codes of an image, and the choice among region candidates.

A region is given as a mask image (white = to be sampled; a grid cell is sampled when any of its pixels is
masked: `grid_mask_from_image`) or as a box [x0, y0, x1, y1] (x1, y1 exclusive) in code-grid cells or in pixels
(`grid_mask_from_box`); `region_mask` takes either. The image is encoded with the pipeline's VQGAN and its codes
outside the region are fed as they are while the region's are sampled with the text (`known_codes`;
T2IPipeline.complete runs it through the same path as T2IPipeline.sample).

The raster problem: a code is drawn from p(code | the codes before it, text), so the known codes that come after
the region in raster order (the rest of the region's rows, the rows below) cannot steer the region: a sampled
region may not fit what follows it. The remedy here (`following_codes_nll`, T2IPipeline.complete's
region_candidates=K): draw K candidates of the region and keep the one under which the model gives the known
codes after the region's first cell the highest likelihood, p(after | region, before, text), one teacher-forced
forward pass per candidate. The region's posterior given everything known is proportional to
p(region | before, text) * p(after | region, before, text); the candidates are draws from the first factor, so
keeping the one with the largest second factor leans towards that posterior (resampling the candidates in
proportion to it would sample it exactly as K grows; best-of-K takes its mode among them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from t2i.models.gpt import GPT

BOX_UNITS = ("codes", "pixels")  # what a box's numbers count: code-grid cells or image pixels


def read_image(path: str | Path, what: str = "image") -> np.ndarray:
    """An image file -> uint8 [H, W, 3] (RGB; transparency dropped)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what}={path}: no such file")
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def check_image(image, size: int) -> torch.Tensor:
    """An image as files and uploads give it, uint8 [H, W, 3] (numpy or torch), -> uint8 [3, size, size]; one of
    another size or layout is refused with what to do."""
    image = torch.from_numpy(np.array(image))  # a copy: a file's array is read-only
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"the image must be uint8 [height, width, 3] (RGB), got {image.dtype} {tuple(image.shape)}")
    if image.shape[:2] != (size, size):
        raise ValueError(f"the image is {image.shape[1]}x{image.shape[0]} pixels but this model's VQGAN reads "
                         f"{size}x{size}: resize (or crop) it to {size}x{size} first")
    return image.permute(2, 0, 1).contiguous()


def grid_mask_from_image(mask, grid: tuple[int, int], size: int) -> torch.Tensor:
    """A mask image (uint8 or bool [size, size] or [size, size, C]; white = to be sampled) -> bool [h, w] on the
    code grid: a cell is sampled when any of its pixels is masked (a pixel is masked at grey level >= 128)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., :3].mean(-1) if mask.dtype != bool else mask.any(-1)
    if mask.ndim != 2:
        raise ValueError(f"the mask must be an image [height, width] or [height, width, channels], got {mask.shape}")
    if mask.shape != (size, size):
        raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is {size}x{size}: "
                         f"draw the mask at the image's size")
    pixels = torch.as_tensor(mask >= 128 if mask.dtype != bool else mask)
    h, w = grid
    return pixels.view(h, size // h, w, size // w).any(3).any(1)


def grid_mask_from_box(box: Sequence[float], grid: tuple[int, int], size: int, units: str) -> torch.Tensor:
    """A box [x0, y0, x1, y1] (x1, y1 exclusive; x across, y down) in code-grid cells (`units="codes"`, integers)
    or in pixels (`units="pixels"`: every cell the box touches) -> bool [h, w] on the code grid."""
    if units not in BOX_UNITS:
        raise ValueError(f"box_units must be one of {', '.join(BOX_UNITS)} (what the box's numbers count), "
                         f"got {units!r}")
    box = list(box)
    if len(box) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {box}")
    h, w = grid
    x0, y0, x1, y1 = box
    width, height = (w, h) if units == "codes" else (size, size)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box={box} is not a box inside the image: it needs 0 <= x0 < x1 <= {width} and "
                         f"0 <= y0 < y1 <= {height} ({units}; x1 and y1 exclusive)")
    if units == "codes":
        if any(value != int(value) for value in box):
            raise ValueError(f"box={box} in codes must be whole cells (or pass box_units=pixels)")
        cells = [int(value) for value in box]
    else:  # the cells any pixel of the box falls in
        cell = size // w
        cells = [int(x0 // cell), int(y0 // cell), -int(-x1 // cell), -int(-y1 // cell)]
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[cells[1]:cells[3], cells[0]:cells[2]] = True
    return mask


def region_mask(grid: tuple[int, int], size: int, mask=None, box: Sequence[float] | None = None,
                box_units: str | None = None) -> torch.Tensor:
    """The region to sample as bool [h, w] on the code grid, from a mask image or a box (exactly one of them);
    a region of no cell is refused."""
    if (mask is None) == (box is None):
        raise ValueError("give the region to complete as a mask image (mask=) or a box (box=[x0,y0,x1,y1] with "
                         "box_units=codes|pixels), one of them")
    if box is not None and box_units is None:
        raise ValueError(f"say what box={list(box)} counts: box_units=codes (code-grid cells) or box_units=pixels")
    cells = grid_mask_from_image(mask, grid, size) if mask is not None else \
        grid_mask_from_box(box, grid, size, box_units)
    if not cells.any():
        raise ValueError("the mask covers nothing of the image: paint the region to complete white (any other "
                         "colour is kept)")
    return cells


def known_codes(codes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """An image's codes [N, h, w] and its region [N, h, w] (True: to be sampled) -> known codes [N, h, w], -1 in the
    region (what generate_codes(known=...) takes)."""
    if codes.shape != masks.shape:
        raise ValueError(f"codes {tuple(codes.shape)} and region masks {tuple(masks.shape)} differ in shape")
    return codes.masked_fill(masks.to(codes.device), -1)


@torch.no_grad()
def following_codes_nll(model: GPT, text: torch.Tensor, codes: torch.Tensor, masks: torch.Tensor,
                        batch_size: int = 64) -> torch.Tensor:
    """Per sequence, the mean negative log-likelihood under `model` (conditional, no guidance) of the known codes
    that follow the region's first cell in raster order, given the text and everything before them: text ids
    [N, text_len], completed codes [N, h, w], regions [N, h, w] -> [N] (0 where no known code follows).
    Candidates of one image share their region, so the lowest value is the candidate the after-codes prefer."""
    layout, image_len = model.layout, model.cfg.image_len
    codes, masks = codes.flatten(1), masks.flatten(1).to(codes.device)
    first = masks.float().argmax(1)  # the region's first cell in raster order
    following = (torch.arange(image_len, device=codes.device)[None] > first[:, None]) & ~masks
    out = []
    for chunk in range(0, len(codes), batch_size):
        rows = slice(chunk, chunk + batch_size)
        sequence = layout.text_to_image(text[rows].to(codes.device), codes[rows])
        logits = model(sequence[:, :-1], last=image_len, head_rows=layout.n_image_codes)  # logits[:, j] predicts code j
        nll = F.cross_entropy(logits.float().transpose(1, 2), codes[rows], reduction="none")
        counted = following[rows]
        out.append((nll * counted).sum(1) / counted.sum(1).clamp(min=1))
    return torch.cat(out)
