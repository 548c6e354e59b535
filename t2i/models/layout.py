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

Everything that builds or reads a sequence (the training stage, the sampler, Caption Loss, the
pai-painter interop) asks a TokenLayout, so they never disagree about what a position means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUTS = ("t2i", "paipainter")
SPECIAL_TOKENS = ("T2I", "I2T", "BOI", "BOT")  # t2i only


@dataclass(frozen=True)
class TokenLayout:
    kind: str
    n_image_codes: int
    n_text_tokens: int
    text_len: int
    image_len: int

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError(f"model.layout must be one of {LAYOUTS}, got {self.kind!r}")

    # -- id ranges -----------------------------------------------------------------------------

    @property
    def text_offset(self) -> int:
        return self.n_image_codes

    @property
    def specials(self) -> tuple[str, ...]:
        return SPECIAL_TOKENS if self.kind == "t2i" else ()

    def special(self, name: str) -> int:
        if name not in self.specials:
            raise ValueError(f"the {self.kind} layout has no [{name}] token")
        return self.n_image_codes + self.n_text_tokens + SPECIAL_TOKENS.index(name)

    @property
    def vocab_size(self) -> int:
        return self.n_image_codes + self.n_text_tokens + len(self.specials)

    @property
    def head_size(self) -> int:
        """Rows of the output head: the whole vocabulary, or (pai-painter) the image codes only."""
        return self.vocab_size if self.kind == "t2i" else self.n_image_codes

    @property
    def predicts_text(self) -> bool:
        """Whether the head scores text ids: needed for a text loss, captioning and Caption Loss."""
        return self.kind == "t2i"

    # -- positions -----------------------------------------------------------------------------

    @property
    def prefix_len(self) -> int:
        """Positions before the first image code."""
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
        if not self.predicts_text:
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

    def prefix(self, text: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids [B, text_len] (0 = padding) -> what precedes the image codes [B, prefix_len]."""
        ids = self._text_ids(text)
        if self.kind == "paipainter":
            return ids
        b = len(ids)
        return torch.cat([ids.new_full((b, 1), self.special("T2I")), ids, ids.new_full((b, 1), self.special("BOI"))], 1)

    def text_to_image(self, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Text ids [B, text_len] and codes [B, image_len] -> the whole sequence [B, block_size]."""
        return torch.cat([self.prefix(text), codes.flatten(1)], 1)

    def caption_prefix(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, image_len] (or [B, h, w]) -> `[I2T] codes [BOT]` [B, image_len + 2]: what precedes
        a caption (t2i layout only)."""
        if not self.predicts_text:
            raise ValueError(f"the {self.kind} layout has no image-to-text direction (no text head): "
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
        """Where a target is an image code (it competes among the image codes only)."""
        return targets < self.n_image_codes

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
        if not self.predicts_text:
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
