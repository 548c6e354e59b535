"""Checkpoints, read and written here: the GPT checkpoint record (one versioned schema), and
loading weights strictly: a GPT, a VQGAN (t2i's or taming-transformers'), any .ckpt file.

A GPT checkpoint (a GPTStage .ckpt, or a pai-painter import) is self-contained for sampling: the
GPT's weights under `state_dict` (`gpt.*`) and, under `t2i`, the record

    version    RECORD_VERSION
    gpt        GPTConfig's fields, the token layout included
    tokenizer  {kind: sentencepiece | wordpiece, model: the model's bytes, text_len}
    vqgan      {config: VQGANConfig's fields, checkpoint: its path, sha256: its weights' hash, grid: [h, w]}
    training   {caption_prob, caption_end, txt_loss_scale, cond_drop, origin}: what the model learned, where it
               came from (null: not recorded)
    sampling   SamplingConfig's fields: eval.py's defaults (what the training grids used)
    superres   null, or for a super-resolution GPT (layout "superres") its windows on the code grids,
               SuperresGrid's fields {low, high, window, stride, context}, and the image sizes {low_size, high_size}
               its codes were encoded at: what eval.py task=superres and superres_ckpt= read
    adapter    null, or for a LoRA adapter checkpoint (t2i.adapters: its `state_dict` holds the adapter's
               weights only) AdapterRecord's fields: the adapter's settings {rank, alpha, dropout, targets} and
               the base GPT it belongs to {base_sha256: weights_hash of the base's weights, base_checkpoint}

Version 1 (no version number) kept the tokenizer bytes, text_len and caption_prob at the top:
it is read and upgraded. Version 2 had no `superres` entry (no super-resolution models): read as null.
Version 3 had no `adapter` entry (no adapters): read as null.

In memory the record is GPTRecord, its entries small dataclasses (TokenizerRecord, VQGANRecord,
TrainingRecord, SuperresRecord, AdapterRecord; the configs as GPTConfig and VQGANConfig), built and checked here
only: a field of the wrong type, an unknown or a missing one raises CheckpointError naming the file
and the field (`t2i.vqgan.sha256`). On disk it stays the plain dict above (`GPTRecord.to_dict()`).
"""

from __future__ import annotations

import hashlib
import pickle
import types
import typing
import zipfile
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from t2i.data.tokenizer import TOKENIZERS, FixedLengthTokenizer, load_tokenizer
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.layout import SuperresGrid
from t2i.models.vqgan import VQGANConfig, VQModel

RECORD_VERSION = 4


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: the message names the file and what is wrong with it."""


class RecordEntry:
    """One entry of the checkpoint record: a dataclass whose fields are checked against their types when
    it is built (the message names the field: `t2i.<entry>.<field>`), written to disk as a plain dict."""

    where = "t2i"  # the entry's place in the checkpoint, for error messages

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _fits(value, hints[f.name]):
                raise CheckpointError(f"the checkpoint record's {self.where}.{f.name} must be "
                                      f"{_type_name(hints[f.name])}, got {type(value).__name__} {_short(value)}")

    @classmethod
    def from_dict(cls, data, **converted):
        """The entry from its on-disk dict: every key a field, every field without a default given;
        `converted`: fields already built from their dicts (nested configs)."""
        _check_keys(cls, data, cls.where)
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise CheckpointError(f"the checkpoint record's {cls.where} lacks {', '.join(missing)}")
        return cls(**{**data, **converted})

    def to_dict(self) -> dict:
        return asdict(self)


def _check_keys(cls, data, where: str) -> None:
    """`data` must be a mapping of the dataclass `cls`'s fields (a CheckpointError naming `where` otherwise)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"the checkpoint record's {where} must be a mapping of {cls.__name__}'s fields, got "
                              f"{type(data).__name__} {_short(data)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"the checkpoint record's {where} has unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")


def _fits(value, hint) -> bool:
    """Whether `value` has the type `hint` names (an int passes for a float; a bool for neither)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list or hint is list:  # a tuple too: torch.save keeps the tuples a config was given
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0]) for item in value if args)
    return isinstance(value, origin or hint)


def _type_name(hint) -> str:
    name = hint.__name__ if isinstance(hint, type) else str(hint)  # int, not <class 'int'>; list[int] as written
    return name.replace("typing.", "").replace("NoneType", "None")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class TokenizerRecord(RecordEntry):
    """The text tokenizer, whole: its kind, its model's bytes (SentencePiece model or WordPiece vocab), text_len."""

    kind: str
    model: bytes
    text_len: int
    where = "t2i.tokenizer"

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in TOKENIZERS:
            raise CheckpointError(f"the checkpoint record's {self.where}.kind must be one of "
                                  f"{', '.join(TOKENIZERS)}, got {self.kind!r}")

    @classmethod
    def of(cls, tokenizer: FixedLengthTokenizer) -> TokenizerRecord:
        return cls(kind=tokenizer.kind, model=tokenizer.model, text_len=tokenizer.text_len)

    def load(self) -> FixedLengthTokenizer:
        return load_tokenizer(self.kind, self.model, self.text_len)


@dataclass
class VQGANRecord(RecordEntry):
    """The VQGAN whose codes the GPT reads: its config, its checkpoint file (when there is one), its weights'
    hash (when known) and the code grid [h, w] of the images the GPT writes."""

    config: VQGANConfig
    checkpoint: str | None
    sha256: str | None
    grid: list[int]
    where = "t2i.vqgan"

    def __post_init__(self):
        super().__post_init__()
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise CheckpointError(f"the checkpoint record's {self.where}.grid must be two positive sizes [h, w], "
                                  f"got {self.grid}")

    @classmethod
    def from_dict(cls, data) -> VQGANRecord:
        converted = {}
        if isinstance(data, dict) and "config" in data:
            converted["config"] = _config(VQGANConfig, data["config"], f"{cls.where}.config")
        return super().from_dict(data, **converted)


@dataclass
class TrainingRecord(RecordEntry):
    """What the model learned and where it came from (None: not recorded, by checkpoints before version 2)."""

    caption_prob: float = 0.0  # > 0: the model learned the image-to-text direction and can score captions
    caption_end: bool = False  # caption rows learned where their text ends
    txt_loss_scale: float | None = None
    cond_drop: float | None = None
    origin: str | None = None  # "trained from scratch", "fine-tuned from ...", "pai-painter import of ..."
    where = "t2i.training"


@dataclass
class SuperresRecord(RecordEntry):
    """A super-resolution GPT's windows on its code grids (SuperresGrid's fields) and the image sizes its low
    and high codes were encoded at."""

    low: list[int]
    high: list[int]
    window: list[int]
    stride: list[int]
    context: str
    low_size: int
    high_size: int
    where = "t2i.superres"

    def __post_init__(self):
        super().__post_init__()
        try:
            self.grid
        except ValueError as error:
            raise CheckpointError(f"the checkpoint record's {self.where} is not a valid window layout: {error}") \
                from None

    @classmethod
    def of(cls, grid: SuperresGrid, low_size: int, high_size: int) -> SuperresRecord:
        return cls(**grid.to_dict(), low_size=low_size, high_size=high_size)

    @property
    def grid(self) -> SuperresGrid:
        return SuperresGrid(low=self.low, high=self.high, window=self.window, stride=self.stride, context=self.context)


@dataclass
class AdapterRecord(RecordEntry):
    """A LoRA adapter (t2i.adapters): its settings (t2i.adapters.LoraConfig's fields) and the base GPT it was
    trained on, by the sha256 of the base's weights (weights_hash) and the file it was read from."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str]
    base_sha256: str
    base_checkpoint: str | None
    where = "t2i.adapter"


@dataclass
class GPTRecord(RecordEntry):
    """The record a GPT checkpoint carries under "t2i" (see the module's docstring for its fields)."""

    gpt: GPTConfig
    tokenizer: TokenizerRecord
    vqgan: VQGANRecord
    training: TrainingRecord = field(default_factory=TrainingRecord)
    sampling: dict = field(default_factory=dict)  # SamplingConfig's fields (t2i.sampling reads them)
    superres: SuperresRecord | None = None  # a super-resolution GPT's grids and image sizes
    adapter: AdapterRecord | None = None  # a LoRA adapter checkpoint's settings and base
    version: int = RECORD_VERSION

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, source: str) -> GPTRecord:
        """The record of a checkpoint, upgraded to RECORD_VERSION and checked field by field."""
        record = checkpoint.get("t2i") or {}
        if not isinstance(record, dict) or "gpt" not in record:
            raise CheckpointError(f"{source} is not a t2i GPT checkpoint (no t2i.gpt record): train one with "
                                  "stage=gpt, or import one with python -m t2i.interop paipainter")
        version = record.get("version", 1)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise CheckpointError(f"{source} has checkpoint record version {version}; this t2i reads up to "
                                  f"{RECORD_VERSION}: update t2i")
        try:
            return cls.from_dict(_upgraded(record, version))
        except CheckpointError as error:
            raise CheckpointError(f"{source}: {error}") from None

    @classmethod
    def from_dict(cls, data: dict) -> GPTRecord:
        """The record from its on-disk dict (of the current version), every entry checked."""
        entries = {"gpt": lambda d: _config(GPTConfig, d, "t2i.gpt"), "tokenizer": TokenizerRecord.from_dict,
                   "vqgan": VQGANRecord.from_dict, "training": TrainingRecord.from_dict,
                   "superres": lambda d: None if d is None else SuperresRecord.from_dict(d),
                   "adapter": lambda d: None if d is None else AdapterRecord.from_dict(d)}
        converted = {name: build(data[name]) for name, build in entries.items()
                     if isinstance(data, dict) and name in data}
        return super().from_dict(data, **converted)

    @property
    def caption_prob(self) -> float:
        """> 0: the model learned the image-to-text direction and can score captions."""
        return self.training.caption_prob

    @property
    def grid(self) -> tuple[int, int]:
        """The code grid the model reads and writes (superres: the high-resolution one)."""
        h, w = self.vqgan.grid
        return h, w

    @property
    def superres_grid(self) -> SuperresGrid | None:
        """A super-resolution GPT's windows on its code grids; None for a text-to-image GPT."""
        return None if self.superres is None else self.superres.grid

    def tokenizer_model(self) -> FixedLengthTokenizer:
        return self.tokenizer.load()


def _upgraded(record: dict, version: int) -> dict:
    """A record of an older version in the current version's shape."""
    if version == 1:  # the tokenizer's bytes, text_len and caption_prob at the top
        record = {"gpt": record["gpt"], "vqgan": record.get("vqgan"), "sampling": record.get("sampling", {}),
                  "tokenizer": {"kind": "sentencepiece", "model": record.get("tokenizer"),
                                "text_len": record.get("text_len")},
                  "training": {"caption_prob": record.get("caption_prob", 0.0)}}
        if record["vqgan"] is None:
            del record["vqgan"]
    # version 2 had no superres entry, version 3 no adapter entry: read as None
    return {**record, "version": RECORD_VERSION}


def _config(cls, data, where: str):
    """A model config (GPTConfig, VQGANConfig) from the record's dict of its fields."""
    _check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise CheckpointError(f"the checkpoint record's {where}.{name} must be {_type_name(hints[name])}, got "
                                  f"{type(value).__name__} {_short(value)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint record's {where} is not a valid {cls.__name__}: {error}") from None


def vqgan_identity(vqgan: VQModel, checkpoint: str | Path | None, grid: tuple[int, int] | list[int]) -> VQGANRecord:
    """The record's `vqgan` entry for a VQGAN (its checkpoint file, when there is one)."""
    return VQGANRecord(config=vqgan.cfg, checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
                       sha256=weights_hash(vqgan), grid=[int(n) for n in grid])


def gpt_state_dict(checkpoint: dict, source: str = "the checkpoint") -> dict:
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{source} has a t2i record but no state_dict of weights")
    return {k[len("gpt."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("gpt.")}


def load_gpt(path: str | Path) -> tuple[GPT, GPTRecord]:
    """The GPT of a t2i GPT checkpoint and its record."""
    checkpoint = read_checkpoint(path, foreign_objects=False)  # t2i writes tensors and plain data only
    record = GPTRecord.from_checkpoint(checkpoint, str(path))
    if record.adapter is not None:
        raise CheckpointError(f"{path} is a LoRA adapter (its own weights only), not a whole GPT: load it with the "
                              f"base it belongs to, ckpt=BASE adapter={path} (it was trained on "
                              f"{record.adapter.base_checkpoint or 'a base it does not name'})")
    gpt = GPT(record.gpt)
    load_weights(gpt, gpt_state_dict(checkpoint, str(path)), str(path), what="GPT")
    return gpt.eval(), record


def save_gpt(path: str | Path, gpt: GPT, record: GPTRecord) -> None:
    """A GPT checkpoint that load_gpt, eval.py and train.py's `init_ckpt` read (weights as a GPTStage saves them)."""
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


# where each entry point takes the VQGAN of a GPT checkpoint that no longer finds its own
VQGAN_SETTINGS = ("vqgan_ckpt=PATH (for ckpt= in eval.py and the demo, for init_ckpt= in train.py), "
                  "superres_vqgan_ckpt=PATH (for eval.py's superres_ckpt=)")


def load_record_vqgan(record: GPTRecord, source: str, vqgan_ckpt: str | Path | None = None) -> VQModel:
    """The VQGAN a GPT checkpoint names (or `vqgan_ckpt`), checked against the record's hash."""
    path = vqgan_ckpt or record.vqgan.checkpoint
    how = f"pass the VQGAN {source} was trained with: {VQGAN_SETTINGS}"
    if not path:
        raise ValueError(f"{source} names no VQGAN checkpoint: {how}")
    if not vqgan_ckpt and not Path(path).is_file():
        raise FileNotFoundError(f"{source} names its VQGAN at {path}, which is not there (moved?): {how}")
    vqgan = load_vqgan(path, record.vqgan.config)
    expected = record.vqgan.sha256
    if expected and weights_hash(vqgan) != expected:
        raise ValueError(f"the VQGAN at {path} is not the one {source} was trained with "
                         f"(sha256 {weights_hash(vqgan)[:12]}..., expected {expected[:12]}...): "
                         f"{how}")
    return vqgan


# ---------------------------------------------------------------------------------------------
# Checkpoints: taming-transformers' (weights at the top level, LPIPS/discriminator under
# `loss.*`, no config inside) and ours (VQGANStage: weights under `vqgan.`, config under "t2i").


class StandIn:
    """What an object of a class torch's weights-only loading does not allow becomes: the arguments
    and state pickled for it, kept as data; its class's code is neither imported nor run."""

    def __new__(cls, *args, **kwargs):  # NEWOBJ calls only __new__, REDUCE calls the class
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def read_checkpoint(path: str | Path, *, mmap: bool = False, foreign_objects: bool = True) -> dict:
    """torch.load on the CPU that runs no code from the file: torch's weights-only loading.

    A taming .ckpt also pickles Lightning 1.x objects beside the weights (its callbacks' classes and
    states, by module path), which weights-only loading refuses: with `foreign_objects` each class it
    names that torch does not allow (`get_unsafe_globals_in_checkpoint`) is allowed for this load
    only (`safe_globals`) as an inert `StandIn` subclass of that name, so its weights load whether or
    not `pytorch_lightning` is installed. torch never allows functions of os/sys, whatever the list,
    and rebuilds items only into plain dicts and lists: a file that needs more is refused.
    `foreign_objects=False` refuses any object beyond tensors and containers (resuming a run: t2i
    writes no others). `mmap`: tensors stay on disk until used (read a few small entries cheaply).
    Every file that cannot be read raises CheckpointError naming the file and the problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        if not zipfile.is_zipfile(path):  # torch's pre-1.6 format, or not a torch file at all
            return torch.load(path, map_location="cpu", weights_only=True)
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        if unsafe and not foreign_objects:
            raise CheckpointError(f"{path} pickles objects beyond tensors and containers ({', '.join(unsafe)}): "
                                  "not a checkpoint t2i wrote; nothing from it was run")
        # one class per name: classes pickled as dict keys stay distinct
        stand_ins = [(type(name.rsplit(".", 1)[-1], (StandIn,), {"__module__": name.rsplit(".", 1)[0]}), name)
                     for name in unsafe]
        with torch.serialization.safe_globals(stand_ins):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        # torch's message suggests weights_only=False, which would run the file's code: keep only its reason
        reason = str(error).rsplit("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0]
        raise CheckpointError(f"{path} was refused: reading it would need more than tensors and plain data "
                              f"({reason}); nothing from it was run") from error
    except Exception as error:  # garbage makes the unpickler fail in any way (IndexError, struct.error, ...)
        detail = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated, or another kind of file): "
                              f"{type(error).__name__} {detail}".rstrip()) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict of weights)")
    return checkpoint


def vqgan_state_dict(checkpoint: dict) -> dict:
    """The VQModel weights inside a checkpoint (or a bare state dict), `loss.*` left out."""
    state = checkpoint.get("state_dict", checkpoint)
    if any(key.startswith("vqgan.") for key in state):
        state = {key[len("vqgan."):]: value for key, value in state.items() if key.startswith("vqgan.")}
    return {key: value for key, value in state.items() if not key.startswith("loss.")}


def load_weights(model: nn.Module, state: dict, source: str, what: str = "VQGAN") -> None:
    """Strict load that says which keys are missing, unexpected or mis-shaped (`what`: the model's name)."""
    expected = model.state_dict()
    not_tensors = sorted(f"{key} ({type(value).__name__})" for key, value in state.items()
                         if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{source}: weights that are not tensors: {', '.join(not_tensors[:20])}")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
                 for key in expected if key in state and state[key].shape != expected[key].shape]
    if missing or unexpected or misshaped:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise CheckpointError(f"{source} does not fit this {what} config:\n  " + "\n  ".join(parts))
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
