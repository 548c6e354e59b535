"""The synthetic shapes dataset: determinism, captions, balance, shards and the oracle."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFilter

from t2i.data import shapes
from t2i.data.convert import run

ATTRIBUTE_NAMES = tuple(shapes.ATTRIBUTES)
SPLIT_SIZES = {"train": 300, "val": 20, "test": 20}


def same_samples(a, b) -> bool:
    return all(attrs_a == attrs_b and text_a == text_b and np.array_equal(image_a, image_b)
               for (attrs_a, text_a, image_a), (attrs_b, text_b, image_b) in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_gives_the_same_samples():
    assert same_samples(shapes.generate(40, "train", 0, 32), shapes.generate(40, "train", 0, 32))


@pytest.mark.parametrize("other", [dict(split="train", seed=1), dict(split="val", seed=0), dict(split="test", seed=0)])
def test_other_seed_or_split_gives_other_samples(other):
    base = list(shapes.generate(40, "train", 0, 32))
    changed = list(shapes.generate(40, other["split"], other["seed"], 32))
    differing_images = sum(not np.array_equal(a[2], b[2]) for a, b in zip(base, changed))
    differing_captions = sum(a[1] != b[1] for a, b in zip(base, changed))
    assert differing_images >= 35 and differing_captions >= 35


def test_sample_does_not_depend_on_how_many_are_drawn():
    long = list(shapes.generate(50, "val", 7, 32))
    assert same_samples(shapes.generate(10, "val", 7, 32), long[:10])
    assert same_samples([shapes.sample(42, "val", 7, 32)], [long[42]])


@pytest.mark.parametrize("size", [16, 32, 64, 96])
def test_images_have_the_requested_size_and_keep_the_shape_inside(size):
    for attrs, _, image in shapes.generate(200, "train", 3, size):
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        background = np.array(shapes.BACKGROUND_RGB[attrs["background"]], dtype=np.uint8)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == background).all(), attrs  # the shape never touches the edge
        assert (image != background).any(axis=-1).sum() >= 3  # and is always visible


def test_object_bounds_hold_every_drawn_object_and_are_tight():
    size, reach = 64, {}
    for attrs, _, image in shapes.generate(600, "train", 5, size):
        background = np.array(shapes.BACKGROUND_RGB[attrs["background"]], dtype=np.uint8)
        rows, cols = np.nonzero((image != background).any(axis=-1))
        x0, y0, x1, y1 = (size * edge for edge in shapes.object_bounds(attrs))
        # a pixel is drawn when its centre lies inside the object
        assert cols.min() + 0.5 >= x0 and cols.max() + 0.5 <= x1 and rows.min() + 0.5 >= y0 and rows.max() + 0.5 <= y1
        kind = (attrs["position"], attrs["size"])
        reach[kind] = min(reach.get(kind, size), cols.min() + 0.5 - x0)
    assert len(reach) == 10 and max(reach.values()) < 2  # some object of each kind comes within 2 pixels of its bounds


def test_render_refuses_tiny_images():
    with pytest.raises(ValueError):
        shapes.render({"shape": "circle", "color": "red", "position": "center", "size": "large",
                       "background": "white"}, size=8)


# ---------------------------------------------------------------------------------------------
# Captions and balance


@pytest.fixture(scope="module")
def many_samples():
    return list(shapes.generate(600, "train", 0, 32))


def test_every_caption_names_exactly_its_own_attribute_values(many_samples):
    for attrs, caption, _ in many_samples:
        for name, words in shapes.WORDS.items():
            named = {value for value, synonyms in words.items() if any(word in caption for word in synonyms)}
            assert named == {attrs[name]}, (caption, name, named)


def test_captions_use_many_templates_and_synonyms(many_samples):
    vocabulary = sorted({word for words in shapes.WORDS.values() for synonyms in words.values() for word in synonyms},
                        key=len, reverse=True)

    def skeleton(caption):
        for word in vocabulary:  # longest first: "正方形" before "方形"
            caption = caption.replace(word, "□")
        return caption

    assert len({skeleton(caption) for _, caption, _ in many_samples}) >= 6
    for name, words in shapes.WORDS.items():
        for value, synonyms in words.items():
            used = {word for attrs, caption, _ in many_samples if attrs[name] == value
                    for word in synonyms if word in caption}
            assert len(used) >= 2, (name, value, used)


def test_all_attribute_values_occur_about_equally(many_samples):
    for name, values in shapes.ATTRIBUTES.items():
        counts = collections.Counter(attrs[name] for attrs, _, _ in many_samples)
        expected = len(many_samples) / len(values)
        assert set(counts) == set(values)
        assert min(counts.values()) > 0.7 * expected and max(counts.values()) < 1.3 * expected, (name, counts)


# ---------------------------------------------------------------------------------------------
# Shards written by the converter, and the oracle on them


@pytest.fixture(scope="module", params=[64, 32])
def from_shards(request, tmp_path_factory):
    """(image, json, caption) of every sample in shards written by `convert shapes`."""
    size = request.param
    out = tmp_path_factory.mktemp(f"shapes{size}")
    run(["shapes", "--out", str(out), "--size", str(size), "--quiet",
         *(arg for split, n in SPLIT_SIZES.items() for arg in (f"--{split}", str(n)))])
    samples = []
    for split in SPLIT_SIZES:
        urls = sorted(str(p) for p in Path(out).glob(f"{split}-*.tar"))
        dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("png", "json", "txt")
        samples += list(dataset)
    return size, samples


def test_shards_hold_the_generated_samples_losslessly(from_shards):
    size, samples = from_shards
    assert len(samples) == sum(SPLIT_SIZES.values())
    for image, meta, caption in samples:
        split, index = meta["source_id"].split("-")[1:]
        attrs, expected_caption, expected_image = shapes.sample(int(index), split, 0, size)
        assert meta["attributes"] == attrs and meta["split"] == split
        assert caption == meta["caption"] == expected_caption
        assert np.array_equal(image, expected_image)


def test_oracle_reads_the_shards_right(from_shards):
    _, samples = from_shards
    accuracy = shapes.oracle_accuracy([image for image, _, _ in samples], [meta["attributes"] for _, meta, _ in samples])
    assert set(accuracy) == {*ATTRIBUTE_NAMES, "all"}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_a_held_out_concept_splits_the_samples_in_two(tmp_path):
    """--hold-out and --only partition a split's samples by one concept: the same samples, counted as kept."""
    purple = ("color", "purple")
    without = list(shapes.concept_indices(60, "train", 0, without=purple))
    only = list(shapes.concept_indices(12, "train", 0, only=purple))
    assert all(shapes.sample(i, "train", 0, 16)[0]["color"] != "purple" for i in without)
    assert all(shapes.sample(i, "train", 0, 16)[0]["color"] == "purple" for i in only)
    first = sorted(set(without) | set(only))
    assert not set(without) & set(only) and first[:len(first) // 2] == list(range(len(first) // 2))
    run(["shapes", "--out", str(tmp_path), "--size", "16", "--quiet", "--train", "12", "--val", "0", "--test", "5",
         "--only", "color=purple"])
    rows = list(wds.WebDataset(sorted(str(p) for p in tmp_path.glob("train-*.tar")), shardshuffle=False).decode()
                .to_tuple("json"))
    assert [int(meta["source_id"].split("-")[-1]) for meta, in rows] == only
    assert all(meta["attributes"]["color"] == "purple" and "紫" in meta["caption"] for meta, in rows)
    # --replay: the base's first training samples beside the concept's, in index order
    run(["shapes", "--out", str(tmp_path / "replay"), "--size", "16", "--quiet", "--train", "12", "--val", "0",
         "--test", "0", "--only", "color=purple", "--replay", "5"])
    rows = list(wds.WebDataset(str(tmp_path / "replay" / "train-00000.tar"), shardshuffle=False).decode()
                .to_tuple("json"))
    assert [int(meta["source_id"].split("-")[-1]) for meta, in rows] == sorted(only + without[:5])
    with pytest.raises(ValueError, match="--replay N .* without --only"):
        run(["shapes", "--out", str(tmp_path / "no"), "--replay", "5"])
    with pytest.raises(ValueError, match="a concept is ATTRIBUTE=VALUE.*color: red, orange"):
        shapes.parse_concept("colour=purple")
    with pytest.raises(SystemExit):  # argparse: the two are mutually exclusive
        run(["shapes", "--out", str(tmp_path / "no"), "--only", "color=red", "--hold-out", "shape=circle"])


def add_noise(image, rng):
    return np.clip(image + rng.normal(0.0, 10.0, image.shape), 0, 255).astype(np.uint8)


def blur(image):
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1)))


@pytest.mark.parametrize("degradation", ["noise", "blur", "blur+noise"])
def test_oracle_survives_mild_noise_and_blur(from_shards, degradation):
    _, samples = from_shards
    rng = np.random.default_rng(0)
    images = []
    for image, _, _ in samples:
        if "blur" in degradation:
            image = blur(image)
        if "noise" in degradation:
            image = add_noise(image, rng)
        images.append(image)
    accuracy = shapes.oracle_accuracy(images, [meta["attributes"] for _, meta, _ in samples])
    assert min(accuracy.values()) >= 0.95, accuracy


# ---------------------------------------------------------------------------------------------
# The oracle can be wrong: it reads the pixels, not the labels


@pytest.mark.parametrize("size", [64, 32])
@pytest.mark.parametrize("name", ATTRIBUTE_NAMES)
def test_oracle_follows_the_pixels_when_one_attribute_changes(size, name):
    """Images drawn with another value of one attribute are judged wrong on exactly that one."""
    truths, images = [], []
    for index in range(60):
        rng = np.random.default_rng([5, index])
        attrs = shapes.random_attributes(rng)
        values = [value for value in shapes.ATTRIBUTES[name] if value != attrs[name]]
        drawn = {**attrs, name: values[rng.integers(len(values))]}
        truths.append(attrs)
        images.append(shapes.render(drawn, size, rng))
    accuracy = shapes.oracle_accuracy(images, truths)
    assert accuracy[name] == 0.0, accuracy
    assert all(accuracy[other] >= 0.95 for other in ATTRIBUTE_NAMES if other != name), accuracy


def test_oracle_finds_no_shape_in_a_blank_or_noisy_image():
    rng = np.random.default_rng(0)
    truth = {"shape": "circle", "color": "red", "position": "center", "size": "large", "background": "gray"}
    for background, rgb in shapes.BACKGROUND_RGB.items():
        blank = np.empty((64, 64, 3), dtype=np.uint8)
        blank[:] = rgb
        for image in (blank, add_noise(blank, rng)):
            read = shapes.read_attributes(image)
            assert read == {"shape": None, "color": None, "position": None, "size": None, "background": background}
    accuracy = shapes.oracle_accuracy([np.full((32, 32, 3), 128, np.uint8)], [truth])
    assert accuracy == {"color": 0.0, "shape": 0.0, "position": 0.0, "size": 0.0, "background": 1.0, "all": 0.0}


def test_oracle_ignores_a_stray_speck():
    attrs = {"shape": "square", "color": "blue", "position": "top_left", "size": "small", "background": "white"}
    image = shapes.render(attrs, 64)
    image[50:52, 50:52] = shapes.COLOR_RGB["red"]  # a 2x2 speck far from the shape
    assert shapes.read_attributes(image) == attrs
