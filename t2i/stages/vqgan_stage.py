"""VQGANStage: trains the image tokenizer (VQModel + VQGANLoss) with Lightning.

Two optimizers (autoencoder, discriminator) with manual optimisation, as Lightning 2.x needs for
a GAN; `manual_backward` and the LightningOptimizer wrappers handle fp16 loss scaling and DDP.
Gradients are clipped in `on_before_optimizer_step`, which Lightning calls after unscaling fp16
gradients (clipping right after `manual_backward` would clip the scaled ones).
Validation logs PSNR, SSIM, codebook usage and a grid of inputs above reconstructions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torchvision
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from t2i.models.losses import VQGANLoss, VQGANLossConfig
from t2i.models.vqgan import VQGANConfig, VQModel, codebook_usage, load_weights, read_checkpoint, vqgan_state_dict
from t2i.stages.scaling import StepClock, apply_lr_scaling


@dataclass
class CodebookConfig:
    """Keeping the codebook in use: data-dependent restarts of dead codes."""

    restart_every: int = 0  # steps between restarts of unused codes (0: never)
    restart_until: int = 0  # no restarts after this step (0: no limit)
    usage_decay: float = 0.99  # EMA of per-code counts; a code below `dead_below` counts as dead
    dead_below: float = 0.03


class VQGANStage(L.LightningModule):
    def __init__(
        self,
        vqgan: VQGANConfig,
        loss: VQGANLossConfig,
        optimizer: Callable,  # params -> torch.optim.Optimizer (a Hydra partial)
        codebook: CodebookConfig = CodebookConfig(),
        grad_clip: float = 1.0,
        warmup_steps: int = 0,
        decay_steps: int = 0,
        lr_scaling: str = "none",
        lr_reference_batch: int = 1,
        init_ckpt: str | None = None,
        log_images: int = 8,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.vqgan = VQModel(vqgan)
        if init_ckpt:  # fine-tune from a taming or t2i checkpoint
            load_weights(self.vqgan, vqgan_state_dict(read_checkpoint(init_ckpt)), init_ckpt)
        self.loss = VQGANLoss(loss)
        self.optimizer = optimizer
        self.codebook_cfg = codebook
        self.grad_clip = grad_clip
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.lr_scaling, self.lr_reference_batch = lr_scaling, lr_reference_batch
        self.log_images = log_images
        self.register_buffer("code_usage", torch.zeros(vqgan.n_embed))
        self.register_buffer("val_code_counts", torch.zeros(vqgan.n_embed), persistent=False)
        self._clock = StepClock()
        self._image_dir: Path | None = None  # <log dir>/images, set when fitting starts
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule=None) -> "VQGANStage":
        """From train.py's composed config: `vqgan` (model + init_ckpt) and `stage` (training)."""
        vqgan = OmegaConf.to_container(cfg.vqgan, resolve=True)
        init_ckpt = vqgan.pop("init_ckpt", None)
        stage = OmegaConf.to_container(cfg.stage, resolve=True)
        trainer = cfg.get("trainer", {})
        if trainer.get("accumulate_grad_batches", 1) != 1 or trainer.get("gradient_clip_val"):
            raise ValueError("the VQGAN stage steps its two optimizers itself: leave trainer.accumulate_grad_batches=1 "
                             "and trainer.gradient_clip_val=null (clip with stage.grad_clip; for a larger batch raise "
                             "data.batch_size or trainer.devices)")
        return cls(VQGANConfig(**vqgan), VQGANLossConfig(**stage["loss"]), instantiate(cfg.optim),
                   CodebookConfig(**stage["codebook"]), grad_clip=stage["grad_clip"],
                   warmup_steps=stage["warmup_steps"], decay_steps=stage["decay_steps"],
                   lr_scaling=stage["lr_scaling"], lr_reference_batch=stage["lr_reference_batch"], init_ckpt=init_ckpt, log_images=stage["log_images"])

    # -- optimisation ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # under DDP trainer.log_dir is a collective call: ask on every rank, once, not on rank 0 alone later
        self._image_dir = Path(self.trainer.log_dir) / "images" if self.trainer.log_dir else None

    def setup(self, stage: str) -> None:
        # each backward (autoencoder, discriminator) reaches only part of the module: DDP must look
        # for the parameters a backward leaves out, or it waits for their gradients forever
        if isinstance(self.trainer.strategy, DDPStrategy):
            self.trainer.strategy._ddp_kwargs["find_unused_parameters"] = True

    def configure_optimizers(self):
        autoencoder = [p for name, p in self.named_parameters() if name.startswith("vqgan.")]
        optimizers = [self.optimizer(autoencoder), self.optimizer(self.loss.discriminator.parameters())]
        apply_lr_scaling(self, optimizers, self.lr_scaling, self.lr_reference_batch)
        return optimizers

    def on_before_optimizer_step(self, optimizer) -> None:
        name = "grad_norm" if optimizer is self.trainer.optimizers[0] else "disc_grad_norm"
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.log(f"train/{name}", torch.nn.utils.get_total_norm(grads))
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

    def _set_lr(self, optimizer) -> None:
        """Linear warmup, then constant (taming) or cosine decay to 10% over `decay_steps`."""
        step = self.global_step
        scale = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.decay_steps and step >= self.warmup_steps:
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps))
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * scale

    def _step(self, optimizer, loss: torch.Tensor) -> None:
        self._set_lr(optimizer)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()  # clips in on_before_optimizer_step

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        opt_ae, opt_disc = self.optimizers()
        # global_step (max_steps, logging, disc_start) counts batches: the discriminator's steps
        # must not advance it (Lightning counts every optimizer's steps in manual optimisation)
        opt_disc._on_before_step = opt_disc._on_after_step = lambda: None
        step = self.global_step
        z = self.vqgan.latents(x)
        x_hat, codebook_loss, codes = self.vqgan.reconstruct(z)
        loss, logs = self.loss.generator_loss(x, x_hat, codebook_loss, step, self.vqgan.decoder.last_layer)
        self._step(opt_ae, loss)
        if self.loss.gan_active(step):  # the discriminator sleeps until disc_start
            disc_loss, disc_logs = self.loss.discriminator_loss(x, x_hat)
            self._step(opt_disc, disc_loss)
            logs.update(disc_logs)
        self._track_codes(codes, z, step)
        # averaged over processes (one small all-reduce each): what is logged is the whole batch's loss
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, sync_dist=True)
        self.log("train/loss", logs["total"], prog_bar=True, sync_dist=True)
        seconds = self._clock.tick()
        if seconds:  # all processes together: they step in lockstep
            self.log("train/images_per_s", len(x) * self.trainer.world_size / seconds)

    # -- codebook usage and restarts ---------------------------------------------------------

    @torch.no_grad()
    def _track_codes(self, codes: torch.Tensor, z: torch.Tensor, step: int) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.code_usage.numel()).float()
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        decay = self.codebook_cfg.usage_decay
        self.code_usage.mul_(decay).add_(counts, alpha=1 - decay)
        cfg = self.codebook_cfg
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 and (not cfg.restart_until or step < cfg.restart_until):
            self._restart_dead_codes(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor) -> None:
        """Move unused codes onto this batch's encoder outputs `z` [N, D] (same on every rank)."""
        dead = (self.code_usage < self.codebook_cfg.dead_below).nonzero().flatten()
        if dead.numel() == 0:
            return
        picks = z[torch.randint(len(z), (dead.numel(),), device=z.device)]
        picks = picks + 0.01 * z.std() * torch.randn_like(picks)  # split copies of one vector apart
        picks = self.trainer.strategy.broadcast(picks, src=0)
        self.vqgan.quantize.embedding.weight.data[dead] = picks.to(self.vqgan.quantize.embedding.weight.dtype)
        self.code_usage[dead] = self.codebook_cfg.dead_below  # a grace period before the next restart
        self.log("train/codes_restarted", float(dead.numel()))

    # -- validation --------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = batch["image"]
        x_hat, codebook_loss, codes = self.vqgan(x)
        rec, _ = self.loss.reconstruction(x, x_hat)
        real, fake = (x.float() + 1) / 2, (x_hat.float().clamp(-1, 1) + 1) / 2
        self.val_psnr(fake, real)
        self.val_ssim(fake, real)
        self.val_code_counts += torch.bincount(codes.flatten(), minlength=self.val_code_counts.numel()).float()
        self.log("val/reconstruction", rec, sync_dist=True, batch_size=len(x))
        self.log("val/psnr", self.val_psnr)
        self.log("val/ssim", self.val_ssim)
        if batch_idx == 0 and self.log_images:
            self._log_grid(real[: self.log_images], fake[: self.log_images])

    def on_validation_epoch_end(self) -> None:
        counts = self.trainer.strategy.reduce(self.val_code_counts, reduce_op="sum")
        usage = codebook_usage(counts)
        self.log("val/codebook_used", usage["used"])
        self.log("val/codebook_perplexity", usage["perplexity"])
        self.val_code_counts.zero_()

    def _log_grid(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        """Inputs above their reconstructions: a PNG in the run folder, and to W&B when it logs."""
        grid = torchvision.utils.make_grid(torch.cat([real, fake]).cpu(), nrow=len(real), padding=1)
        if self.trainer.is_global_zero and self._image_dir is not None:
            self._image_dir.mkdir(parents=True, exist_ok=True)
            torchvision.utils.save_image(grid, self._image_dir / f"reconstructions-step{self.global_step:07d}.png")
        if hasattr(self.logger, "log_image"):
            self.logger.log_image("val/reconstructions", [grid], step=self.global_step,
                                  caption=["top: inputs, bottom: reconstructions"])

    # -- checkpoints: carry the config so `load_vqgan(path)` needs nothing else ----------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["t2i"] = {"vqgan": asdict(self.vqgan.cfg)}
