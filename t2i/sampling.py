"""Generation: text prompts -> image codes, in one place.

Batched prompts, several samples per prompt in the same batch, temperature, top-k, top-p,
classifier-free guidance (the conditional and the null-text halves run as one batch:
logits = uncond + scale * (cond - uncond)), seeds, and the KV cache: the prompt is run once and
every step after it computes one position. Image positions can only produce image codes.
Each prompt draws from its own random stream (its seed), so its samples do not depend on which
other prompts share its batch or its process.
`use_cache=False` recomputes the whole sequence at every step, as EasyNLP's generate loop does
(kept for the benchmark and the equivalence test).

How a step runs (`decode`, the same codes up to float rounding): "eager" (the cache's length a Python
int, attention over the filled part), "static" (GPT.forward_at: fixed shapes, the position a tensor)
or "compiled" (the static step through torch.compile; on CUDA mode "reduce-overhead", which captures
it once as a CUDA graph and replays it: no per-kernel launch cost, the gpt-fast / LlamaGen pattern).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from t2i.checkpoints import GPTRecord, load_gpt, load_record_vqgan
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.models.gpt import GPT
from t2i.models.vqgan import VQModel


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely codes (0: all)
    top_p: float = 1.0  # keep the smallest set of codes whose probability reaches p (1: all)
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = none (no null-text half is run)
    greedy: bool = False  # argmax instead of sampling
    samples_per_prompt: int = 1
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"sampling.temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_k must be >= 0 and sampling.top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"sampling.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")


DECODES = ("eager", "static", "compiled")
_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GPT -> its compiled forward_at


def compiled_step(model: GPT):
    """model.forward_at through torch.compile, once per model (CUDA: captured as a CUDA graph)."""
    if model not in _compiled_steps:
        mode = "reduce-overhead" if model.tok_emb.weight.is_cuda else None
        _compiled_steps[model] = torch.compile(model.forward_at, mode=mode, fullgraph=True, dynamic=False)
    return _compiled_steps[model]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits outside the top-k and the top-p nucleus to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep until the mass reaches p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _prompt_uniforms(seeds: Sequence[int] | None, n_prompts: int, samples_per_prompt: int, steps: int,
                    device: torch.device) -> torch.Tensor:
    """Uniform draws [n_prompts * samples_per_prompt, steps] in [0, 1): prompt i's rows from its own
    generator seeded with seeds[i] (unseeded: torch's global generator)."""
    if seeds is None:
        return torch.rand(n_prompts * samples_per_prompt, steps, device=device)
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    # CPU generators: the same seed gives the same draws on every device.
    draws = [torch.rand(samples_per_prompt, steps, generator=torch.Generator().manual_seed(seed)) for seed in seeds]
    return torch.cat(draws).to(device)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row of probs [B, V], the first index whose cumulative probability
    exceeds uniforms [B] (in [0, 1)) times the row's total. Zero-probability indices are never drawn."""
    # float64: the tail of a 16k-code distribution keeps its mass, and a float32 u (at most 1 - 2^-24)
    # times the total stays below the total, so some index always exceeds it.
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)


@torch.no_grad()
def generate_codes(model: GPT, text: torch.Tensor, cfg: SamplingConfig, use_cache: bool = True,
                   seeds: Sequence[int] | None = None, decode: str = "eager") -> torch.Tensor:
    """Text ids [P, text_len] -> image codes [P * samples_per_prompt, image_len] (samples of a prompt adjacent).

    Prompt i samples from its own random stream, seeded with seeds[i]; by default cfg.seed + i
    (unseeded when cfg.seed is None). `decode`: how each step runs (DECODES; the module docstring).
    """
    if decode not in DECODES:
        raise ValueError(f"sampling.decode must be one of {DECODES}, got {decode!r}")
    gpt = model.cfg
    if seeds is None and cfg.seed is not None:
        seeds = [cfg.seed + i for i in range(len(text))]
    uniforms = None if cfg.greedy else _prompt_uniforms(seeds, len(text), cfg.samples_per_prompt, gpt.image_len,
                                                       text.device)
    text = text.repeat_interleave(cfg.samples_per_prompt, dim=0)
    layout = model.layout
    prefix = layout.prefix(text)
    guided = cfg.guidance_scale != 1.0
    if guided:  # the null text (all padding) as the unconditional half
        prefix = torch.cat([prefix, layout.prefix(layout.null_text(text))])
    n = len(text)
    codes = torch.empty(n, gpt.image_len, dtype=torch.long, device=prefix.device)
    cache = model.new_cache(len(prefix)) if use_cache else None
    tokens = prefix
    rows = gpt.n_image_codes  # image positions produce image codes only
    if use_cache:  # the last position over the image codes: the rest of the head is never read
        logits = model(prefix, cache, last=1, head_rows=rows)[:, -1]
    else:  # EasyNLP's loop: every position, the whole head
        logits = model(prefix)[:, -1, :rows]
    step_fn = None
    if use_cache and decode != "eager":
        step_fn = compiled_step(model) if decode == "compiled" else model.forward_at
        position = torch.full((1,), cache.length, dtype=torch.long, device=prefix.device)
    for i in range(gpt.image_len):
        logits = logits.float()
        if guided:
            cond, uncond = logits[:n], logits[n:]
            logits = uncond + cfg.guidance_scale * (cond - uncond)
        if cfg.greedy:
            step = logits.argmax(-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            step = _draw(probs, uniforms[:, i])
        codes[:, i] = step
        if i == gpt.image_len - 1:
            break
        new = step.repeat(2)[:, None] if guided else step[:, None]
        if step_fn is not None:
            if decode == "compiled":  # a new replay: the previous step's outputs are consumed
                torch.compiler.cudagraph_mark_step_begin()
            logits = step_fn(new, position, cache, rows)
            position += 1
            cache.length += 1
        elif use_cache:
            logits = model(new, cache, head_rows=rows)[:, -1]
        else:
            tokens = torch.cat([tokens, new], 1)
            logits = model(tokens)[:, -1, :rows]
    return codes


def prompt_seeds(seed: int, prompts: Sequence[str]) -> list[int]:
    """Per prompt, its sampling seed from (seed, its text, how many times that text came before it).

    The same prompt and seed give the same images in any batch, process or task (task=generate,
    an evaluation grid); a prompt repeated in one run gets new images at each repeat.
    """
    seen: Counter[str] = Counter()
    seeds = []
    for prompt in prompts:
        digest = hashlib.sha256(f"{seed}|{seen[prompt]}|{prompt}".encode()).digest()
        seeds.append(int.from_bytes(digest[:8], "little") >> 1)  # below 2**63: any torch generator takes it
        seen[prompt] += 1
    return seeds


class Generator:
    """A trained GPT with its tokenizer and VQGAN: prompts in, codes and images out.

    `record` is the checkpoint's (t2i.checkpoints.GPTRecord): GPT config, tokenizer, VQGAN identity,
    training options, sampling defaults.
    """

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, vqgan: VQModel, record: GPTRecord,
                 decode: str = "eager"):
        if decode not in DECODES:
            raise ValueError(f"sampling.decode must be one of {DECODES}, got {decode!r}")
        self.gpt, self.tokenizer, self.vqgan = gpt.eval(), tokenizer, vqgan.eval()
        self.record, self.decode_mode = record, decode

    @classmethod
    def from_checkpoint(cls, path: str | Path, vqgan_ckpt: str | Path | None = None, device: str = "cpu",
                        decode: str = "eager") -> Generator:
        """Everything from a GPT checkpoint; the VQGAN it names (or `vqgan_ckpt`) must match its hash."""
        gpt, record = load_gpt(path)
        vqgan = load_record_vqgan(record, str(path), vqgan_ckpt)
        return cls(gpt.to(device), record.tokenizer_model(), vqgan.to(device), record, decode)

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_emb.weight.device

    @torch.no_grad()
    def sample_codes(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16,
                     seeds: Sequence[int] | None = None) -> torch.Tensor:
        """Codes [len(prompts) * samples_per_prompt, h, w], the samples of a prompt adjacent.

        Prompt i is sampled with seeds[i], by default prompt_seeds(cfg.seed, prompts): the codes do not
        depend on batch_size.
        """
        if any(not p.strip() for p in prompts):
            warnings.warn("an empty prompt generates unconditionally (the null text)")
        if seeds is None and cfg.seed is not None:
            seeds = prompt_seeds(cfg.seed, prompts)
        h, w = self.record.grid
        codes = []
        per_batch = max(1, batch_size // cfg.samples_per_prompt)
        for start in range(0, len(prompts), per_batch):
            text = self.tokenizer(prompts[start:start + per_batch]).to(self.device)
            batch_seeds = None if seeds is None else seeds[start:start + per_batch]
            codes.append(generate_codes(self.gpt, text, cfg, seeds=batch_seeds, decode=self.decode_mode).view(-1, h, w))
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Codes [N, h, w] -> uint8 images [N, 3, H, W] on the CPU."""
        return torch.cat([decode_to_uint8(self.vqgan, chunk).cpu() for chunk in codes.split(batch_size)])

    def __call__(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16) -> torch.Tensor:
        """uint8 images [len(prompts) * samples_per_prompt, 3, H, W], the samples of a prompt adjacent."""
        return self.decode(self.sample_codes(prompts, cfg, batch_size), batch_size)


def resolve_sampling(options: dict, checkpoint_defaults: dict | None = None) -> SamplingConfig:
    """Sampling options: those given (not None) win over the checkpoint's (what its training grids used)."""
    merged = {**(checkpoint_defaults or {}), **{k: v for k, v in options.items() if v is not None}}
    return SamplingConfig(**merged)


def decode_to_uint8(vqgan: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, h, w] -> uint8 images [B, 3, H, W]."""
    pixels = vqgan.decode(codes).float()
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_captioned_grid(images: torch.Tensor, prompts: list[str], path: str | Path, samples_per_prompt: int) -> None:
    """A PNG grid, one row per prompt, and beside it `<name>.md` with the row captions.

    The captions go in a text file because a font that draws Chinese is not on every machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(images.float() / 255, path, nrow=samples_per_prompt, padding=2)
    path.with_suffix(".md").write_text(
        f"![samples]({path.name})\n\nRows, top to bottom:\n\n" + "".join(f"{i + 1}. {p}\n" for i, p in enumerate(prompts)),
        encoding="utf-8")
