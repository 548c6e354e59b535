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
from collections.abc import Iterable, Sequence
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.hub
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)
from torch_fidelity.metric_fid import (
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import (
    KEY_METRIC_ISC_MEAN,
    KEY_METRIC_ISC_STD,
    isc_features_to_metric,
)
from tqdm import tqdm

from t2i.precision import exact_fp32

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
        # fp32 as the reference statistics were computed: no autocast, no TF32 (t2i.precision)
        with exact_fp32(torch.device(self.device).type):
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


def check_image_counts(real: int, generated: int, layer: str, isc_splits: int | None, fix: str | None = None) -> None:
    """Before any sampling: are there enough images for FID (and IS)? An error (or a warning) that
    says which setting to change (`fix`: what the caller's user can do), rather than a failure after
    hours of sampling."""
    fix = fix or "evaluate more prompts (eval.num_prompts, or a larger split=), or skip FID/IS with eval.fid=false"
    if real < 2 or generated < 2:
        raise ValueError(f"FID needs at least 2 real and 2 generated images (it estimates covariances); this "
                         f"evaluation has {real} real and {generated} generated: {fix}")
    if isc_splits is not None and generated < isc_splits:
        raise ValueError(f"the Inception Score with eval.isc_splits={isc_splits} needs at least {isc_splits} "
                         f"generated images, this evaluation has {generated}: lower eval.isc_splits or {fix}")
    dim = int(layer)
    if min(real, generated) < dim:
        warnings.warn(f"FID from {real} real and {generated} generated images with eval.fid_layer={layer} "
                      f"({dim}-dimensional features): the covariances are singular and the FID biased and noisy; "
                      f"use at least {dim} images (published FIDs use 10k-50k) or a smaller eval.fid_layer "
                      f"({', '.join(FID_LAYERS)})", stacklevel=2)


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


def _labels(labels: Sequence | None, first: int, n: int) -> list:
    """The labels of n new images; by default their arrival numbers, counted from `first`."""
    labels = list(range(first, first + n)) if labels is None else list(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} images")
    return labels


def _sizes(sizes: set[tuple[int, int]]) -> list:
    """[H, W] when every image had one size, else the list of sizes seen."""
    listed = sorted([h, w] for h, w in sizes)
    return listed[0] if len(listed) == 1 else listed


def _in_label_order(parts: list[torch.Tensor], labels: list) -> torch.Tensor:
    """The rows of the concatenated parts sorted by their labels (one per row)."""
    rows = torch.cat(parts)
    order = sorted(range(len(labels)), key=labels.__getitem__)
    return rows[order]


class FidelityAccumulator:
    """FID (and IS unless `isc_splits` is None) of images that arrive batch by batch, as a
    generation loop produces them, against real images whose statistics are cached on disk.

    `real_key` must name everything the real images depend on (the caller passes a hash of the shard
    manifest, the split, the image size and which images); the layer and the weights are added
    here. When `cache_dir` already holds statistics for the key, `needs_real` is False and
    add_real() does nothing, so the caller can skip loading real images.

    With `generated_per_real` (the samples per prompt, when every real image is a prompt's image),
    compute() refuses a generated set of any other size than that many per real image: FID would
    then compare two different sets of images. `protocol` adds entries to the reported protocol
    (e.g. how the real images were chosen).

    Every image may carry a label (any sortable value, e.g. its sample key); compute() reads the
    features in label order, so the numbers (IS splits depend on the order) do not depend on the
    order the images arrived in, nor on how many processes produced them: each process's
    accumulator sends state() to the main process's, which merge()s them.
    """

    def __init__(self, inception: InceptionFeatures, cache_dir: str | Path, real_key: str, layer: str = "2048",
                 isc_splits: int | None = 10, generated_per_real: int | None = None, protocol: dict | None = None):
        _check_layers([layer], FID_LAYERS)
        if generated_per_real is not None and generated_per_real < 1:
            raise ValueError(f"generated_per_real must be >= 1, got {generated_per_real}")
        needed = [layer] + ([IS_LAYER] if isc_splits is not None else [])
        if any(name not in inception.layers for name in needed):
            raise ValueError(f"FID/IS need the layers {needed}; the extractor computes {list(inception.layers)}")
        self.inception, self.layer, self.isc_splits = inception, layer, isc_splits
        self.generated_per_real, self.extra_protocol = generated_per_real, dict(protocol or {})
        self.cache_key = f"{real_key}|layer={layer}|weights={inception.weights}"
        self.cache_path = Path(cache_dir) / f"{hashlib.sha256(self.cache_key.encode()).hexdigest()}.npz"
        self.real = self._read_cache()  # the statistics, once known
        self._real_features: list[torch.Tensor] = []
        self._real_labels: list = []
        self._real_sizes: set[tuple[int, int]] = set()
        self._fake_features: dict[str, list[torch.Tensor]] = {name: [] for name in needed}
        self._fake_labels: list = []
        self._fake_sizes: set[tuple[int, int]] = set()

    @property
    def needs_real(self) -> bool:
        return self.real is None

    def add_real(self, images: torch.Tensor, labels: Sequence | None = None) -> None:
        """uint8 [N, 3, H, W] real images (ignored when the statistics came from the cache), with
        one label each (default: their arrival order)."""
        if self.real is None:
            self._real_labels += _labels(labels, len(self._real_labels), len(images))
            self._real_features.append(self.inception(images)[self.layer])
            self._real_sizes.add(tuple(images.shape[-2:]))

    def add_generated(self, images: torch.Tensor, labels: Sequence | None = None) -> None:
        """uint8 [N, 3, H, W] generated images, with one label each (default: their arrival order)."""
        self._fake_labels += _labels(labels, len(self._fake_labels), len(images))
        for name, feature in self.inception(images).items():
            if name in self._fake_features:
                self._fake_features[name].append(feature)
        self._fake_sizes.add(tuple(images.shape[-2:]))

    def state(self) -> dict:
        """What add_real/add_generated collected (CPU tensors, labels, sizes), for merge() in another process."""
        return {"needs_real": self.needs_real, "real_features": self._real_features, "real_labels": self._real_labels,
                "real_sizes": self._real_sizes, "fake_features": self._fake_features, "fake_labels": self._fake_labels,
                "fake_sizes": self._fake_sizes}

    def merge(self, state: dict) -> None:
        """Add what another process's accumulator collected (its state())."""
        if state["needs_real"] != self.needs_real:  # one process would have skipped its real images
            raise RuntimeError(f"processes disagree on whether {self.cache_path} holds the real statistics: "
                               "put eval.stats_cache on a filesystem every node shares")
        self._real_features += state["real_features"]
        self._real_labels += state["real_labels"]
        self._real_sizes |= state["real_sizes"]
        for name, parts in self._fake_features.items():
            parts += state["fake_features"][name]
        self._fake_labels += state["fake_labels"]
        self._fake_sizes |= state["fake_sizes"]

    def real_statistics(self) -> dict:
        """FID statistics of the real images ({"mu", "sigma", "n", "sizes", "cached", "path"}), cached on first use."""
        if self.real is None and not self._real_features:
            self.real = self._read_cache()  # another accumulator over the same real images may have written it
        if self.real is None:
            if not self._real_features:
                raise ValueError(f"no real images were added and {self.cache_path} holds no statistics for this key")
            stats = feature_statistics(_in_label_order(self._real_features, self._real_labels), "real images")
            stats["sizes"] = _sizes(self._real_sizes)
            self._write_cache(stats)
            self.real = {**stats, "cached": False, "path": str(self.cache_path)}
        return self.real

    def compute(self) -> dict:
        """{"fid", "is_mean", "is_std", "protocol"}: the protocol is what the numbers depend on."""
        real = self.real_statistics()
        if not self._fake_features[self.layer]:
            raise ValueError("no generated images were added")
        fake = {name: _in_label_order(parts, self._fake_labels) for name, parts in self._fake_features.items()}
        generated = len(fake[self.layer])
        if self.generated_per_real is not None and generated != real["n"] * self.generated_per_real:
            where = (f"read from the cache {real['path']} (delete it if the shards changed)" if real.get("cached")
                     else "added")
            raise ValueError(f"FID of mismatched sets: {generated} generated images against {real['n']} real images "
                             f"{where}; expected {self.generated_per_real} generated per real image (the prompts "
                             "must be the real images' captions)")
        results = {"fid": fid_from_statistics(real, feature_statistics(fake[self.layer], "generated images"))}
        if self.isc_splits is not None:
            results["is_mean"], results["is_std"] = isc_from_logits(fake[IS_LAYER], self.isc_splits)
        results["protocol"] = {
            "feature_extractor": f"torch-fidelity {torch_fidelity.__version__} {EXTRACTOR}",
            "feature_layer": self.layer, "weights": self.inception.weights, "resize": RESIZE,
            "real_images": real["n"], "real_input_size": real["sizes"],
            "generated_images": generated, "generated_input_size": _sizes(self._fake_sizes),
            "isc_layer": IS_LAYER if self.isc_splits is not None else None, "isc_splits": self.isc_splits,
            "real_statistics": real["path"], **self.extra_protocol}
        return results

    def _read_cache(self) -> dict | None:
        if not self.cache_path.is_file():
            return None
        with np.load(self.cache_path, allow_pickle=False) as cached:
            if str(cached["key"]) != self.cache_key:  # only a hand-copied file could get here
                return None
            return {"mu": cached["mu"], "sigma": cached["sigma"], "n": int(cached["n"]),
                    "sizes": cached["sizes"].tolist(), "cached": True, "path": str(self.cache_path)}

    def _write_cache(self, stats: dict) -> None:
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temporary file in the same directory and rename it: a crash or a concurrent
        # evaluation never leaves a half-written file that a later run would trust.
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=f".{self.cache_path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, mu=stats["mu"], sigma=stats["sigma"], n=stats["n"], sizes=np.array(stats["sizes"]),
                         key=self.cache_key)
            os.replace(tmp, self.cache_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_random_inception(path: str | Path, seed: int = 0) -> str:
    """Write a randomly initialised InceptionV3 the way torch-fidelity loads weights (a plain state dict).

    For checks that need the pipeline, not the figures: the tests, and the GPU check's GPU-vs-CPU
    agreement on a machine with no copy of the real weights (which download from GitHub).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    empty = path.with_name(path.name + ".empty")
    torch.save({}, empty)
    torch.manual_seed(seed)
    # The constructor always loads a state dict (strictly); skip that to get the bare network.
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict, strict=True: None):
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["64"], feature_extractor_weights_path=str(empty))
    empty.unlink()
    for module in model.modules():
        # PyTorch's default conv init shrinks activations layer by layer; He init keeps the features
        # (and the logits at the far end) at a scale where differences between images show.
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(model.state_dict(), path)
    return str(path)
