"""VQGANStage: trains the image tokenizer (VQModel + VQGANLoss) with Lightning.

Two optimizers (autoencoder, discriminator) with manual optimisation, as Lightning 2.x needs for
a GAN; `manual_backward` and the strategy's `optimizer_step` handle fp16 loss scaling and DDP.
Gradients are clipped in `on_before_optimizer_step`, which Lightning calls after unscaling fp16
gradients (clipping right after `manual_backward` would clip the scaled ones).
`global_step` counts autoencoder steps, one per batch (what `trainer.max_steps`, `disc_start` and
the lr schedule count): the autoencoder steps through its LightningOptimizer, which Lightning
counts; the discriminator through `trainer.strategy.optimizer_step`, which it does not.
Validation logs PSNR, SSIM, codebook usage and a grid of inputs above reconstructions.
With `stage.image_sizes` (e.g. [32, 32, 64]) each training step trains at one size, in turn through
the list, on the data module's images at that size (`ShardDataModule.decode_also_at`: the same
decoding and resize as data.image_size=size), so that one VQGAN serves several code grids;
validation then reports each size (val/psnr_32, val/ssim_32, val/reconstruction_32, ...) and
val/psnr, val/ssim as their means over the sizes.
With `vqgan.entropy_weight` > 0 the generator loss adds the quantizer's entropy (usage) loss, logged
as train/entropy with its two terms (computed on each process's own batch under DDP).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.distributed as dist
import torchvision
from hydra.utils import instantiate
from lightning.fabric.utilities.throughput import measure_flops
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torchmetrics.image import StructuralSimilarityIndexMeasure

from t2i.models.losses import VQGANLoss
from t2i.checkpoints import load_weights, read_checkpoint, vqgan_state_dict
from t2i.eval.reconstruction import image_psnr
from t2i.models.vqgan import VQGANConfig, VQModel, codebook_usage
from t2i.stages.configs import VQGANStageConfig, typed_stage_config
from t2i.stages.scaling import apply_lr_scaling, run_steps, warmup_cosine


FIND_UNUSED = "ddp_find_unused_parameters_true"  # Lightning's registered name for DDP(find_unused_parameters=True)


def strategy_for(devices, num_nodes: int = 1) -> str:
    """The trainer strategy of a VQGAN run (conf/stage/vqgan.yaml `strategy`, which conf/trainer/* take).

    Each of the stage's two backward passes (autoencoder, discriminator) reaches only part of the
    module, so under DDP it must look for the parameters a backward leaves out
    (find_unused_parameters), or it waits for their gradients forever. One process: "auto".
    """
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    one_device = devices == 1 or (isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1)
    return "auto" if one_device and int(num_nodes) == 1 else FIND_UNUSED


def broadcast_from_rank_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's values of `tensor` on every rank, written into it on this rank's device.

    A tensor collective (NCCL on GPUs, gloo on CPUs), not an object one: pickling rank 0's CUDA
    tensor would unpickle it onto cuda:0 on every rank.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


class VQGANStage(L.LightningModule):
    def __init__(
        self,
        vqgan: VQGANConfig,
        stage: VQGANStageConfig,
        optimizer: Callable,  # params -> torch.optim.Optimizer (a Hydra partial)
        init_ckpt: str | None = None,  # fine-tune from a taming or t2i checkpoint
    ):
        super().__init__()
        self.automatic_optimization = False
        self.stage_config = stage
        self.vqgan = VQModel(vqgan)
        if init_ckpt:
            load_weights(self.vqgan, vqgan_state_dict(read_checkpoint(init_ckpt)), init_ckpt)
        self.loss = VQGANLoss(stage.loss)
        self.optimizer = optimizer
        self._total_steps = 0  # the run's autoencoder steps (set with the optimizers)
        self.register_buffer("code_usage", torch.zeros(vqgan.n_embed))
        self.register_buffer("val_code_counts", torch.zeros(vqgan.n_embed), persistent=False)
        self.image_sizes = list(stage.image_sizes or [])  # one a step, in turn; empty: the batches' `image`
        off_grid = [size for size in self.image_sizes if size % self.vqgan.cfg.downsample]
        if off_grid:
            raise ValueError(f"stage.image_sizes {off_grid} are not multiples of the VQGAN's downsampling factor "
                             f"{self.vqgan.cfg.downsample}: give sizes that it maps onto whole code grids")
        self._trained_size: int | None = None  # the size of the last training step (throughput_counts)
        self._flops_per_image: dict[int, int] = {}  # by image size, counted at its first batch (TrainingThroughput)
        self._image_dir: Path | None = None  # <log dir>/images, set when fitting starts
        self._compiled_autoencode = None  # autoencode through torch.compile (configure_model, stage.compile)
        self.val_psnr = image_psnr()  # each image's PSNR, averaged (t2i.eval.reconstruction.PSNR)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_sizes = sorted(set(self.image_sizes))
        self.val_psnr_at = torch.nn.ModuleDict({str(size): image_psnr() for size in self.val_sizes})
        self.val_ssim_at = torch.nn.ModuleDict({str(size): StructuralSimilarityIndexMeasure(data_range=1.0)
                                                for size in self.val_sizes})

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule=None) -> "VQGANStage":
        """From train.py's composed config: `vqgan` (the model), `stage` (training) and `init_ckpt`."""
        trainer = cfg.get("trainer", {})
        if trainer.get("accumulate_grad_batches", 1) != 1 or trainer.get("gradient_clip_val"):
            raise ValueError("the VQGAN stage steps its two optimizers itself: leave trainer.accumulate_grad_batches=1 "
                             "and trainer.gradient_clip_val=null (clip with stage.grad_clip; for a larger batch raise "
                             "data.batch_size or trainer.devices)")
        return cls(VQGANConfig(**OmegaConf.to_container(cfg.vqgan, resolve=True)), typed_stage_config(cfg.stage),
                   instantiate(cfg.optim), init_ckpt=cfg.init_ckpt)

    # -- image sizes -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        if not self.image_sizes:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "decode_also_at"):
            raise ValueError("stage.image_sizes needs the images at each size from t2i's ShardDataModule: pass it as "
                             "trainer.fit(stage, datamodule=...), or set stage.image_sizes=null")
        datamodule.decode_also_at(self.image_sizes)

    def size_at(self, step: int) -> int:
        """The image size training step `step` trains at (stage.image_sizes, in turn)."""
        return self.image_sizes[step % len(self.image_sizes)]

    def images_at(self, batch: dict, size: int) -> torch.Tensor:
        """The batch's images at `size`: `image` (data.image_size) or `image_<size>` (decode_also_at)."""
        if batch["image"].shape[-1] == size:
            return batch["image"]
        if f"image_{size}" not in batch:
            raise ValueError(f"the batch has no {size}x{size} images (image_{size}): the data module decodes them "
                             f"when stage.image_sizes names {size} (ShardDataModule.decode_also_at, called in setup)")
        return batch[f"image_{size}"]

    # -- optimisation ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        # each backward (autoencoder, discriminator) reaches only part of the module: DDP must look
        # for the parameters a backward leaves out, or it waits for their gradients forever
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise ValueError(f"the VQGAN stage under DDP needs find_unused_parameters=True: leave trainer.strategy "
                             f"to the presets (they take stage.strategy) or set trainer.strategy={FIND_UNUSED}")
        # under DDP trainer.log_dir is a collective call: ask on every rank, once, not on rank 0 alone later
        self._image_dir = Path(self.trainer.log_dir) / "images" if self.trainer.log_dir else None

    def configure_optimizers(self):
        autoencoder = [p for name, p in self.named_parameters() if name.startswith("vqgan.")]
        optimizers = [self.optimizer(autoencoder), self.optimizer(self.loss.discriminator.parameters())]
        apply_lr_scaling(self, optimizers, self.stage_config.lr_scaling, self.stage_config.lr_reference_batch)
        if self.stage_config.lr_schedule == "cosine":
            # global_step counts autoencoder steps, one per batch: so does estimated_stepping_batches
            self._total_steps = run_steps(self.trainer, "stage.lr_schedule=constant")
        return optimizers

    def on_before_optimizer_step(self, optimizer) -> None:
        name = "grad_norm" if optimizer is self.trainer.optimizers[0] else "disc_grad_norm"
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.log(f"train/{name}", torch.nn.utils.get_total_norm(grads))
        if self.stage_config.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.stage_config.grad_clip,
                                gradient_clip_algorithm="norm")

    def _set_lr(self, optimizer, step: int) -> None:
        """Linear warmup, then constant (taming) or cosine decay to 10% over the run."""
        options = self.stage_config
        total = self._total_steps if options.lr_schedule == "cosine" else None
        scale = warmup_cosine(step, options.warmup_steps, total, min_ratio=0.1)
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * scale

    def _loss_scale(self) -> float:
        """The fp16 GradScaler's current scale (precision=16-mixed), else 1."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    def autoencode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents, reconstruction, codebook loss and codes of a training batch (VQModel.latents, then
        .reconstruct). With stage.compile all but the decoder's last layer run as one compiled graph: the GAN's
        adaptive weight differentiates the loss by that layer's weight with retain_graph, which a compiled
        backward refuses, and outside the graph that derivative never reaches it. Validation stays eager."""
        autoencoder = self._compiled_autoencode or self._autoencode
        z, features, codebook_loss, codes = autoencoder(x)
        return z, self.vqgan.decoder.conv_out(features), codebook_loss, codes

    def _autoencode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.vqgan.latents(x)
        z_q, codebook_loss, codes = self.vqgan.quantize(z)
        return z, self.vqgan.decoder.features(self.vqgan.post_quant_conv(z_q)), codebook_loss, codes

    def configure_model(self) -> None:
        if self.stage_config.compile and self._compiled_autoencode is None:
            # a compiled function, not a compiled module: parameter names and checkpoints stay as they are
            self._compiled_autoencode = torch.compile(self._autoencode)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        step = self.global_step  # autoencoder steps so far (see the module docstring)
        x = self.images_at(batch, self.size_at(step)) if self.image_sizes else batch["image"]
        self._trained_size = x.shape[-1]
        z, x_hat, codebook_loss, codes = self.autoencode(x)
        loss, logs = self.loss.generator_loss(x, x_hat, codebook_loss, step, self.vqgan.decoder.last_layer,
                                              loss_scale=self._loss_scale())
        if self.vqgan.cfg.entropy_weight > 0:  # the usage loss (vqgan.entropy_weight), beside the codebook loss
            entropy, terms = self.vqgan.quantize.entropy_loss(z)
            loss = loss + self.vqgan.cfg.entropy_weight * entropy
            logs.update(entropy=entropy.detach(), **terms, total=loss.detach())
        self._set_lr(opt_ae, step)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_ae.step()  # a LightningOptimizer: counted in global_step; clips in on_before_optimizer_step
        if self.loss.gan_active(step):  # the discriminator sleeps until disc_start
            disc_loss, disc_logs = self.loss.discriminator_loss(x, x_hat)
            self._set_lr(opt_disc, step)  # this batch's step: global_step has moved on
            opt_disc.zero_grad(set_to_none=True)
            self.manual_backward(disc_loss)
            # the strategy's step does what LightningOptimizer.step does (fp16 unscaling, the
            # on_before_optimizer_step hook, skipping non-finite steps) but is not counted in global_step
            self.trainer.strategy.optimizer_step(opt_disc.optimizer, closure=lambda: None)
            logs.update(disc_logs)
        self._track_codes(codes, z, step)
        # averaged over processes (one small all-reduce each): what is logged is the whole batch's loss
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, sync_dist=True)
        self.log("train/loss", logs["total"], prog_bar=True, sync_dist=True)

    def throughput_counts(self, batch: dict) -> tuple[int, int, int]:
        """(images, codes, FLOPs) of a batch on this device (t2i.callbacks.TrainingThroughput). FLOPs: the
        autoencoder's forward and backward, counted once on the meta device (no memory, no time); the
        discriminator and LPIPS are not counted, so MFU is a lower bound."""
        images = self.images_at(batch, self._trained_size) if self._trained_size else batch["image"]
        size = images.shape[-1]
        if size not in self._flops_per_image:
            with torch.device("meta"):
                model = VQModel(self.vqgan.cfg)
            x = torch.empty(1, *images.shape[1:], device="meta")
            self._flops_per_image[size] = measure_flops(model, lambda: model(x)[0], lambda y: y.sum())
        grid = size // self.vqgan.cfg.downsample
        return len(images), len(images) * grid * grid, len(images) * self._flops_per_image[size]

    # -- codebook usage and restarts ---------------------------------------------------------

    @torch.no_grad()
    def _track_codes(self, codes: torch.Tensor, z: torch.Tensor, step: int) -> None:
        counts = torch.bincount(codes.flatten(), minlength=self.code_usage.numel()).float()
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        cfg = self.stage_config.codebook
        self.code_usage.mul_(cfg.usage_decay).add_(counts, alpha=1 - cfg.usage_decay)
        if cfg.restart_every and (step + 1) % cfg.restart_every == 0 \
                and (not cfg.restart_until or step < cfg.restart_until):
            self._restart_dead_codes(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float())

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor) -> None:
        """Move unused codes onto this batch's encoder outputs `z` [N, D] (same on every rank)."""
        dead = (self.code_usage < self.stage_config.codebook.dead_below).nonzero().flatten()
        if dead.numel() == 0:
            return
        picks = z[torch.randint(len(z), (dead.numel(),), device=z.device)]
        picks = picks + 0.01 * z.std() * torch.randn_like(picks)  # split copies of one vector apart
        picks = broadcast_from_rank_zero(picks)
        self.vqgan.quantize.set_codes(dead, picks)  # SimVQ: through its projection
        self.code_usage[dead] = self.stage_config.codebook.dead_below  # a grace period before the next restart
        self.log("train/codes_restarted", float(dead.numel()))

    # -- validation --------------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if not self.image_sizes:
            self._validate(batch["image"], self.val_psnr, self.val_ssim, "", batch_idx)
        for size in self.val_sizes:
            self._validate(self.images_at(batch, size), self.val_psnr_at[str(size)], self.val_ssim_at[str(size)],
                           f"_{size}", batch_idx)

    def _validate(self, x: torch.Tensor, psnr, ssim, suffix: str, batch_idx: int) -> None:
        """Reconstruct `x`; log its metrics under val/<name><suffix>."""
        x_hat, codebook_loss, codes = self.vqgan(x)
        rec, _ = self.loss.reconstruction(x, x_hat)
        real, fake = (x.float() + 1) / 2, (x_hat.float().clamp(-1, 1) + 1) / 2
        psnr(fake, real)
        ssim(fake, real)
        self.val_code_counts += torch.bincount(codes.flatten(), minlength=self.val_code_counts.numel()).float()
        self.log(f"val/reconstruction{suffix}", rec, sync_dist=True, batch_size=len(x))
        self.log(f"val/psnr{suffix}", psnr)
        self.log(f"val/ssim{suffix}", ssim)
        if batch_idx == 0 and self.stage_config.log_images:
            self._log_grid(real[: self.stage_config.log_images], fake[: self.stage_config.log_images], suffix)

    def on_validation_epoch_end(self) -> None:
        if self.val_sizes:  # the means over the sizes: what stage.monitor (val/psnr) keeps the best of
            # compute() keeps its result, which Lightning logs for each size when the epoch ends
            self.log("val/psnr", torch.stack([metric.compute() for metric in self.val_psnr_at.values()]).mean())
            self.log("val/ssim", torch.stack([metric.compute() for metric in self.val_ssim_at.values()]).mean())
        counts = self.trainer.strategy.reduce(self.val_code_counts, reduce_op="sum")
        usage = codebook_usage(counts)
        self.log("val/codebook_used", usage["used"])
        self.log("val/codebook_perplexity", usage["perplexity"])
        self.val_code_counts.zero_()

    def _log_grid(self, real: torch.Tensor, fake: torch.Tensor, suffix: str = "") -> None:
        """Inputs above their reconstructions: a PNG in the run folder, and to W&B when it logs."""
        grid = torchvision.utils.make_grid(torch.cat([real, fake]).cpu(), nrow=len(real), padding=1)
        if self.trainer.is_global_zero and self._image_dir is not None:
            self._image_dir.mkdir(parents=True, exist_ok=True)
            name = f"reconstructions{suffix}-step{self.global_step:07d}.png"
            torchvision.utils.save_image(grid, self._image_dir / name)
        if hasattr(self.logger, "log_image"):
            self.logger.log_image(f"val/reconstructions{suffix}", [grid], step=self.global_step,
                                  caption=["top: inputs, bottom: reconstructions"])

    # -- checkpoints: carry the config so `load_vqgan(path)` needs nothing else ----------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["t2i"] = {"vqgan": asdict(self.vqgan.cfg)}
