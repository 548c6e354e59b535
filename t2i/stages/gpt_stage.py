"""GPTStage: trains the text-to-image GPT on code shards with Lightning.

Each batch becomes token sequences in one vocabulary (see t2i.models.gpt):

    text to image:  [T2I] text [BOI] codes      (text replaced by padding with prob. cond_drop:
                                                 the null text of classifier-free guidance)
    image to text:  [I2T] codes [BOT] text      (with prob. caption_prob: the captioning direction
                                                 that Caption Loss and reranking use)

Loss = image cross-entropy + txt_loss_scale x text cross-entropy (CogView; 0 gives EasyNLP's
image-only loss), each over its own id range (an image position only competes among image codes),
padding excluded. `pkeep` < 1 replaces that fraction of the *input* image codes by random codes
(targets stay true), as taming/EasyNLP do, drawing only from the image codes.

Codes come from code shards (fast path: `python -m t2i.pretokenize`) or from image shards encoded
on the fly by a frozen VQGAN (`stage.vqgan_ckpt`, EasyNLP's way): the data manifest decides.
Every `sample_every_n_steps` steps rank 0 samples images for fixed prompts (the first validation
captions unless `stage.sample_prompts` names them) and logs the grid with its captions.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from t2i.data.tokenizer import TextTokenizer
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig, VQModel, load_vqgan, weights_hash
from t2i.sampling import SamplingConfig, decode_to_uint8, generate_codes, save_captioned_grid
from t2i.stages.scaling import StepClock, apply_lr_scaling, grad_norm, run_steps, warmup_cosine, weight_decay_groups


class GPTStage(L.LightningModule):
    def __init__(
        self,
        model: GPTConfig,
        optimizer: Callable,  # param groups -> torch.optim.Optimizer (a Hydra partial)
        txt_loss_scale: float = 1.0,
        pkeep: float = 1.0,
        cond_drop: float = 0.1,
        caption_prob: float = 0.0,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        lr_scaling: str = "none",
        lr_reference_batch: int = 256,
        checkpoint_extras: dict | None = None,  # tokenizer bytes, VQGAN identity: travel in checkpoints
        vqgan: VQModel | None = None,  # frozen: encodes image shards, decodes sample grids
        sample_prompts: list[str] | None = None,
        sample_every_n_steps: int = 0,  # 0: no sample grids during training
        sampling: SamplingConfig | None = None,
    ):
        super().__init__()
        for name, p in (("pkeep", pkeep), ("cond_drop", cond_drop), ("caption_prob", caption_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"stage.{name} must be in [0, 1], got {p}")
        self.gpt = GPT(model)
        self.optimizer = optimizer
        self.txt_loss_scale, self.pkeep = txt_loss_scale, pkeep
        self.cond_drop, self.caption_prob = cond_drop, caption_prob
        self.weight_decay, self.warmup_steps, self.min_lr_ratio = weight_decay, warmup_steps, min_lr_ratio
        self.lr_scaling, self.lr_reference_batch = lr_scaling, lr_reference_batch
        self.checkpoint_extras = checkpoint_extras or {}
        # kept out of the module tree: never trained, never saved in the state dict, never wrapped by DDP
        self._frozen = {"vqgan": vqgan.requires_grad_(False).eval() if vqgan is not None else None}
        self.sample_prompts = list(sample_prompts or [])
        self.sample_every_n_steps = sample_every_n_steps
        self.sampling = sampling or SamplingConfig()
        self._sample_text = None  # token ids of sample_prompts
        self._clock = StepClock()
        self._image_dir: Path | None = None  # <log dir>/images, set when fitting starts

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule) -> "GPTStage":
        """Architecture from `model`, vocabulary sizes and lengths from the data it will read."""
        stage = OmegaConf.to_container(cfg.stage, resolve=True)
        manifest = datamodule.cfg.manifest()
        if manifest.get("kind") == "codes":  # fast path: the VQGAN is needed only to draw sample grids
            vqgan_info = {"config": manifest["vqgan"], "checkpoint": manifest.get("vqgan_checkpoint"),
                          "sha256": manifest.get("vqgan_sha256"), "grid": list(manifest["grid"])}
            vqgan = _vqgan_for_samples(vqgan_info) if stage["sample_every_n_steps"] else None
        else:
            vqgan, vqgan_info = _vqgan_for_images(cfg, datamodule)
        h, w = vqgan_info["grid"]
        model = GPTConfig(**OmegaConf.to_container(cfg.model, resolve=True),
                          n_image_codes=vqgan_info["config"]["n_embed"], n_text_tokens=datamodule.tokenizer.vocab_size,
                          text_len=datamodule.cfg.text_len, image_len=h * w)
        extras = {"tokenizer": datamodule.tokenizer.model, "text_len": datamodule.cfg.text_len, "vqgan": vqgan_info}
        prompts = stage["sample_prompts"]
        if stage["sample_every_n_steps"] and not prompts:
            if datamodule.cfg.splits.get("val") not in datamodule.cfg.manifest()["splits"]:
                raise ValueError("sample grids need prompts: set stage.sample_prompts=[...] (this data has no val "
                                 "split to take them from) or stage.sample_every_n_steps=0")
            prompts = list(itertools.islice(datamodule.cfg.captions("val"), stage["num_sample_prompts"]))
        return cls(model, instantiate(cfg.optim), txt_loss_scale=stage["txt_loss_scale"],
                   pkeep=stage["pkeep"], cond_drop=stage["cond_drop"], caption_prob=stage["caption_prob"],
                   weight_decay=stage["weight_decay"], warmup_steps=stage["warmup_steps"],
                   min_lr_ratio=stage["min_lr_ratio"], lr_scaling=stage["lr_scaling"],
                   lr_reference_batch=stage["lr_reference_batch"], checkpoint_extras=extras, vqgan=vqgan,
                   sample_prompts=prompts, sample_every_n_steps=stage["sample_every_n_steps"],
                   sampling=SamplingConfig(**stage["sampling"]))

    @property
    def vqgan(self) -> VQModel | None:
        return self._frozen["vqgan"]

    # -- sequences and loss --------------------------------------------------------------------

    def sequences(self, codes: torch.Tensor, text: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(input tokens, target tokens) [B, block_size - 1] for codes [B, N] and text ids [B, L]."""
        cfg = self.gpt.cfg
        b = len(codes)
        text = text + cfg.text_offset
        inputs_codes = codes
        if train and self.cond_drop:
            null = torch.rand(b, 1, device=codes.device) < self.cond_drop
            text = torch.where(null, torch.full_like(text, cfg.text_offset), text)
        if train and self.pkeep < 1:
            replace = torch.rand(codes.shape, device=codes.device) > self.pkeep
            inputs_codes = torch.where(replace, torch.randint_like(codes, cfg.n_image_codes), codes)

        def layout(image: torch.Tensor) -> torch.Tensor:
            t2i = torch.cat([text.new_full((b, 1), cfg.special("T2I")), text,
                             text.new_full((b, 1), cfg.special("BOI")), image], 1)
            if not (train and self.caption_prob):
                return t2i
            i2t = torch.cat([text.new_full((b, 1), cfg.special("I2T")), image,
                             text.new_full((b, 1), cfg.special("BOT")), text], 1)
            return torch.where(self._caption_rows[:, None], i2t, t2i)

        if train and self.caption_prob:
            self._caption_rows = torch.rand(b, device=codes.device) < self.caption_prob
        targets = layout(codes)
        inputs = layout(inputs_codes) if inputs_codes is not codes else targets
        return inputs[:, :-1], targets[:, 1:]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg = self.gpt.cfg
        image = targets < cfg.n_image_codes
        text = (targets > cfg.text_offset) & (targets < cfg.text_offset + cfg.n_text_tokens)  # padding excluded
        image_loss = F.cross_entropy(logits[image][:, : cfg.n_image_codes].float(), targets[image])
        text_loss = (F.cross_entropy(logits[text][:, cfg.text_offset: cfg.text_offset + cfg.n_text_tokens].float(),
                                     targets[text] - cfg.text_offset)
                     if text.any() else logits.new_zeros(()))
        loss = image_loss + self.txt_loss_scale * text_loss if self.txt_loss_scale else image_loss
        return loss, {"image_loss": image_loss.detach(), "text_loss": text_loss.detach()}

    def _codes(self, batch: dict) -> torch.Tensor:
        if "codes" in batch:
            return batch["codes"].flatten(1)
        return self.vqgan.encode(batch["image"]).flatten(1)  # slow path: image shards

    def on_fit_start(self) -> None:
        if self.vqgan is not None:
            self.vqgan.to(self.device)
        if self.sample_every_n_steps and isinstance(self.trainer.strategy, FSDPStrategy):
            # rank 0 alone cannot run a model whose weights are sharded over all ranks
            warnings.warn("no sample grids during training under FSDP: draw them from a checkpoint with "
                          "`python eval.py task=generate ckpt=...`")
            self.sample_every_n_steps = 0
        # under DDP trainer.log_dir is a collective call: ask on every rank, once, not on rank 0 alone later
        self._image_dir = Path(self.trainer.log_dir) / "images" if self.trainer.log_dir else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.sequences(self._codes(batch), batch["text"], train=True)
        loss, logs = self.loss(self.gpt(inputs), targets)
        # averaged over processes (one small all-reduce each): what is logged is the whole batch's loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, sync_dist=True)
        seconds = self._clock.tick()
        if seconds:  # all processes together: they step in lockstep
            self.log("train/tokens_per_s", inputs.numel() * self.trainer.world_size / seconds)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs, targets = self.sequences(self._codes(batch), batch["text"], train=False)
        loss, logs = self.loss(self.gpt(inputs), targets)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(inputs))
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=len(inputs))

    # -- sample grids ------------------------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.sample_every_n_steps
        if not (every and self.vqgan is not None and self.sample_prompts and self.trainer.is_global_zero):
            return
        # the hook runs after every batch, global_step counts optimizer steps: with accumulate_grad_batches
        # > 1 only the batch that completed a step (every accumulate_grad_batches-th, or an epoch's last) draws
        stepped = ((batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
                   or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if stepped and self.global_step % every == 0:
            self.log_samples()

    @torch.no_grad()
    def log_samples(self) -> None:
        """Images for the fixed prompts: a PNG grid (a row per prompt) + captions, and the logger's image panel."""
        if self._sample_text is None:  # the prompts are fixed: tokenize them once
            tokenizer = TextTokenizer(self.checkpoint_extras["tokenizer"], self.gpt.cfg.text_len)
            self._sample_text = tokenizer(self.sample_prompts)
        text = self._sample_text.to(self.device)
        was_training = self.gpt.training
        self.gpt.eval()
        codes = generate_codes(self.gpt, text, self.sampling)
        self.gpt.train(was_training)
        h, w = self.checkpoint_extras["vqgan"]["grid"]
        images = decode_to_uint8(self.vqgan, codes.view(-1, h, w)).cpu()
        per_prompt = self.sampling.samples_per_prompt
        if self._image_dir is not None:
            save_captioned_grid(images, self.sample_prompts,
                                self._image_dir / f"samples-step{self.global_step:07d}.png", per_prompt)
        if hasattr(self.logger, "log_image"):  # W&B: one image per prompt, captioned
            rows = [torch.cat(list(images[i * per_prompt:(i + 1) * per_prompt]), dim=2)
                    for i in range(len(self.sample_prompts))]
            self.logger.log_image("val/samples", rows, step=self.global_step, caption=self.sample_prompts)

    # -- optimisation ------------------------------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        # before Lightning's clipping (trainer.gradient_clip_val), after fp16 unscaling; under FSDP the norm of
        # the whole gradient, not of this process's shard
        self.log("train/grad_norm", grad_norm(self.gpt.parameters(), self.trainer.model))

    def configure_optimizers(self):
        # weight decay on matrices only: not on biases, LayerNorms, embeddings or positions (by module type:
        # under FSDP this runs after wrapping, when every parameter is a flat 1-D shard)
        optimizer = self.optimizer(weight_decay_groups(self.gpt, self.weight_decay))
        apply_lr_scaling(self, [optimizer], self.lr_scaling, self.lr_reference_batch,
                         tokens_per_sample=self.gpt.cfg.block_size - 1)
        # linear warmup, then a cosine to min_lr_ratio over the run (no length needed when nothing decays)
        total = run_steps(self.trainer, constant="stage.min_lr_ratio=1") if self.min_lr_ratio != 1 else None
        warmup, min_ratio = self.warmup_steps, self.min_lr_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints: everything sampling needs ------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["t2i"] = {"gpt": asdict(self.gpt.cfg), **self.checkpoint_extras,
                             "caption_prob": self.caption_prob,  # > 0: the model can score captions
                             "sampling": asdict(self.sampling)}  # defaults for eval.py


def _vqgan_for_samples(info: dict) -> VQModel | None:
    """The VQGAN that made the code shards, to draw sample grids; None (with a warning) when it is gone."""
    path = info["checkpoint"]
    if not path or not Path(path).is_file():
        warnings.warn(f"the VQGAN that made the code shards ({path}) is not there: no sample grids during training")
        return None
    vqgan = load_vqgan(path, VQGANConfig(**info["config"]))
    if info["sha256"] and weights_hash(vqgan) != info["sha256"]:
        warnings.warn(f"{path} changed since the code shards were made: no sample grids during training")
        return None
    return vqgan


def _vqgan_for_images(cfg: DictConfig, datamodule) -> tuple[VQModel, dict]:
    """Slow path: a frozen VQGAN encodes the image shards at every step (stage.vqgan_ckpt)."""
    path = cfg.stage.vqgan_ckpt
    if not path:
        raise ValueError(f"stage=gpt on image shards ({datamodule.cfg.root}) needs the VQGAN that encodes them: "
                         "set stage.vqgan_ckpt=PATH (a taming checkpoint also needs vqgan=f16_16384), or pre-tokenize "
                         "once and train on code shards, which is much faster: "
                         "python -m t2i.pretokenize --data IMAGE_SHARDS --out CODE_SHARDS --vqgan CKPT")
    # our checkpoints carry their config; taming's get the `vqgan` config group's
    fallback = OmegaConf.to_container(cfg.vqgan, resolve=True)
    vqgan = load_vqgan(path, fallback=VQGANConfig(**fallback))
    size = datamodule.cfg.image_size
    if size % vqgan.cfg.downsample:
        raise ValueError(f"data.image_size={size} is not a multiple of the VQGAN's downsampling {vqgan.cfg.downsample}")
    grid = size // vqgan.cfg.downsample
    info = {"config": asdict(vqgan.cfg), "checkpoint": str(Path(path).resolve()), "sha256": weights_hash(vqgan),
            "grid": [grid, grid]}
    return vqgan, info
