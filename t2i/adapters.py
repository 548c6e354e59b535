"""LoRA adapters on the GPT through peft: attach, save the adapter with its base's hash, load, merge.

A LoRA adapter adds to chosen linear layers W a trainable low-rank update (alpha / rank) * B A (A: rank x in,
B: out x rank, B zero at the start, so the adapted model starts as its base); the base weights stay frozen.
Training (`stage.lora` with `init_ckpt=BASE`) saves adapter checkpoints: the adapter's weights only (peft's
state dict: no base weight is stored again) and the GPT record of the base with an `adapter` entry
(t2i.checkpoints.AdapterRecord): the adapter's settings and the sha256 of its base's weights, so that an
adapter is refused on any other base. Loading (`T2IPipeline.from_checkpoint(BASE, adapter=PATH)`, eval.py's
`adapter=`) attaches it to the base and by default merges it into the weights (W + (alpha / rank) B A): the
merged GPT is a plain GPT again, as fast as its base. Several adapters of one base can also be attached to it at
once, unmerged, each under its name (`attach_adapters`), and one of them, or none, made the one that runs
(`use_adapter`): the demo's style menu switches per request without reloading the base.

peft is an optional dependency (the `lora` extra): imported when an adapter is used.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from t2i.checkpoints import (AdapterRecord, CheckpointError, GPTRecord, gpt_state_dict, load_gpt, read_checkpoint,
                             weights_hash)
from t2i.extras import require
from t2i.models.gpt import GPT

# each choice of LoraConfig.targets -> the GPT's layers it adapts (full module names, as one regex): the classic
# blocks' key/query/value/proj and MLP (nn.Sequential: linears 0 and 2), the Llama-style blocks' SwiGLU
# gate/up/down, the output head, and the token embedding (a word the base never read in a caption has only its
# random initial row: the adapter can give it one; rows of tokens the fine-tuning never sees stay as they are)
TARGETS = {
    "attention": r"blocks\.\d+\.attn\.(key|query|value|proj)",
    "mlp": r"blocks\.\d+\.mlp\.(0|2|gate|up|down)",
    "head": r"head",
    "embedding": r"tok_emb",
}


@dataclass
class LoraConfig:
    """stage.lora: the adapter's rank, its scale alpha (the update is (alpha / rank) B A), dropout on its
    input, and which layers it adapts (TARGETS' names)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attention", "mlp"])

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"stage.lora.rank must be a positive integer, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"stage.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"stage.lora.dropout must be in [0, 1), got {self.dropout}")
        self.targets = list(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"stage.lora.targets must name some of {', '.join(TARGETS)}, got {self.targets}")

    @classmethod
    def of(cls, record: AdapterRecord) -> LoraConfig:
        return cls(rank=record.rank, alpha=record.alpha, dropout=record.dropout, targets=record.targets)


def _peft():
    return require("peft")


def add_lora(gpt: GPT, config: LoraConfig, name: str = "default") -> GPT:
    """Freeze `gpt`'s weights and attach a new adapter (in place), under `name` (peft's adapter name): only the
    adapter's weights train."""
    tied = [target for target in ("head", "embedding") if target in config.targets]
    if tied and gpt.cfg.tie_head:
        raise ValueError(f"stage.lora.targets has {tied[0]}, but this GPT's head is its token embedding "
                         "(model.tie_head): merged, the adapter would change both; leave head and embedding out of "
                         "the targets")
    peft = _peft()
    gpt.requires_grad_(False)
    pattern = "|".join(f"(?:{TARGETS[target]})" for target in config.targets)
    peft_config = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                  target_modules=pattern, bias="none")
    return peft.inject_adapter_in_model(peft_config, gpt, adapter_name=name)


def adapter_weights(gpt: GPT, state_dict: dict | None = None, name: str = "default") -> dict[str, torch.Tensor]:
    """The weights of the adapter `name` of an adapted GPT (peft's names, without the adapter's name: no base
    weight), from `state_dict` when given (the GPT's own, e.g. a strategy's gathered one)."""
    return _peft().get_peft_model_state_dict(gpt, state_dict=state_dict, adapter_name=name)


def adapter_record(config: LoraConfig, base: GPT, base_checkpoint: str | Path | None) -> AdapterRecord:
    """The record's `adapter` entry: the settings and the base (before the adapter is attached), by hash."""
    return AdapterRecord(**asdict(config), base_sha256=weights_hash(base),
                         base_checkpoint=str(Path(base_checkpoint).resolve()) if base_checkpoint else None)


def save_adapter(path: str | Path, gpt: GPT, record: GPTRecord) -> None:
    """An adapter checkpoint: the adapter's weights (under `gpt.`, as a GPTStage saves them) and the record."""
    if record.adapter is None:
        raise ValueError("an adapter checkpoint's record needs its adapter entry (adapter_record)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"gpt.{k}": v.detach().cpu().contiguous() for k, v in adapter_weights(gpt).items()}
    torch.save({"state_dict": state, "t2i": record.to_dict()}, path)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], GPTRecord]:
    """An adapter checkpoint's weights and record (a CheckpointError if the file is not one)."""
    checkpoint = read_checkpoint(path, foreign_objects=False)
    record = GPTRecord.from_checkpoint(checkpoint, str(path))
    if record.adapter is None:
        raise CheckpointError(f"{path} is a whole GPT checkpoint, not a LoRA adapter: pass it as ckpt=, or pass the "
                              "adapter checkpoint of a run with stage.lora as adapter=")
    return gpt_state_dict(checkpoint, str(path)), record


def check_base(record: GPTRecord, adapter: str | Path, base_sha256: str, base_path: str | Path) -> None:
    """Refuse an adapter on any GPT but the one it was trained on: `base_sha256` is weights_hash of the GPT
    (before any adapter is attached)."""
    found = base_sha256
    expected = record.adapter.base_sha256
    if found != expected:
        raise CheckpointError(f"the LoRA adapter {adapter} was trained on another base than {base_path} (its weights' "
                              f"sha256 {found[:12]}..., the adapter's base {expected[:12]}..., "
                              f"{record.adapter.base_checkpoint or 'not named'}): pass the base it was trained on")


def load_adapter_weights(gpt: GPT, weights: dict[str, torch.Tensor], source: str, name: str = "default") -> None:
    """Load an adapter's weights into a GPT that has the same adapter attached under `name` (add_lora), checking
    they fit."""
    expected = adapter_weights(gpt, name=name)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    misshaped = [f"{k}: file {tuple(weights[k].shape)}, model {tuple(v.shape)}" for k, v in expected.items()
                 if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or misshaped:
        raise CheckpointError(f"{source}: the adapter's weights do not fit its own settings (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}, mis-shaped: {misshaped[:5]})")
    _peft().set_peft_model_state_dict(gpt, weights, adapter_name=name)


def merge_lora(gpt: GPT) -> GPT:
    """Fold every adapted layer's update into its weight and put the plain layer back (in place): a plain GPT."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(gpt.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, attribute = name.rpartition(".")
            setattr(gpt.get_submodule(parent), attribute, module.get_base_layer())
    return gpt


def apply_adapter(gpt: GPT, base_path: str | Path, adapter: str | Path, merge: bool = True) -> GPTRecord:
    """Attach the adapter checkpoint `adapter` to `gpt` (in place: the GPT of `base_path`, checked by hash),
    merged into its weights when `merge`. Returns the adapter's record (its settings, training, sampling)."""
    weights, record = read_adapter(adapter)
    check_base(record, adapter, weights_hash(gpt), base_path)
    add_lora(gpt, LoraConfig.of(record.adapter))
    load_adapter_weights(gpt, weights, str(adapter))
    if merge:
        merge_lora(gpt)
    gpt.eval()
    return record


BASE_STYLE = "base"  # the name of no adapter: the base GPT itself


def attach_adapters(gpt: GPT, base_path: str | Path, adapters: dict[str, str | Path]) -> dict[str, GPTRecord]:
    """Attach several adapter checkpoints of `gpt` (the GPT of `base_path`) at once, unmerged, each under its name
    (adapters: name -> file), every one checked against the base by hash before any is attached; then none runs
    (use_adapter picks one). Returns each adapter's record by name."""
    if BASE_STYLE in adapters:
        raise ValueError(f"an adapter may not be named {BASE_STYLE!r}: that name is the base model without one")
    base_sha256 = weights_hash(gpt)  # of the base alone: attached adapters add their weights to the state dict
    read = {name: read_adapter(path) for name, path in adapters.items()}
    for name, (_, record) in read.items():
        check_base(record, adapters[name], base_sha256, base_path)
    for name, (weights, record) in read.items():
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            add_lora(gpt, LoraConfig.of(record.adapter), name)
        load_adapter_weights(gpt, weights, str(adapters[name]), name)
    use_adapter(gpt, None)
    gpt.eval()
    return {name: record for name, (_, record) in read.items()}


def use_adapter(gpt: GPT, name: str | None) -> None:
    """Make the attached adapter `name` the one that runs in `gpt`'s forward (None: none, the base's weights
    alone), in every adapted layer; unmerged adapters only (attach_adapters), so that switching changes no
    weight. A layer the adapter does not adapt runs as the base's."""
    _peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [module for module in gpt.modules() if isinstance(module, BaseTunerLayer)]
    names = set().union(*(set(layer.lora_A) | set(layer.lora_embedding_A) for layer in layers))  # linear, embedding
    if name is not None and name not in names:
        raise ValueError(f"no adapter named {name!r} is attached (attached: {', '.join(sorted(names)) or 'none'})")
    for layer in layers:
        if layer.merged:
            raise ValueError("use_adapter switches unmerged adapters: this GPT has one merged into its weights")
        layer.enable_adapters(name is not None)  # disabled: the layer's forward is its base layer's alone
    if name is not None:  # after enable_adapters, which sets the active ones trainable again
        from peft.functional import set_adapter

        set_adapter(gpt, name, inference_mode=True)


def load_adapted_gpt(path: str | Path, adapter: str | Path | None = None, merge: bool = True) -> tuple[GPT, GPTRecord]:
    """The GPT of the checkpoint `path` and its record; with `adapter`, that adapter applied (apply_adapter: checked
    against the base by hash, merged when `merge`) and the adapter's record in place of the base's."""
    gpt, record = load_gpt(path)
    if adapter is not None:
        record = apply_adapter(gpt, path, adapter, merge=merge)
    return gpt, record
