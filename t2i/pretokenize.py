"""Pre-tokenization: image shards -> VQGAN code shards, so GPT training never runs the encoder.

    python -m t2i.pretokenize --data data/shapes --out data/shapes_codes --vqgan VQGAN.ckpt
    python -m t2i.pretokenize --data data/muge --out data/muge_codes \\
        --vqgan vqgan_imagenet_f16_16384.ckpt --vqgan-config f16_16384 --hflip

Every input shard (the splits of `--data`'s manifest.json) becomes one output shard of the same
name holding, per sample:

* `KEY.codes`: the VQGAN code grid, h * w code indices as little-endian uint16 in row-major
  order (row 0 left to right, then row 1 ...), nothing else: no header, no padding. h and w are
  the sample JSON's `codes_shape` and the manifest's `grid`; `n_embed` must be <= 65536.
  `t2i.data.stream.decode_codes` reads it back (numpy: `np.frombuffer(data, "<u2").reshape(h, w)`).
* `KEY.txt`: the caption, as in the image shard.
* `KEY.json`: the image shard's JSON plus `"codes_shape": [h, w]` and `"hflip": false`.

With `--superres-size S` (e.g. 64 for the shapes data stored at 64x64, encoded at 32x32) each sample
also gets `KEY.hrcodes`: the same image at S x S encoded by the same VQGAN (a fully convolutional
one gives a grid S / image_size times larger), in the same format, its shape in the JSON's
`hr_codes_shape` and the manifest's `hr_grid` / `hr_image_size`: the pairs a super-resolution GPT
learns from (`experiment=superres_shapes`).

With `--hflip` each sample is followed by a mirrored copy `KEY_flip` (JSON `"key"` = that key,
`"hflip": true`); keep it off for captions that say 左/右.

Images are decoded as the DataModule does (`decode_image`: centre square, resized to
`--image-size`, by default the VQGAN's resolution), scaled to [-1, 1] and encoded in batches of
`--batch-size` images (the last, partial batch of a shard at the shard's end). Shards are written
like the converters' (stats then tar, each under a temporary name renamed when complete), so an
interrupted run resumes per shard and gives the same bytes. The manifest (kind "codes") records
the source folder, the VQGAN config, a sha256 of its weights and its checkpoint, the grid, the
image size and the flip setting; the source's `tokenizer.model` is copied beside the shards, so
a data config pointing at the code folder finds it where it finds it for image shards.

It sits above t2i.data and t2i.models (it runs the VQGAN), so t2i.data imports no model.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from t2i.data.shards import (IMAGE_EXTENSIONS, MANIFEST, ShardStats, describe, read_manifest, shard_done, stats_path,
                             write_atomic, write_manifest, write_shard)
from t2i.data.stream import complete_samples, decode_image, to_unit_range
from t2i.checkpoints import load_vqgan, weights_hash
from t2i.models.vqgan import VQGANConfig, VQModel

VQGAN_CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf" / "vqgan"
TOKENIZER = "tokenizer.model"
MAX_CODES = 2**16  # uint16
FLIP_SUFFIX = "_flip"
# Config keys of conf/vqgan/*.yaml that are not model shape (where training starts from).
IGNORED_CONFIG_KEYS = ("init_ckpt",)


def load_vqgan_config(name_or_path: str | Path) -> VQGANConfig:
    """A VQGANConfig from conf/vqgan/<name>.yaml or from a YAML file's path."""
    path = Path(name_or_path)
    if not path.is_file():
        if path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
            raise FileNotFoundError(f"VQGAN config {path} not found")
        path = VQGAN_CONFIG_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in VQGAN_CONFIG_DIR.glob("*.yaml"))
            raise FileNotFoundError(f"no VQGAN config {name_or_path!r} in {VQGAN_CONFIG_DIR} "
                                    f"(known: {', '.join(known) or 'none'}); give a name or a YAML path")
    conf = OmegaConf.load(path)
    for key in IGNORED_CONFIG_KEYS:
        conf.pop(key, None)
    values = OmegaConf.to_container(conf, resolve=True)
    known = {f.name for f in fields(VQGANConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown VQGAN config key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    return VQGANConfig(**values)


@dataclass(frozen=True)
class Settings:
    """What decides a code shard's bytes besides its input: an earlier run's shards are reused only
    when these match."""

    vqgan_sha256: str
    image_size: int
    hflip: bool
    hr_image_size: int | None = None  # --superres-size: a second, larger grid per sample


@dataclass
class _Pending:
    key: str
    caption: bytes
    meta: dict
    image: torch.Tensor  # uint8 [S, S, 3]
    hr_image: torch.Tensor | None = None  # uint8 [S2, S2, 3] (--superres-size)


@dataclass
class _ShardWriter:
    """Collects one shard's samples, encodes them in batches, and keeps the encoded members."""

    model: VQModel
    device: torch.device
    batch_size: int
    grid: tuple[int, int]
    hr_grid: tuple[int, int] | None = None
    pending: list[_Pending] = field(default_factory=list)
    members: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, item: _Pending) -> None:
        self.pending.append(item)
        if len(self.pending) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        codes = encode_images(self.model, torch.stack([item.image for item in self.pending]), self.device)
        if codes.shape[1:] != self.grid:
            raise RuntimeError(f"the VQGAN gave a {codes.shape[1:]} code grid, expected {self.grid}")
        hr_codes = [None] * len(codes)
        if self.hr_grid is not None:
            hr_codes = encode_images(self.model, torch.stack([item.hr_image for item in self.pending]), self.device)
            if hr_codes.shape[1:] != self.hr_grid:
                raise RuntimeError(f"the VQGAN gave a {hr_codes.shape[1:]} code grid at --superres-size, expected "
                                   f"{self.hr_grid}")
        for item, grid, hr_grid in zip(self.pending, codes, hr_codes):
            meta = {**item.meta, "codes_shape": list(self.grid)}
            if hr_grid is not None:
                meta["hr_codes_shape"] = list(self.hr_grid)
                self.members.append((f"{item.key}.hrcodes", codes_to_bytes(hr_grid)))
            self.members += [(f"{item.key}.codes", codes_to_bytes(grid)), (f"{item.key}.txt", item.caption),
                             (f"{item.key}.json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())]
        self.pending = []


def encode_images(model: VQModel, images: torch.Tensor, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 images [B, S, S, 3] (channels last, as decode_image gives) -> uint16 codes [B, h, w]."""
    with torch.no_grad():
        x = to_unit_range(images.to(device).permute(0, 3, 1, 2))
        codes = model.encode(x)
    return codes.cpu().numpy().astype(np.uint16)


def codes_to_bytes(codes: np.ndarray) -> bytes:
    """A code grid [h, w] -> the `KEY.codes` bytes (little-endian uint16, row-major, no header)."""
    return np.ascontiguousarray(codes, dtype="<u2").tobytes()


def _sample_image(sample: dict) -> bytes:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError("sample has no image")
    return sample[ext]


def pretokenize_shard(url: str, tar_path: Path, writer: _ShardWriter, settings: Settings, bar: tqdm) -> ShardStats:
    """Encode every sample of the image shard at `url` into the code shard `tar_path`."""
    stats = ShardStats(tar_path.name)
    rng = random.Random(0)  # decode_image wants one; centre crops without flips never draw from it
    for sample in complete_samples(url):
        bar.update()
        stats.rows_read += 1
        key = sample["__key__"]
        try:
            image = decode_image(_sample_image(sample), settings.image_size, "center", 1.0, False, rng)
            hr_image = None if settings.hr_image_size is None else \
                decode_image(_sample_image(sample), settings.hr_image_size, "center", 1.0, False, rng)
        except Exception as e:  # a corrupt sample is skipped and counted, never fatal
            warnings.warn(f"skipped undecodable image {key} in {url}: {e!r}")
            stats.skipped["undecodable_image"] = stats.skipped.get("undecodable_image", 0) + 1
            continue
        caption = sample["txt"]
        meta = json.loads(sample["json"]) if "json" in sample else {"key": key, "caption": caption.decode("utf-8")}
        writer.add(_Pending(key, caption, {**meta, "hflip": False}, image, hr_image))
        stats.samples += 1
        if settings.hflip:
            flipped = f"{key}{FLIP_SUFFIX}"
            writer.add(_Pending(flipped, caption, {**meta, "key": flipped, "hflip": True}, image.flip(1),
                                None if hr_image is None else hr_image.flip(1)))
            stats.samples += 1
    writer.flush()  # the last, partial batch of the shard
    write_shard(tar_path, writer.members, {**asdict(stats), **asdict(settings)})
    writer.members = []
    return stats


def _finished_stats(tar_path: Path, settings: Settings) -> ShardStats:
    """The stats of a shard an earlier run completed; refuses shards made with other settings."""
    saved = json.loads(stats_path(tar_path).read_text())
    earlier = {key: saved.get(key) for key in asdict(settings)}
    if earlier != asdict(settings):
        changed = ", ".join(f"{k}: {earlier[k]!r} -> {v!r}" for k, v in asdict(settings).items() if earlier[k] != v)
        raise ValueError(f"{tar_path} was written by an earlier run with other settings ({changed}): "
                         "give a new --out folder or delete that one")
    return ShardStats(**{f.name: saved[f.name] for f in fields(ShardStats)})


def pretokenize(data: str | Path, out: str | Path, model: VQModel, *, splits: list[str] | None = None,
                batch_size: int = 32, image_size: int | None = None, hflip: bool = False,
                superres_size: int | None = None,
                device: str | torch.device = "cpu", checkpoint: str | Path | None = None,
                progress: bool = True, args: dict | None = None) -> dict:
    """Encode the image shards of `data` (a folder with manifest.json) into code shards in `out`.

    Returns the written manifest. Shards completed by an earlier run with the same VQGAN weights,
    image size, flip setting and superres_size are kept. `superres_size`: also encode each image at that
    side (a multiple of image_size) into `KEY.hrcodes`.
    """
    data, out = Path(data), Path(out)
    cfg = model.cfg
    if cfg.n_embed > MAX_CODES:
        raise ValueError(f"n_embed={cfg.n_embed} codes do not fit the uint16 code format (at most {MAX_CODES})")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    image_size = image_size or cfg.resolution
    if image_size < cfg.downsample or image_size % cfg.downsample:
        raise ValueError(f"--image-size {image_size} is not a multiple of the VQGAN's downsampling factor "
                         f"{cfg.downsample}")
    if superres_size is not None and (superres_size <= image_size or superres_size % image_size
                                      or superres_size % cfg.downsample):
        raise ValueError(f"--superres-size {superres_size} must be a multiple of the image size {image_size} larger "
                         f"than it (e.g. {2 * image_size}), and of the VQGAN's downsampling {cfg.downsample}")
    source = read_manifest(data)
    if source["kind"] != "image":
        raise ValueError(f"{data} holds {source['kind']} shards, not image shards")
    if out.resolve() == data.resolve():
        raise ValueError("--out must differ from --data: code shards take the image shards' names")
    names = list(source["splits"]) if splits is None else list(splits)
    for name in names:
        if name not in source["splits"]:
            raise ValueError(f"split {name!r} is not in {data / MANIFEST} (it has: {', '.join(source['splits'])})")

    device = torch.device(device)
    model = model.to(device).eval()
    grid = (image_size // cfg.downsample, image_size // cfg.downsample)
    hr_grid = None if superres_size is None else (superres_size // cfg.downsample,) * 2
    settings = Settings(weights_hash(model), image_size, hflip, superres_size)
    writer = _ShardWriter(model, device, batch_size, grid, hr_grid)
    out.mkdir(parents=True, exist_ok=True)

    written: dict[str, list[ShardStats]] = {}
    for name in names:
        split = source["splits"][name]
        written[name] = []
        bar = tqdm(desc=f"pretokenize/{name}", unit="sample", total=split["samples"], disable=not progress)
        for shard in split["shards"]:
            tar_path = out / shard["path"].rstrip("/").rsplit("/", 1)[-1]
            if shard_done(tar_path):
                written[name].append(_finished_stats(tar_path, settings))
                bar.update(shard["samples"])
                continue
            stats = pretokenize_shard(shard["path"], tar_path, writer, settings, bar)
            if stats.rows_read != shard["samples"]:
                warnings.warn(f"{shard['path']}: read {stats.rows_read} samples, its manifest says {shard['samples']} "
                              "(was the shard changed after conversion?)")
            written[name].append(stats)
        bar.close()

    tokenizer = data / TOKENIZER
    if tokenizer.is_file():
        model_bytes = tokenizer.read_bytes()
        write_atomic(out / TOKENIZER, lambda f: f.write(model_bytes))
    else:
        warnings.warn(f"{data} has no {TOKENIZER} to copy: train one for the code shards with "
                      "`python train.py stage=tokenizer data=<code-shard config>`")
    return write_manifest(
        out, written, kind="codes", source=source.get("source"), data_dir=str(data.resolve()),
        vqgan=asdict(cfg), vqgan_sha256=settings.vqgan_sha256,
        vqgan_checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
        grid=list(grid), image_size=image_size, hflip=hflip,
        **({} if hr_grid is None else {"hr_grid": list(hr_grid), "hr_image_size": superres_size}),
        codes_format="uint16 little-endian, row-major [h, w], no header",
        tokenizer=TOKENIZER if tokenizer.is_file() else None, args=args or {},
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m t2i.pretokenize",
        description="Encode image shards with a VQGAN into code shards (KEY.codes + KEY.txt + KEY.json) "
                    "with a manifest, so GPT training never runs the image encoder.",
    )
    parser.add_argument("--data", required=True, type=Path, help="image-shard folder (with manifest.json)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for code shards + manifest.json")
    parser.add_argument("--vqgan", required=True, type=Path, metavar="CKPT", help="VQGAN checkpoint (ours or taming's)")
    parser.add_argument("--vqgan-config", metavar="NAME|PATH.yaml",
                        help="conf/vqgan/NAME.yaml or a YAML path: needed for checkpoints without a config "
                             "(taming's); for ours it replaces the saved config and must fit the weights")
    parser.add_argument("--splits", nargs="+", metavar="SPLIT", help="splits to encode (default: all in the manifest)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder batch")
    parser.add_argument("--image-size", type=int, help="square side the images are encoded at "
                                                       "(default: the VQGAN config's resolution)")
    parser.add_argument("--superres-size", type=int, metavar="S",
                        help="also encode every image at S x S (a multiple of the image size, e.g. 64 for 32) into "
                             "KEY.hrcodes: the pairs a super-resolution GPT trains on")
    parser.add_argument("--hflip", action="store_true", help="also write a mirrored copy KEY_flip of every sample")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run(argv: list[str] | None = None) -> dict:
    """Parse a command line (as `python -m t2i.pretokenize` does) and pre-tokenize; returns the manifest."""
    args = build_parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    read_manifest(args.data)  # a wrong --data fails before the checkpoint is loaded
    cfg = load_vqgan_config(args.vqgan_config) if args.vqgan_config else None
    model = load_vqgan(args.vqgan, cfg)
    return pretokenize(args.data, args.out, model, splits=args.splits, batch_size=args.batch_size,
                       image_size=args.image_size, hflip=args.hflip, superres_size=args.superres_size,
                       device=args.device, checkpoint=args.vqgan,
                       progress=not args.quiet,
                       args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> int:
    try:
        manifest = run(argv)
    except (FileNotFoundError, ValueError) as e:  # a wrong option, folder or checkpoint: say which, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
