"""VQGAN image tokenizer with taming-transformers' architecture and parameter names.

A taming checkpoint (e.g. the ImageNet f16_16384 model EasyNLP uses) loads into `VQModel` with
strict key and shape checks (t2i.checkpoints.load_vqgan) and encodes/decodes as taming does. Layout, top to bottom:

    image -> Encoder -> quant_conv -> VectorQuantizer -> codes [B, h, w]
    codes -> embedding -> post_quant_conv -> Decoder -> image

Everything here is a plain nn.Module; training (losses, optimizers) lives in stages/.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from t2i.precision import exact_fp32


CODEBOOKS = ("plain", "simvq")


@dataclass
class VQGANConfig:
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list = field(default_factory=lambda: [16])
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256  # codebook vector size (LlamaGen: 8, with l2_normalize)
    n_embed: int = 16384  # codebook entries
    beta: float = 0.25  # commitment weight
    legacy_beta: bool = True  # taming's placement of beta (on the codebook term), for checkpoint fidelity
    l2_normalize: bool = False  # cosine-similarity codebook lookup (LlamaGen)
    # plain: the codebook is learned entry by entry (taming). simvq: a frozen random codebook through
    # a learned linear map (SimVQ, Zhu et al. 2024): every step moves every code, none can die
    codebook: str = "plain"
    # entropy (usage) loss on soft assignments (MAGVIT-v2, LlamaGen): per-vector entropy low, the batch's
    # average assignment's entropy high; the VQGAN stage adds entropy_weight x it (0: off)
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01  # softmax(-distance / T) over the codes; LlamaGen's 0.01

    def __post_init__(self):
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"vqgan.codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if self.entropy_weight < 0 or self.entropy_temperature <= 0:
            raise ValueError(f"vqgan.entropy_weight must be >= 0 and vqgan.entropy_temperature > 0, got "
                             f"{self.entropy_weight} and {self.entropy_temperature}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32 if channels % 32 == 0 else math.gcd(channels, 32), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convolutions as projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # [B, C, H, W] -> [B, 1, HW, C]: one head over the flattened grid
        q, k, v = (t(y).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: taming's convention


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, 1, 1)
        res, channels = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(channels, cfg.ch * mult, cfg.dropout))
                channels = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(channels))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(channels)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.mid.attn_1 = AttnBlock(channels)
        self.mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        channels = cfg.ch * cfg.ch_mult[-1]
        res = cfg.grid
        self.conv_in = nn.Conv2d(cfg.z_channels, channels, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(channels, channels, cfg.dropout)
        self.mid.attn_1 = AttnBlock(channels)
        self.mid.block_2 = ResnetBlock(channels, channels, cfg.dropout)
        # built from the lowest resolution up, stored highest-resolution first (taming's indexing)
        up = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(channels, cfg.ch * cfg.ch_mult[level], cfg.dropout))
                channels = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    stage.attn.append(AttnBlock(channels))
            if level != 0:
                stage.upsample = Upsample(channels)
                res *= 2
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.features(z))

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """Everything before the last layer (conv_out): what it maps to pixels."""
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return F.silu(self.norm_out(h))

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the GAN loss's adaptive weight is measured at."""
        return self.conv_out.weight


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    Loss: `codebook + beta * commitment` (standard), or taming's legacy placement
    `commitment + beta * codebook` that its checkpoints were trained with.

    `kind="plain"`: the codes are the rows of `embedding` (taming's parameter, its checkpoints'
    key). `kind="simvq"` (SimVQ): `embedding` holds a frozen random basis N(0, 1/embed_dim) and
    the codes are `projection(embedding)`, a learned linear map: the codebook loss reaches every
    code through the map, so no code is left behind. The basis stays in the state dict (it is
    random), beside `projection.weight`.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy_beta: bool = True,
                 l2_normalize: bool = False, kind: str = "plain", entropy_temperature: float = 0.01):
        super().__init__()
        if kind not in CODEBOOKS:
            raise ValueError(f"codebook kind must be one of {CODEBOOKS}, got {kind!r}")
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.beta, self.legacy_beta, self.l2_normalize = beta, legacy_beta, l2_normalize
        self.kind, self.entropy_temperature = kind, entropy_temperature
        self.embedding = nn.Embedding(n_embed, embed_dim)
        if kind == "plain":
            self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)
        else:
            nn.init.normal_(self.embedding.weight, std=embed_dim ** -0.5)
            self.embedding.weight.requires_grad_(False)  # frozen: only the projection learns
            # a linear map, as in the paper (no bias: a shared offset would pull every l2-normalised code one way)
            self.projection = nn.Linear(embed_dim, embed_dim, bias=False)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        if self.kind == "simvq":  # outside autocast: the codes keep the parameters' precision
            with torch.autocast(w.device.type, enabled=False):
                w = self.projection(w)
        return F.normalize(w, dim=1) if self.l2_normalize else w

    @torch.no_grad()
    def set_codes(self, indices: torch.Tensor, vectors: torch.Tensor) -> None:
        """Make the codes `indices` point at `vectors` [n, embed_dim] (dead-code restarts). For SimVQ the
        frozen basis rows are solved for so that the projection maps them onto `vectors`."""
        weight = self.embedding.weight
        if self.kind == "simvq":
            # projection(x) = W x = v  ->  x = pinv(W) v: exact while W is invertible
            vectors = vectors.float() @ torch.linalg.pinv(self.projection.weight.float()).t()
        weight.data[indices] = vectors.to(weight.dtype)

    def entropy_loss(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The entropy (usage) loss of quantizer inputs z [B, embed_dim, h, w], and its two terms.

        Soft assignments p = softmax(-distance / entropy_temperature) over the codes, one per vector
        (the distance the nearest-code search uses; cosine-based with l2_normalize). The loss is the
        mean per-vector entropy H(p), which makes each vector commit to a code, minus the entropy of
        the batch's average assignment, which spreads the vectors over the whole codebook. Its
        gradient reaches the encoder and the codebook. Computed in float32, even under autocast.
        """
        with torch.autocast(z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()
            codebook = self.codebook().float()
            if self.l2_normalize:
                flat = F.normalize(flat, dim=-1)
                logits = 2 * flat @ codebook.t()  # -|f - c|^2 = 2 f.c - 2 for unit vectors; a constant drops out
            else:
                logits = -(flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t())
            log_p = F.log_softmax(logits / self.entropy_temperature, dim=1)
            per_vector = -(log_p.exp() * log_p).sum(1).mean()
            average = log_p.exp().mean(0)
            batch = -(average * average.clamp_min(1e-12).log()).sum()
        return per_vector - batch, {"entropy_per_vector": per_vector.detach(), "entropy_batch": batch.detach()}

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index for each vector of z [..., embed_dim]."""
        # exact fp32 whatever autocast or TF32 say: a bf16 or TF32 distance picks a non-nearest code for a
        # few % of vectors
        with exact_fp32(z.device.type):
            return self._nearest(z.float())

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, self.embed_dim)
        codebook = self.codebook().float()
        if self.l2_normalize:
            distance = -flat @ codebook.t()  # unit vectors: nearest = most similar
        else:
            distance = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return distance.argmin(1).view(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> quantised vectors [B, embed_dim, h, w]."""
        return F.embedding(codes, self.codebook()).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, C, h, w] -> (straight-through quantised z, codebook loss, codes [B, h, w])."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
        codes = self.nearest(z.detach())
        z_q = F.embedding(codes, self.codebook())
        commitment = F.mse_loss(z, z_q.detach())
        codebook = F.mse_loss(z_q, z.detach())
        loss = commitment + self.beta * codebook if self.legacy_beta else codebook + self.beta * commitment
        z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient flows to the encoder
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, codes


class VQModel(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy_beta, cfg.l2_normalize,
                                        cfg.codebook, cfg.entropy_temperature)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] -> (reconstruction, codebook loss, codes)."""
        return self.reconstruct(self.latents(x))

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """The quantizer's input: [B, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(x))

    def reconstruct(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents -> (reconstruction, codebook loss, codes)."""
        z_q, codebook_loss, codes = self.quantize(z)
        return self.decoder(self.post_quant_conv(z_q)), codebook_loss, codes

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, h, w] (long).

        In exact fp32 whatever autocast, TF32 or matmul_precision say: an image's codes (pre-tokenized
        shards, the slow path's codes, a fine-tuning's data) do not depend on the run's settings."""
        with exact_fp32(images.device.type):
            z = self.latents(images.float()).permute(0, 2, 3, 1)
            if self.cfg.l2_normalize:
                z = F.normalize(z, dim=-1)
            return self.quantize.nearest(z)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> images [B, 3, H, W], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))


def codebook_usage(counts: torch.Tensor) -> dict:
    """Fraction of codes used and perplexity (effective number of codes) of a code histogram."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return {"used": (counts > 0).float().mean(), "perplexity": entropy.exp()}
