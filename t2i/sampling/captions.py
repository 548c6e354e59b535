"""Captions: image codes -> text through the `[I2T] codes [BOT] text` direction, with the KV cache and the
images' filtering: greedy, sampled (temperature, top-k, top-p, a seed per image) or beam search."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from t2i.models.gpt import GPT
from t2i.sampling.draws import draw, filter_logits
from t2i.sampling.options import CaptionConfig
from t2i.sampling.seeds import prompt_uniforms, require_seeds


@torch.no_grad()
def generate_text(model: GPT, codes: torch.Tensor, cfg: CaptionConfig,
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Image codes [B, h, w] (or [B, image_len]) -> caption ids [B, text_len] (tokenizer ids), through the
    image-to-text direction with the KV cache.

    A caption ends at the first padding (tokenizer id 0) the model predicts, and every position after it
    is padding; one that never predicts it runs to text_len. Text positions compete among the text ids
    only, as in training. strategy=sample draws image i's caption from its own stream (seeds[i], e.g.
    prompt_seeds(cfg.seed, keys); with no seeds cfg.seed must be None: unseeded), so it does not depend on the batch.
    """
    layout = model.layout
    prefix = layout.caption_prefix(codes)  # a clear error for a layout without a text head
    if cfg.strategy == "beam" and cfg.num_beams > 1:
        return beam_text(model, prefix, cfg)
    n, length, rows = len(prefix), layout.text_len, layout.text_rows
    uniforms = None
    if cfg.strategy == "sample":
        require_seeds(seeds, cfg.seed, n, "generate_text (strategy=sample)")
        uniforms = prompt_uniforms(seeds, n, 1, length, prefix.device)
    text = torch.zeros(n, length, dtype=torch.long, device=prefix.device)
    ended = torch.zeros(n, dtype=torch.bool, device=prefix.device)
    cache = model.new_cache(n)
    logits = model(prefix, cache, last=1, head_rows=rows)[:, -1]
    for i in range(length):
        logits = logits.float()
        if uniforms is None:  # greedy, or a beam of one
            step = logits.argmax(-1)
        else:
            step = draw(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1), uniforms[:, i])
        step = step.masked_fill(ended, 0)  # an ended caption is padded, as in training
        text[:, i] = step
        ended |= step == 0
        if i == length - 1 or bool(ended.all()):
            break
        logits = model((step + layout.text_offset)[:, None], cache, head_rows=rows)[:, -1]
    return text


def beam_text(model: GPT, prefix: torch.Tensor, cfg: CaptionConfig) -> torch.Tensor:
    """Beam search: the prefixes [n, L] -> the best of cfg.num_beams beams per image [n, text_len].

    Each step keeps the K most likely continuations (sum of log-probabilities) of the K beams; a beam
    that has ended continues with padding at no cost. At the end each image's beams are ranked by
    log p / length ** length_penalty, the length counting the end (padding) token; beams that never
    end all have text_len tokens, so the penalty does not change their order."""
    layout = model.layout
    n, k, length, rows = len(prefix), cfg.num_beams, layout.text_len, layout.text_rows
    vocab = layout.n_text_tokens
    device = prefix.device
    cache = model.new_cache(n * k)
    logits = model(prefix, cache, last=1, head_rows=rows)[:, -1]  # the prefix once per image
    cache.reorder(torch.arange(n, device=device).repeat_interleave(k))  # then in each of its beams
    log_probs = logits.float().log_softmax(-1).repeat_interleave(k, 0)
    # scores and lengths in float32 whatever the default dtype (bf16 under bf16-true)
    scores = torch.full((n, k), float("-inf"), device=device, dtype=torch.float32)
    scores[:, 0] = 0  # the beams start equal: only the first one expands at the first step
    padding_only = torch.full((vocab,), float("-inf"), device=device, dtype=torch.float32)
    padding_only[0] = 0
    text = torch.zeros(n * k, length, dtype=torch.long, device=device)
    ended = torch.zeros(n * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(n * k, device=device, dtype=torch.float32)
    for i in range(length):
        log_probs = torch.where(ended[:, None], padding_only, log_probs)
        scores, best = (scores.view(-1, 1) + log_probs).view(n, k * vocab).topk(k, dim=-1)
        parents = (torch.arange(n, device=device)[:, None] * k + best // vocab).flatten()
        step = (best % vocab).flatten()
        text, ended, lengths = text[parents], ended[parents], lengths[parents]
        text[:, i] = step
        lengths += (~ended).float()
        ended = ended | (step == 0)
        if i == length - 1 or bool(ended.all()):
            break
        cache.reorder(parents)
        log_probs = model((step + layout.text_offset)[:, None], cache, head_rows=rows)[:, -1].float().log_softmax(-1)
    ranked = scores / lengths.view(n, k).clamp_min(1) ** cfg.length_penalty
    return text.view(n, k, length)[torch.arange(n, device=device), ranked.argmax(-1)]
