"""A web page over a GPT checkpoint: python -m t2i.demo ckpt=PATH [port=7860] [key=value ...] (conf/demo.yaml).

Type a prompt, set the sampling options, press Generate: the images appear in a gallery with the
prompt and the settings under each, beside a captioned grid and a zip of the PNGs to download.
Built with Gradio; `t2i.sampling.Generator` does the work.

How requests are served: Gradio's queue holds at most `queue.size` requests. The model runs in one
thread of its own (the `Engine`): when it is free it takes the oldest waiting request together with
the others that ask for the same settings (up to `queue.max_batch`) and samples them as one batch,
each prompt from its own seed, so a request gets the same images whether it was batched or not,
and the same images `eval.py task=generate` gives for its prompt and seed. A request's page shows
the steps done while it samples (the GPT's forward calls, counted from outside the sampler) and
how many requests are ahead of it while it waits. `sampling.batch_size` bounds the sequences sampled at
once (a request's images x rerank candidates split over sampling batches, the images unchanged), so a
request's peak memory does not grow with the page's limits (docs/demo.md: the formula, a measurement).
A visitor gets only the files of the request they made: the run folder is never served (docs/demo.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import reprlib
import secrets
import shutil
import sys
import threading
import time
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import torch
import torchvision
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.command_line import check_command_line
from t2i.extras import require
from t2i.grids import FONT_HINT, captioned_grid, find_cjk_font
from t2i.models.gpt import GPT
from t2i.sampling import Generator, SamplingConfig, prompt_seeds, resolve_sampling, sampling_batches

if TYPE_CHECKING:
    from t2i.eval.text_to_image import CaptionScorer
# t2i.eval.text_to_image (Lightning, torchmetrics: seconds to import) is imported once a checkpoint has
# loaded, so that a wrong path stops the command at once

log = logging.getLogger("demo")

MAX_SEED = 2 ** 53 - 1  # the largest whole number a browser's numbers hold exactly
EMPTY_NOTE = ("**Empty prompt**: these images are unconditional, sampled from the model's null text "
              "(no description), not from a prompt.")


@dataclass(frozen=True)
class Settings:
    """What a request asks for besides its prompt and seed: requests with equal settings share a batch."""

    samples: int = 1
    guidance_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    rerank: int = 1  # candidates per image; the lowest Caption Loss is kept

    def check(self, max_samples: int, max_rerank: int, can_rerank: bool) -> None:
        """A ValueError naming the setting to change (the sampler's own checks included)."""
        if not 1 <= self.samples <= max_samples:
            raise ValueError(f"samples per prompt must be between 1 and {max_samples}, got {self.samples}")
        if not 1 <= self.rerank <= max_rerank:
            raise ValueError(f"rerank must be between 1 and {max_rerank}, got {self.rerank}")
        if self.rerank > 1 and not can_rerank:
            raise ValueError("reranking needs a captioning model, which this demo has not got: set rerank to 1")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance scale must be >= 0, got {self.guidance_scale}")
        self.sampling()

    def sampling(self) -> SamplingConfig:
        """The sampler's options: every candidate of every image as one of the prompt's samples."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              guidance_scale=self.guidance_scale, samples_per_prompt=self.samples * self.rerank)

    def describe(self) -> str:
        text = (f"guidance {self.guidance_scale:g} · temperature {self.temperature:g} · top-k {self.top_k} · "
                f"top-p {self.top_p:g}")
        return text + (f" · best of {self.rerank} by Caption Loss" if self.rerank > 1 else "")


def clean_prompt(prompt: str | None) -> str:
    """Any text the page or an API client sends, as a valid str: lone UTF-16 surrogates (which no
    encoder takes) become U+FFFD, surrogate pairs the character they stand for; the whitespace around
    it dropped (as prompts_file lines are: a stray space changes no image), so whitespace-only is empty."""
    return (prompt or "").encode("utf-16", "surrogatepass").decode("utf-16", "replace").strip()


def markdown_text(text: str) -> str:
    """Text shown as itself in the page's Markdown: every ASCII punctuation mark backslash-escaped (CommonMark),
    so a prompt's markup (links, images, HTML) is not rendered."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", text)


# The page's controls: their labels (in error messages) and which take whole numbers
LABELS = {"samples": "samples per prompt", "guidance_scale": "guidance scale", "temperature": "temperature",
          "top_k": "top-k", "top_p": "top-p", "seed": "seed", "rerank": "rerank"}
WHOLE = ("samples", "top_k", "seed", "rerank")


def read_number(name: str, value, ends: tuple[float, float]) -> int | float:
    """A control's value as the page or an API client sent it, or a ValueError naming the control: JSON
    carries strings, null, NaN and infinities where numbers go, and any number of digits."""
    label, (low, high) = LABELS[name], ends
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # value != value: NaN
        raise ValueError(f"{label} must be a number, got {reprlib.repr(value)}")
    if not low <= value <= high:  # infinities included
        raise ValueError(f"{label} must be from {low} to {high}, got {reprlib.repr(value)}")
    if name in WHOLE:
        if value != int(value):
            raise ValueError(f"{label} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


def prompt_notes(tokenizer: FixedLengthTokenizer, prompt: str) -> list[str]:
    """What the page says about a (cleaned) prompt before sampling: empty, or cut to text_len."""
    if not prompt:
        return [EMPTY_NOTE]
    ids = tokenizer.encode(prompt)
    if len(ids) <= tokenizer.text_len:
        return []
    kept = tokenizer.decode(ids[: tokenizer.text_len]) if hasattr(tokenizer, "decode") else None
    note = (f"**Prompt cut**: it is {len(ids)} tokens long and the model reads {tokenizer.text_len}: "
            f"the last {len(ids) - tokenizer.text_len} token(s) were cut")
    return [note + (f"; the model read “{markdown_text(kept)}”." if kept is not None else ".")]


class StepCounter:
    """Counts the sampling steps of a GPT from outside the sampler: each forward call of the model
    computes the logits of one step (the prompt's call those of the first). A forward hook sees the
    eager steps and the prompt's call; decode="static" steps go through `forward_at`, wrapped on the
    instance while counting; decode="compiled" and "frozen" steps are compiled code, so there only the prompt's
    call is seen and the count moves a whole sampling batch at a time."""

    def __init__(self, gpt: GPT, decode: str, on_step: Callable[[int], None]):
        self.gpt, self.decode, self.on_step = gpt, decode, on_step
        self.calls = 0
        self._handle = None

    def _tick(self, *_):
        self.calls += 1
        if self.decode in ("compiled", "frozen"):  # a prompt's call starts a batch: the batches before it are done
            self.on_step((self.calls - 1) * self.gpt.cfg.image_len)
        else:
            self.on_step(self.calls)

    def __enter__(self) -> StepCounter:
        self._handle = self.gpt.register_forward_hook(self._tick)
        if self.decode == "static":
            step = self.gpt.forward_at

            def counted(*args, **kwargs):
                self._tick()
                return step(*args, **kwargs)

            self.gpt.forward_at = counted  # an instance attribute: the class's method is untouched
        return self

    def __exit__(self, *_):
        self._handle.remove()
        self.gpt.__dict__.pop("forward_at", None)


@dataclass
class Job:
    """One request: waiting, sampling (steps of total), then done with images or an error."""

    prompt: str
    seed: int
    settings: Settings
    steps: int = 0  # sampling steps done (over all the sampling batches of its batch)
    total: int = 0  # 0 until it samples
    ahead: int = 0  # requests the model takes before this one (while waiting)
    images: torch.Tensor | None = None  # uint8 [samples, 3, H, W]
    losses: torch.Tensor | None = None  # Caption Loss of each image, when there is a captioning model
    error: BaseException | None = None
    batched_with: int = 1  # requests in the batch it was sampled in
    seconds: float = 0.0  # how long its codes took to sample
    done: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model's thread: takes waiting jobs in order, batching those with equal settings."""

    def __init__(self, generator: Generator, scorer: CaptionScorer | None, batch_size: int = 16, max_batch: int = 4,
                 start: bool = True):
        self.generator, self.scorer = generator, scorer
        self.batch_size, self.max_batch = batch_size, max_batch
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self.batches = 0  # batches sampled so far
        if start:
            self.start()

    def start(self) -> None:
        threading.Thread(target=self._serve, name="t2i-demo-model", daemon=True).start()

    def submit(self, prompt: str, seed: int, settings: Settings) -> Job:
        job = Job(prompt, seed, settings)
        with self._lock:
            job.ahead = len(self._waiting)
            self._waiting.append(job)
            self._lock.notify()
        return job

    def _take(self) -> list[Job]:
        with self._lock:
            while not self._waiting:
                self._lock.wait()
            first = self._waiting.popleft()
            batch = [first] + [job for job in self._waiting if job.settings == first.settings][: self.max_batch - 1]
            for job in batch[1:]:
                self._waiting.remove(job)
            for ahead, job in enumerate(self._waiting):
                job.ahead = ahead
        return batch

    def _serve(self):
        while True:
            batch = self._take()
            try:
                self.sample(batch)
            except Exception as error:  # the page shows it; the model thread goes on
                log.exception("sampling failed")
                for job in batch:
                    job.error = error
            finally:
                self.batches += 1
                for job in batch:
                    job.done.set()

    @torch.no_grad()
    def sample(self, jobs: list[Job]) -> None:
        """Images (and Caption Losses) for jobs of equal settings, as one sampling run."""
        settings = jobs[0].settings
        sampling = settings.sampling()
        prompts = [job.prompt for job in jobs]
        seeds = [prompt_seeds(job.seed, [job.prompt])[0] for job in jobs]  # as task=generate seeds each prompt
        generator = self.generator
        # as Generator.sample_codes splits them: at most batch_size sequences (samples x candidates) at once
        total = len(sampling_batches(len(jobs), sampling.samples_per_prompt, self.batch_size)) * generator.gpt.cfg.image_len
        for job in jobs:
            job.total, job.steps, job.batched_with = total, 0, len(jobs)

        def on_step(steps: int):
            for job in jobs:
                job.steps = min(steps, total)

        started = time.perf_counter()
        with StepCounter(generator.sampler, generator.decode_mode, on_step):
            codes = generator.sample_codes(prompts, sampling, self.batch_size, seeds)
        on_step(total)
        for job in jobs:
            job.seconds = time.perf_counter() - started
        n, k, s = len(jobs), settings.rerank, settings.samples
        losses = None
        if self.scorer is not None:
            captions = [p for p in prompts for _ in range(k * s)]
            losses = self.scorer(captions, codes, self.batch_size).cpu().view(n, k, s)
        codes = codes.view(n, k, s, *codes.shape[1:])  # candidate c of image i: row c * S + i
        if k > 1:
            from t2i.eval.text_to_image import pick_best

            codes, losses = pick_best(codes, losses)
        else:
            codes, losses = codes[:, 0], None if losses is None else losses[:, 0]
        images = generator.decode(codes.flatten(0, 1), self.batch_size)
        images = images.view(n, s, *images.shape[1:])
        for i, job in enumerate(jobs):
            job.images = images[i]
            job.losses = None if losses is None else losses[i]


class Results:
    """A request's files on disk: PNGs, the captioned grid, settings.json and a zip of them all;
    the newest `keep` folders are kept. A folder's name ends in a random token: a name seen (or a
    time and count guessed) never leads to another request's files. The page serves none of these
    folders: the event hands a request's own files to Gradio, which serves copies (`build_page`)."""

    def __init__(self, root: Path, keep: int, font: str | None, model: dict):
        self.root, self.keep, self.font, self.model = root, keep, font, model
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._count = 0

    def save(self, job: Job, notes: list[str], random_seed: bool) -> tuple[list[tuple[str, str]], list[str], str]:
        """(gallery entries (PNG path, caption), the files to download, the result's name)."""
        with self._lock:
            self._count += 1
            folder = self.root / f"{time.strftime('%Y%m%d-%H%M%S')}-{self._count:05d}-{secrets.token_hex(8)}"
            folder.mkdir()
            self._prune()
        settings, prompt = job.settings, job.prompt
        shown = prompt or "(empty prompt: unconditional)"
        header = f"seed {job.seed}{' (random)' if random_seed else ''} · {settings.describe()}"
        gallery, pngs = [], []
        for i, image in enumerate(job.images):
            path = folder / f"{i:02d}.png"
            torchvision.utils.save_image(image.float() / 255, path)
            loss = "" if job.losses is None else f" · Caption Loss {job.losses[i].item():.3f}"
            gallery.append((str(path), f"{shown}\n#{i + 1} of {len(job.images)} · {header}{loss}"))
            pngs.append(path)
        grid, drawn = captioned_grid(job.images, [f"{shown}\n{header}"], settings.samples, self.font)
        grid_path = folder / "grid.png"
        grid.save(grid_path)
        record = {"prompt": prompt, "seed": job.seed, "random_seed": random_seed,
                  "prompt_seed": prompt_seeds(job.seed, [prompt])[0], "settings": asdict(settings),
                  "caption_loss": None if job.losses is None else [round(x, 4) for x in job.losses.tolist()],
                  "notes": notes, "caption_drawn_on_grid": drawn, "model": self.model}
        (folder / "settings.json").write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
        archive = folder / "images.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for path in [*pngs, grid_path, folder / "settings.json"]:
                zf.write(path, path.name)
        return gallery, [str(grid_path), str(archive)], folder.name

    def _prune(self):
        folders = sorted(p for p in self.root.iterdir() if p.is_dir())
        for old in folders[: max(0, len(folders) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_card(generator: Generator, ckpt: str, ckpt_sha256: str, caption_source: str, can_rerank: bool,
               font: str | None) -> tuple[str, dict]:
    """The model panel (markdown) and its facts (written into each result's settings.json): files by name and
    sha256, never by absolute path (both reach every visitor)."""
    record, gpt = generator.record, generator.gpt
    cfg = gpt.cfg
    params = sum(p.numel() for p in gpt.parameters())
    vqgan, h_w = record.vqgan, record.grid
    device = generator.device
    device_text = str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        device_text += f", {torch.get_num_threads()} threads"
    facts = {
        "checkpoint": Path(ckpt).name, "checkpoint_sha256": ckpt_sha256,
        "parameters": params, "layers": cfg.n_layer, "width": cfg.n_embd, "heads": cfg.n_head,
        "layout": cfg.layout, "text_len": cfg.text_len, "image_len": cfg.image_len, "grid": list(h_w),
        "tokenizer": f"{record.tokenizer['kind']} ({generator.tokenizer.vocab_size} pieces)",
        "vqgan_sha256": vqgan.get("sha256"),
        "vqgan_checkpoint": Path(vqgan["checkpoint"]).name if vqgan.get("checkpoint") else None,
        "vqgan_codebook": vqgan["config"].get("n_embed"), "origin": record.training.get("origin", "unknown"),
        "caption_prob": record.caption_prob, "device": device_text,
    }
    blocks = [f"norm {cfg.norm}/{cfg.norm_type}", f"MLP {cfg.mlp}", f"positions {cfg.pos}"]
    rows = [
        ("Size", f"{params / 1e6:.2f} M parameters: {cfg.n_layer} layers × {cfg.n_embd} wide, {cfg.n_head} heads "
                 f"({', '.join(blocks)})"),
        ("Layout", f"{cfg.layout}: {cfg.text_len} text tokens, then {cfg.image_len} image codes "
                   f"({h_w[0]}×{h_w[1]} grid)"),
        ("Tokenizer", facts["tokenizer"]),
        ("VQGAN", f"{vqgan['config'].get('resolution')} px, {facts['vqgan_codebook']} codes, sha256 "
                  f"`{str(vqgan.get('sha256'))[:16]}…`, {facts['vqgan_checkpoint'] or 'no path recorded'}"),
        ("Training", f"{facts['origin']}; caption direction: "
                     f"{'yes (caption_prob ' + format(record.caption_prob, 'g') + ')' if record.caption_prob else 'no'}"),
        ("Reranking", f"by Caption Loss under {caption_source}" if can_rerank else f"unavailable: {caption_source}"),
        ("Checkpoint", f"`{facts['checkpoint']}`, sha256 `{ckpt_sha256[:16]}…`"),
        ("Device", device_text),
        ("Caption font", font or f"none found ({FONT_HINT})"),
    ]
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


def progress_text(steps: int, total: int, image_len: int) -> str:
    """'step i of image_len' (and which sampling batch, when a request takes several)."""
    batches = total // image_len
    batch = min(steps // image_len, batches - 1)  # the batch sampling now
    text = f"sampling: step {steps - batch * image_len} of {image_len}"
    return text + (f", batch {batch + 1} of {batches}" if batches > 1 else "")


def build_page(engine: Engine, results: Results, defaults: Settings, seed: int | None, examples: list[str],
               card: str, limits: dict, can_rerank: bool, rerank_reason: str, concurrency: int):
    """The Gradio page; its Generate button is the API endpoint /generate."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    tokenizer = engine.generator.tokenizer
    image_len = engine.generator.gpt.cfg.image_len
    # each control's ends: the page's sliders, and what an API call may send (the event reads the values itself,
    # Gradio's preprocessing off, so that every bad value is refused naming its control)
    ends = {"samples": (1, limits["max_samples"]), "guidance_scale": (1.0, max(10.0, defaults.guidance_scale)),
            "temperature": (0.1, max(2.0, defaults.temperature)), "top_k": (0, engine.generator.gpt.cfg.n_image_codes),
            "top_p": (0.05, 1.0), "seed": (0, MAX_SEED), "rerank": (1, limits["max_rerank"])}

    def generate(prompt, samples, guidance_scale, temperature, top_k, top_p, seed, random_seed, rerank,
                 progress=gr.Progress()):
        try:
            if prompt is not None and not isinstance(prompt, str):
                raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
            prompt = clean_prompt(prompt)
            if len(prompt) > limits["max_prompt_chars"]:
                raise ValueError(f"the prompt has {len(prompt)} characters; this page takes at most "
                                 f"{limits['max_prompt_chars']} (the model reads {tokenizer.text_len} tokens)")
            if not isinstance(random_seed, bool):
                raise ValueError(f"random seed must be true or false, got {reprlib.repr(random_seed)}")
            values = {"samples": samples, "guidance_scale": guidance_scale, "temperature": temperature,
                      "top_k": top_k, "top_p": top_p, "rerank": 1 if rerank is None else rerank}
            settings = Settings(**{name: read_number(name, value, ends[name]) for name, value in values.items()})
            settings.check(limits["max_samples"], limits["max_rerank"], can_rerank)
            seed = secrets.randbelow(2 ** 31) if random_seed else read_number("seed", seed, ends["seed"])
        except ValueError as error:
            raise gr.Error(str(error)) from None
        notes = prompt_notes(tokenizer, prompt)
        job = engine.submit(prompt, seed, settings)
        while not job.done.wait(0.1):
            if job.total:
                progress((job.steps, job.total), desc=progress_text(job.steps, job.total, image_len), unit="steps")
            else:
                progress(None, desc=f"waiting for the model: {job.ahead} request(s) ahead")
        if job.error is not None:
            raise gr.Error(f"sampling failed: {job.error}")
        entries, downloads, name = results.save(job, notes, bool(random_seed))
        # this request's files, copied into Gradio's cache and served from there under a path only this answer
        # carries (a hash of the content and a secret); the run folder itself is never served (no allowed_paths)
        entries = [(gallery.move_resource_to_block_cache(path), caption) for path, caption in entries]
        downloads = [files.move_resource_to_block_cache(path) for path in downloads]
        summary = [f"{settings.samples} image(s), seed {seed}{' (random)' if random_seed else ''}, {settings.describe()}"
                   + f"; sampled in {job.seconds:.2f} s"
                   + (f", in a batch of {job.batched_with} requests" if job.batched_with > 1 else "")
                   + f". Result `{name}`."]
        return entries, "\n\n".join(notes + summary), downloads

    with gr.Blocks(title="t2i demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# t2i: text to image\nType a prompt (Chinese), choose the sampling options, press **Generate**.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="画面左上角有一个红色的小圆形，背景是白色的 (empty: unconditional)")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[prompt], label="Examples")
                with gr.Accordion("Sampling", open=True):
                    samples = gr.Slider(*ends["samples"], value=defaults.samples, step=1,
                                        label="Samples per prompt", elem_id="samples")
                    guidance = gr.Slider(*ends["guidance_scale"], value=defaults.guidance_scale, step=0.5,
                                         label="Guidance scale (1: none)", elem_id="guidance")
                    temperature = gr.Slider(*ends["temperature"], value=defaults.temperature, step=0.05,
                                            label="Temperature", elem_id="temperature")
                    with gr.Row():
                        top_k = gr.Number(value=defaults.top_k, precision=0, minimum=ends["top_k"][0],
                                          maximum=ends["top_k"][1], label="Top-k (0: all codes)",
                                          elem_id="top-k")
                        top_p = gr.Slider(*ends["top_p"], value=defaults.top_p, step=0.01, label="Top-p (1: all)",
                                          elem_id="top-p")
                    with gr.Row():
                        seed_box = gr.Number(value=0 if seed is None else seed, precision=0, minimum=ends["seed"][0],
                                             maximum=ends["seed"][1],
                                             label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=seed is None, label="Random seed", elem_id="random-seed")
                    rerank = gr.Slider(*ends["rerank"], value=defaults.rerank if can_rerank else 1, step=1,
                                       label="Rerank: best of N by Caption Loss", interactive=can_rerank,
                                       info=None if can_rerank else f"unavailable: {rerank_reason}", elem_id="rerank")
            with gr.Column(scale=3):
                note = gr.Markdown(label="Notes", elem_id="note")
                gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", height="auto", elem_id="gallery")
                files = gr.File(label="Download: the captioned grid and a zip of the PNGs (with settings.json)",
                                file_count="multiple", elem_id="downloads")
        with gr.Accordion("Model", open=False):
            gr.Markdown(card, elem_id="model-card")
        inputs = [prompt, samples, guidance, temperature, top_k, top_p, seed_box, random_seed, rerank]
        button.click(generate, inputs, [gallery, note, files], api_name="generate", concurrency_limit=concurrency,
                     concurrency_id="generate", preprocess=False)
        prompt.submit(generate, inputs, [gallery, note, files], api_name=False, concurrency_limit=concurrency,
                      concurrency_id="generate", preprocess=False)
    return page


# small images enlarged in the gallery keep their pixels sharp
PAGE_CSS = "#gallery img { image-rendering: pixelated; }"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but this machine has no CUDA GPU: use device=cpu (or auto)")
    return device


def setup(cfg: DictConfig, out_dir: Path):
    """The model, the engine and the page from the demo's config (conf/demo.yaml); errors name what to fix."""
    if not cfg.ckpt:
        raise ValueError("t2i.demo needs ckpt=PATH (a GPT checkpoint from stage=gpt, or a pai-painter import)")
    limits = OmegaConf.to_container(cfg.limits, resolve=True)
    queue = OmegaConf.to_container(cfg.queue, resolve=True)
    for name, value in [*((f"limits.{k}", v) for k, v in limits.items()), *((f"queue.{k}", v) for k, v in queue.items())]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    options = OmegaConf.to_container(cfg.sampling, resolve=True)
    generator = Generator.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=resolve_device(cfg.device),
                                          decode=options.pop("decode"), weights=options.pop("weights"))
    from t2i.eval.text_to_image import CaptionScorer

    scorer, caption_source = CaptionScorer.for_generator(generator, cfg.caption_ckpt)
    if cfg.caption_ckpt:  # the page names the file, not where it lies
        caption_source = caption_source.replace(str(cfg.caption_ckpt), Path(cfg.caption_ckpt).name)
    rerank, batch_size, seed = cfg.rerank, options.pop("batch_size"), options.pop("seed")
    samples = options.pop("samples_per_prompt")
    sampling = resolve_sampling(options, generator.record.sampling)
    top_k = min(sampling.top_k, generator.gpt.cfg.n_image_codes)  # keeping more codes than there are keeps all
    defaults = Settings(samples, sampling.guidance_scale, sampling.temperature, top_k, sampling.top_p,
                        rerank if scorer is not None else 1)
    defaults.check(limits["max_samples"], limits["max_rerank"], True)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sampling.batch_size must be an integer >= 1, got {batch_size!r}")
    font = find_cjk_font(cfg.font)
    if font is None:
        log.warning("no CJK font found: grids carry the prompt only when it is ASCII (%s)", FONT_HINT)
    card, facts = model_card(generator, cfg.ckpt, file_sha256(cfg.ckpt), caption_source, scorer is not None, font)
    engine = Engine(generator, scorer, batch_size, queue["max_batch"])
    results = Results(out_dir / "results", queue["keep_results"], font, facts)
    examples = example_prompts(cfg.examples_file, cfg.ckpt, cfg.examples_from_run)
    page = build_page(engine, results, defaults, seed, examples, card, limits, scorer is not None, caption_source,
                      concurrency=2 * queue["max_batch"])  # the next batch gathers while one samples
    page.queue(max_size=queue["size"], default_concurrency_limit=1)
    return page, engine


@hydra.main(config_path="../conf", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    require("gradio")  # before the model loads
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    page, _ = setup(cfg, out_dir)
    log.info("serving %s on http://%s:%d (results in %s)", cfg.ckpt, cfg.host, cfg.port, out_dir)
    # no allowed_paths: the file route serves only what an event returned (copied into Gradio's cache), and the
    # run folder (config, log, every request's results) is blocked even if a later option allowed more
    page.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, blocked_paths=[str(out_dir)],
                show_error=True, css=PAGE_CSS)


if __name__ == "__main__":
    check_command_line("demo", sys.argv[1:])  # renamed settings, before Hydra composes
    main()
