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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from t2i.models.gpt import GPT, GPTConfig


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
        checkpoint_extras: dict | None = None,  # tokenizer bytes, VQGAN identity: travel in checkpoints
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
        self.checkpoint_extras = checkpoint_extras or {}
        self._step_started = None

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule) -> "GPTStage":
        """Architecture from `model`, vocabulary sizes and lengths from the data it will read."""
        codes = datamodule.cfg.manifest()
        if codes.get("kind") != "codes":
            raise ValueError(f"stage=gpt trains on code shards: pre-tokenize {datamodule.cfg.root} first "
                             "(python -m t2i.pretokenize --data IMAGE_SHARDS --out CODE_SHARDS --vqgan CKPT)")
        h, w = codes["grid"]
        model = GPTConfig(**OmegaConf.to_container(cfg.model, resolve=True),
                          n_image_codes=codes["vqgan"]["n_embed"], n_text_tokens=datamodule.tokenizer.vocab_size,
                          text_len=datamodule.cfg.text_len, image_len=h * w)
        stage = OmegaConf.to_container(cfg.stage, resolve=True)
        extras = {"tokenizer": datamodule.tokenizer.model, "text_len": datamodule.cfg.text_len,
                  "vqgan": {"config": codes["vqgan"], "checkpoint": codes.get("vqgan_checkpoint"),
                            "sha256": codes.get("vqgan_sha256"), "grid": [h, w]}}
        return cls(model, instantiate(cfg.stage.optimizer), txt_loss_scale=stage["txt_loss_scale"],
                   pkeep=stage["pkeep"], cond_drop=stage["cond_drop"], caption_prob=stage["caption_prob"],
                   weight_decay=stage["weight_decay"], warmup_steps=stage["warmup_steps"],
                   min_lr_ratio=stage["min_lr_ratio"], checkpoint_extras=extras)

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
        return batch["codes"].flatten(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.sequences(self._codes(batch), batch["text"], train=True)
        loss, logs = self.loss(self.gpt(inputs), targets)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()})
        if self._step_started is not None:
            self.log("train/tokens_per_s", inputs.numel() / (time.perf_counter() - self._step_started))
        self._step_started = time.perf_counter()
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs, targets = self.sequences(self._codes(batch), batch["text"], train=False)
        loss, logs = self.loss(self.gpt(inputs), targets)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(inputs))
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=len(inputs))

    # -- optimisation ------------------------------------------------------------------------

    def configure_optimizers(self):
        # weight decay on matrices only: not on biases, LayerNorms, embeddings or positions
        decay, no_decay = [], []
        for name, p in self.gpt.named_parameters():
            (decay if p.dim() == 2 and "emb" not in name else no_decay).append(p)
        optimizer = self.optimizer([{"params": decay, "weight_decay": self.weight_decay},
                                    {"params": no_decay, "weight_decay": 0.0}])
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def warmup_cosine(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- checkpoints: everything sampling needs ------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["t2i"] = {"gpt": asdict(self.gpt.cfg), **self.checkpoint_extras}
