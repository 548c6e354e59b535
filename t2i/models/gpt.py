"""Text-to-image GPT: one decoder-only transformer over image codes and text ids.

The vocabulary and the sequences (which id means what, which position holds what) are the token
layout's, `t2i.models.layout`: t2i's own ([T2I] text [BOI] codes, and [I2T] codes [BOT] text for
captioning) or EasyNLP pai-painter's (text then codes, a head over the image codes only).

Blocks follow minGPT (separate key/query/value/proj linears, 4x GELU MLP, learned positions) by
default; the options of today's Llama-style image models (LlamaGen, Lumina-mGPT) switch each part:
`norm_type=rms` (RMSNorm), `mlp=swiglu` (SiLU-gated MLP, 8/3 x wide rounded to 256), `pos=rope`
(rotary positions) or `pos=rope2d` (rotary: 1-D over text, 2-D over the image grid, as LlamaGen),
`qk_norm` (queries and keys normalised per head), `bias=false`. CogView's stabilisers are options too: Sandwich-LN (one more LayerNorm on each branch output
before the residual add) and PB-relax (attention scores computed as
softmax((QK^T / (alpha sqrt(d)) - max) * alpha), and LayerNorm inputs divided by max|x| / 8, both
equal to the plain forms in exact arithmetic but free of fp16 overflow). Attention runs through
F.scaled_dot_product_attention (flash attention on GPUs), PB-relax's too wherever that computes it
exactly; it is written out in fp16 off CUDA, and for the one query of `forward_at` on CPUs (faster compiled).

`forward(tokens, cache=...)` with a `KVCache` appends the new positions' keys and values to
preallocated per-layer buffers, so sampling costs one position per step. `forward_at(tokens, position,
cache)` does the same with fixed shapes (each row's first position a tensor, attention over the whole
cache with the positions after each query masked): a step that torch.compile can capture once as a CUDA
graph (the gpt-fast pattern); one position per row for token-by-token sampling, a window of them for
speculative Jacobi decoding.

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
    layout: str = "t2i"  # the token layout: "t2i", "paipainter" or "superres" (t2i.models.layout)
    low_len: int = 0  # superres: low-resolution codes in the prefix
    windows: int = 1  # superres: window positions on the high-resolution grid
    norm_type: str = "layer"  # "layer" (LayerNorm) or "rms" (RMSNorm); `norm` is where the norms sit
    mlp: str = "gelu"  # "gelu" (4x, GPT-2) or "swiglu" (Llama)
    pos: str = "learned"  # "learned" table, "rope" (1-D rotary) or "rope2d" (rotary, 2-D over the image grid)
    rope_base: float = 10000.0
    qk_norm: bool = False  # normalise queries and keys per head (norm_type) before attention
    bias: bool = True  # biases in the linear layers and LayerNorms

    def __post_init__(self):
        for name, value, allowed in (("norm", self.norm, ("pre", "sandwich")), ("norm_type", self.norm_type, ("layer", "rms")),
                                     ("mlp", self.mlp, ("gelu", "swiglu")), ("pos", self.pos, ("learned", "rope", "rope2d"))):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {allowed}, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        tokens = self.tokens  # checks the layout's name
        if self.tie_head and tokens.head_size != tokens.vocab_size:
            raise ValueError(f"model.tie_head=true needs a head over the whole vocabulary; the {self.layout} "
                             "layout's head covers the image codes only")
        head_dim = self.n_embd // self.n_head
        if self.pos != "learned" and head_dim % (4 if self.pos == "rope2d" else 2):
            raise ValueError(f"model.pos={self.pos} rotates pairs of dimensions{' per axis' if self.pos == 'rope2d' else ''}: "
                             f"the head size n_embd / n_head = {head_dim} must be a multiple of "
                             f"{4 if self.pos == 'rope2d' else 2}")
        if self.pos == "rope2d":
            tokens.rotary_coordinates(caption=False, two_d=True)  # checks the grid is square

    @property
    def tokens(self) -> TokenLayout:
        """The token layout: id ranges, sequences, what each loss reads."""
        return TokenLayout(self.layout, self.n_image_codes, self.n_text_tokens, self.text_len, self.image_len,
                           self.low_len, self.windows)

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    @property
    def block_size(self) -> int:
        return self.tokens.block_size


def _relaxed(x: torch.Tensor) -> torch.Tensor:
    """PB-relax: scale each vector to max|x| = 8 before a scale-invariant norm (no fp16 overflow)."""
    return x / (x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-6) / 8)


class LayerNorm(nn.LayerNorm):
    """LayerNorm; with PB-relax the input is first scaled to max|x| = 8 (LN is scale invariant)."""

    def __init__(self, dim: int, pb_relax: bool = False, bias: bool = True):
        super().__init__(dim, bias=bias)
        self.pb_relax = pb_relax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_relaxed(x) if self.pb_relax else x)


class RMSNorm(nn.RMSNorm):
    """RMSNorm (Llama); with PB-relax the input is first scaled as for LayerNorm (RMSNorm is scale invariant)."""

    def __init__(self, dim: int, pb_relax: bool = False):
        super().__init__(dim, eps=1e-5)
        self.pb_relax = pb_relax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(_relaxed(x) if self.pb_relax else x)


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    return RMSNorm(dim, cfg.pb_relax) if cfg.norm_type == "rms" else LayerNorm(dim, cfg.pb_relax, cfg.bias)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions: dimension pairs (i, i + d/2) of x [B, H, T, d] turned by each position's angle i,
    in fp32 (the angles of far positions need its mantissa); cos, sin [B, 1, T, d/2]."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


class SwiGLU(nn.Module):
    """Llama's MLP: down(silu(gate(x)) * up(x)), hidden 8/3 x n_embd rounded up to a multiple of 256."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = -(-int(8 * cfg.n_embd / 3) // 256) * 256
        self.gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class KVCache(nn.Module):
    """Preallocated keys and values for every layer: [B, H, positions, head_dim] each (positions: block_size,
    or more for fixed-shape windows that run past the sequence's end: GPT.forward_at).

    Module buffers, so that a compiled decode step sees them at fixed addresses and may write them in a
    CUDA graph (torch.compile treats module buffers as static; plain tensor arguments it copies)."""

    def __init__(self, cfg: GPTConfig, batch_size: int, device, dtype, positions: int | None = None):
        super().__init__()
        positions = cfg.block_size if positions is None else positions
        if positions < cfg.block_size:
            raise ValueError(f"a KV cache holds at least block_size={cfg.block_size} positions, got {positions}")
        shape = (batch_size, cfg.n_head, positions, cfg.n_embd // cfg.n_head)
        # which rows are image-to-text sequences (their rotary coordinates differ), set by the first forward
        self.register_buffer("caption", torch.zeros(batch_size, dtype=torch.bool, device=device), persistent=False)
        for layer in range(cfg.n_layer):
            # zeros, not empty: a masked position's weight is 0, and 0 x a NaN left in memory would be NaN
            self.register_buffer(f"keys{layer}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
            self.register_buffer(f"values{layer}", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.keys = [getattr(self, f"keys{layer}") for layer in range(cfg.n_layer)]
        self.values = [getattr(self, f"values{layer}") for layer in range(cfg.n_layer)]
        self.length = 0  # positions filled so far

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i takes row rows[i]'s keys, values and direction (beam search: each beam continues its parent's)."""
        for buffer in (*self.keys, *self.values, self.caption):
            buffer.copy_(buffer.index_select(0, rows))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = make_norm(cfg, self.head_dim), make_norm(cfg, self.head_dim)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.pb_relax, self.alpha = cfg.pb_relax, cfg.pb_relax_alpha

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                position: torch.Tensor | None = None, rotary: tuple | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (proj(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if position is not None:  # fixed shapes, `position` [1 or B, t]: write them, attend over the whole cache
            keys, values = cache.keys[layer], cache.values[layer]
            if len(position) == 1:  # every row at the same positions (token-by-token steps: ~10% faster frozen)
                keys.index_copy_(2, position[0], k)
                values.index_copy_(2, position[0], v)
            else:
                index = position[:, None, :, None].expand_as(k)
                keys.scatter_(2, index, k)
                values.scatter_(2, index, v)
            visible = (torch.arange(keys.shape[2], device=x.device) <= position[..., None])[:, None]  # [1|B, 1, t, S]
            # on a CPU written out too: compiled, a few queries' attention fuses into a few loops, cheaper
            # than SDPA's CPU kernel (experiments/RESULTS.md, the frozen rows)
            if self._written_out(q) or not q.is_cuda:
                y = self._written_attention(q, keys, values, visible)
            else:
                with self._fused_kernels(q):
                    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
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
            y = self._written_attention(q, k, v, torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(start))
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

    def _written_attention(self, q, k, v, mask):
        """softmax(QK^T / sqrt(d)) V with a boolean mask, in PB-relax's form when it is on."""
        alpha = self.alpha if self.pb_relax else 1.0
        scores = (q / (alpha * math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.pb_relax:
            scores = (scores - scores.detach().amax(-1, keepdim=True)) * alpha
        weights = F.dropout(scores.float().softmax(-1).to(v.dtype), self.dropout, self.training)
        return weights @ v


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = make_norm(cfg), make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLU(cfg)
        else:  # indices 0 and 2: the state-dict keys of every earlier and imported checkpoint
            self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias), nn.GELU(),
                                     nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias), nn.Dropout(cfg.dropout))
        if cfg.norm == "sandwich":  # CogView: normalise each branch's output before the add
            self.ln3, self.ln4 = make_norm(cfg), make_norm(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                position: torch.Tensor | None = None, rotary: tuple | None = None) -> torch.Tensor:
        a = self.attn(self.ln1(x), cache, layer, position, rotary)
        x = x + (self.ln3(a) if hasattr(self, "ln3") else a)
        m = self.mlp(self.ln2(x))
        return x + (self.ln4(m) if hasattr(self, "ln4") else m)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(1, cfg.block_size, cfg.n_embd))
        else:  # rotary: each position's coordinates, per direction (0: text to image, 1: image to text)
            layout = cfg.tokens
            coords = [layout.rotary_coordinates(caption, cfg.pos == "rope2d") for caption in (False, True)]
            self.register_buffer("rotary_coords", torch.stack(coords), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
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
        t = tokens.shape[1]
        if start + t > self.cfg.block_size:
            raise ValueError(f"sequence of {start + t} exceeds block_size {self.cfg.block_size}")
        x = self.tok_emb(tokens)
        rotary = None
        if self.cfg.pos == "learned":
            x = x + self.pos_emb[:, start:start + t]
        else:
            caption = self.layout.caption_rows(tokens) if start == 0 else cache.caption[:len(tokens)]
            if cache is not None and start == 0:
                cache.caption[:len(tokens)] = caption
            rotary = self._rotary(caption, torch.arange(start, start + t, device=tokens.device))
        x = self.drop(x)
        recompute = self.checkpoint_activations and self.training and cache is None and torch.is_grad_enabled()
        for layer, block in enumerate(self.blocks):
            # non-reentrant checkpointing replays dropout with the same random state in the recomputation
            if recompute:
                x = checkpoint(block, x, None, layer, None, rotary, use_reentrant=False)
            else:
                x = block(x, cache, layer, rotary=rotary)
        if cache is not None:
            cache.length += tokens.shape[1]
        if last:
            x = x[:, -last:]
        x = self.ln_f(x)
        if head_rows is None:
            return self.head(x)
        return self.head_logits(x, slice(0, head_rows) if isinstance(head_rows, int) else head_rows)

    def head_logits(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """Logits over a block of the head's rows (a view of the weight, no copy); an int8 head
        (t2i.models.int8) takes the block itself; any other head (one with a LoRA adapter beside its weight,
        t2i.adapters, unmerged) computes every row, then keeps the block."""
        if isinstance(self.head, nn.Linear):
            return F.linear(x, self.head.weight[rows])
        if getattr(self.head, "reads_rows", False):
            return self.head(x, rows)
        return self.head(x)[..., rows]

    def forward_at(self, tokens: torch.Tensor, position: torch.Tensor, cache: KVCache, head_rows: int) -> torch.Tensor:
        """Tokens [B, t] at positions position .. position + t - 1 (`position` a long tensor on the model's
        device: [1], every row's, or [B], each row's own) -> logits over the first `head_rows` rows of the head
        [B, t, head_rows]. Writes the cache there and leaves cache.length to the caller: nothing here depends on
        Python values that change between calls. Positions past block_size (a window run past the sequence's
        end, in a cache with room for it) take the last position's embedding: their outputs are not meant to
        be used."""
        b, t = tokens.shape
        positions = position[:, None] + torch.arange(t, device=tokens.device)  # [1 or B, t]
        table = positions.clamp(max=self.cfg.block_size - 1)
        x = self.tok_emb(tokens)
        rotary = None
        if self.cfg.pos == "learned":
            x = x + self.pos_emb[0, table]
        else:
            rotary = self._rotary(cache.caption[:b], table)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, positions, rotary)
        return self.head_logits(self.ln_f(x), slice(0, head_rows))

    def _rotary(self, caption: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [B, 1, T, head_dim / 2] of the rotary angles at `positions` for rows of each direction.

        Frequencies base^(-j / n) over n = head_dim / 2 angles (1-D), or n = head_dim / 4 per axis (2-D:
        the first half of the angles follow a position's first coordinate, the second half its second)."""
        cfg = self.cfg
        coords = self.rotary_coords[caption.long()[:, None], positions].float()  # [B, T, 2]; positions [T] or [B, T]
        angles_per_axis = (cfg.n_embd // cfg.n_head) // (4 if cfg.pos == "rope2d" else 2)
        freqs = cfg.rope_base ** -(torch.arange(angles_per_axis, device=coords.device, dtype=torch.float32)
                                   / angles_per_axis)
        if cfg.pos == "rope2d":
            angles = torch.cat([coords[..., :1] * freqs, coords[..., 1:] * freqs], -1)
        else:
            angles = coords[..., :1] * freqs
        return angles.cos()[:, None], angles.sin()[:, None]

    def flops_per_sequence(self, length: int) -> int:
        """Training FLOPs (forward + backward) of one sequence of `length` positions, as MFU counts them
        (PaLM's convention): 6 per weight of every linear layer and position (2 forward, 4 backward),
        plus 12 * n_embd * length per layer and position for the attention scores and the weighted
        values over the whole sequence (causal masking not subtracted; norms, softmax and the
        embedding lookup not counted, nor the recomputation of activation checkpointing)."""
        cfg = self.cfg
        linear_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * linear_weights * length + 12 * cfg.n_layer * cfg.n_embd * length * length

    def new_cache(self, batch_size: int, positions: int | None = None) -> KVCache:
        param = self.tok_emb.weight
        return KVCache(self.cfg, batch_size, param.device, param.dtype, positions)
