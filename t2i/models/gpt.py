"""Text-to-image GPT: one decoder-only transformer over image codes and text ids.

The vocabulary and the sequences (which id means what, which position holds what) are the token
layout's, `t2i.models.layout`: t2i's own ([T2I] text [BOI] codes, and [I2T] codes [BOT] text for
captioning) or EasyNLP pai-painter's (text then codes, a head over the image codes only).

Blocks follow minGPT (separate key/query/value/proj linears, 4x GELU MLP, learned positions),
with CogView's stabilisers as options: Sandwich-LN (one more LayerNorm on each branch output
before the residual add) and PB-relax (attention scores computed as
softmax((QK^T / (alpha sqrt(d)) - max) * alpha), and LayerNorm inputs divided by max|x| / 8, both
equal to the plain forms in exact arithmetic but free of fp16 overflow). Attention runs through
F.scaled_dot_product_attention (flash attention on GPUs), PB-relax's too wherever that computes it
exactly; only fp16 off CUDA writes it out.

`forward(tokens, cache=...)` with a `KVCache` appends the new positions' keys and values to
preallocated per-layer buffers, so sampling costs one position per step. `forward_at(token, position,
cache)` does the same for one position with fixed shapes (the position a tensor, attention over the
whole cache with the positions after it masked): a step that torch.compile can capture once as a CUDA
graph (the gpt-fast pattern).

`checkpoint_activations` (a training switch, not part of the architecture) recomputes each block's
activations in the backward pass instead of keeping them: memory for depth (`large` on one GPU).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from t2i.models.layout import TokenLayout

@dataclass
class GPTConfig:
    n_image_codes: int = 16384  # the VQGAN codebook
    n_text_tokens: int = 16000  # the SentencePiece vocabulary (id 0 = padding)
    text_len: int = 32
    image_len: int = 256  # the VQGAN grid, h * w
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    norm: str = "pre"  # "pre" (minGPT) or "sandwich" (CogView)
    pb_relax: bool = False
    pb_relax_alpha: float = 32.0
    tie_head: bool = False  # output head shares the token embedding
    layout: str = "t2i"  # the token layout: "t2i" or "paipainter" (t2i.models.layout)

    def __post_init__(self):
        if self.norm not in ("pre", "sandwich"):
            raise ValueError(f"model.norm must be 'pre' or 'sandwich', got {self.norm!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        tokens = self.tokens  # checks the layout's name
        if self.tie_head and tokens.head_size != tokens.vocab_size:
            raise ValueError(f"model.tie_head=true needs a head over the whole vocabulary; the {self.layout} "
                             "layout's head covers the image codes only")

    @property
    def tokens(self) -> TokenLayout:
        """The token layout: id ranges, sequences, what each loss reads."""
        return TokenLayout(self.layout, self.n_image_codes, self.n_text_tokens, self.text_len, self.image_len)

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    @property
    def block_size(self) -> int:
        return self.tokens.block_size


class LayerNorm(nn.LayerNorm):
    """LayerNorm; with PB-relax the input is first scaled to max|x| = 8 (LN is scale invariant)."""

    def __init__(self, dim: int, pb_relax: bool = False):
        super().__init__(dim)
        self.pb_relax = pb_relax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pb_relax:
            x = x / (x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-6) / 8)
        return super().forward(x)


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: [B, H, block_size, head_dim] each.

    Module buffers, so that a compiled decode step sees them at fixed addresses and may write them in a
    CUDA graph (torch.compile treats module buffers as static; plain tensor arguments it copies)."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device, dtype):
        super().__init__()
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        for layer in range(cfg.n_layer):
            # zeros, not empty: a masked position's weight is 0, and 0 x a NaN left in memory would be NaN
            self.register_buffer(f"keys{layer}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            self.register_buffer(f"values{layer}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.keys = [getattr(self, f"keys{layer}") for layer in range(cfg.n_layer)]
        self.values = [getattr(self, f"values{layer}") for layer in range(cfg.n_layer)]
        self.length = 0  # positions filled so far


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.pb_relax, self.alpha = cfg.pb_relax, cfg.pb_relax_alpha

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                position: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if position is not None:  # one position, fixed shapes: write it, attend over the whole cache up to it
            keys, values = cache.keys[layer], cache.values[layer]
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
            visible = torch.arange(keys.shape[2], device=x.device) <= position
            if self._written_out(q):
                y = self._pb_relax_attention(q, keys, values, visible[None])
            else:
                with self._fused_kernels(q):
                    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[None])
            return self.proj(y.transpose(1, 2).reshape(b, t, c))
        start = 0
        if cache is not None:  # write the new positions, attend over everything so far
            start = cache.length
            cache.keys[layer][:b, :, start:start + t] = k
            cache.values[layer][:b, :, start:start + t] = v
            k, v = cache.keys[layer][:b, :, :start + t], cache.values[layer][:b, :, :start + t]
        # query i (absolute position start + i) sees keys 0 .. start + i; one new query sees them all
        mask = None if start == 0 or t == 1 else torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start)
        if self._written_out(q):
            y = self._pb_relax_attention(q, k, v, torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start))
        else:
            with self._fused_kernels(q):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0 and t > 1,
                                                   dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))

    def _written_out(self, q: torch.Tensor) -> bool:
        """PB-relax's attention is written out only where it is needed and SDPA cannot stand in: fp16 off
        CUDA. In fp32 and bf16 (fp32's range) scores cannot overflow; on CUDA the fused SDPA kernels
        (flash, memory-efficient) accumulate scores in fp32 and subtract the row max themselves, which is
        PB-relax's attention computed exactly (its LayerNorm scaling stays on)."""
        return self.pb_relax and q.dtype == torch.float16 and not q.is_cuda

    def _fused_kernels(self, q: torch.Tensor):
        """Under PB-relax in fp16 on CUDA, only the fused kernels (never SDPA's fp16 math fallback)."""
        if self.pb_relax and q.dtype == torch.float16:
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
        return nullcontext()

    def _pb_relax_attention(self, q, k, v, mask):
        scores = (q / (self.alpha * math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = (scores - scores.detach().amax(-1, keepdim=True)) * self.alpha
        weights = F.dropout(scores.float().softmax(-1).to(v.dtype), self.dropout, self.training)
        return weights @ v


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.n_embd, cfg.pb_relax)
        self.ln2 = LayerNorm(cfg.n_embd, cfg.pb_relax)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))
        if cfg.norm == "sandwich":  # CogView: normalise each branch's output before the add
            self.ln3 = LayerNorm(cfg.n_embd, cfg.pb_relax)
            self.ln4 = LayerNorm(cfg.n_embd, cfg.pb_relax)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                position: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.ln1(x), cache, layer, position)
        x = x + (self.ln3(a) if hasattr(self, "ln3") else a)
        m = self.mlp(self.ln2(x))
        return x + (self.ln4(m) if hasattr(self, "ln4") else m)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.pb_relax)
        self.head = nn.Linear(cfg.n_embd, cfg.tokens.head_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_head:
            self.head.weight = self.tok_emb.weight
        self.checkpoint_activations = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def layout(self) -> TokenLayout:
        return self.cfg.tokens

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last: int = 0,
                head_rows: int | slice | None = None) -> torch.Tensor:
        """Tokens [B, T] -> logits [B, T, head size]; with a cache, T new positions after cache.length.

        Sampling and scoring need less: `last` keeps only the last positions ([B, last, ...]) and
        `head_rows` only some rows of the head (an int: the first ones, the image codes; a slice: e.g.
        the text ids), so the rest of the output head is never read: a sampling step at batch 1 is
        bound by reading the weights.
        """
        start = cache.length if cache is not None else 0
        if start + tokens.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence of {start + tokens.shape[1]} exceeds block_size {self.cfg.block_size}")
        x = self.drop(self.tok_emb(tokens) + self.pos_emb[:, start:start + tokens.shape[1]])
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            # non-reentrant checkpointing replays dropout with the same random state in the recomputation
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, cache, layer)
        if cache is not None:
            cache.length += tokens.shape[1]
        if last:
            x = x[:, -last:]
        x = self.ln_f(x)
        if head_rows is None:
            return self.head(x)
        rows = slice(0, head_rows) if isinstance(head_rows, int) else head_rows
        return F.linear(x, self.head.weight[rows])  # a block of rows: a view, no copy

    def forward_at(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache, head_rows: int) -> torch.Tensor:
        """One token per row [B, 1] at `position` (a [1] long tensor on the model's device) -> logits over the
        first `head_rows` rows of the head [B, head_rows]. Writes the cache at `position` and leaves
        cache.length to the caller: nothing here depends on Python values that change between steps."""
        x = self.tok_emb(token) + self.pos_emb[:, position]
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, position)
        return F.linear(self.ln_f(x[:, -1]), self.head.weight[:head_rows])

    def flops_per_sequence(self, length: int) -> int:
        """Training FLOPs (forward + backward) of one sequence of `length` positions, as MFU counts them
        (PaLM's convention): 6 per weight of every linear layer and position (2 forward, 4 backward),
        plus 12 * n_embd * length per layer and position for the attention scores and the weighted
        values over the whole sequence (causal masking not subtracted; norms, softmax and the
        embedding lookup not counted, nor the recomputation of activation checkpointing)."""
        cfg = self.cfg
        linear_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * linear_weights * length + 12 * cfg.n_layer * cfg.n_embd * length * length

    def new_cache(self, batch_size: int) -> KVCache:
        param = self.pos_emb
        return KVCache(self.cfg, batch_size, param.device, param.dtype)
