"""VQGAN training losses: pixel + LPIPS reconstruction, PatchGAN with hinge loss, adaptive weight.

The terms are taming-transformers' VQLPIPSWithDiscriminator:

    reconstruction = pixel(x, x_hat) + perceptual_weight * LPIPS(x, x_hat)
    generator      = reconstruction + adaptive_weight * disc_weight * (-mean D(x_hat)) + codebook_weight * codebook
    discriminator  = 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))

with the GAN terms off before `disc_start` and the adaptive weight
||grad reconstruction|| / (||grad generator|| + 1e-4) taken at the decoder's last layer.
Under fp16 autocast those gradients are taken of the losses times the GradScaler's scale (as the
backward pass is) and divided by it after: unscaled, they can underflow to zero.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights, which LPIPS is built on


@dataclass
class VQGANLossConfig:
    pixel_loss: str = "l1"  # or "l2"
    perceptual_weight: float = 1.0  # 0 turns LPIPS off (no VGG weights needed)
    lpips_vgg_path: str | None = None  # local torchvision vgg16 weights; None: torchvision's download
    codebook_weight: float = 1.0
    disc_weight: float = 0.75
    disc_start: int = 0  # global step at which the discriminator starts
    disc_num_layers: int = 2
    disc_channels: int = 64
    max_adaptive_weight: float = 1e4

    def __post_init__(self):
        if self.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"stage.loss.pixel_loss must be l1 or l2, got {self.pixel_loss!r}")


def build_lpips(vgg_path: str | None, setting: str = "stage.loss.lpips_vgg_path",
                off: str = "train without the perceptual term: stage.loss.perceptual_weight=0") -> nn.Module:
    """The `lpips` package's VGG LPIPS, frozen; backbone from `vgg_path` or torchvision's download.

    The small linear heads ship inside the package; only the VGG16 backbone needs the network.
    `setting` and `off` name the caller's options in errors (the path's, and how to do without).
    """
    import lpips
    import torchvision

    with warnings.catch_warnings():  # lpips 0.1.4 uses torchvision's deprecated `pretrained=`
        warnings.simplefilter("ignore", UserWarning)
        metric = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if vgg_path is not None:
        if not Path(vgg_path).is_file():
            raise FileNotFoundError(f"{setting}={vgg_path} does not exist")
        state = torch.load(vgg_path, map_location="cpu", weights_only=True)
    else:
        try:
            state = torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # no network, proxy, ...
            raise RuntimeError(
                f"LPIPS needs torchvision's ImageNet VGG16 weights and the download failed ({e}). "
                f"Download {VGG16_FILE} on a machine with internet (torchvision.models.vgg16(weights='DEFAULT') "
                f"puts it in ~/.cache/torch/hub/checkpoints/) and set {setting}=PATH, or {off}"
            ) from None
    vgg = torchvision.models.vgg16()
    vgg.load_state_dict(state)
    # lpips keeps VGG's feature layers under their original indices, split into five slices
    for slice_ in (metric.net.slice1, metric.net.slice2, metric.net.slice3, metric.net.slice4, metric.net.slice5):
        for index, layer in slice_.named_children():
            layer.load_state_dict(vgg.features[int(index)].state_dict())
    metric.eval().requires_grad_(False)
    return metric


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): one real/fake logit per image patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1  # the last block keeps the resolution
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4, loss_scale: float = 1.0) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer.

    `loss_scale`: the fp16 GradScaler's current scale (1 without one). The gradients are taken of
    the scaled losses, as in the backward pass, so that fp16 activation gradients do not underflow,
    and unscaled in fp32 after: the ratio is the unscaled one. Should they overflow at this scale,
    the weight is NaN: the step's gradients are then non-finite, so the GradScaler skips the step
    and lowers its scale, as for any overflow (a clamped or zero weight would train on silently
    with the wrong balance).
    """
    rec_grad = torch.autograd.grad(rec_loss * loss_scale, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss * loss_scale, last_layer, retain_graph=True)[0]
    rec_norm, g_norm = rec_grad.float().norm() / loss_scale, g_grad.float().norm() / loss_scale
    weight = (rec_norm / (g_norm + 1e-4)).clamp(0.0, max_weight)
    if loss_scale != 1.0:  # a GradScaler is there to skip the step
        weight = torch.where(torch.isfinite(rec_norm) & torch.isfinite(g_norm), weight, float("nan"))
    return weight.detach()


class VQGANLoss(nn.Module):
    def __init__(self, cfg: VQGANLossConfig):
        super().__init__()
        self.cfg = cfg
        self.perceptual = build_lpips(cfg.lpips_vgg_path) if cfg.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(channels=cfg.disc_channels, num_layers=cfg.disc_num_layers)

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        pixel = F.l1_loss(x_hat, x) if self.cfg.pixel_loss == "l1" else F.mse_loss(x_hat, x)
        logs = {"pixel": pixel.detach()}
        if self.perceptual is None:
            return pixel, logs
        perceptual = self.perceptual(x_hat.float(), x.float()).mean()
        logs["perceptual"] = perceptual.detach()
        return pixel + self.cfg.perceptual_weight * perceptual, logs

    def generator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, codebook_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor, loss_scale: float = 1.0) -> tuple[torch.Tensor, dict]:
        """`loss_scale`: the fp16 GradScaler's current scale, for the adaptive weight (see adaptive_weight)."""
        rec, logs = self.reconstruction(x, x_hat)
        loss = rec + self.cfg.codebook_weight * codebook_loss
        logs.update(reconstruction=rec.detach(), codebook=codebook_loss.detach())
        if self.gan_active(step):
            g_loss = -self.discriminator(x_hat).mean()
            weight = adaptive_weight(rec, g_loss, last_layer, self.cfg.max_adaptive_weight,
                                     loss_scale=loss_scale) * self.cfg.disc_weight
            loss = loss + weight * g_loss
            logs.update(generator=g_loss.detach(), adaptive_weight=weight)
        logs["total"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_hat.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"disc": loss.detach(), "logits_real": logits_real.mean().detach(),
                      "logits_fake": logits_fake.mean().detach()}
