"""FID and Inception Score of generated images against a real split.

Features come from torch-fidelity's InceptionV3 (the TensorFlow FID network ported to PyTorch,
the one published FID numbers use) and the metrics from torch-fidelity's own helpers, so our
numbers match `torch_fidelity.calculate_metrics` on the same images. Real-image statistics are
cached on disk because the real split does not change between evaluations of different models.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.hub
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from tqdm import tqdm

FID_LAYERS = ("64", "192", "768", "2048")  # pooled activations; "2048" is the standard FID
IS_LAYER = "logits_unbiased"  # the fc layer without its bias: what the original TF Inception Score used
LAYERS = (*FID_LAYERS, IS_LAYER, "logits")
EXTRACTOR = "inception-v3-compat"  # torch-fidelity's registry name for this network
RESIZE = "torch-fidelity's TensorFlow-1.x-compatible bilinear resize to 299x299 (inside the extractor)"
ISC_SHUFFLE_SEED = 2020  # torch-fidelity's default: IS splits are taken after this fixed shuffle


def _check_layers(layers: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [layer for layer in layers if layer not in allowed]
    if unknown or not layers:
        raise ValueError(f"unknown Inception feature layer(s) {unknown or list(layers)}: choose from {list(allowed)}")


def _load_extractor(layers: Sequence[str], inception_weights: str | None) -> FeatureExtractorInceptionV3:
    """torch-fidelity's extractor for `layers`, turning its loading failures into errors that say what to do."""
    if inception_weights is not None:
        path = Path(inception_weights)
        if not path.is_file():
            raise FileNotFoundError(f"eval.inception_weights={path}: no such file (expected torch-fidelity's "
                                    f"InceptionV3 weights, downloadable from {URL_INCEPTION_V3})")
        try:
            return FeatureExtractorInceptionV3(EXTRACTOR, list(layers), feature_extractor_weights_path=str(path),
                                               verbose=False)
        except Exception as error:  # a pickle, a state-dict or a format error: all mean the wrong file
            raise ValueError(f"eval.inception_weights={path} is not torch-fidelity's InceptionV3 weights "
                             f"(the state dict saved at {URL_INCEPTION_V3}): {error}") from error
    try:
        return FeatureExtractorInceptionV3(EXTRACTOR, list(layers), verbose=False)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a truncated download fails in torch.load
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"could not download the InceptionV3 weights for FID/IS from {URL_INCEPTION_V3} ({error}). "
            f"Download that file on a machine with internet access and pass it with eval.inception_weights=PATH "
            f"(or put it in torch.hub's cache, {cache}/).") from error


class InceptionFeatures:
    """torch-fidelity's InceptionV3 as a function from uint8 image batches [N, 3, H, W] to features.

    `layers` are torch-fidelity's names (see LAYERS); one forward pass yields all of them, so ask for
    "2048" and "logits_unbiased" together to get FID and IS from one pass over the generated images.
    `inception_weights` is a local copy of torch-fidelity's weights file; None downloads it.
    Images of any size are resized to 299x299 inside the network (RESIZE).
    """

    def __init__(self, layers: Sequence[str] = ("2048",), inception_weights: str | None = None,
                 device: str = "cpu"):
        self.layers = tuple(layers)
        _check_layers(self.layers, LAYERS)
        self.weights = str(inception_weights) if inception_weights is not None else URL_INCEPTION_V3
        self.device = device
        self.model = _load_extractor(self.layers, inception_weights).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of one batch, float32 on the CPU, keyed by layer."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        features = self.model(images.to(self.device))
        return {layer: feature.cpu() for layer, feature in zip(self.layers, features)}

    def extract(self, batches: Iterable[torch.Tensor], desc: str = "inception") -> dict[str, torch.Tensor]:
        """Features of every batch, concatenated in order."""
        parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        for images in tqdm(batches, desc=desc):
            for layer, feature in self(images).items():
                parts[layer].append(feature)
        if not parts[self.layers[0]]:
            raise ValueError(f"{desc}: no images to compute features of")
        return {layer: torch.cat(part) for layer, part in parts.items()}


def _check_count(n: int, dim: int, what: str) -> None:
    if n < 2:
        raise ValueError(f"FID needs at least 2 {what} (it estimates a covariance), got {n}")
    if n < dim:
        # The covariance then has rank < dim: FID is still defined but biased upward and noisy.
        warnings.warn(f"FID from {n} {what} with {dim}-dimensional features: the covariance is singular; "
                      f"use at least {dim} images (published FIDs use 10k-50k) or a smaller feature layer",
                      stacklevel=3)


def feature_statistics(features: torch.Tensor, what: str = "images") -> dict:
    """Mean and covariance (float64) of [N, D] features, as torch-fidelity's FID takes them, plus N.
    `what` names the images in errors and warnings."""
    if features.dim() != 2:
        raise ValueError(f"expected features [N, D] of {what}, got {list(features.shape)}")
    _check_count(len(features), features.shape[1], what)
    stats = fid_features_to_statistics(features.detach().cpu().double())
    return {"mu": stats["mu"], "sigma": stats["sigma"], "n": len(features)}


def fid_from_statistics(real: dict, fake: dict) -> float:
    """Fréchet distance between two Gaussians given as {"mu", "sigma"} (torch-fidelity's formula)."""
    if real["mu"].shape != fake["mu"].shape:
        raise ValueError(f"FID statistics of different feature sizes: {real['mu'].shape} vs {fake['mu'].shape}")
    # torch-fidelity asserts equal dtypes; float64 also keeps the eigenvalues of sigma1 @ sigma2 accurate.
    real, fake = ({"mu": np.asarray(s["mu"], np.float64), "sigma": np.asarray(s["sigma"], np.float64)}
                  for s in (real, fake))
    return float(fid_statistics_to_metric(real, fake, verbose=False)[KEY_METRIC_FID])


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two sets of [N, D] features."""
    return fid_from_statistics(feature_statistics(real, "real images"), feature_statistics(fake, "generated images"))


def isc_from_logits(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over `splits` splits) of [N, classes] logits (use the "logits_unbiased" layer)."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits [N, classes], got {list(logits.shape)}")
    if splits < 1 or len(logits) < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {len(logits)}")
    out = isc_features_to_metric(logits.detach().cpu(), splits=splits, shuffle=True, rng_seed=ISC_SHUFFLE_SEED)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def real_statistics(batches: Iterable[torch.Tensor], inception: InceptionFeatures, cache_dir: str | Path,
                    key: str, layer: str = "2048") -> dict:
    """FID statistics of the real images, computed once per `key` and then read from `cache_dir`.

    `key` must name everything the images depend on (the caller passes a hash of the shard manifest,
    the split, the image size and the number of images); the layer and the weights are added here.
    `batches` is only iterated on a cache miss. Returns feature_statistics() plus "cached" and "path".
    """
    _check_layers([layer], FID_LAYERS)
    if layer not in inception.layers:
        raise ValueError(f"layer {layer!r} is not among the extractor's layers {list(inception.layers)}")
    full_key = f"{key}|layer={layer}|weights={inception.weights}"
    path = Path(cache_dir) / f"{hashlib.sha256(full_key.encode()).hexdigest()}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["key"]) == full_key:
                return {"mu": cached["mu"], "sigma": cached["sigma"], "n": int(cached["n"]),
                        "cached": True, "path": str(path)}
    stats = feature_statistics(inception.extract(batches, desc="inception (real)")[layer], "real images")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file in the same directory and rename: a crash or a concurrent
    # evaluation never leaves a half-written cache that a later run would trust.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, mu=stats["mu"], sigma=stats["sigma"], n=stats["n"], key=full_key)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {**stats, "cached": False, "path": str(path)}


def protocol(inception: InceptionFeatures, layer: str, image_size: int | Sequence[int], n_real: int,
             n_fake: int, isc_splits: int | None = None) -> dict:
    """What a FID/IS number depends on, for results.json: without it two FIDs cannot be compared."""
    size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    return {"feature_extractor": f"torch-fidelity {torch_fidelity.__version__} {EXTRACTOR}",
            "feature_layer": layer, "weights": inception.weights, "input_size": size, "resize": RESIZE,
            "real_images": n_real, "generated_images": n_fake,
            "isc_layer": IS_LAYER if isc_splits else None, "isc_splits": isc_splits}


def fidelity_metrics(fake_batches: Iterable[torch.Tensor], real_batches: Iterable[torch.Tensor],
                     inception: InceptionFeatures, cache_dir: str | Path, real_key: str,
                     image_size: int | Sequence[int], layer: str = "2048", isc_splits: int | None = 10) -> dict:
    """FID of the generated images against the real ones (statistics cached) and, unless
    `isc_splits` is None, their Inception Score; with the protocol they were measured under."""
    if isc_splits is not None and IS_LAYER not in inception.layers:
        raise ValueError(f"Inception Score needs the {IS_LAYER!r} layer; the extractor has {list(inception.layers)}")
    real = real_statistics(real_batches, inception, cache_dir, real_key, layer)
    fake = inception.extract(fake_batches, desc="inception (generated)")
    results = {"fid": fid_from_statistics(real, feature_statistics(fake[layer], "generated images"))}
    if isc_splits is not None:
        results["is_mean"], results["is_std"] = isc_from_logits(fake[IS_LAYER], isc_splits)
    results["protocol"] = protocol(inception, layer, image_size, real["n"], len(fake[layer]), isc_splits)
    return results
