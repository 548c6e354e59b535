"""Reading what a visitor sends the Complete tab: the image (an upload or a picked example) and the region, drawn on
it with the brush or typed as a box.

The editor's value reaches the event raw (Gradio's preprocessing off, as for the other controls): a dict with
`background` (the image), `layers` (what was drawn: RGBA, the canvas's size) and `composite`, each a file description
{"path": ..., "meta": {"_type": "gradio.FileData"}}. Before the event runs, Gradio checks every file description
of a file component's value: the editor's data model refuses one without its meta, and a path that did not come
through its upload route (which refuses files over launch(max_file_size=...)) is refused ("it was not uploaded by a
user"); the file is then copied into Gradio's cache. Here a file is opened only when it lies in that cache (a
second check: the event never opens a path outside it), is at most limits.max_upload_bytes, and has at most
limits.max_upload_pixels by its header, checked before a pixel is decoded.
"""

from __future__ import annotations

import re
import reprlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from t2i.demo.settings import Limits
from t2i.sampling.complete import BOX_UNITS

UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # the decoders an upload may reach
MAX_LAYERS = 4  # the page's editor sends one layer (layers=False); an API client may send a few
MAX_BOX_CHARS = 200  # four numbers and their commas


def open_upload(file, cache: Path, limits: Limits, what: str) -> Image.Image:
    """A file description of the editor's value -> its image, decoded only after its bytes and its pixel count
    (from the header) are within the limits; a ValueError naming `what` otherwise."""
    if not isinstance(file, dict) or not isinstance(file.get("path"), str):
        raise ValueError(f"the {what} must be an uploaded image file, got {reprlib.repr(file)}")
    path = Path(file["path"]).resolve()
    if not path.is_relative_to(Path(cache).resolve()) or not path.is_file():
        raise ValueError(f"the {what} was not uploaded to this page: upload the file (or pick an example)")
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise ValueError(f"the {what} is {size} bytes; this page takes files of at most {limits.max_upload_bytes} bytes")
    try:
        image = Image.open(path, formats=UPLOAD_FORMATS)  # reads the header only
    except Image.DecompressionBombError:  # PIL's own bound, far above ours: the header said too many pixels
        raise ValueError(f"the {what} has more than {limits.max_upload_pixels} pixels, the most this page takes") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"the {what} is not an image this page reads ({', '.join(UPLOAD_FORMATS)})") from None
    width, height = image.size
    if width * height > limits.max_upload_pixels:
        image.close()
        raise ValueError(f"the {what} is {width}x{height} = {width * height} pixels; this page takes at most "
                         f"{limits.max_upload_pixels} pixels")
    try:
        image.load()
    except OSError as error:
        image.close()
        raise ValueError(f"the {what} could not be decoded: {error}") from None
    return image


def read_image(file, cache: Path, limits: Limits, size: int) -> np.ndarray:
    """The image to complete as uint8 [size, size, 3] (RGB), resized (antialiased) when it is of another size."""
    with open_upload(file, cache, limits, "image") as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)  # PIL's resize filters over the whole footprint
    return np.asarray(rgb)


def read_drawn_region(layers, cache: Path, limits: Limits, size: int) -> np.ndarray:
    """The pixels drawn on, over all layers, as bool [size, size]: a pixel of the model's image is drawn on when any
    pixel of a layer that falls in it is (painted: alpha > 0; a layer without alpha: grey >= 128, white)."""
    if layers is None:
        layers = []
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise ValueError(f"the drawn layers must be a list of at most {MAX_LAYERS} images, got {reprlib.repr(layers)}")
    drawn = np.zeros((size, size), dtype=bool)
    for layer in layers:
        with open_upload(layer, cache, limits, "drawn layer") as image:
            painted = np.asarray(image.getchannel("A")) > 0 if "A" in image.getbands() else \
                np.asarray(image.convert("L")) >= 128
        rows, cols = np.nonzero(painted)
        drawn[rows * size // painted.shape[0], cols * size // painted.shape[1]] = True
    return drawn


def read_box(text, units) -> list[float] | None:
    """A typed box "x0,y0,x1,y1" -> its four numbers (None when the box is empty); the units one of BOX_UNITS."""
    if text is not None and not isinstance(text, str):
        raise ValueError(f"the box must be text x0,y0,x1,y1, got {reprlib.repr(text)}")
    text = (text or "").strip()
    if not text:
        return None
    if units not in BOX_UNITS:
        raise ValueError(f"the box's units must be one of {', '.join(BOX_UNITS)}, got {reprlib.repr(units)}")
    parts = re.split(r"[,\s]+", text[:MAX_BOX_CHARS + 1])
    try:
        box = [float(part) for part in parts]
    except ValueError:
        box = []
    if len(text) > MAX_BOX_CHARS or len(box) != 4 or not all(np.isfinite(box)):
        raise ValueError(f"the box must be four numbers x0,y0,x1,y1 (x1, y1 exclusive), got {reprlib.repr(text)}")
    return box


def read_region(pipeline, drawn: np.ndarray, box: list[float] | None, units: str):
    """The region to sample, bool [h, w] on the model's code grid, from the drawing or the box (exactly one)."""
    if box is None and not drawn.any():
        raise ValueError("no region to complete: paint over it with the brush, or type a box x0,y0,x1,y1")
    if box is not None and drawn.any():
        raise ValueError("the region is both drawn and typed as a box: clear the drawing or the box")
    if box is not None:
        return pipeline.region(box=box, box_units=units)
    return pipeline.region(mask=drawn)


def read_completion(editor, box_text, box_units, cache: Path, limits: Limits, pipeline) -> tuple[np.ndarray, object]:
    """The editor's value and the typed box -> (the image uint8 [S, S, 3] at the model's size, the region bool [h, w]),
    or a ValueError saying what to fix."""
    if editor is None or (isinstance(editor, dict) and editor.get("background") is None):
        raise ValueError("no image to complete: upload one or pick an example")
    if not isinstance(editor, dict):
        raise ValueError(f"the image must be the editor's value (background, layers), got {reprlib.repr(editor)}")
    box = read_box(box_text, box_units)  # a bad box is refused before any file is read
    size = pipeline.image_size
    image = read_image(editor["background"], cache, limits, size)
    drawn = read_drawn_region(editor.get("layers"), cache, limits, size)
    return image, read_region(pipeline, drawn, box, box_units)
