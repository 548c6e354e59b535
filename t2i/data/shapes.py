"""The built-in synthetic dataset: one coloured shape on a plain background, with a Chinese caption.

Everything the pipeline needs to run, learn and be judged without a download:

- `render(attrs, size, rng)` draws an image from its attributes (shape, colour, position, size,
  background), with a little random jitter so that no two images are alike;
- `caption(attrs, rng)` describes it in natural Chinese, from several templates and synonyms,
  so that a model has to read the words rather than memorise a few fixed strings;
- `generate(n, split, seed, size)` yields (attributes, caption, image), each sample drawn from
  its own random generator seeded by (seed, split, index): sample i never depends on n;
  `concept_indices` picks a split's samples without one concept (e.g. `color=purple`, for a base
  model that never saw it) or with only that concept (to teach it later, e.g. to a LoRA adapter);
- `read_attributes(image)` is the oracle that reads the attributes back from pixels, robust
  enough for blurry or noisy generated images; `oracle_accuracy` scores a set of images;
- `read_caption(text)` reads them back from a caption's words (generated captions are scored so).

Attribute values are English ids ("circle", "red", "top_left", "large", "white"); the tables
below give each id its drawing parameters and its Chinese words.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# ---------------------------------------------------------------------------------------------
# Attribute tables (shared by the renderer, the captions and the oracle)

SHAPE_WORDS = {
    "circle": ("圆形", "圆", "圆圈"),
    "square": ("正方形", "方形", "方块"),
    "triangle": ("三角形", "三角"),
}

# Saturated colours, at least ~100 apart in RGB from each other and ~120 from every background.
COLOR_RGB = {
    "red": (220, 20, 30),
    "orange": (255, 128, 0),
    "yellow": (240, 230, 20),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "purple": (150, 40, 210),
}
COLOR_WORDS = {
    "red": ("红色", "红"),
    "orange": ("橙色", "橙", "橘色"),
    "yellow": ("黄色", "黄"),
    "green": ("绿色", "绿"),
    "blue": ("蓝色", "蓝"),
    "purple": ("紫色", "紫"),
}

# Where the shape's bounding-box centre goes, as (x, y) fractions of the image side.
POSITION_CENTRES = {
    "top_left": (0.28, 0.28),
    "top_right": (0.72, 0.28),
    "bottom_left": (0.28, 0.72),
    "bottom_right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
POSITION_WORDS = {
    "top_left": ("左上角", "左上方", "左上"),
    "top_right": ("右上角", "右上方", "右上"),
    "bottom_left": ("左下角", "左下方", "左下"),
    "bottom_right": ("右下角", "右下方", "右下"),
    "center": ("中间", "中央", "正中间", "正中央"),
}

# Half the side of the shape's bounding box, as a fraction of the image side.
SIZE_RADIUS = {"large": 0.2, "small": 0.11}
SIZE_WORDS = {
    "large": ("大", "较大", "大号"),
    "small": ("小", "较小", "小号"),
}

# Achromatic backgrounds, so a background never looks like a shape colour.
BACKGROUND_RGB = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
BACKGROUND_WORDS = {
    "white": ("白色", "白"),
    "black": ("黑色", "黑"),
    "gray": ("灰色", "灰"),
}

ATTRIBUTES = {
    "shape": tuple(SHAPE_WORDS),
    "color": tuple(COLOR_RGB),
    "position": tuple(POSITION_CENTRES),
    "size": tuple(SIZE_RADIUS),
    "background": tuple(BACKGROUND_RGB),
}
WORDS = {
    "shape": SHAPE_WORDS,
    "color": COLOR_WORDS,
    "position": POSITION_WORDS,
    "size": SIZE_WORDS,
    "background": BACKGROUND_WORDS,
}

# Slots: {position} {color} {size} {shape} {background}; no template text may contain a word
# of the tables above, so each caption names exactly one value of each attribute.
TEMPLATES = (
    "画面{position}有一个{color}的{size}{shape}，背景是{background}的",
    "{background}背景上，{position}画着一个{size}的{color}{shape}",
    "一个{size}的{color}{shape}位于画面{position}，底色是{background}的",
    "{background}底，{position}有个{color}的{size}{shape}",
    "在{background}的背景上，{position}有一个{size}的{color}{shape}",
    "这张图的背景是{background}的，{position}是一个{color}的{size}{shape}",
    "{color}的{size}{shape}出现在图片{position}，背景是{background}的",
    "{position}：{size}的{color}{shape}；背景：{background}",
)

SPLIT_NUMBERS = {"train": 0, "val": 1, "test": 2}
MIN_IMAGE_SIZE = 16
CENTRE_JITTER = 0.03  # +- fraction of the side: corner shapes stay well inside their quadrant
SCALE_JITTER = 0.08  # +- relative: large and small stay far apart in area


# ---------------------------------------------------------------------------------------------
# Sampling, drawing and describing


def object_bounds(attrs: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) as fractions of the image side: where an object of this position and size can lie, its
    jitter included (render's), clipped to the image."""
    cx, cy = POSITION_CENTRES[attrs["position"]]
    half = SIZE_RADIUS[attrs["size"]] * (1 + SCALE_JITTER) + CENTRE_JITTER
    return max(0.0, cx - half), max(0.0, cy - half), min(1.0, cx + half), min(1.0, cy + half)


def random_attributes(rng: np.random.Generator) -> dict:
    """Each attribute uniformly and independently."""
    return {name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items()}


def render(attrs: dict, size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the shape crisply on its background: a size x size x 3 uint8 array.

    The shape's bounding box is a square of half-side SIZE_RADIUS centred on its position's
    anchor; the circle is inscribed in it, the square fills it, the triangle points up with its
    base on the box's bottom edge. `rng` adds jitter to centre and scale (none when omitted).
    """
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be >= {MIN_IMAGE_SIZE}, got {size}")
    cx, cy = POSITION_CENTRES[attrs["position"]]
    r = SIZE_RADIUS[attrs["size"]]
    if rng is not None:
        cx += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
        cy += rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
        r *= 1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)

    centres = (np.arange(size) + 0.5) / size  # pixel centres in [0, 1]
    x, y = centres[None, :], centres[:, None]
    if attrs["shape"] == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif attrs["shape"] == "square":
        inside = (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    elif attrs["shape"] == "triangle":
        depth = y - (cy - r)  # distance below the apex; half-width grows by 1/2 per unit
        inside = (depth >= 0) & (y <= cy + r) & (np.abs(x - cx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {attrs['shape']!r}")

    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND_RGB[attrs["background"]]
    image[inside] = COLOR_RGB[attrs["color"]]
    return image


def caption(attrs: dict, rng: np.random.Generator) -> str:
    """A Chinese description from a random template with a random synonym for every value."""
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    words = {}
    for name in ("position", "color", "size", "shape", "background"):
        synonyms = WORDS[name][attrs[name]]
        words[name] = synonyms[rng.integers(len(synonyms))]
    return template.format(**words)


def read_caption(text: str) -> dict:
    """The attributes a caption names (English ids; None for an attribute it does not name).

    The text is read left to right, taking at each place the longest word of the tables above (so
    正方形 is one word, not 方形 after 正, and 右上方 a position, not 右上 and 方...); each attribute
    takes the first word of its own that the caption names: text a generated caption runs on with
    after its end does not override it.
    """
    words = {word: (name, value) for name, table in WORDS.items() for value, synonyms in table.items()
             for word in synonyms}
    longest = max(map(len, words))
    attrs = dict.fromkeys(ATTRIBUTES)
    at = 0
    while at < len(text):
        match = next((text[at:at + n] for n in range(min(longest, len(text) - at), 0, -1) if text[at:at + n] in words),
                     None)
        if match is None:
            at += 1
            continue
        name, value = words[match]
        if attrs[name] is None:
            attrs[name] = value
        at += len(match)
    return attrs


def sample_generator(index: int, split: str, seed: int) -> np.random.Generator:
    """Sample `index`'s own random generator: its attributes, caption and jitter are drawn from it, in that order."""
    if split not in SPLIT_NUMBERS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLIT_NUMBERS)}")
    return np.random.default_rng([seed, SPLIT_NUMBERS[split], index])


def sample(index: int, split: str = "train", seed: int = 0, size: int = 64) -> tuple[dict, str, np.ndarray]:
    """Sample `index` of a split: (attributes, caption, image), fixed by (seed, split, index)."""
    rng = sample_generator(index, split, seed)
    attrs = random_attributes(rng)
    text = caption(attrs, rng)
    return attrs, text, render(attrs, size, rng)


def generate(n: int, split: str = "train", seed: int = 0, size: int = 64) -> Iterator[tuple[dict, str, np.ndarray]]:
    """The first `n` samples of a split, lazily."""
    for index in range(n):
        yield sample(index, split, seed, size)


def parse_concept(text: str) -> tuple[str, str]:
    """'color=purple' -> ('color', 'purple'): one value of one attribute (a concept to hold out, or to keep)."""
    name, _, value = text.partition("=")
    if name not in ATTRIBUTES or value not in ATTRIBUTES[name]:
        choices = "; ".join(f"{a}: {', '.join(values)}" for a, values in ATTRIBUTES.items())
        raise ValueError(f"a concept is ATTRIBUTE=VALUE, e.g. color=purple, got {text!r} (attributes and values: "
                         f"{choices})")
    return name, value


def concept_indices(n: int, split: str = "train", seed: int = 0, without: tuple[str, str] | None = None,
                    only: tuple[str, str] | None = None) -> Iterator[int]:
    """The indices of a split's first `n` samples that lack the concept `without` (or have the concept `only`).

    A held-out split is the full split with some samples left out, never other samples: sample i is the same
    image and caption in either, so the base training set (without a concept) and the concept's own set (only
    it) never share an image, and the oracle scores both as it scores the full split.
    """
    if without and only:
        raise ValueError("hold a concept out (without) or keep only one (only), not both")
    concept = without or only
    found, index = 0, 0
    while found < n:
        if concept is None:
            keep = True
        else:  # the attributes are the first draws of a sample's generator: no need to draw the image
            attrs = random_attributes(sample_generator(index, split, seed))
            keep = (attrs[concept[0]] == concept[1]) == (only is not None)
        if keep:
            found += 1
            yield index
        index += 1


# ---------------------------------------------------------------------------------------------
# The oracle: attributes read back from pixels
#
# The shape is measured on its coverage (how much of each pixel it covers, from where the
# pixel's colour lies between background and shape colour) through moments that a blur does not
# change: area, centroid and the third and fourth cumulants (a Gaussian blur adds only to the
# variance). A binary mask alone cannot tell a blurred 7-pixel square from a crisp 7-pixel
# circle; these moments can. Thresholds sit between the classes, measured with blur and noise.

MIN_CONTRAST = 40.0  # RGB distance from the background below which a pixel is background
MIN_SHAPE_PIXELS = 3  # less foreground than this: no shape at all
# Scores are 1 for the ideal shape and 0 for the others; at 32 px with blur and noise small
# triangles fall to ~0.3 (others stay below ~0.22) and squares and circles meet near 0.7.
TRIANGLE_SCORE = 0.25
SQUARE_SCORE = 0.7
LARGE_SIDE = 0.3  # bounding-box side / image side: large 0.37-0.43, small 0.20-0.24
SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area


def _nearest(table: dict, value: np.ndarray) -> str:
    names = list(table)
    distances = [np.linalg.norm(value - np.asarray(table[name], dtype=np.float64)) for name in names]
    return names[int(np.argmin(distances))]


def _nearest_mixture(rgb: np.ndarray, background_rgb: np.ndarray) -> str:
    """The palette colour whose blend with the background comes closest to `rgb`.

    A blurred shape's pixels are blends of shape and background colour (a yellow triangle on
    black blurs towards orange), so each colour is judged by the segment from the background to
    it, not by its end point alone.
    """
    best_name, best_distance = None, np.inf
    for name, color in COLOR_RGB.items():
        direction = np.asarray(color, dtype=np.float64) - background_rgb
        share = np.clip((rgb - background_rgb) @ direction / (direction @ direction), 0.0, 1.0)
        distance = np.linalg.norm(rgb - (background_rgb + share * direction))
        if distance < best_distance:
            best_name, best_distance = name, distance
    return best_name


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours (one step of binary dilation)."""
    h, w = mask.shape
    padded = np.pad(mask, 1)
    grown = mask.copy()
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy:dy + h, dx:dx + w]
    return grown


def _connected_labels(mask: np.ndarray) -> np.ndarray:
    """Label 8-connected regions of a boolean mask (0 = outside): repeated max-propagation."""
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        padded = np.pad(labels, 1)
        spread = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.maximum(spread, padded[dy:dy + h, dx:dx + w], out=spread)
        spread[~mask] = 0
        if np.array_equal(spread, labels):
            return labels
        labels = spread


def _shape_mask(distance: np.ndarray) -> np.ndarray:
    """Pixels far from the background, without specks apart from the main shape.

    The cut is half the shape's contrast (where a blurred edge crosses), never below
    MIN_CONTRAST so that noise alone makes no shape. Regions under a quarter of the largest
    one's size are dropped.
    """
    contrast = np.percentile(distance, 99.5)
    mask = distance > max(MIN_CONTRAST, contrast / 2)
    if not mask.any():
        return mask
    labels = _connected_labels(mask)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    keep = counts >= max(MIN_SHAPE_PIXELS, counts.max() / 4)
    return keep[labels]


def _cumulants(weights: np.ndarray, coordinate: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, variance, third and fourth cumulant of `coordinate` weighted by `weights`."""
    total = weights.sum()
    mean = (weights * coordinate).sum() / total
    centred = coordinate - mean
    m2, m3, m4 = ((weights * centred**k).sum() / total for k in (2, 3, 4))
    return mean, m2, m3, m4 - 3 * m2**2


def read_attributes(image) -> dict:
    """Read shape, color, position, size and background (English ids) from an HxWx3 image.

    Values that cannot be read (no shape visible) are None.
    """
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    h, w = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background_rgb = np.median(border, axis=0)  # the median ignores a shape touching the border
    attrs = {"shape": None, "color": None, "position": None, "size": None,
             "background": _nearest(BACKGROUND_RGB, background_rgb)}

    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    mask = _shape_mask(distance)
    if mask.sum() < MIN_SHAPE_PIXELS:
        return attrs

    # Colour: median of the shape's core (its pixels farthest from the background), where blur
    # mixes in the least background.
    core = mask & (distance >= np.median(distance[mask]))
    shape_rgb = np.median(pixels[core], axis=0)
    attrs["color"] = _nearest_mixture(shape_rgb, background_rgb)

    # Coverage, counted only on and next to the mask so that background noise adds little.
    axis = shape_rgb - background_rgb
    coverage = ((pixels - background_rgb) @ axis) / (axis @ axis)
    coverage = np.where(_grow(mask), np.clip(coverage, 0.0, 1.0), 0.0)
    area = coverage.sum()  # in pixels
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float64)
    x_mean, _, _, x_fourth = _cumulants(coverage, cols)
    y_mean, _, y_third, y_fourth = _cumulants(coverage, rows)
    _, _, _, diagonal_fourth = _cumulants(coverage, (cols + rows) / np.sqrt(2))
    _, _, _, antidiagonal_fourth = _cumulants(coverage, (cols - rows) / np.sqrt(2))

    # An upward triangle of height h (= base) has area h²/2, vertical variance h²/18 = area/9
    # and third cumulant -(2√2/5)(area/9)^1.5; symmetric shapes have none.
    triangle_score = -y_third / (area / 9) ** 1.5 / (2 * np.sqrt(2) / 5)
    # A square's mass reaches further along its diagonals than along its sides: the fourth
    # cumulant differs by area²/240 between the two directions; a circle's is the same in all.
    square_score = ((diagonal_fourth + antidiagonal_fourth) - (x_fourth + y_fourth)) / 2 * 240 / area**2
    if triangle_score > TRIANGLE_SCORE:
        shape = "triangle"
    elif square_score > SQUARE_SCORE:
        shape = "square"
    else:
        shape = "circle"
    attrs["shape"] = shape

    # Size: the side of the bounding box this area fills as this shape.
    side = np.sqrt(area / SHAPE_FILL[shape])  # in pixels
    attrs["size"] = "large" if side / np.sqrt(h * w) > LARGE_SIDE else "small"

    # Position: the anchor nearest to the bounding-box centre; that is the centroid, except
    # for a triangle, whose centroid lies a sixth of its height below its box centre.
    x = (x_mean + 0.5) / w
    y = (y_mean + 0.5 - (side / 6 if shape == "triangle" else 0.0)) / h
    attrs["position"] = _nearest(POSITION_CENTRES, np.array([x, y]))
    return attrs


def oracle_accuracy(images, attrs_list) -> dict:
    """Fraction of images whose read attributes match the true ones, per attribute, plus `all`
    (colour, shape and position all right: what a caption mostly asks for)."""
    return attribute_accuracy((read_attributes(image) for image in images), attrs_list)


def attribute_accuracy(reads, attrs_list) -> dict:
    """Fraction of readings (from images or captions) that match the true attributes, per attribute,
    plus `all` (colour, shape and position all right)."""
    names = ("color", "shape", "position", "size", "background")
    hits = {name: 0 for name in (*names, "all")}
    count = 0
    for read, truth in zip(reads, attrs_list):
        for name in names:
            hits[name] += read[name] == truth[name]
        hits["all"] += all(read[name] == truth[name] for name in ("color", "shape", "position"))
        count += 1
    if count == 0:
        raise ValueError("attribute accuracy needs at least one image")
    return {name: value / count for name, value in hits.items()}
