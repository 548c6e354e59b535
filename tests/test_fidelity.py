"""FID / IS on torch-fidelity's InceptionV3 with random weights (no network here): the metric
formulas, the real-statistics cache and the errors a user without the weights sees."""

import math
import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.hub
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
)

from t2i.eval.fidelity import (
    IS_LAYER,
    FidelityAccumulator,
    InceptionFeatures,
    check_image_counts,
    feature_statistics,
    fid_from_features,
    isc_from_logits,
)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Any download fails the test loudly. torch-fidelity imports torch.hub.load_state_dict_from_url by
    name (patching it in torch.hub would miss), but that function looks up download_url_to_file at
    call time: patch that, and point torch.hub at an empty cache so a copy cached here is not used."""
    def download(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)


@pytest.fixture(scope="module")
def inception64(inception_weights):
    return InceptionFeatures(["64"], inception_weights=inception_weights)


def images(n, seed, low=0, high=255, size=32):
    """Flat-coloured noisy images whose colour is drawn from [low, high]: the colour is what varies."""
    generator = torch.Generator().manual_seed(seed)
    colour = torch.randint(low, high + 1, (n, 3, 1, 1), generator=generator).float()
    noise = torch.randn(n, 3, size, size, generator=generator) * 20
    return (colour + noise).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def features(inception64):
    """64-d features of 66 images (more than 64, so covariances are full rank) from two distributions."""
    sets = {"real": images(66, 1), "dark": images(66, 3, high=110)}
    return {name: inception64.extract(batch.split(33))["64"] for name, batch in sets.items()}


def scipy_fid(a, b):
    a, b = a.double().numpy(), b.double().numpy()
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def test_fid_is_zero_for_a_set_with_itself_and_large_for_different_sets(features):
    same = fid_from_features(features["real"], features["real"])
    different = fid_from_features(features["real"], features["dark"])
    scale = np.trace(feature_statistics(features["real"])["sigma"])  # the feature variance, about 9 here
    assert abs(same) < 1e-3 and abs(same) < 1e-6 * scale
    assert different > 1 and different > 0.3 * scale


def test_fid_matches_a_direct_scipy_computation(features):
    for a, b in [("real", "dark"), ("dark", "real")]:
        ours, direct = fid_from_features(features[a], features[b]), scipy_fid(features[a], features[b])
        assert ours == pytest.approx(direct, rel=1e-3)


class Images(torch.utils.data.Dataset):
    """A uint8 [N, 3, H, W] tensor as torch-fidelity takes an input: a dataset of single images."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


@pytest.mark.filterwarnings("ignore:FID from")
def test_fid_equals_torch_fidelitys_own_pipeline(inception_weights, inception64):
    a, b = images(12, 7), images(12, 8, high=110)
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(a), input2=Images(b), fid=True, feature_layer_fid="64", feature_extractor_weights_path=inception_weights,
        cuda=False, verbose=False, save_cpu_ram=True)["frechet_inception_distance"]  # save_cpu_ram: no workers
    ours = fid_from_features(inception64.extract([a])["64"], inception64.extract([b])["64"])
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_fid_and_is_end_to_end_record_the_protocol(inception_weights, inception64, tmp_path):
    inception = InceptionFeatures(["64", IS_LAYER], inception_weights=inception_weights)
    fake, real = images(4, 4, high=110, size=24), images(4, 5, size=24)
    accumulator = FidelityAccumulator(inception, tmp_path / "cache", "shapes-test-24-4", layer="64", isc_splits=2)
    assert accumulator.needs_real
    for batch in range(2):  # as a generation loop feeds it
        accumulator.add_real(real[2 * batch: 2 * batch + 2])
        accumulator.add_generated(fake[2 * batch: 2 * batch + 2])
    with pytest.warns(UserWarning, match="covariance is singular"):  # 4 images, 64 dimensions
        results = accumulator.compute()
    assert math.isfinite(results["fid"]) and results["fid"] > 0
    assert math.isfinite(results["is_mean"]) and math.isfinite(results["is_std"]) and results["is_mean"] >= 1
    protocol = results["protocol"]
    assert "299" in protocol.pop("resize") and protocol.pop("real_statistics").startswith(str(tmp_path / "cache"))
    assert protocol == {"feature_extractor": "torch-fidelity 0.4.0 inception-v3-compat", "feature_layer": "64",
                        "weights": inception_weights, "real_images": 4, "real_input_size": [24, 24], "generated_images": 4,
                        "generated_input_size": [24, 24], "isc_layer": IS_LAYER, "isc_splits": 2}

    # A second evaluation against the same real set reads the cache and never looks at real images
    # (the key covers weights and layer, not which other layers an extractor computes).
    again = FidelityAccumulator(inception64, tmp_path / "cache", "shapes-test-24-4", layer="64", isc_splits=None)
    assert not again.needs_real
    again.add_real(torch.empty(0))  # ignored: not even checked
    again.add_generated(fake)
    with pytest.warns(UserWarning, match="covariance is singular"):
        repeated = again.compute()
    assert repeated["fid"] == pytest.approx(results["fid"], rel=1e-6)
    assert repeated["protocol"]["real_images"] == 4 and repeated["protocol"]["real_input_size"] == [24, 24]


class PixelFeatures:
    """Stands in for InceptionFeatures where only the bookkeeping is tested: pixels as features."""

    layers, weights = ("64", IS_LAYER), "pixels"

    def __call__(self, images):
        pixels = images.flatten(1).float() / 255
        return {"64": pixels[:, :64], IS_LAYER: pixels[:, :1008] * 10}


def test_accumulators_of_several_processes_merge_into_the_one_process_numbers(tmp_path):
    """What eval.py does with several devices: each process feeds its share, in its own order; the
    main process merges the states. Labels (sample keys) put the images back in one order."""
    real, fake = images(6, 9, size=32), images(6, 10, high=110, size=32)
    labels = [f"key{i}" for i in range(6)]

    def accumulator(cache):
        return FidelityAccumulator(PixelFeatures(), tmp_path / cache, "merge-test", layer="64", isc_splits=2)

    one = accumulator("one")
    one.add_real(real, labels)
    one.add_generated(fake, labels)
    main, other = accumulator("two"), accumulator("two")
    for part, index in ((main, [4, 1, 5]), (other, [3, 0]), (other, [2])):  # shares in arrival order
        part.add_real(real[index], [labels[i] for i in index])
        part.add_generated(fake[index], [labels[i] for i in index])
    main.merge(other.state())
    with pytest.warns(UserWarning, match="covariance is singular"):
        expected, merged = one.compute(), main.compute()
    for metric in ("fid", "is_mean", "is_std"):
        assert merged[metric] == pytest.approx(expected[metric], rel=1e-6, abs=1e-9), metric
    assert merged["protocol"]["real_images"] == merged["protocol"]["generated_images"] == 6

    cached = accumulator("two")  # a process that found the statistics cached cannot merge with one that did not
    with pytest.raises(RuntimeError, match="eval.stats_cache"):
        cached.merge(accumulator("three").state())


def test_too_few_images_for_fid_are_refused_before_sampling():
    with pytest.raises(ValueError, match="at least 2 real and 2 generated.*eval.num_prompts.*eval.fid=false"):
        check_image_counts(1, 8, "64", None)
    with pytest.raises(ValueError, match="at least 2 real and 2 generated"):
        check_image_counts(8, 1, "64", None)
    with pytest.raises(ValueError, match="eval.isc_splits=10 needs at least 10"):
        check_image_counts(8, 8, "64", 10)
    with pytest.warns(UserWarning, match="covariances are singular.*eval.fid_layer"):
        check_image_counts(100, 200, "2048", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_image_counts(100, 200, "64", 10)  # enough: no warning


def test_inception_score_of_logits():
    uniform = torch.zeros(20, 1008)  # every image equally unsure: IS is exactly 1
    assert isc_from_logits(uniform, splits=2) == pytest.approx((1.0, 0.0))
    confident = torch.eye(1008)[:20] * 100  # 10 distinct confident classes per split: IS about 10
    mean, std = isc_from_logits(confident, splits=2)
    assert mean == pytest.approx(10, rel=1e-3) and std == pytest.approx(0, abs=1e-3)


@pytest.mark.filterwarnings("ignore:FID from")
def test_real_statistics_are_computed_once_per_key(inception64, tmp_path):
    calls = []
    hook = inception64.model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))

    def real_statistics(batches, key):  # what eval.py does: every real batch offered, used only on a cache miss
        accumulator = FidelityAccumulator(inception64, tmp_path, key, "64", isc_splits=None)
        for batch in batches:
            accumulator.add_real(batch)
        return accumulator.real_statistics()

    try:
        real = images(6, 6, size=16)
        first = real_statistics(real.split(3), "manifest-abc|val|16|6")
        assert calls == [3, 3] and not first["cached"]
        again = real_statistics(real.split(3), "manifest-abc|val|16|6")
        assert calls == [3, 3] and again["cached"] and again["n"] == 6
        np.testing.assert_array_equal(again["mu"], first["mu"])
        np.testing.assert_array_equal(again["sigma"], first["sigma"])
        other = real_statistics(real.split(3), "manifest-abc|test|16|6")
        assert calls == [3, 3, 3, 3] and not other["cached"]
    finally:
        hook.remove()
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz", ".npz"]  # no temporary files left


def test_offline_download_failure_says_how_to_provide_the_weights(monkeypatch):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="eval.inception_weights=PATH") as error:
        InceptionFeatures(["64"])
    assert URL_INCEPTION_V3 in str(error.value)


def test_bad_weights_path_and_bad_inputs_raise_clear_errors(inception64, tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights="):
        InceptionFeatures(["64"], inception_weights=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="eval.inception_weights="):
        InceptionFeatures(["64"], inception_weights=str(garbage))
    with pytest.raises(ValueError, match="unknown Inception feature layer"):
        InceptionFeatures(["1000"], inception_weights=str(garbage))
    with pytest.raises(ValueError, match="layer"):
        FidelityAccumulator(inception64, tmp_path, "key", "2048", isc_splits=None)  # not among its layers
    with pytest.raises(ValueError, match="uint8"):
        inception64(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(torch.randn(1, 64), torch.randn(10, 64))
    with pytest.raises(ValueError, match="at least 10"):
        isc_from_logits(torch.randn(5, 1008), splits=10)


def test_mismatched_real_and_generated_sets_are_refused(tmp_path):
    """With samples_per_prompt S, FID compares N real images with N x S generated ones: any other
    pair of sizes means the two sets are not the same prompts' (e.g. statistics cached for another set)."""
    real, fake = images(6, 11, size=32), images(12, 12, high=110, size=32)

    def accumulator(per_real):
        return FidelityAccumulator(PixelFeatures(), tmp_path, "per-real-test", layer="64", isc_splits=None,
                                   generated_per_real=per_real, protocol={"captions_available": 30})

    matched = accumulator(2)
    matched.add_real(real)
    matched.add_generated(fake)
    with pytest.warns(UserWarning, match="covariance is singular"):
        results = matched.compute()
    assert results["protocol"]["real_images"] == 6 and results["protocol"]["generated_images"] == 12
    assert results["protocol"]["captions_available"] == 30  # the caller's protocol entries are reported
    fewer = accumulator(2)  # the real statistics now come from the cache
    fewer.add_generated(fake[:10])
    with pytest.raises(ValueError, match=r"10 generated images against 6 real images read from the cache.*2 generated"):
        fewer.compute()
    with pytest.raises(ValueError, match=r"12 generated images against 6 real images.*3 generated per real image"):
        one_more = accumulator(3)
        one_more.add_generated(fake)
        one_more.compute()
    with pytest.raises(ValueError, match="generated_per_real"):
        accumulator(0)
