"""The stages' settings as typed configs: the schemas of conf/stage/gpt.yaml and conf/stage/vqgan.yaml.

Each is registered with Hydra's ConfigStore (group `stage`, names `gpt_schema`, `vqgan_schema`) and
named first in its YAML file's defaults list, so Hydra checks the composed `stage` node against it:
a key the stage does not have (a typo in an experiment, `+stage.warmup_step=5`) or a value of the
wrong type (`stage.warmup_steps=abc`) fails when the config is composed, naming the key, before
anything is built. `OmegaConf.to_object(cfg.stage)` then gives the dataclass, whose `__post_init__`
checks what the config alone can tell (ranges, choices); what needs the model or the data too is
checked by the stage. Importing t2i.stages registers the schemas (train.py and the tests do).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from t2i.adapters import LoraConfig
from t2i.models.losses import VQGANLossConfig
from t2i.sampling import SamplingConfig
from t2i.sampling.options import check_step_mode

LR_SCHEDULES = ("constant", "cosine")


@dataclass
class MonitorConfig:
    """The logged metric ModelCheckpoint keeps the best of (conf/callbacks/default.yaml reads it)."""

    metric: str = "val/loss"
    mode: str = "min"

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"stage.monitor.mode must be min or max, got {self.mode!r}")


@dataclass
class SuperresOptions:
    """stage.superres: a super-resolution GPT's windows, in codes of the 2x grid (None: the whole grid)."""

    window: list[int] | None = None
    stride: list[int] | None = None  # default: the window (windows side by side)
    context: str | None = None  # whole (default) or window: the low-resolution codes before each window


@dataclass
class GPTStageConfig:
    """conf/stage/gpt.yaml: how the GPT trains (the comments there say what each setting does)."""

    name: str = "gpt"
    weight_decay: float = 0.01
    lr_scaling: str = "none"
    lr_reference_batch: int = 256
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    txt_loss_scale: float = 1.0
    pkeep: float = 1.0
    cond_drop: float = 0.1
    caption_prob: float = 0.0
    caption_end: bool = False
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    compile: bool = False
    compile_mode: str | None = None
    fused_optimizer: Any = "auto"  # true, false or "auto" (OmegaConf types no bool-or-str union)
    activation_checkpointing: bool = False
    sample_every_n_steps: int = 0  # 0: no sample grids during training
    sample_prompts: list[str] = field(default_factory=list)
    num_sample_prompts: int = 8
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sample_step: str = "auto"  # how the grids' sampling steps run (as eval.py's sampling.step; not in the checkpoint)
    # SuperresOptions or null; typed Any in the schema because OmegaConf cannot merge a mapping given on
    # the command line (stage.superres={window:[8,8]}) into a typed node that is null: checked below instead
    superres: Any = None
    # LoraConfig or null (typed Any for the same reason): train a LoRA adapter on init_ckpt's frozen GPT
    lora: Any = None

    def __post_init__(self):
        for name in ("pkeep", "cond_drop", "caption_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"stage.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.txt_loss_scale < 0:
            raise ValueError(f"stage.txt_loss_scale must be >= 0, got {self.txt_loss_scale}")
        check_step_mode(self.sample_step, setting="stage.sample_step")
        if self.fused_optimizer not in (True, False, "auto"):
            raise ValueError(f"stage.fused_optimizer must be true, false or auto, got {self.fused_optimizer!r}")
        if isinstance(self.superres, dict):
            known = [f.name for f in fields(SuperresOptions)]
            unknown = sorted(set(self.superres) - set(known))
            if unknown:
                raise ValueError(f"stage.superres has unknown key(s) {', '.join(unknown)}: it takes {', '.join(known)}")
            self.superres = SuperresOptions(**self.superres)
        if self.superres is not None and not isinstance(self.superres, SuperresOptions):
            raise ValueError(f"stage.superres must be null or {{window, stride, context}}, got {self.superres!r}")
        if isinstance(self.lora, dict):
            known = [f.name for f in fields(LoraConfig)]
            unknown = sorted(set(self.lora) - set(known))
            if unknown:
                raise ValueError(f"stage.lora has unknown key(s) {', '.join(unknown)}: it takes {', '.join(known)}")
            self.lora = LoraConfig(**self.lora)
        if self.lora is not None and not isinstance(self.lora, LoraConfig):
            raise ValueError(f"stage.lora must be null or {{rank, alpha, dropout, targets}}, got {self.lora!r}")
        if self.superres is not None and self.caption_prob:
            raise ValueError("a super-resolution GPT has no captioning direction: set stage.caption_prob=0")


@dataclass
class CodebookConfig:
    """Keeping the codebook in use: data-dependent restarts of dead codes."""

    restart_every: int = 0  # steps between restarts of unused codes (0: never)
    restart_until: int = 0  # no restarts after this step (0: no limit)
    usage_decay: float = 0.99  # EMA of per-code counts; a code below `dead_below` counts as dead
    dead_below: float = 0.03


@dataclass
class VQGANStageConfig:
    """conf/stage/vqgan.yaml: how the VQGAN trains (the model itself is the `vqgan` config group's)."""

    name: str = "vqgan"
    lr_scaling: str = "none"
    lr_reference_batch: int = 1
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    log_images: int = 8  # inputs/reconstructions pairs in the validation grid
    image_sizes: list[int] | None = None  # train at these sizes, one a step in turn (null: data.image_size)
    compile: bool = False  # torch.compile of the training step's autoencoder pass (speed only)
    monitor: MonitorConfig = field(default_factory=lambda: MonitorConfig("val/psnr", "max"))
    strategy: Any = "auto"  # the trainer strategy the trainer presets take (a _target_ node in the YAML)

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"stage.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.image_sizes is not None and (not self.image_sizes or any(size < 1 for size in self.image_sizes)):
            raise ValueError(f"stage.image_sizes must be null or a list of sizes >= 1 (e.g. [32, 32, 64]: two steps "
                             f"at 32x32, then one at 64x64), got {self.image_sizes}")


def typed_stage_config(node: DictConfig) -> GPTStageConfig | VQGANStageConfig:
    """The composed `stage` node as its dataclass (interpolations resolved, __post_init__ checks run).

    Hydra lets `+stage.KEY=VALUE` add a key past the schema, and OmegaConf would drop it silently when
    building the dataclass: refused here, naming it."""
    config = OmegaConf.to_object(node)
    unknown = sorted(set(node) - {f.name for f in fields(config)})
    if unknown:
        raise ValueError(f"stage={config.name} has no setting {', '.join(f'stage.{key}' for key in unknown)}: its "
                         f"settings are {', '.join(f.name for f in fields(config))} (conf/stage/{config.name}.yaml)")
    return config


ConfigStore.instance().store(group="stage", name="gpt_schema", node=GPTStageConfig)
ConfigStore.instance().store(group="stage", name="vqgan_schema", node=VQGANStageConfig)
