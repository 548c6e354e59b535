"""task=reconstruct's metrics: rFID (the FID path of t2i.eval.fidelity, random Inception weights) and
LPIPS (build_lpips on a random VGG16) beside PSNR/SSIM; eval.py end to end with both. Nothing downloads."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from run_each import run_each

from t2i.data.convert import run as convert
from t2i.data.tokenizer import train_sentencepiece
from t2i.eval.fidelity import FidelityAccumulator, InceptionFeatures, fid_from_features
from t2i.eval.reconstruction import PSNR, image_psnr, markdown_table, reconstruction_metrics
from t2i.models.losses import build_lpips
from t2i.models.vqgan import VQGANConfig, VQModel

TINY = dict(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
            embed_dim=8, n_embed=64, l2_normalize=True, legacy_beta=False)


def batches(n: int, size: int, seed: int = 0) -> list[dict]:
    """uint8 images of a flat background and a flat rectangle, with sample keys, as a loader yields them."""
    g = torch.Generator().manual_seed(seed)
    out, count = [], 0
    while count < n:
        images = torch.empty(min(size, n - count), 3, 32, 32, dtype=torch.uint8)
        for image in images:
            background, colour = torch.randint(0, 256, (2, 3, 1, 1), generator=g, dtype=torch.uint8)
            image[:] = background
            top, left = torch.randint(0, 16, (2,), generator=g).tolist()
            image[:, top:top + 12, left:left + 10] = colour
        out.append({"image": images, "key": [f"{count + i:05d}" for i in range(len(images))]})
        count += len(images)
    return out


def prepare(batch: dict) -> dict:
    return {**batch, "image": batch["image"].float() / 127.5 - 1}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    vqgan = VQModel(VQGANConfig(**TINY))
    with torch.no_grad():
        vqgan.quantize.embedding.weight.normal_()  # a spread-out codebook: varied reconstructions
    return vqgan.eval()


def test_rfid_and_lpips_are_those_of_the_reconstructions_against_the_real_images(model, inception_weights,
                                                                                 random_vgg16, tmp_path):
    data = batches(70, 32)  # 70 > 64 features: full-rank covariances
    inception = InceptionFeatures(["64"], inception_weights)
    fidelity = FidelityAccumulator(inception, tmp_path / "stats", "test-real-set", "64", isc_splits=None,
                                   generated_per_real=1)
    lpips = build_lpips(str(random_vgg16[0]))
    results = reconstruction_metrics(model, data, prepare, fidelity=fidelity, lpips=lpips)
    # the same numbers, computed directly
    real = torch.cat([b["image"] for b in data])
    with torch.no_grad():
        fake = (model.decode(model.encode(prepare({"image": real})["image"])).clamp(-1, 1) + 1) / 2
    fake_uint8 = (fake * 255).round().byte()
    expected_fid = fid_from_features(inception(real)["64"], inception(fake_uint8)["64"])
    with torch.no_grad():
        expected_lpips = lpips(fake * 2 - 1, real.float() / 127.5 - 1).mean().item()
    assert results["images"] == 70
    assert results["rfid"] == pytest.approx(expected_fid, rel=1e-3)
    assert results["rfid"] > 1  # a random VQGAN's reconstructions are far from the images
    assert results["lpips"] == pytest.approx(expected_lpips, rel=1e-4) and results["lpips"] > 0
    protocol = results["rfid_protocol"]
    assert protocol["real_images"] == protocol["generated_images"] == 70
    assert protocol["feature_layer"] == "64" and protocol["weights"] == inception_weights
    assert protocol["isc_layer"] is None and protocol["real_input_size"] == [32, 32]
    assert {"psnr", "ssim", "codebook_used", "codebook_perplexity"} <= set(results)
    # a second evaluation reads the real statistics from the cache: the same rFID
    again = FidelityAccumulator(inception, tmp_path / "stats", "test-real-set", "64", isc_splits=None,
                                generated_per_real=1)
    assert not again.needs_real
    assert reconstruction_metrics(model, data, prepare, fidelity=again)["rfid"] == pytest.approx(results["rfid"])


def test_psnr_is_each_images_averaged_not_that_of_the_pooled_error(model):
    real = torch.full((2, 3, 8, 8), 0.5)
    fake = real + torch.tensor([0.1, 0.001])[:, None, None, None]  # MSE 1e-2 (20 dB) and 1e-6 (60 dB)
    psnr = image_psnr()
    psnr.update(fake[:1], real[:1])
    psnr.update(fake[1:], real[1:])
    assert float(psnr.compute()) == pytest.approx(40.0, abs=0.01)  # the pooled MSE's PSNR: 23.0 dB
    # task=reconstruct's figure: the same, over the reconstructions of images of very different error
    data = batches(6, 4)
    results = reconstruction_metrics(model, data, prepare)
    per_image = []
    with torch.no_grad():
        for batch in data:
            x = prepare(batch)["image"]
            fake = (model.decode(model.encode(x)).clamp(-1, 1) + 1) / 2
            per_image += (10 * torch.log10(1 / ((fake - (x + 1) / 2) ** 2).mean((1, 2, 3)))).tolist()
    assert max(per_image) - min(per_image) > 3  # the two definitions differ on this set
    assert results["psnr"] == pytest.approx(sum(per_image) / len(per_image), abs=1e-3)
    assert results["psnr_protocol"] == PSNR and "each image's PSNR" in markdown_table(
        {**results, "ckpt": "c", "split": "val", "data": "d"})


def test_rfid_of_a_set_against_itself_is_zero(inception_weights, tmp_path):
    """The accumulator as reconstruct uses it: identical reconstructions give rFID ~0."""
    data = batches(70, 35, seed=1)
    fidelity = FidelityAccumulator(InceptionFeatures(["64"], inception_weights), tmp_path, "self", "64",
                                   isc_splits=None, generated_per_real=1)
    for batch in data:
        fidelity.add_real(batch["image"], batch["key"])
        fidelity.add_generated(batch["image"].flip(0), batch["key"][::-1])  # another order, same labels
    assert abs(fidelity.compute()["fid"]) < 1e-3


def test_without_rfid_and_lpips_the_metrics_leave_them_out(model):
    results = reconstruction_metrics(model, batches(8, 4), prepare)
    assert "rfid" not in results and "lpips" not in results and results["images"] == 8
    table = markdown_table({**results, "not_computed": {"rfid": "eval.rfid=false"}})
    assert "| n/a |" in table and "rfid not computed: eval.rfid=false" in table


def test_lpips_errors_name_the_eval_settings(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torchvision.models.VGG16_Weights, "get_state_dict", refuse)
    with pytest.raises(RuntimeError, match=r"eval\.lpips_vgg_path=PATH, or skip LPIPS: eval\.lpips=false"):
        build_lpips(None, setting="eval.lpips_vgg_path", off="skip LPIPS: eval.lpips=false")
    with pytest.raises(FileNotFoundError, match=r"eval\.lpips_vgg_path=.*missing\.pth"):
        build_lpips(str(tmp_path / "missing.pth"), setting="eval.lpips_vgg_path")


# ---------------------------------------------------------------------------------------------
# eval.py task=reconstruct


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "shapes"
    convert(["shapes", "--out", str(root), "--train", "8", "--val", "24", "--test", "0", "--size", "32", "--quiet"])
    (root / "tokenizer.model").write_bytes(train_sentencepiece(["红色的圆形", "蓝色的方块", "绿色三角形"] * 20, 300))
    return root


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("vqgan") / "v.ckpt"
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in model.state_dict().items()}, "t2i": {"vqgan": TINY}}, path)
    return path


@pytest.fixture(scope="module")
def reconstruct_runs(shapes_root, checkpoint, inception_weights, random_vgg16, tmp_path_factory):
    """eval.py task=reconstruct three ways, run one after another in one process (tests/run_each): with rFID and
    LPIPS, with the defaults and no weights anywhere, and rFID asked for without its weights: {name: (run folder,
    exit code, stderr)}."""
    root = tmp_path_factory.mktemp("reconstruct")
    common = ["eval.py", "task=reconstruct", f"ckpt={checkpoint}", "data=shapes", f"data.root={shapes_root}",
              "data.image_size=32", "data.batch_size=10", "split=val"]
    runs = {"metrics": ["eval.rfid=true", "eval.lpips=true", f"eval.inception_weights={inception_weights}",
                        "eval.fid_layer=64", f"eval.stats_cache={root / 'stats'}",
                        f"eval.lpips_vgg_path={random_vgg16[0]}"],
            "defaults": ["eval.inception_weights=/nonexistent", "eval.lpips_vgg_path=/nonexistent"],
            "missing": ["eval.rfid=true", f"eval.inception_weights={root / 'missing.pth'}"]}
    said = run_each(*[[*common, f"hydra.run.dir={root / name}", *overrides] for name, overrides in runs.items()])
    return {name: (root / name, code, stderr) for name, (code, stderr) in zip(runs, said)}


def test_eval_py_reconstruct_with_rfid_and_lpips(reconstruct_runs, random_vgg16):
    run, code, stderr = reconstruct_runs["metrics"]
    assert code == 0, stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert results["images"] == 24
    assert math.isfinite(results["rfid"]) and results["rfid"] > 0
    assert results["rfid_protocol"]["real_images"] == results["rfid_protocol"]["generated_images"] == 24
    assert "every sample of the split" in results["rfid_protocol"]["real_images_choice"]
    assert len(list((run.parent / "stats").glob("*.npz"))) == 1  # the real statistics, cached
    assert results["lpips"] > 0 and results["lpips_protocol"]["backbone"] == str(random_vgg16[0])
    assert results["not_computed"] == {}
    table = (run / "results.md").read_text()
    assert "rFID" in table and f"{results['rfid']:.3f}" in table and f"{results['lpips']:.4f}" in table


def test_eval_py_reconstruct_defaults_need_no_weights(reconstruct_runs):
    """As the quickstart runs it: no Inception or VGG weights anywhere, nothing downloaded."""
    run, code, stderr = reconstruct_runs["defaults"]
    assert code == 0, stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert "rfid" not in results and "lpips" not in results and results["psnr"] > 0
    assert set(results["not_computed"]) == {"rfid", "lpips"}
    assert "rfid not computed" in (run / "results.md").read_text()


def test_eval_py_reconstruct_rfid_without_weights_names_the_setting(reconstruct_runs):
    run, code, stderr = reconstruct_runs["missing"]
    assert code != 0
    assert "eval.inception_weights=" in stderr and "missing.pth" in stderr
