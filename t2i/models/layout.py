"""The token layout: which id means what, and which position holds what, in one place.

One vocabulary per model, image codes first: [image codes | text ids | special tokens]. A text
id is the tokenizer's id + n_image_codes, padding (tokenizer id 0) included, so the null text of
classifier-free guidance is all padding. Two conventions:

    t2i (default, CogView's):
        text to image:  [T2I] text (text_len, padded) [BOI] codes (image_len)
        image to text:  [I2T] codes [BOT] text        (captioning: Caption Loss, reranking)
        the output head covers the whole vocabulary (text is predicted too: CogView's text loss)

    paipainter (EasyNLP's pai-painter):
        text to image:  text (text_len, [PAD]-padded) codes
        no special tokens, no image-to-text direction; the head covers the image codes only, and
        the last text position predicts the first code

    superres (CogView's super-resolution model, same VQGAN at two sizes):
        [SR] text [LOW] low-res codes (low_len) [WIN_k] high-res window codes (image_len)
        the low-res codes are the whole low grid or those under the window (SuperresGrid.context);
        the high-res codes are one window of the 2x grid, and [WIN_k] (one token per window
        position, `windows` of them) says which; image_len = one window (the whole 2x grid when
        windows == 1). Only the window's codes (and, with a text loss,
        the text) are targets: the low-res codes are given, the text-to-image model makes them.
        SuperresGrid below says where each window sits on the grid.

Everything that builds or reads a sequence (the training stage, the sampler, Caption Loss, the
pai-painter interop) asks a TokenLayout, so they never disagree about what a position means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUTS = ("t2i", "paipainter", "superres")
SPECIAL_TOKENS = ("T2I", "I2T", "BOI", "BOT")  # t2i only
SUPERRES_TOKENS = ("SR", "LOW")  # superres: then WIN0 .. WIN{windows - 1}


@dataclass(frozen=True)
class TokenLayout:
    kind: str
    n_image_codes: int
    n_text_tokens: int
    text_len: int
    image_len: int
    low_len: int = 0  # superres: the low-resolution codes before the window
    windows: int = 1  # superres: window positions on the high-resolution grid (one [WIN_k] token each)

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"model.layout must be one of {LAYOUTS}, got {self.kind!r}")
        if self.kind == "superres" and (self.low_len < 1 or self.windows < 1):
            raise ValueError(f"a superres layout needs low_len >= 1 and windows >= 1, got {self.low_len}, {self.windows}")
        if self.kind != "superres" and (self.low_len or self.windows != 1):
            raise ValueError(f"low_len and windows are superres settings; the {self.kind} layout takes none")

    # -- id ranges -----------------------------------------------------------------------------

    @property
    def text_offset(self) -> int:
        return self.n_image_codes

    @property
    def specials(self) -> tuple[str, ...]:
        if self.kind == "superres":
            return SUPERRES_TOKENS + tuple(f"WIN{k}" for k in range(self.windows))
        return SPECIAL_TOKENS if self.kind == "t2i" else ()

    def special(self, name: str) -> int:
        if name not in self.specials:
            raise ValueError(f"the {self.kind} layout has no [{name}] token")
        return self.n_image_codes + self.n_text_tokens + self.specials.index(name)

    @property
    def vocab_size(self) -> int:
        return self.n_image_codes + self.n_text_tokens + len(self.specials)

    @property
    def head_size(self) -> int:
        """Rows of the output head: the whole vocabulary, or (pai-painter) the image codes only."""
        return self.n_image_codes if self.kind == "paipainter" else self.vocab_size

    @property
    def predicts_text(self) -> bool:
        """Whether the head scores text ids: needed for a text loss (and, t2i, captioning and Caption Loss)."""
        return self.kind != "paipainter"

    @property
    def captions(self) -> bool:
        """Whether the layout has the image-to-text direction (captioning, Caption Loss, reranking)."""
        return self.kind == "t2i"

    # -- positions -----------------------------------------------------------------------------

    @property
    def prefix_len(self) -> int:
        """Positions before the first image code (superres: the first code of the high-resolution window)."""
        if self.kind == "superres":
            return self.text_len + self.low_len + 3
        return self.text_len + (2 if self.kind == "t2i" else 0)

    @property
    def block_size(self) -> int:
        return self.prefix_len + self.image_len

    def rotary_coordinates(self, caption: bool, two_d: bool) -> torch.Tensor:
        """Each position's rotary coordinates [block_size, 2] (long), for one direction of sequence.

        1-D (RoPE): (i, i), the index. 2-D (LlamaGen's image RoPE): an image code at grid (r, c) gets
        (s + r, s + c), s its sequence's first image index, and the other positions count on past the
        grid from where they sit, (i, i) before the image and (i + h - n, i + w - n) after it (n = h * w):
        text and specials stay 1-D, the image is 2-D, and nothing overlaps.
        """
        index = torch.arange(self.block_size)
        if not two_d:
            return torch.stack([index, index], 1)
        if self.kind == "superres":
            raise ValueError("model.pos=rope2d is for one image grid; a superres sequence holds two (use learned or rope)")
        side = math.isqrt(self.image_len)
        if side * side != self.image_len:
            raise ValueError(f"model.pos=rope2d needs a square code grid, got image_len={self.image_len}")
        start = 1 if caption else self.prefix_len  # the first image code's index
        code = (index - start).clamp(0, self.image_len - 1)
        grid = torch.stack([start + code // side, start + code % side], 1)
        after = torch.stack([index - self.image_len + side] * 2, 1)
        coords = torch.where((index < start)[:, None], torch.stack([index, index], 1), after)
        image = (index >= start) & (index < start + self.image_len)
        return torch.where(image[:, None], grid, coords)

    def caption_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which rows [B] of whole sequences [B, T] are image-to-text ones (their first token)."""
        if not self.captions:
            return torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        return tokens[:, 0] == self.special("I2T")

    # -- sequences -----------------------------------------------------------------------------

    def _text_ids(self, text: torch.Tensor) -> torch.Tensor:
        if text.dim() != 2 or text.shape[1] != self.text_len:
            raise ValueError(f"text ids must be [batch, text_len={self.text_len}], got {tuple(text.shape)}")
        return text + self.text_offset

    def null_text(self, text: torch.Tensor) -> torch.Tensor:
        """All padding, shaped like `text` (tokenizer ids): the unconditional input of guidance."""
        return torch.zeros_like(text)

    def prefix(self, text: torch.Tensor, low: torch.Tensor | None = None,
               window: int | torch.Tensor = 0) -> torch.Tensor:
        """Tokenizer ids [B, text_len] (0 = padding) -> what precedes the image codes [B, prefix_len].

        superres: also the low-resolution codes `low` [B, low_len] (or [B, h, w]) and which window
        follows (an int, or one per row [B])."""
        ids = self._text_ids(text)
        if self.kind == "paipainter":
            return ids
        b = len(ids)
        if self.kind == "superres":
            if low is None or low.flatten(1).shape != (b, self.low_len):
                raise ValueError(f"a superres sequence needs low-resolution codes [batch={b}, low_len={self.low_len}], "
                                 f"got {None if low is None else tuple(low.shape)}")
            window = torch.as_tensor(window, device=ids.device).expand(b)
            if window.min() < 0 or window.max() >= self.windows:
                raise ValueError(f"window index out of range 0..{self.windows - 1}: {window.tolist()}")
            return torch.cat([ids.new_full((b, 1), self.special("SR")), ids, ids.new_full((b, 1), self.special("LOW")),
                              low.flatten(1), (self.special("WIN0") + window)[:, None]], 1)
        if low is not None:
            raise ValueError(f"low-resolution codes are for a superres layout, not {self.kind}")
        return torch.cat([ids.new_full((b, 1), self.special("T2I")), ids, ids.new_full((b, 1), self.special("BOI"))], 1)

    def text_to_image(self, text: torch.Tensor, codes: torch.Tensor, low: torch.Tensor | None = None,
                      window: int | torch.Tensor = 0) -> torch.Tensor:
        """Text ids [B, text_len] and codes [B, image_len] (superres: + low codes, window) -> [B, block_size]."""
        return torch.cat([self.prefix(text, low, window), codes.flatten(1)], 1)

    def caption_prefix(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, image_len] (or [B, h, w]) -> `[I2T] codes [BOT]` [B, image_len + 2]: what precedes
        a caption (t2i layout only)."""
        if not self.captions:
            raise ValueError(f"the {self.kind} layout has no image-to-text direction: "
                             "captioning and Caption Loss need a t2i-layout model")
        codes = codes.flatten(1)
        if codes.shape[1] != self.image_len:
            raise ValueError(f"image codes must be [batch, image_len={self.image_len}], got {tuple(codes.shape)}")
        b = len(codes)
        return torch.cat([codes.new_full((b, 1), self.special("I2T")), codes,
                          codes.new_full((b, 1), self.special("BOT"))], 1)

    def image_to_text(self, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Codes and text ids -> `[I2T] codes [BOT] text` [B, block_size] (t2i layout only)."""
        return torch.cat([self.caption_prefix(codes), self._text_ids(text)], 1)

    # -- what the loss reads -------------------------------------------------------------------

    def image_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Where a target is an image code (it competes among the image codes only); targets [B, T] are the
        sequences shifted by one. superres: the window's codes only (the low-resolution codes are given)."""
        codes = targets < self.n_image_codes
        if self.kind == "superres":
            window = torch.arange(targets.shape[-1], device=targets.device) >= self.prefix_len - 1
            codes = codes & window
        return codes

    def text_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Where a target is a real text id, padding excluded (it competes among the text ids only)."""
        return (targets > self.text_offset) & (targets < self.text_offset + self.n_text_tokens)

    @property
    def text_rows(self) -> slice:
        """The head's rows (vocabulary ids) of the text ids, padding (tokenizer id 0) first."""
        return slice(self.text_offset, self.text_offset + self.n_text_tokens)

    def caption_end_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Where a target is the end of a caption: the first padding after the text of an image-to-text
        row (targets [B, block_size - 1], the sequences shifted by one). Learning it lets captioning stop
        there. A caption that fills text_len has no end, and an empty text (the null text) none either."""
        ends = torch.zeros_like(targets, dtype=torch.bool)
        if not self.captions:
            return ends
        text = targets[:, self.image_len + 1:]  # after codes and [BOT]; in a text-to-image row, anything
        caption = targets[:, self.image_len] == self.special("BOT")  # only image-to-text rows have [BOT] there
        padding = text == self.text_offset
        first = padding & (padding.cumsum(1) == 1) & ~padding[:, :1]  # not at the start: an empty text
        ends[:, self.image_len + 1:] = first & caption[:, None]
        return ends

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., : self.n_image_codes]

    def text_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.predicts_text:
            raise ValueError(f"the {self.kind} layout's head scores image codes only")
        return logits[..., self.text_rows]


@dataclass(frozen=True)
class SuperresGrid:
    """Where a superres model's windows sit, in codes: the low-resolution grid, the 2x grid, the window
    and the stride between windows (CogView's sliding windows: 32x32 windows at stride 16 on a 64x64
    grid; one window covering the whole grid is one pass). Windows are numbered in raster order of
    their top-left corners, which is also the order the sampler fills them in.

    `context`: which low-resolution codes a window's sequence holds: "whole" (the whole low grid, as
    CogView's training sequences) or "window" (only the low codes under the window, as CogView's
    magnify step feeds them: a shorter sequence, and the same low-to-high mapping in every window)."""

    low: tuple[int, int]
    high: tuple[int, int]
    window: tuple[int, int]
    stride: tuple[int, int]
    context: str = "whole"

    def __post_init__(self):
        for name in ("low", "high", "window", "stride"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"superres.{name} must be two positive sizes [h, w], got {getattr(self, name)}")
            object.__setattr__(self, name, value)
        if self.context not in ("whole", "window"):
            raise ValueError(f"superres.context must be whole or window, got {self.context!r}")
        for axis, label in ((0, "rows"), (1, "columns")):
            high, window, stride = self.high[axis], self.window[axis], self.stride[axis]
            if window > high:
                raise ValueError(f"superres.window {self.window} is larger than the high-resolution grid {self.high}")
            if stride > window or (high - window) % stride:
                raise ValueError(f"superres.stride {self.stride} must tile the {label} of the {self.high} grid with "
                                 f"{self.window} windows without gaps: stride <= window and (grid - window) a "
                                 "multiple of the stride")
            if self.context == "window" and (high % self.low[axis] or window * self.low[axis] % high
                                             or stride * self.low[axis] % high):
                raise ValueError(f"superres.context=window needs windows and strides that fall on whole low-resolution "
                                 f"codes: {self.window} and {self.stride} on {self.high} over {self.low}")

    @property
    def low_window(self) -> tuple[int, int]:
        """The low-resolution codes a window's sequence holds: the whole grid, or those under the window."""
        if self.context == "whole":
            return self.low
        return tuple(self.window[a] * self.low[a] // self.high[a] for a in (0, 1))

    @property
    def low_len(self) -> int:
        return self.low_window[0] * self.low_window[1]

    def low_context(self, low: torch.Tensor, window: int | torch.Tensor) -> torch.Tensor:
        """Low-resolution grids [B, h, w] -> the codes window(s) `window` read [B, low_len] (raster order)."""
        if self.context == "whole":
            return low.flatten(1)
        scale = [self.high[a] // self.low[a] for a in (0, 1)]
        offsets = torch.tensor(self.offsets, device=low.device)[torch.as_tensor(window, device=low.device).reshape(-1)]
        r, c = torch.meshgrid(torch.arange(self.low_window[0], device=low.device),
                              torch.arange(self.low_window[1], device=low.device), indexing="ij")
        rows, cols = offsets[:, :1] // scale[0] + r.flatten(), offsets[:, 1:] // scale[1] + c.flatten()
        return low[torch.arange(len(low), device=low.device)[:, None], rows, cols]

    @property
    def window_len(self) -> int:
        return self.window[0] * self.window[1]

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """Each window's top-left corner on the high-resolution grid, in raster order."""
        rows = range(0, self.high[0] - self.window[0] + 1, self.stride[0])
        cols = range(0, self.high[1] - self.window[1] + 1, self.stride[1])
        return [(r, c) for r in rows for c in cols]

    @property
    def windows(self) -> int:
        return len(self.offsets)

    def window_index(self, window: int | torch.Tensor, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, columns) [B or 1, window_len] of the high-resolution cells of window(s) `window`."""
        offsets = torch.tensor(self.offsets, device=device)[torch.as_tensor(window, device=device).reshape(-1)]
        r, c = torch.meshgrid(torch.arange(self.window[0], device=device), torch.arange(self.window[1], device=device),
                              indexing="ij")
        return offsets[:, :1] + r.flatten(), offsets[:, 1:] + c.flatten()

    def crop(self, high: torch.Tensor, window: int | torch.Tensor) -> torch.Tensor:
        """High-resolution grids [B, H, W] -> window `window`'s codes [B, window_len] in raster order
        (`window` an int, or one per row [B])."""
        rows, cols = self.window_index(window, high.device)
        return high[torch.arange(len(high), device=high.device)[:, None], rows, cols]

    def paste(self, high: torch.Tensor, window: int, codes: torch.Tensor) -> None:
        """Write window `window`'s codes [B, window_len] into the grids high [B, H, W] (in place)."""
        rows, cols = self.window_index(window, high.device)
        high[:, rows[0], cols[0]] = codes

    def to_dict(self) -> dict:
        return {**{name: list(getattr(self, name)) for name in ("low", "high", "window", "stride")},
                "context": self.context}
