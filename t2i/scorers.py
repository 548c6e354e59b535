"""Scoring sampled images and keeping the best candidates: Caption Loss and reranking.

Caption Loss (CogView) is the mean negative log-likelihood per text token of a caption given an
image's codes, under a captioning GPT (one trained with stage.caption_prob > 0): the lower, the
better the image matches the text. Reranking samples K candidates for each image and keeps the one
with the best score, by Caption Loss (lowest) or by the CLIP score of t2i.eval.clip (highest).
`rerank` is that choice for every caller: eval.py's reranked sets and the demo's best-of-N.

Plain torch (no Lightning, no torchmetrics), so the demo loads it in a moment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from t2i.checkpoints import load_gpt
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.models.gpt import GPT

if TYPE_CHECKING:
    from t2i.sampling import T2IPipeline

# what reranking asks of a scorer: (prompts [N], codes [N, h, w], batch_size) -> a score per image [N], lower better
Scorer = Callable[[list[str], torch.Tensor, int], torch.Tensor]


@torch.no_grad()
def caption_loss(model: GPT, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per sample: mean NLL of the text tokens (padding excluded) in the image-to-text sequence.

    codes [N, image_len] (or [N, h, w]), text ids [N, text_len] -> [N] (NaN for an empty text).
    As in training, a text position competes only among text ids: only the text positions are
    projected, and only onto the text rows of the head.
    """
    layout = model.layout
    sequence = layout.image_to_text(codes, text)  # a clear error for a layout without captioning
    text_rows = slice(layout.text_offset, layout.text_offset + layout.n_text_tokens)
    logits = model(sequence[:, :-1], last=layout.text_len, head_rows=text_rows)
    nll = F.cross_entropy(logits.float().transpose(1, 2), text, reduction="none")
    real = text > 0
    return (nll * real).sum(1) / real.sum(1)  # 0/0 = NaN: an empty caption has no loss


class CaptionScorer:
    """Caption Loss under a captioning GPT (one trained with stage.caption_prob > 0)."""

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, source: str):
        self.gpt, self.tokenizer, self.source = gpt.eval(), tokenizer, source

    @classmethod
    def for_pipeline(cls, pipeline: T2IPipeline, caption_ckpt: str | None) -> tuple[CaptionScorer | None, str]:
        """The evaluated model itself when it learned captioning, else `caption_ckpt`; (None, reason) when neither."""
        if caption_ckpt:
            gpt, record = load_gpt(caption_ckpt)
            if not record.caption_prob:
                return None, f"caption_ckpt={caption_ckpt} was trained without the caption direction"
            ours, theirs = pipeline.record.vqgan.sha256, record.vqgan.sha256
            if ours != theirs:
                raise ValueError(f"caption_ckpt={caption_ckpt} reads codes of another VQGAN "
                                 f"({str(theirs)[:12]}..., the evaluated model's is {str(ours)[:12]}...)")
            return cls(gpt.to(pipeline.device), record.tokenizer_model(), str(caption_ckpt)), str(caption_ckpt)
        if pipeline.record.caption_prob:
            return cls(pipeline.gpt, pipeline.tokenizer, "self"), "self"
        if not pipeline.gpt.layout.captions:
            return None, (f"a {pipeline.gpt.layout.kind}-layout model has no image-to-text direction to score captions with "
                          "(pass caption_ckpt=a t2i captioning model over the same VQGAN)")
        return None, ("the checkpoint was trained without the caption direction (stage.caption_prob=0) and no "
                      "caption_ckpt was given")

    def __call__(self, prompts: list[str], codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Caption Loss [N] of prompts[i] for codes[i], batch_size sequences through the model at once."""
        text = self.tokenizer(prompts).to(codes.device)
        return torch.cat([caption_loss(self.gpt, c, t) for c, t in zip(codes.split(batch_size), text.split(batch_size))])


def take(values: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """values [n, K, S, ...] (K candidates of S samples) and the chosen candidates [n, S] -> [n, S, ...].
    The choice may lie on another device (scores are gathered on the CPU, codes stay on the GPU)."""
    index = best.to(values.device).view(*best.shape[:1], 1, best.shape[1], *[1] * (values.dim() - 3))
    return values.gather(1, index.expand(-1, 1, -1, *values.shape[3:]))[:, 0]


def rerank(candidates: torch.Tensor, scores: torch.Tensor, highest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The best of K candidates of each of S samples of n prompts: candidates [n, K, S, ...] (codes or images)
    and their scores [n, K, S] -> (the chosen candidates [n, S, ...], which candidate each is [n, S]).

    The lowest score wins (Caption Loss), or with `highest` the highest (CLIP score); a NaN score (an empty
    caption's loss) never wins over a number. `take(other, chosen)` picks the same candidates from any other
    tensor laid out as they are (their scores, their images)."""
    worst = float("-inf") if highest else float("inf")
    ranked = scores.nan_to_num(worst)
    chosen = ranked.argmax(1) if highest else ranked.argmin(1)
    return take(candidates, chosen), chosen
