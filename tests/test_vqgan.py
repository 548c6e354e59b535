"""VQGAN tokenizer and its losses: taming checkpoints, parameter names, shapes, gradients, LPIPS.

Everything runs on the CPU with tiny models, except the parameter-name and parameter-count checks of
the full f16_16384 config, which build it on the meta device (no memory, no init time). LPIPS uses a
randomly initialised VGG16 saved to a temporary file: the ImageNet weights cannot be downloaded here.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
import torchvision

from t2i.models.losses import (PatchDiscriminator, VQGANLoss, VQGANLossConfig, adaptive_weight,
                               build_lpips, hinge_d_loss)
from t2i.checkpoints import load_vqgan, load_weights, read_checkpoint, vqgan_state_dict, weights_hash
from t2i.models.vqgan import VectorQuantizer, VQGANConfig, VQModel

SMALL = dict(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
             z_channels=16, embed_dim=8, n_embed=64)


def small_config(**changes) -> VQGANConfig:
    return VQGANConfig(**{**SMALL, **changes})


def small_model(seed: int = 0, **changes) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(small_config(**changes))


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1]: a flat background with one flat-coloured rectangle."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, 3, size, size)
    for i in range(n):
        background, colour = torch.rand(2, 3, 1, 1, generator=g) * 2 - 1
        x[i] = background[:, 0, 0, None, None]
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        height, width = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        x[i, :, top:top + height, left:left + width] = colour[:, 0, 0, None, None]
    return x


# ---------------------------------------------------------------------------------------------
# Checkpoints: taming's Lightning .ckpt layout and ours

FAKE_LOSS_KEYS = {  # what a taming checkpoint carries beside the autoencoder (never loaded)
    "loss.discriminator.main.0.weight": (64, 3, 4, 4),
    "loss.discriminator.main.0.bias": (64,),
    "loss.discriminator.main.3.running_mean": (128,),
    "loss.perceptual_loss.scaling_layer.shift": (1, 3, 1, 1),
    "loss.perceptual_loss.net.slice1.0.weight": (64, 3, 3, 3),
    "loss.perceptual_loss.lin0.model.1.weight": (1, 64, 1, 1),
}


class LightningCallbackState:
    """Stands in for the Lightning 1.x objects a real taming .ckpt pickles beside the weights."""

    def __init__(self):
        self.best_model_path = "logs/2020-11-09T13-31-51_imagenet_vqgan/checkpoints/last.ckpt"


@pytest.fixture(scope="module")
def trained_small():
    """A small VQModel whose weights are all moved off their init values (norms included)."""
    model = small_model(seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def taming_checkpoint(model: VQModel, **extra) -> dict:
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state.update({key: torch.randn(shape) for key, shape in FAKE_LOSS_KEYS.items()})
    state["loss.discriminator.main.3.num_batches_tracked"] = torch.tensor(100)
    return {"state_dict": state, "epoch": 3, "global_step": 100, "pytorch-lightning_version": "1.0.8", **extra}


def assert_same_model(loaded: VQModel, original: VQModel):
    assert weights_hash(loaded) == weights_hash(original)
    x = images(2)
    codes = original.encode(x)
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), original.decode(codes))


def test_taming_checkpoint_loads_strictly_and_round_trips(trained_small, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(taming_checkpoint(trained_small), path)
    loaded = load_vqgan(path, small_config())
    assert not loaded.training
    assert_same_model(loaded, trained_small)


def test_taming_checkpoint_with_pickled_lightning_objects_loads_quietly(trained_small, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(taming_checkpoint(trained_small, callbacks={"ModelCheckpoint": LightningCallbackState()}), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "full unpickling" warning: nothing from the file runs
        loaded = load_vqgan(path, small_config())
    assert_same_model(loaded, trained_small)


LIGHTNING_1X = """
class ModelCheckpoint:  # what taming's .ckpt pickles: the callback's class as a key, objects with state
    def __init__(self):
        self.best_model_path = "logs/2020-11-09T13-31-51_imagenet_vqgan/checkpoints/last.ckpt"


class Namespace:  # an hparams container (argparse's, as Lightning 1.x kept it)
    def __init__(self, **values):
        self.__dict__.update(values)
"""


def test_taming_checkpoint_loads_without_the_modules_it_pickles(trained_small, tmp_path, monkeypatch):
    """A taming .ckpt names Lightning 1.x classes by module path: it loads when that module is gone."""
    package = tmp_path / "lib" / "pytorch_lightning_1x"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "callbacks.py").write_text(LIGHTNING_1X)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    import importlib
    callbacks = importlib.import_module("pytorch_lightning_1x.callbacks")
    hparams = callbacks.Namespace(n_embed=64)
    path = tmp_path / "last.ckpt"
    torch.save(taming_checkpoint(trained_small, callbacks={callbacks.ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}},
                                 checkpoint_callback=callbacks.ModelCheckpoint(), hyper_parameters=hparams), path)
    # the module is gone at load time: not importable, not imported
    monkeypatch.undo()
    for name in ("pytorch_lightning_1x.callbacks", "pytorch_lightning_1x"):
        del sys.modules[name]
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("pytorch_lightning_1x.callbacks")
    checkpoint = read_checkpoint(path)
    assert "pytorch_lightning_1x" not in sys.modules
    assert torch.equal(checkpoint["state_dict"]["quantize.embedding.weight"], trained_small.quantize.embedding.weight)
    assert_same_model(load_vqgan(path, small_config()), trained_small)
    # the other objects are inert stand-ins that keep what was pickled
    (key, state), = checkpoint["callbacks"].items()
    assert key.__name__ == "ModelCheckpoint" and state["best_model_score"] == 0.5
    assert checkpoint["checkpoint_callback"].state == {"best_model_path": callbacks.ModelCheckpoint().best_model_path}
    assert checkpoint["hyper_parameters"].state == {"n_embed": 64}


class RunsCode:
    """What a hostile checkpoint could pickle: a call made while unpickling."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_reading_a_checkpoint_runs_no_code_from_it(trained_small, tmp_path):
    marker = tmp_path / "written_by_the_checkpoint"
    path = tmp_path / "last.ckpt"
    torch.save(taming_checkpoint(trained_small, payload=RunsCode(marker)), path)
    checkpoint = read_checkpoint(path)
    assert not marker.exists()  # builtins.open was not called: a stand-in took its place
    assert type(checkpoint["payload"]).__name__ == "open"
    assert_same_model(load_vqgan(path, small_config()), trained_small)


def test_loss_keys_are_left_out_of_the_vqgan_state():
    checkpoint = taming_checkpoint(small_model())
    state = vqgan_state_dict(checkpoint)
    assert not any(key.startswith("loss.") for key in state)
    assert set(state) == set(small_model().state_dict())
    assert set(vqgan_state_dict(checkpoint["state_dict"])) == set(state)  # a bare state dict too


def test_our_checkpoint_loads_without_a_config(trained_small, tmp_path):
    cfg = small_config(l2_normalize=True, legacy_beta=False)
    torch.manual_seed(3)
    model = VQModel(cfg).eval()
    state = {"vqgan." + key: value for key, value in model.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # the stage's loss module: ignored
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": state, "t2i": {"vqgan": asdict(cfg)}, "global_step": 7}, path)
    loaded = load_vqgan(path)
    assert loaded.cfg == cfg
    assert loaded.quantize.l2_normalize and not loaded.quantize.legacy_beta
    assert_same_model(loaded, model)
    assert load_vqgan(path, fallback=small_config()).cfg == cfg  # the saved config wins over a fallback


def test_taming_checkpoint_without_a_config_asks_for_one(trained_small, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(taming_checkpoint(trained_small), path)
    with pytest.raises(ValueError, match="no VQGAN config.*give its config"):
        load_vqgan(path)
    assert_same_model(load_vqgan(path, fallback=small_config()), trained_small)  # a fallback config fits it


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_vqgan(tmp_path / "nope.ckpt", small_config())


def test_misshaped_checkpoint_names_the_key(trained_small, tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save(taming_checkpoint(trained_small), path)
    with pytest.raises(ValueError, match="mis-shaped") as error:
        load_vqgan(path, small_config(n_embed=32))
    message = str(error.value)
    assert "quantize.embedding.weight: checkpoint (64, 8), model (32, 8)" in message
    assert "missing" not in message and "unexpected" not in message


def test_missing_and_unexpected_keys_are_listed(trained_small, tmp_path):
    checkpoint = taming_checkpoint(trained_small)
    del checkpoint["state_dict"]["encoder.mid.attn_1.q.weight"]
    checkpoint["state_dict"]["encoder.down.0.block.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(ValueError) as error:
        load_vqgan(path, small_config())
    message = str(error.value)
    assert "missing (1): encoder.mid.attn_1.q.weight" in message
    assert "unexpected (1): encoder.down.0.block.0.extra.weight" in message


def test_a_different_architecture_is_refused_not_half_loaded(trained_small):
    model = VQModel(small_config(num_res_blocks=2))
    before = weights_hash(model)
    missing = set(model.state_dict()) - set(trained_small.state_dict())
    assert "encoder.down.0.block.1.conv1.weight" in missing and "decoder.up.2.block.2.conv1.weight" in missing
    with pytest.raises(ValueError, match=rf"missing \({len(missing)}\): decoder\.up\.0\.block\.2\.") as error:
        load_weights(model, trained_small.state_dict(), "test")
    assert "unexpected" not in str(error.value) and "mis-shaped" not in str(error.value)
    assert weights_hash(model) == before


# ---------------------------------------------------------------------------------------------
# The f16_16384 config: taming's parameter names and counts (built on the meta device)


@pytest.fixture(scope="module")
def f16_16384():
    with torch.device("meta"):
        return VQModel(VQGANConfig())


TAMING_NAMES = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),  # 128 -> 256 at level 2
    "encoder.down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),  # 256 -> 512 at level 4
    "encoder.down.4.attn.0.norm.weight": (512,),
    "encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),  # attention at resolution 16 = level 4
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.block_2.norm2.bias": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (256, 256, 1, 1),
    "quantize.embedding.weight": (16384, 256),
    "post_quant_conv.weight": (256, 256, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "decoder.up.4.block.2.conv1.weight": (512, 512, 3, 3),  # num_res_blocks + 1 blocks per level
    "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
    "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),  # 512 -> 256
    "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),  # 256 -> 128
    "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
    "decoder.up.0.block.2.norm2.weight": (128,),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
NOT_TAMING_NAMES = [
    "encoder.down.4.downsample.conv.weight",  # the last encoder level keeps its resolution
    "decoder.up.0.upsample.conv.weight",  # so does the first (highest-resolution) decoder level
    "encoder.down.0.block.0.nin_shortcut.weight", "encoder.down.1.block.0.nin_shortcut.weight",
    "encoder.down.2.block.1.nin_shortcut.weight", "encoder.down.3.block.0.nin_shortcut.weight",
    "decoder.up.4.block.0.nin_shortcut.weight", "decoder.up.0.block.0.nin_shortcut.weight",
    "encoder.down.3.attn.0.q.weight", "encoder.down.4.attn.2.q.weight", "decoder.up.3.attn.0.q.weight",
    "encoder.down.0.block.2.conv1.weight", "decoder.up.0.block.3.conv1.weight",
]


def test_f16_16384_has_taming_parameter_names(f16_16384):
    state = f16_16384.state_dict()
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    for key, shape in TAMING_NAMES.items():
        assert shapes.get(key) == shape, key
    for key in NOT_TAMING_NAMES:
        assert key not in state, key
    # taming's checkpoint has 392 keys, 49 of them under loss.* (see test_taming_loss_key_count)
    assert len(state) == 343
    assert all(key.split(".")[0] in {"encoder", "decoder", "quantize", "quant_conv", "post_quant_conv"}
               for key in state)
    assert len(VQGANConfig().ch_mult) == 5 and VQGANConfig().grid == 16


def test_f16_16384_parameter_count(f16_16384):
    encoder = sum(p.numel() for p in f16_16384.encoder.parameters())
    decoder = sum(p.numel() for p in f16_16384.decoder.parameters())
    assert round(encoder / 1e6, 1) == 29.3
    assert round(decoder / 1e6, 2) == 42.45


# ---------------------------------------------------------------------------------------------
# Shapes and the straight-through gradient


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_small_config_shapes(l2_normalize):
    model = small_model(l2_normalize=l2_normalize).eval()
    x = images(3)
    codes = model.encode(x)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    decoded = model.decode(codes)
    assert decoded.shape == (3, 3, 32, 32)
    assert not codes.requires_grad and not decoded.requires_grad  # encode/decode run under no_grad

    x_hat, codebook_loss, forward_codes = model(x)
    assert x_hat.shape == (3, 3, 32, 32) and x_hat.requires_grad
    assert codebook_loss.shape == () and codebook_loss.requires_grad
    assert torch.equal(forward_codes, codes)
    assert torch.allclose(x_hat, decoded, atol=1e-5)  # straight-through z_q has z_q's value


def test_codebook_init_is_uniform_in_one_over_n():
    quantizer = VectorQuantizer(16384, 8)
    w = quantizer.embedding.weight
    assert w.abs().max() <= 1 / 16384 and w.std() > 0.5 / 16384 / 3 ** 0.5


def test_reconstruction_gradient_reaches_the_encoder_but_not_the_codebook():
    model = small_model()
    x_hat, codebook_loss, _ = model(images(2))
    F.l1_loss(x_hat, images(2)).backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad is not None and model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    codebook = model.quantize.embedding.weight
    assert codebook.grad is None or codebook.grad.abs().sum() == 0
    codebook_loss.backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Quantizer: loss placement, nearest-code selection, cosine codebook

CODEBOOK = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
Z = torch.tensor([[0.9, 0.2], [0.1, 0.7]])  # nearest codes 1 and 2
ZQ = CODEBOOK[[1, 2]]


@pytest.mark.parametrize("legacy_beta", [True, False])
def test_quantizer_loss_placement(legacy_beta):
    beta = 0.25
    quantizer = VectorQuantizer(3, 2, beta=beta, legacy_beta=legacy_beta)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(CODEBOOK)
    z = Z.t().reshape(1, 2, 1, 2).clone().requires_grad_(True)  # [B, C, h, w]: two positions
    z_q, loss, codes = quantizer(z)
    assert codes.tolist() == [[[1, 2]]]
    assert torch.allclose(z_q, ZQ.t().reshape(1, 2, 1, 2))
    n = Z.numel()
    mse = (Z - ZQ).pow(2).sum() / n
    assert torch.allclose(loss, (1 + beta) * mse)  # both terms have the same value...
    loss.backward()
    # ...but their gradients go to different places: commitment -> encoder, codebook -> embedding
    z_weight, codebook_weight = (1.0, beta) if legacy_beta else (beta, 1.0)
    z_grad = z.grad.reshape(2, 2).t()
    assert torch.allclose(z_grad, z_weight * 2 * (Z - ZQ) / n)
    expected = torch.zeros(3, 2)
    expected[[1, 2]] = codebook_weight * 2 * (ZQ - Z) / n
    assert torch.allclose(quantizer.embedding.weight.grad, expected)


def test_nearest_code_is_the_brute_force_argmin():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    z = torch.randn(2, 8, 4, 4)
    _, _, codes = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    brute = (flat[:, None, :] - quantizer.embedding.weight[None]).pow(2).sum(-1).argmin(1)
    assert torch.equal(codes.flatten(), brute)
    assert torch.equal(quantizer.nearest(z.permute(0, 2, 3, 1)), codes)


def test_l2_normalize_picks_the_most_cosine_similar_code():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8, l2_normalize=True)
    with torch.no_grad():  # very different norms, so that cosine and euclidean nearest disagree
        quantizer.embedding.weight.normal_().mul_(torch.logspace(-1, 1, 64)[torch.randperm(64)][:, None])
    z = torch.randn(2, 8, 4, 4) * 3
    z_q, _, codes = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    w = quantizer.embedding.weight
    cosine = F.cosine_similarity(flat[:, None, :], w[None], dim=-1)
    assert torch.equal(codes.flatten(), cosine.argmax(1))
    euclidean = (flat[:, None, :] - w[None]).pow(2).sum(-1).argmin(1)
    assert (euclidean != cosine.argmax(1)).any()  # the test means something
    assert torch.allclose(z_q.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Losses: adaptive weight, discriminator schedule, PatchGAN, hinge


def generator_setup(seed: int = 0):
    model = small_model(seed)
    x = images(2)
    x_hat, codebook_loss, _ = model(x)
    torch.manual_seed(seed)
    loss = VQGANLoss(VQGANLossConfig(perceptual_weight=0, disc_start=10))
    return model, loss, x, x_hat, codebook_loss


def test_adaptive_weight_at_the_decoders_last_layer():
    model, loss, x, x_hat, _ = generator_setup()
    last = model.decoder.conv_out.weight
    assert model.decoder.last_layer is last
    rec = F.l1_loss(x_hat, x)
    g = -loss.discriminator(x_hat).mean()
    rec_grad, = torch.autograd.grad(rec, last, retain_graph=True)
    g_grad, = torch.autograd.grad(g, last, retain_graph=True)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    weight = adaptive_weight(rec, g, last)
    assert torch.allclose(weight, expected) and not weight.requires_grad
    assert torch.allclose(adaptive_weight(rec, g, last, max_weight=expected.item() / 2), expected / 2)
    _, logs = loss.generator_loss(x, x_hat, torch.tensor(0.0), step=10, last_layer=last)
    assert torch.allclose(logs["adaptive_weight"], expected * loss.cfg.disc_weight)


def test_adaptive_weight_under_fp16_takes_the_gradients_of_scaled_losses():
    """Unscaled, the fp16 activation gradients of small losses underflow: the weight comes out 0
    (the GAN silently off). Taken as the GradScaler takes them, it is the fp32 weight."""
    if not cpu_autocast_works(torch.float16):
        pytest.skip("this torch has no CPU autocast for float16")
    model, loss, x, _, _ = generator_setup()
    last = model.decoder.last_layer
    small = 1e-5  # a loss this size: its gradient per pixel (~1e-9) is below fp16's smallest number

    def losses(x_hat):
        return F.l1_loss(x_hat.float(), x) * small, -loss.discriminator(x_hat).float().mean() * small

    expected = adaptive_weight(*losses(model(x)[0]), last)
    with torch.autocast("cpu", dtype=torch.float16):
        x_hat, _, _ = model(x)
        assert x_hat.dtype == torch.float16
        rec, g = losses(x_hat)
    assert adaptive_weight(rec, g, last) == 0  # the defect: the gradients underflowed
    scaled = adaptive_weight(rec, g, last, loss_scale=2.0 ** 16)
    assert scaled == pytest.approx(expected.item(), rel=0.05)
    # overflowing at the scale: NaN, so that the GradScaler skips the step and lowers its scale
    assert torch.isnan(adaptive_weight(rec / small, g / small, last, loss_scale=2.0 ** 60))
    with torch.autocast("cpu", dtype=torch.float16):
        _, logs = loss.generator_loss(x, x_hat, torch.tensor(0.0), step=10, last_layer=last, loss_scale=2.0 ** 8)
    assert torch.isfinite(logs["adaptive_weight"]) and logs["adaptive_weight"] > 0


def test_discriminator_is_inactive_before_disc_start():
    model, loss, x, x_hat, codebook_loss = generator_setup()
    total, logs = loss.generator_loss(x, x_hat, codebook_loss, step=5, last_layer=model.decoder.last_layer)
    assert "generator" not in logs and "adaptive_weight" not in logs
    assert torch.allclose(total, F.l1_loss(x_hat, x) + codebook_loss)
    total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_discriminator_is_active_from_disc_start():
    model, loss, x, x_hat, codebook_loss = generator_setup()
    total, logs = loss.generator_loss(x, x_hat, codebook_loss, step=10, last_layer=model.decoder.last_layer)
    assert {"generator", "adaptive_weight", "pixel", "reconstruction", "codebook", "total"} <= set(logs)
    expected = logs["reconstruction"] + codebook_loss + logs["adaptive_weight"] * logs["generator"]
    assert torch.allclose(total, expected)
    total.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_discriminator_loss_trains_only_the_discriminator():
    model, loss, x, x_hat, _ = generator_setup()
    d_loss, logs = loss.discriminator_loss(x, x_hat)
    assert set(logs) == {"disc", "logits_real", "logits_fake"}
    d_loss.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("size, num_layers, grid", [(64, 2, 14), (256, 3, 30), (32, 2, 6)])
def test_patch_discriminator_output_shape(size, num_layers, grid):
    disc = PatchDiscriminator(num_layers=num_layers)
    with torch.no_grad():
        assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, grid, grid)


def test_patch_discriminator_has_tamings_layout():
    """loss.discriminator.* of the f16_16384 checkpoint: 2 layers, BatchNorm, biasless middle convs."""
    state = PatchDiscriminator(num_layers=2).state_dict()
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert set(shapes) == {"main.0.weight", "main.0.bias", "main.2.weight", "main.5.weight",
                           "main.8.weight", "main.8.bias", *(f"main.{i}.{name}" for i in (3, 6) for name in bn)}
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and shapes["main.5.weight"] == (256, 128, 4, 4)
    assert shapes["main.8.weight"] == (1, 256, 4, 4)


def test_hinge_d_loss_on_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x) = 0, 1, 2
    assert torch.allclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0)))
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)) == 0


def test_pixel_loss_choice():
    x, y = torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.5)
    l1 = VQGANLoss(VQGANLossConfig(perceptual_weight=0)).reconstruction(x, y)[0]
    l2 = VQGANLoss(VQGANLossConfig(perceptual_weight=0, pixel_loss="l2")).reconstruction(x, y)[0]
    assert torch.isclose(l1, torch.tensor(0.5)) and torch.isclose(l2, torch.tensor(0.25))
    with pytest.raises(ValueError, match="pixel_loss"):
        VQGANLossConfig(pixel_loss="huber")


# ---------------------------------------------------------------------------------------------
# LPIPS (offline, from a local random VGG16: the random_vgg16 fixture in conftest.py)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torchvision.models.VGG16_Weights, "get_state_dict", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_lpips_from_a_local_vgg16(random_vgg16, no_network):
    path, state = random_vgg16
    metric = build_lpips(str(path))
    assert not any(p.requires_grad for p in metric.parameters()) and not metric.training
    for slice_ in (metric.net.slice1, metric.net.slice2, metric.net.slice3, metric.net.slice4, metric.net.slice5):
        for index, layer in slice_.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                assert torch.equal(layer.weight, state[f"features.{index}.weight"])
    x, y = images(2), images(2, seed=1)
    with torch.no_grad():
        same, different = metric(x, x).flatten(), metric(x, y).flatten()
    assert same.abs().max() < 1e-6
    assert (different > 1e-3).all()
    # with taming's discriminator, these are the 49 loss.* keys of its f16_16384 checkpoint (392 - 343);
    # the lpips package also registers its five heads a second time as `lins.*`, which taming's copy does not
    lpips_keys = [key for key in metric.state_dict() if not key.startswith("lins.")]
    assert len(lpips_keys) == 33 and "lin0.model.1.weight" in lpips_keys and "net.slice5.28.weight" in lpips_keys
    assert len(lpips_keys) + len(PatchDiscriminator(num_layers=2).state_dict()) == 49


def test_lpips_without_weights_or_network_says_what_to_do(no_network):
    with pytest.raises(RuntimeError, match=r"loss\.lpips_vgg_path=PATH") as error:
        build_lpips(None)
    assert "loss.perceptual_weight=0" in str(error.value)


def test_lpips_missing_file_names_the_option(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"loss\.lpips_vgg_path=.*vgg16-397923af\.pth"):
        build_lpips(str(tmp_path / "vgg16-397923af.pth"))


# ---------------------------------------------------------------------------------------------
# Mixed precision and a few optimisation steps


def cpu_autocast_works(dtype: torch.dtype) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast("cpu", dtype=dtype):
            return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
                    and torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1)).dtype == dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("l2_normalize", [False, True])
def test_autocast_keeps_the_nearest_code(dtype, l2_normalize):
    """LlamaGen-like codebook (16384 x 8): a bf16 distance matmul mis-picked ~5% of the codes."""
    if not cpu_autocast_works(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16384, 8, l2_normalize=l2_normalize)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    z = torch.randn(4, 8, 16, 16)
    _, _, exact = quantizer(z)
    with torch.autocast("cpu", dtype=dtype):
        _, loss, codes = quantizer(z)
        assert torch.equal(codes, exact)
        assert torch.equal(quantizer.nearest(z.permute(0, 2, 3, 1).to(dtype)),
                           quantizer.nearest(z.permute(0, 2, 3, 1).to(dtype).float()))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward(dtype):
    if not cpu_autocast_works(dtype):
        pytest.skip(f"this torch has no CPU autocast for {dtype}")
    model = small_model()
    torch.manual_seed(0)
    loss_fn = VQGANLoss(VQGANLossConfig(perceptual_weight=0, disc_start=0))
    x = images(2)
    with torch.autocast("cpu", dtype=dtype):
        x_hat, codebook_loss, codes = model(x)
        assert x_hat.dtype == dtype
        g_loss, g_logs = loss_fn.generator_loss(x, x_hat, codebook_loss, step=0,
                                                last_layer=model.decoder.last_layer)
    g_loss.backward()
    with torch.autocast("cpu", dtype=dtype):
        d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat)
    d_loss.backward()
    for name, value in {**g_logs, **d_logs}.items():
        assert torch.isfinite(value).all(), name
    assert "generator" in g_logs
    for p in [*model.parameters(), *loss_fn.discriminator.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_a_few_adam_steps_lower_the_reconstruction_loss():
    # a tinier config than SMALL (one downsampling, no attention) keeps 50 steps at about a second;
    # with taming's tiny codebook init the decoder first sees nearly constant codes, hence 50, not 30
    torch.manual_seed(0)
    model = VQModel(VQGANConfig(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[],
                                z_channels=8, embed_dim=8, n_embed=64))
    x = images(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        x_hat, codebook_loss, _ = model(x)
        rec = F.l1_loss(x_hat, x)
        optimizer.zero_grad()
        (rec + codebook_loss).backward()
        optimizer.step()
        losses.append(rec.item())
    assert losses[-1] < 0.7 * losses[0], losses
