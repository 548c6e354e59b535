"""The quantizer's options for codebook use: the entropy (usage) loss and SimVQ's projected codebook,
and that checkpoints of the plain quantizer keep their keys and keep loading."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from t2i.checkpoints import load_vqgan, weights_hash
from t2i.models.vqgan import VectorQuantizer, VQGANConfig, VQModel

SMALL = dict(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
             embed_dim=8, n_embed=64, legacy_beta=False)


def direct_entropy_loss(z: torch.Tensor, codebook: torch.Tensor, temperature: float, cosine: bool):
    """The loss written out vector by vector, as the definition reads."""
    vectors = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    per_vector, probabilities = [], []
    for v in vectors:
        if cosine:
            v = v / v.norm()
        distance = torch.stack([(v - c).pow(2).sum() for c in codebook])
        p = torch.softmax(-distance / temperature, 0)
        probabilities.append(p)
        per_vector.append(-sum(float(q) * math.log(float(q)) for q in p if q > 0))
    average = torch.stack(probabilities).mean(0)
    batch = -sum(float(q) * math.log(float(q)) for q in average if q > 0)
    return sum(per_vector) / len(per_vector), batch


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_entropy_loss_matches_the_definition(l2_normalize):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(6, 3, l2_normalize=l2_normalize, entropy_temperature=0.5)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    z = torch.randn(2, 3, 2, 2)
    loss, terms = quantizer.entropy_loss(z)
    per_vector, batch = direct_entropy_loss(z, quantizer.codebook().detach(), 0.5, l2_normalize)
    assert terms["entropy_per_vector"].item() == pytest.approx(per_vector, rel=1e-4)
    assert terms["entropy_batch"].item() == pytest.approx(batch, rel=1e-4)
    assert loss.item() == pytest.approx(per_vector - batch, rel=1e-4, abs=1e-5)
    assert 0 < per_vector < batch <= math.log(6) + 1e-6  # the average assignment is the more spread out


def collapsed_toy():
    """256 vectors near the origin; code 0 at the origin, 15 codes on a circle of radius 4: every
    vector's nearest code is code 0 or one other (usage 2 of 16), the rest get no codebook gradient."""
    torch.manual_seed(0)
    quantizer = VectorQuantizer(16, 2, legacy_beta=False, entropy_temperature=1.0)
    angles = torch.arange(15) * 2 * math.pi / 15
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.cat([torch.zeros(1, 2), 4 * torch.stack([angles.cos(), angles.sin()], 1)]))
    return quantizer, torch.randn(1, 2, 16, 16) * 0.5


def codes_used(quantizer: VectorQuantizer, z: torch.Tensor) -> int:
    return quantizer.nearest(z.permute(0, 2, 3, 1)).unique().numel()


def test_entropy_loss_gradient_spreads_a_collapsed_codebook():
    used = {}
    for loss_name in ("vq", "entropy"):
        quantizer, z = collapsed_toy()
        before = codes_used(quantizer, z)
        optimizer = torch.optim.Adam(quantizer.parameters(), lr=0.05)
        for _ in range(100):
            loss = quantizer(z)[1] if loss_name == "vq" else quantizer.entropy_loss(z)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        used[loss_name] = (before, codes_used(quantizer, z))
    assert used["vq"] == (2, 2)  # the codebook loss moves only the codes in use
    assert used["entropy"][0] == 2 and used["entropy"][1] >= 8, used


def test_entropy_loss_reaches_the_encoder_side_and_the_codebook():
    quantizer, z = collapsed_toy()
    z.requires_grad_(True)
    quantizer.entropy_loss(z)[0].backward()
    assert z.grad.abs().sum() > 0
    assert (quantizer.embedding.weight.grad.abs().sum(1) > 0).all()  # every code, used or not


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_loss_is_float32_under_autocast(dtype):
    quantizer, z = collapsed_toy()
    expected, _ = quantizer.entropy_loss(z)
    with torch.autocast("cpu", dtype=dtype):
        loss, _ = quantizer.entropy_loss(z)
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# SimVQ


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_simvq_moves_every_code_in_one_step_and_plain_moves_only_those_in_use(l2_normalize):
    moved = {}
    for kind in ("plain", "simvq"):
        torch.manual_seed(0)
        quantizer = VectorQuantizer(64, 8, legacy_beta=False, l2_normalize=l2_normalize, kind=kind)
        z = torch.randn(1, 8, 2, 2)  # 4 vectors: at most 4 codes in use
        before = quantizer.codebook().detach().clone()
        optimizer = torch.optim.Adam([p for p in quantizer.parameters() if p.requires_grad], lr=1e-2)
        _, loss, codes = quantizer(z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        changed = (quantizer.codebook().detach() - before).abs().sum(1) > 0
        moved[kind] = (int(changed.sum()), codes.unique().numel())
    assert moved["simvq"][0] == 64
    assert moved["plain"][0] == moved["plain"][1] <= 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_simvq_codebook_stays_float32_under_autocast(dtype):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(64, 8, legacy_beta=False, l2_normalize=True, kind="simvq")
    z = torch.randn(2, 8, 4, 4)
    expected = quantizer.codebook()
    with torch.autocast("cpu", dtype=dtype):
        codebook = quantizer.codebook()
        z_q, loss, codes = quantizer(z)
    assert codebook.dtype == torch.float32 and torch.equal(codebook, expected)
    assert torch.equal(codes, quantizer.nearest(z.permute(0, 2, 3, 1))) and torch.isfinite(loss)
    loss.backward()
    assert quantizer.projection.weight.grad.abs().sum() > 0


def test_simvq_basis_is_frozen_and_random_and_lives_beside_the_projection():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(4096, 8, kind="simvq")
    basis = quantizer.embedding.weight
    assert not basis.requires_grad
    assert basis.std().item() == pytest.approx(8 ** -0.5, rel=0.05)
    assert set(quantizer.state_dict()) == {"embedding.weight", "projection.weight"}
    assert torch.allclose(quantizer.codebook(), quantizer.projection(basis))
    codes = torch.tensor([[[0, 5], [4095, 7]]])
    assert torch.allclose(quantizer.lookup(codes).permute(0, 2, 3, 1), quantizer.codebook()[codes])


@pytest.mark.parametrize("kind", ["plain", "simvq"])
@pytest.mark.parametrize("l2_normalize", [False, True])
def test_set_codes_points_the_codes_at_the_vectors(kind, l2_normalize):
    torch.manual_seed(0)
    quantizer = VectorQuantizer(32, 8, l2_normalize=l2_normalize, kind=kind)
    others = quantizer.codebook().detach().clone()
    indices, vectors = torch.tensor([3, 17, 30]), torch.randn(3, 8)
    quantizer.set_codes(indices, vectors)
    codebook = quantizer.codebook().detach()
    expected = F.normalize(vectors, dim=1) if l2_normalize else vectors
    assert torch.allclose(codebook[indices], expected, atol=1e-4)
    kept = torch.ones(32, dtype=torch.bool)
    kept[indices] = False
    assert torch.equal(codebook[kept], others[kept])
    # the vectors' own inputs now quantise to the new codes
    assert quantizer.nearest(vectors).tolist() == indices.tolist()


def test_config_values_are_checked():
    with pytest.raises(ValueError, match=r"vqgan\.codebook must be one of \('plain', 'simvq'\)"):
        VQGANConfig(codebook="ema")
    with pytest.raises(ValueError, match=r"vqgan\.entropy_weight"):
        VQGANConfig(entropy_weight=-0.1)
    with pytest.raises(ValueError, match=r"vqgan\.entropy_temperature"):
        VQGANConfig(entropy_temperature=0)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_plain_quantizer_keeps_tamings_single_key():
    model = VQModel(VQGANConfig(**SMALL))
    assert [k for k in model.state_dict() if k.startswith("quantize.")] == ["quantize.embedding.weight"]
    simvq = VQModel(VQGANConfig(**SMALL, codebook="simvq"))
    assert set(simvq.state_dict()) - set(model.state_dict()) == {"quantize.projection.weight"}


def test_checkpoint_saved_before_the_options_still_loads(tmp_path):
    """A t2i checkpoint whose config predates codebook/entropy_* loads as the plain quantizer."""
    torch.manual_seed(0)
    model = VQModel(VQGANConfig(**SMALL)).eval()
    old_config = {k: v for k, v in asdict(model.cfg).items()
                  if k not in ("codebook", "entropy_weight", "entropy_temperature")}
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in model.state_dict().items()}, "t2i": {"vqgan": old_config}},
               tmp_path / "old.ckpt")
    loaded = load_vqgan(tmp_path / "old.ckpt")
    assert loaded.cfg.codebook == "plain" and loaded.cfg.entropy_weight == 0
    assert weights_hash(loaded) == weights_hash(model)


def test_simvq_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = VQModel(VQGANConfig(**SMALL, codebook="simvq", l2_normalize=True)).eval()
    with torch.no_grad():
        model.quantize.projection.weight.add_(0.1 * torch.randn(8, 8))
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in model.state_dict().items()},
                "t2i": {"vqgan": asdict(model.cfg)}}, tmp_path / "simvq.ckpt")
    loaded = load_vqgan(tmp_path / "simvq.ckpt")
    assert loaded.cfg.codebook == "simvq"
    assert weights_hash(loaded) == weights_hash(model)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    # a plain model refuses the SimVQ weights rather than half-loading them
    with pytest.raises(Exception, match="projection"):
        load_vqgan(tmp_path / "simvq.ckpt", VQGANConfig(**SMALL, l2_normalize=True))
