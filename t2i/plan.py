"""What `python train.py ...` will do, resolved before anything is built and said before it starts.

Three things follow from the machine and the files on disk unless they are given:
- the data a GPT reads: the code shards of `data=<name>` once `python -m t2i.pretokenize` has made
  them (`data.codes_root`), else its image shards with the VQGAN that encodes them at every step
  (`vqgan_ckpt`, or the one `init_ckpt` names);
- the precision (`trainer.precision=auto`): bf16-mixed on GPUs that have bf16, 16-mixed on GPUs
  that do not (with CogView's PB-relax advised), 32-true on CPUs;
- the strategy (`trainer.strategy=auto`): DDP when devices x nodes > 1, as Lightning chooses.

`resolve_run` writes those choices into the config (after checking the devices, so a machine that
cannot run the command stops before anything is built); `RunPlan` is the summary train.py prints,
logs and keeps in `<run dir>/plan.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from t2i.data.shards import MANIFEST, read_manifest
from t2i.devices import check_devices
from t2i.stages.scaling import scaled_lr

log = logging.getLogger(__name__)


def auto_precision(accelerator: str) -> str:
    """trainer.precision=auto: the fastest precision that trains reliably on this machine."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return "32-true"  # CPUs: bf16 autocast is slow where there is no bf16 matrix unit
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def _manifest_kind(root: str | None) -> str | None:
    """"codes", "image", or None when `root` holds no shards."""
    if not root or not (Path(root) / MANIFEST).is_file():
        return None
    return read_manifest(root)["kind"]


def gpt_data_root(cfg: DictConfig) -> tuple[str, str]:
    """(root, kind) of the shards a GPT run reads; an error naming both ways to make them when neither works.

    Code shards at data.root (e.g. data=shapes_codes) are read as they are. Image shards at data.root are
    read when a VQGAN for them is given: vqgan_ckpt, or init_ckpt's own (fine-tuning: the codes
    at data.codes_root may come from another VQGAN). Otherwise the code shards at data.codes_root.
    """
    data = cfg.data
    root, codes_root = data.root, data.get("codes_root")
    kind = _manifest_kind(root)
    if kind == "codes" or data.get("source") == "pretokenize":  # code shards asked for: the loader says what is amiss
        return root, "codes"
    if (cfg.vqgan_ckpt or cfg.init_ckpt) and kind == "image":
        return root, "image"
    if codes_root and _manifest_kind(codes_root) == "codes":
        return codes_root, "codes"
    convert = "" if kind else (f"    python -m t2i.data.convert {data.get('source') or data.name} --src RAW "
                               f"--out {root}   (no image shards at data.root={root} either)\n")
    raise FileNotFoundError(
        f"stage=gpt found nothing to train on for data={data.name}: no code shards at data.codes_root={codes_root}"
        f"{' and no vqgan_ckpt for the image shards at ' + str(root) if kind else ''}. Either\n{convert}"
        f"    python -m t2i.pretokenize --data {root} --out {codes_root} --vqgan VQGAN.ckpt   (code shards: fast "
        f"training, then this command again)\n"
        f"or train on the image shards, encoding them at every step (slow): add vqgan_ckpt=VQGAN.ckpt")


def resolve_run(cfg: DictConfig) -> int:
    """Check the devices and fill in what follows from the machine and the disk (precision, the GPT's data).

    Returns the number of processes on each node. Called before anything is built.
    """
    devices = check_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    with open_dict(cfg):
        if cfg.trainer.precision == "auto":
            cfg.trainer.precision = auto_precision(cfg.trainer.accelerator)
            if cfg.trainer.precision == "16-mixed" and cfg.stage.name == "gpt" and not cfg.model.pb_relax:
                log.warning("this GPU has no bf16: training in fp16 (16-mixed, with loss scaling); CogView's PB-relax "
                            "keeps fp16 attention and LayerNorm finite: add model.pb_relax=true")
        if cfg.stage.name == "gpt":
            root, kind = gpt_data_root(cfg)
            if root != cfg.data.root:
                log.info("data=%s: training on its code shards, %s", cfg.data.name, root)
                cfg.data.root, cfg.data.source = root, "pretokenize"
    return devices


@dataclass
class RunPlan:
    """What a training run was resolved to: printed before it starts, kept in <run dir>/plan.json."""

    stage: str
    model: str
    parameters: int  # trained
    frozen_parameters: int  # loaded and not trained (the VQGAN that encodes images or draws sample grids)
    data: str
    data_root: str
    data_kind: str  # image or codes
    devices: int  # processes per node
    nodes: int
    strategy: str
    precision: str
    batch_per_device: int
    accumulate: int
    effective_batch: int
    lr: float  # after stage.lr_scaling
    lr_rule: str
    max_steps: int
    length: str  # the run's length in words: steps, epochs or time
    schedule: str
    run_dir: str
    checkpoints: str
    logger: str

    def lines(self) -> list[str]:
        return [
            f"stage      {self.stage}: {self.model}, {self.parameters:,} trained parameters"
            + (f" (+ {self.frozen_parameters:,} frozen)" if self.frozen_parameters else ""),
            f"data       {self.data}: {'code' if self.data_kind == 'codes' else 'image'} shards at {self.data_root}",
            f"devices    {self.devices} per node x {self.nodes} node(s), strategy {self.strategy}, precision {self.precision}",
            f"batch      {self.batch_per_device} per device x {self.accumulate} accumulated x "
            f"{self.devices * self.nodes} processes = {self.effective_batch}",
            f"lr         {self.lr:.3g} ({self.lr_rule})",
            f"steps      {self.length}, {self.schedule}",
            f"writes     checkpoints to {self.checkpoints}, logs ({self.logger}) to {self.run_dir}",
        ]

    def save(self, run_dir: str | Path) -> None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, "plan.json").write_text(json.dumps(asdict(self), indent=1))


def strategy_name(strategy, world: int) -> str:
    """trainer.strategy in words: a name, "auto" as Lightning resolves it, or a strategy object's class."""
    if isinstance(strategy, str):
        return ("ddp" if world > 1 else "single-device") if strategy == "auto" else strategy
    return type(strategy).__name__


def _model_name(cfg: DictConfig, stage_module) -> str:
    if cfg.stage.name == "gpt":
        c = stage_module.gpt.cfg
        return (f"GPT {c.n_layer} layers x {c.n_head} heads x {c.n_embd} wide ({c.norm} {c.norm_type}-norm, "
                f"{c.mlp}, {c.pos} positions), {c.block_size} positions")
    c = stage_module.vqgan.cfg
    return f"VQGAN {c.resolution}px, downsampling {c.downsample}, {c.n_embed} codes"


def run_plan(cfg: DictConfig, trainer_options: dict, devices: int, stage_module) -> RunPlan:
    """The plan of a run whose stage is built (`trainer_options`: cfg.trainer instantiated)."""
    nodes = int(trainer_options["num_nodes"])
    world = devices * nodes
    gpt = cfg.stage.name == "gpt"
    accumulate = int(trainer_options["accumulate_grad_batches"]) if gpt else 1  # the VQGAN's GAN steps are manual
    batch = int(cfg.data.batch_size)
    effective = batch * accumulate * world
    lr_rule = cfg.stage.lr_scaling
    lr = scaled_lr(float(cfg.optim.lr), effective, lr_rule, int(cfg.stage.lr_reference_batch))
    if lr_rule != "none":
        lr_rule = f"optim.lr {cfg.optim.lr:.3g} x {lr_rule} scaling from batch {cfg.stage.lr_reference_batch}"
    else:
        lr_rule = "optim.lr as given"
    max_steps, max_epochs = int(trainer_options["max_steps"]), trainer_options.get("max_epochs")
    if max_steps > 0:
        length = f"{max_steps:,} steps"
    elif max_epochs and max_epochs > 0:
        length = f"{max_epochs} epochs"
    else:
        length = f"until trainer.max_time={trainer_options.get('max_time')}"
    warmup = int(cfg.stage.warmup_steps)
    if gpt:
        schedule = f"{warmup} warmup steps, cosine to {cfg.stage.min_lr_ratio:g} x lr"
    else:
        schedule = f"{warmup} warmup steps, then {cfg.stage.lr_schedule}"
    trained = sum(p.numel() for p in stage_module.parameters() if p.requires_grad)
    frozen_vqgan = stage_module.vqgan if gpt else None  # the GPT stage's VQGAN is not one of its parameters
    frozen = sum(p.numel() for p in frozen_vqgan.parameters()) if frozen_vqgan is not None else 0
    logger = cfg.logger._target_.rsplit(".", 1)[-1] if cfg.get("logger") else "none"
    return RunPlan(
        stage=cfg.stage.name, model=_model_name(cfg, stage_module), parameters=trained, frozen_parameters=frozen,
        data=cfg.data.name, data_root=str(cfg.data.root), data_kind=_manifest_kind(cfg.data.root) or "image",
        devices=devices, nodes=nodes, strategy=strategy_name(trainer_options["strategy"], world),
        precision=str(trainer_options["precision"]), batch_per_device=batch, accumulate=accumulate,
        effective_batch=effective, lr=lr, lr_rule=lr_rule, max_steps=max_steps, length=length, schedule=schedule,
        run_dir=str(trainer_options["default_root_dir"]),
        checkpoints=str(cfg.callbacks.model_checkpoint.dirpath), logger=logger)
