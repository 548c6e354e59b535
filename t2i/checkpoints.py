"""The GPT checkpoint record: one versioned schema, written and read here.

A GPT checkpoint (a GPTStage .ckpt, or a pai-painter import) is self-contained for sampling: the
GPT's weights under `state_dict` (`gpt.*`) and, under `t2i`, the record

    version    RECORD_VERSION
    gpt        GPTConfig's fields, the token layout included
    tokenizer  {kind: sentencepiece | wordpiece, model: the model's bytes, text_len}
    vqgan      {config: VQGANConfig's fields, checkpoint: its path, sha256: its weights' hash, grid: [h, w]}
    training   {caption_prob, txt_loss_scale, cond_drop, origin}: what the model learned, where it came from
    sampling   SamplingConfig's fields: eval.py's defaults (what the training grids used)

Version 1 (no version number) kept the tokenizer bytes, text_len and caption_prob at the top:
it is read and upgraded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from t2i.data.tokenizer import FixedLengthTokenizer, load_tokenizer
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig, VQModel, load_vqgan, load_weights, read_checkpoint, weights_hash

RECORD_VERSION = 2


@dataclass
class GPTRecord:
    gpt: dict
    tokenizer: dict  # kind, model (bytes), text_len
    vqgan: dict  # config, checkpoint, sha256, grid
    training: dict = field(default_factory=dict)  # caption_prob, txt_loss_scale, cond_drop, origin
    sampling: dict = field(default_factory=dict)
    version: int = RECORD_VERSION

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, source: str) -> GPTRecord:
        record = checkpoint.get("t2i") or {}
        if "gpt" not in record:
            raise ValueError(f"{source} is not a t2i GPT checkpoint (no t2i.gpt record): train one with stage=gpt, "
                             "or import one with python -m t2i.interop paipainter")
        version = record.get("version", 1)
        if version > RECORD_VERSION:
            raise ValueError(f"{source} has checkpoint record version {version}; this t2i reads up to "
                             f"{RECORD_VERSION}: update t2i")
        if version == 1:
            record = {"gpt": record["gpt"], "vqgan": record["vqgan"], "sampling": record.get("sampling", {}),
                      "tokenizer": {"kind": "sentencepiece", "model": record["tokenizer"],
                                    "text_len": record["text_len"]},
                      "training": {"caption_prob": record.get("caption_prob", 0.0)}}
        missing = [name for name in ("tokenizer", "vqgan") if name not in record]
        if missing:
            raise ValueError(f"{source}: the checkpoint record lacks {', '.join(missing)}")
        return cls(**{**record, "version": RECORD_VERSION})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def config(self) -> GPTConfig:
        return GPTConfig(**self.gpt)

    @property
    def caption_prob(self) -> float:
        """> 0: the model learned the image-to-text direction and can score captions."""
        return self.training.get("caption_prob", 0.0)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.vqgan["grid"]
        return h, w

    def tokenizer_model(self) -> FixedLengthTokenizer:
        return load_tokenizer(**self.tokenizer)


def vqgan_identity(vqgan: VQModel, checkpoint: str | Path | None, grid: tuple[int, int] | list[int]) -> dict:
    """The record's `vqgan` entry for a VQGAN (its checkpoint file, when there is one)."""
    return {"config": asdict(vqgan.cfg), "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "sha256": weights_hash(vqgan), "grid": list(grid)}


def gpt_state_dict(checkpoint: dict) -> dict:
    return {k[len("gpt."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("gpt.")}


def load_gpt(path: str | Path) -> tuple[GPT, GPTRecord]:
    """The GPT of a t2i GPT checkpoint and its record."""
    checkpoint = read_checkpoint(path)
    record = GPTRecord.from_checkpoint(checkpoint, str(path))
    gpt = GPT(record.config)
    load_weights(gpt, gpt_state_dict(checkpoint), str(path), what="GPT")
    return gpt.eval(), record


def save_gpt(path: str | Path, gpt: GPT, record: GPTRecord) -> None:
    """A GPT checkpoint that load_gpt, eval.py and `stage.init_ckpt` read (weights as a GPTStage saves them)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"gpt.{k}": v.detach().cpu().contiguous() for k, v in gpt.state_dict().items()}
    torch.save({"state_dict": state, "t2i": record.to_dict()}, path)


def save_vqgan(path: str | Path, vqgan: VQModel) -> None:
    """A VQGAN checkpoint as VQGANStage writes one (weights under `vqgan.`, config in the record)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"vqgan.{k}": v.detach().cpu().contiguous() for k, v in vqgan.state_dict().items()}
    torch.save({"state_dict": state, "t2i": {"vqgan": asdict(vqgan.cfg)}}, path)


def load_record_vqgan(record: GPTRecord, source: str, vqgan_ckpt: str | Path | None = None) -> VQModel:
    """The VQGAN a GPT checkpoint names (or `vqgan_ckpt`), checked against the record's hash."""
    path = vqgan_ckpt or record.vqgan.get("checkpoint")
    if not path:
        raise ValueError(f"{source} names no VQGAN checkpoint: pass vqgan_ckpt=PATH")
    vqgan = load_vqgan(path, VQGANConfig(**record.vqgan["config"]))
    expected = record.vqgan.get("sha256")
    if expected and weights_hash(vqgan) != expected:
        raise ValueError(f"the VQGAN at {path} is not the one {source} was trained with "
                         f"(sha256 {weights_hash(vqgan)[:12]}..., expected {expected[:12]}...): "
                         "pass the right one with vqgan_ckpt=PATH")
    return vqgan
