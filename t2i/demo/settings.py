"""What a request asks for, and reading it from what the page or an API client sent.

Everything a visitor sends passes through here before the model sees it: the prompt cleaned to a
valid str and bounded in length, every number checked against its control's ends, and each refusal
a ValueError naming the control to change (the page shows it as the request's error).
"""

from __future__ import annotations

import re
import reprlib
import secrets
from dataclasses import dataclass

from t2i.adapters import BASE_STYLE
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.sampling import SamplingConfig

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
    style: str = BASE_STYLE  # the adapter that runs (conf/demo.yaml adapters), or the base model without one

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
        """The sampler's options (the candidates of reranking are T2IPipeline.sample's: `rerank`)."""
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              guidance_scale=self.guidance_scale, samples_per_prompt=self.samples)

    def describe(self) -> str:
        text = (f"guidance {self.guidance_scale:g} · temperature {self.temperature:g} · top-k {self.top_k} · "
                f"top-p {self.top_p:g}")
        text += f" · best of {self.rerank} by Caption Loss" if self.rerank > 1 else ""
        return text + (f" · style {self.style}" if self.style != BASE_STYLE else "")


def positive_integers(section: str, values: dict) -> dict:
    """A config section whose every value must be a whole number >= 1 (limits.*, queue.*), or a ValueError
    naming the key."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{section}.{name} must be an integer >= 1, got {value!r}")
    return values


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (conf/demo.yaml limits.*): the page's slider ends, and an API call beyond
    them is refused. The first three bound time (sampling.batch_size bounds the model's memory); the upload
    limits bound what reading an image to complete may cost (t2i.demo.uploads)."""

    max_samples: int  # images per request
    max_rerank: int  # candidates per image
    max_prompt_chars: int  # a longer prompt is refused
    max_upload_bytes: int  # an uploaded file (the image, a drawn layer) larger than this is refused, unread
    max_upload_pixels: int  # width x height of an upload, checked from its header before it is decoded

    @classmethod
    def from_config(cls, values: dict) -> Limits:
        return cls(**positive_integers("limits", values))


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


def read_style(value, styles: tuple[str, ...]) -> str:
    """The style a request asks for: one of the names the page lists (BASE_STYLE, then the operator's adapters),
    or a ValueError; a visitor names a style, never a file."""
    names = (BASE_STYLE, *styles)
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"style must be one of {', '.join(names)}, got {reprlib.repr(value)}")
    return value


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


class Controls:
    """The page's controls: each one's ends (the page's sliders, and what an API call may send) and reading
    a request's values (`read`), which the event does itself, Gradio's preprocessing off, so that every
    bad value is refused naming its control."""

    def __init__(self, limits: Limits, defaults: Settings, n_image_codes: int, text_len: int, can_rerank: bool,
                 styles: tuple[str, ...] = ()):
        self.limits, self.defaults, self.text_len, self.can_rerank = limits, defaults, text_len, can_rerank
        self.styles = tuple(styles)  # the adapters' names (the page's style menu, after BASE_STYLE); () : none
        self.ends = {"samples": (1, limits.max_samples), "guidance_scale": (1.0, max(10.0, defaults.guidance_scale)),
                     "temperature": (0.1, max(2.0, defaults.temperature)), "top_k": (0, n_image_codes),
                     "top_p": (0.05, 1.0), "seed": (0, MAX_SEED), "rerank": (1, limits.max_rerank)}

    def read(self, prompt, samples, guidance_scale, temperature, top_k, top_p, seed, random_seed,
             rerank, style=BASE_STYLE) -> tuple[str, Settings, int]:
        """(the cleaned prompt, the settings, the seed: drawn when random_seed), or a ValueError naming what to fix."""
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
        prompt = clean_prompt(prompt)
        if len(prompt) > self.limits.max_prompt_chars:
            raise ValueError(f"the prompt has {len(prompt)} characters; this page takes at most "
                             f"{self.limits.max_prompt_chars} (the model reads {self.text_len} tokens)")
        if not isinstance(random_seed, bool):
            raise ValueError(f"random seed must be true or false, got {reprlib.repr(random_seed)}")
        values = {"samples": samples, "guidance_scale": guidance_scale, "temperature": temperature,
                  "top_k": top_k, "top_p": top_p, "rerank": 1 if rerank is None else rerank}
        settings = Settings(**{name: read_number(name, value, self.ends[name]) for name, value in values.items()},
                            style=read_style(style, self.styles))
        settings.check(self.limits.max_samples, self.limits.max_rerank, self.can_rerank)
        seed = secrets.randbelow(2 ** 31) if random_seed else read_number("seed", seed, self.ends["seed"])
        return prompt, settings, seed
