"""VQGAN image tokenizer with taming-transformers' architecture and parameter names.

A taming checkpoint (e.g. the ImageNet f16_16384 model EasyNLP uses) loads into `VQModel` with
strict key and shape checks and encodes/decodes as taming does. Layout, top to bottom:

    image -> Encoder -> quant_conv -> VectorQuantizer -> codes [B, h, w]
    codes -> embedding -> post_quant_conv -> Decoder -> image

Everything here is a plain nn.Module; training (losses, optimizers) lives in stages/.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


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
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the GAN loss's adaptive weight is measured at."""
        return self.conv_out.weight


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    Loss: `codebook + beta * commitment` (standard), or taming's legacy placement
    `commitment + beta * codebook` that its checkpoints were trained with.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy_beta: bool = True,
                 l2_normalize: bool = False):
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.beta, self.legacy_beta, self.l2_normalize = beta, legacy_beta, l2_normalize
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index for each vector of z [..., embed_dim]."""
        # in float32 even under autocast: a bf16 matmul picks a non-nearest code for a few % of vectors
        with torch.autocast(z.device.type, enabled=False):
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
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta, cfg.legacy_beta, cfg.l2_normalize)
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
        """Images [B, 3, H, W] in [-1, 1] -> codes [B, h, w] (long)."""
        z = self.latents(images).permute(0, 2, 3, 1)
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


# ---------------------------------------------------------------------------------------------
# Checkpoints: taming-transformers' (weights at the top level, LPIPS/discriminator under
# `loss.*`, no config inside) and ours (VQGANStage: weights under `vqgan.`, config under "t2i").


def read_checkpoint(path: str | Path) -> dict:
    """torch.load on the CPU that runs no code from the file: tensors and what torch's weights_only allows.

    Tensors-only unpickling first (torch's weights_only). A taming .ckpt also pickles Lightning 1.x
    objects beside the weights (its callbacks' classes and states, by module path), which that
    refuses: such a file is read again with every class that torch's weights-only loading does not
    allow replaced by an inert stand-in (a dict subclass that keeps the pickled state and calls
    nothing), so its weights load whether or not `pytorch_lightning` is installed. Everything else,
    tensors and storages included, is rebuilt only by what torch allows, as with weights_only.
    """
    import pickletools
    import types
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = error
    if not zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(
            f"{path} holds more than tensors and is in torch's pre-1.6 format, which t2i reads tensors-only: "
            "re-save its state_dict (torch.save({'state_dict': ckpt['state_dict']}, ...)) where it loads") from refused
    # the globals the file names, and torch's verdict on them (tensors, storages, containers: allowed)
    with zipfile.ZipFile(path) as archive:
        pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1)
        named = {arg.replace(" ", ".", 1) for op, arg, _ in pickletools.genops(archive.read(pickled))
                 if op.name == "GLOBAL"}
    allowed = named - set(torch.serialization.get_unsafe_globals_in_checkpoint(path))

    class StandIn(dict):
        """An object of a class torch does not allow: its pickled arguments and state, nothing run."""

        def __new__(cls, *args, **kwargs):
            return dict.__new__(cls)

        def __init__(self, *args, **kwargs):
            super().__init__()
            self.__dict__["args"] = args

        def __setstate__(self, state):
            self.__dict__["state"] = state

        def append(self, item):
            self.__dict__.setdefault("items", []).append(item)

        def extend(self, items):
            for item in items:
                self.append(item)

    stand_ins: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            full = f"{module}.{name}"
            if full in allowed:
                return super().find_class(module, name)
            if full not in stand_ins:  # one class per name: classes pickled as dict keys stay distinct
                stand_ins[full] = type(name, (StandIn,), {"__module__": module, "__qualname__": name})
            return stand_ins[full]

    restricted = types.ModuleType("t2i_restricted_pickle")
    restricted.Unpickler = Unpickler
    restricted.load = lambda file, **kwargs: Unpickler(file, **kwargs).load()
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)


def vqgan_state_dict(checkpoint: dict) -> dict:
    """The VQModel weights inside a checkpoint (or a bare state dict), `loss.*` left out."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(key.startswith("vqgan.") for key in state):
        state = {key[len("vqgan."):]: value for key, value in state.items() if key.startswith("vqgan.")}
    return {key: value for key, value in state.items() if not key.startswith("loss.")}


def load_weights(model: nn.Module, state: dict, source: str, what: str = "VQGAN") -> None:
    """Strict load that says which keys are missing, unexpected or mis-shaped (`what`: the model's name)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
                 for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or misshaped:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise ValueError(f"{source} does not fit this {what} config:\n  " + "\n  ".join(parts))
    model.load_state_dict(state, strict=True)


def load_vqgan(path: str | Path, cfg: VQGANConfig | None = None, fallback: VQGANConfig | None = None) -> VQModel:
    """A VQModel from our checkpoint (config inside) or taming's (pass its config, e.g. f16_16384).

    `cfg` overrides the saved config; `fallback` is used only when the checkpoint carries none.
    """
    checkpoint = read_checkpoint(path)
    saved = checkpoint.get("t2i", {}).get("vqgan")
    if cfg is None and saved is None:
        cfg = fallback
    if cfg is None:
        if saved is None:
            raise ValueError(f"{path} carries no VQGAN config (a taming checkpoint?): give its config, "
                             "e.g. vqgan=f16_16384")
        cfg = VQGANConfig(**saved)
    model = VQModel(cfg)
    load_weights(model, vqgan_state_dict(checkpoint), str(path))
    return model.eval()


def weights_hash(model: nn.Module) -> str:
    """sha256 of the weights (names, shapes and bytes), to tie code shards to the VQGAN that made them."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
