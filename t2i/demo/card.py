"""What the page says about the model: the model panel (size, layout, tokenizer, VQGAN, training, reranking,
checkpoint, device), the example prompts, and the examples of the Complete tab (shapes test images drawn at start).

Files are named by file name and sha256, never by absolute path: the panel reaches every visitor, and its
facts go into each result's settings.json.
"""

from __future__ import annotations

import hashlib
import logging
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from t2i.adapters import BASE_STYLE, adapter_weights
from t2i.checkpoints import GPTRecord
from t2i.data import shapes
from t2i.grids import FONT_HINT
from t2i.sampling import T2IPipeline

log = logging.getLogger("demo")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_card(pipeline: T2IPipeline, ckpt: str, ckpt_sha256: str, caption_source: str, can_rerank: bool,
               font: str | None, styles: dict[str, tuple[str, GPTRecord]] | None = None) -> tuple[str, dict]:
    """The model panel (markdown) and its facts (written into each result's settings.json): files by name and
    sha256, never by absolute path (both reach every visitor). `styles`: the style menu's adapters, name ->
    (file, its record)."""
    record, gpt = pipeline.record, pipeline.gpt
    cfg = gpt.cfg
    styles = styles or {}
    # each style's adapter weights, beside (not in) the base's parameters
    style_params = {name: sum(w.numel() for w in adapter_weights(gpt, name=name).values()) for name in styles}
    params = sum(p.numel() for p in gpt.parameters()) - sum(style_params.values())
    vqgan, h_w = record.vqgan, record.grid
    device = pipeline.device
    device_text = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        device_text += f", {torch.get_num_threads()} threads"
    facts = {
        "checkpoint": Path(ckpt).name, "checkpoint_sha256": ckpt_sha256,
        "parameters": params, "layers": cfg.n_layer, "width": cfg.n_embd, "heads": cfg.n_head,
        "layout": cfg.layout, "text_len": cfg.text_len, "image_len": cfg.image_len, "grid": list(h_w),
        "tokenizer": f"{record.tokenizer.kind} ({pipeline.tokenizer.vocab_size} pieces)",
        "vqgan_sha256": vqgan.sha256,
        "vqgan_checkpoint": Path(vqgan.checkpoint).name if vqgan.checkpoint else None,
        "vqgan_codebook": vqgan.config.n_embed, "origin": record.training.origin or "unknown",
        "caption_prob": record.caption_prob, "device": device_text, "sampling_step": pipeline.step_record(),
    }
    blocks = [f"norm {cfg.norm}/{cfg.norm_type}", f"MLP {cfg.mlp}", f"positions {cfg.pos}"]
    rows = [
        ("Size", f"{params / 1e6:.2f} M parameters: {cfg.n_layer} layers × {cfg.n_embd} wide, {cfg.n_head} heads "
                 f"({', '.join(blocks)})"),
        ("Layout", f"{cfg.layout}: {cfg.text_len} text tokens, then {cfg.image_len} image codes "
                   f"({h_w[0]}×{h_w[1]} grid)"),
        ("Tokenizer", facts["tokenizer"]),
        ("VQGAN", f"{vqgan.config.resolution} px, {facts['vqgan_codebook']} codes, sha256 "
                  f"`{str(vqgan.sha256)[:16]}…`, {facts['vqgan_checkpoint'] or 'no path recorded'}"),
        ("Training", f"{facts['origin']}; caption direction: "
                     f"{'yes (caption_prob ' + format(record.caption_prob, 'g') + ')' if record.caption_prob else 'no'}"),
        ("Reranking", f"by Caption Loss under {caption_source}" if can_rerank else f"unavailable: {caption_source}"),
        ("Checkpoint", f"`{facts['checkpoint']}`, sha256 `{ckpt_sha256[:16]}…`"),
        ("Device", device_text),
        ("Sampling steps", pipeline.step_mode if pipeline.step_asked == pipeline.step_mode
         else f"{pipeline.step_mode} (sampling.step={pipeline.step_asked})"),
        ("Caption font", font or f"none found ({FONT_HINT})"),
    ]
    if styles:
        facts["styles"] = {name: {"adapter": Path(path).name, "adapter_sha256": file_sha256(path),
                                  "parameters": style_params[name], "rank": record.adapter.rank,
                                  "alpha": record.adapter.alpha, "targets": record.adapter.targets}
                           for name, (path, record) in styles.items()}
        described = [f"{name}: LoRA `{style['adapter']}`, sha256 `{style['adapter_sha256'][:16]}…`, "
                     f"{style['parameters']:,} parameters, rank {style['rank']} on {', '.join(style['targets'])}"
                     for name, style in facts["styles"].items()]
        rows.append(("Styles", "; ".join([f"{BASE_STYLE} (no adapter)", *described])))
    table = "| | |\n|---|---|\n" + "".join(f"| {name} | {value.replace('|', '/')} |\n" for name, value in rows)
    return table, facts


def example_prompts(examples_file: str | None, ckpt: str, from_run: int) -> list[str]:
    """The page's example prompts: the lines of `examples_file`, then up to `from_run` validation
    captions of the data the checkpoint was trained on (read through its run folder's Hydra config,
    when that and the data are still there)."""
    prompts: list[str] = []
    if examples_file:
        path = Path(examples_file)
        if path.is_file():
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            log.warning("examples_file=%s not found: no examples from it", examples_file)
    config = Path(ckpt).resolve().parent.parent / ".hydra" / "config.yaml"
    if from_run and config.is_file():
        try:
            from t2i.data.datamodule import DataConfig

            data = OmegaConf.to_container(OmegaConf.load(config).data, resolve=True)
            prompts += [c for c in islice(DataConfig.from_dict(data).captions("val"), from_run) if c.strip()]
        except Exception as error:  # the run's data moved or never had a val split: the file's examples only
            log.warning("no example captions from the checkpoint's training data (%s): %s", config, error)
    return list(dict.fromkeys(prompts))


def example_completions(size: int, count: int = 3) -> list[tuple[np.ndarray, str, str, str]]:
    """The Complete tab's examples, drawn here (no file is read): shapes test images at the model's size, each with
    its object's box in pixels and a prompt for another colour and shape at the same place and size: (image uint8
    [size, size, 3], prompt, box "x0,y0,x1,y1", box units)."""
    examples = []
    for index in range(count):
        attrs, _, image = shapes.sample(index, "test", size=size)
        rows, cols = np.nonzero((image != np.array(shapes.BACKGROUND_RGB[attrs["background"]])).any(-1))
        box = f"{cols.min()},{rows.min()},{cols.max() + 1},{rows.max() + 1}"
        colors, kinds = shapes.ATTRIBUTES["color"], shapes.ATTRIBUTES["shape"]
        edited = {**attrs, "color": colors[(colors.index(attrs["color"]) + 1) % len(colors)],
                  "shape": kinds[(kinds.index(attrs["shape"]) + 1) % len(kinds)]}
        examples.append((image, shapes.caption(edited, np.random.default_rng(index)), box, "pixels"))
    return examples
