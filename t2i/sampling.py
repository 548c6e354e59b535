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
int, attention over the filled part), "static" (GPT.forward_at: fixed shapes, the position a tensor),
"compiled" (the static step through torch.compile; on CUDA mode "reduce-overhead", which captures
it once as a CUDA graph and replays it: no per-kernel launch cost, the gpt-fast / LlamaGen pattern)
or "frozen" (compiled with the weights folded in as constants: `frozen_step`).

Guidance schedules move the scale over the image positions t = 0 .. T-1, from 1 at the first to the given
scale g at the last: constant (g everywhere), a linear ramp (VAR: 1 + (g - 1) t / (T - 1)), power-cosine
(RAR: 1 + (g - 1) (1 - cos(pi (t / (T - 1))^p)) / 2), and an interval (LlamaGen's cfg_interval: positions with
start <= t / T < end) outside which the scale is 1.

Captions go the other way (`generate_text`): image codes -> text through the `[I2T] codes [BOT] text`
direction, with the same cache and filtering: greedy, sampled (temperature, top-k, top-p, a seed
per image) or beam search.

`method="sjd"` is speculative Jacobi decoding (Teng et al. 2024, arXiv 2410.01699): each model call
verifies a window of draft codes at once and keeps the sampling distribution exactly; see
`_sjd_codes`.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
import types
import warnings
import weakref
from collections import Counter, OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from t2i.checkpoints import GPTRecord, load_gpt, load_record_vqgan
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.models.gpt import GPT
from t2i.models.int8 import quantize_weights
from t2i.models.layout import SuperresGrid
from t2i.models.vqgan import VQModel


def check_filtering(group: str, temperature: float, top_k: int, top_p: float) -> None:
    """The temperature and top-k/top-p of images (group "sampling") or captions ("caption"), or an error naming them."""
    if temperature <= 0:
        raise ValueError(f"{group}.temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"{group}.top_k must be >= 0 and {group}.top_p in (0, 1], got {top_k}, {top_p}")


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely codes (0: all)
    top_p: float = 1.0  # keep the smallest set of codes whose probability reaches p (1: all)
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = none (no null-text half is run)
    greedy: bool = False  # argmax instead of sampling
    samples_per_prompt: int = 1
    seed: int | None = None
    # how the guidance scale moves over the image positions: constant, linear (VAR), power_cosine (RAR)
    guidance_schedule: str = "constant"
    guidance_power: float = 2.75  # power_cosine's exponent p (RAR-B's released value)
    # guidance only for image positions t with start <= t / image_len < end (scale 1 elsewhere)
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    method: str = "ar"  # "ar": one position per model call; "sjd": speculative Jacobi decoding
    sjd_window: int = 16  # draft codes verified per model call (method=sjd)

    def __post_init__(self):
        check_filtering("sampling", self.temperature, self.top_k, self.top_p)
        if self.samples_per_prompt < 1:
            raise ValueError(f"sampling.samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"sampling.guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, "
                             f"got {self.guidance_schedule!r}")
        if self.guidance_power <= 0:
            raise ValueError(f"sampling.guidance_power must be > 0, got {self.guidance_power}")
        interval = tuple(self.guidance_interval)  # a list from YAML
        if len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1:
            raise ValueError(f"sampling.guidance_interval must be [start, end] with 0 <= start < end <= 1 (fractions "
                             f"of the image positions), got {self.guidance_interval}")
        self.guidance_interval = (float(interval[0]), float(interval[1]))
        if self.method not in METHODS:
            raise ValueError(f"sampling.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.sjd_window < 1:
            raise ValueError(f"sampling.sjd_window must be >= 1, got {self.sjd_window}")


GUIDANCE_SCHEDULES = ("constant", "linear", "power_cosine")
METHODS = ("ar", "sjd")


@dataclass
class SamplingStats:
    """Model calls made, and how many token-by-token sampling (method=ar) would have made for the same codes."""
    model_calls: int = 0
    token_by_token_calls: int = 0

    @property
    def speedup(self) -> float:
        return self.token_by_token_calls / max(self.model_calls, 1)


def guidance_scales(cfg: SamplingConfig, image_len: int) -> torch.Tensor:
    """The guidance scale at each image position [image_len] (float32, as the logits are guided)."""
    position = torch.arange(image_len, dtype=torch.float64)
    ramp = position / max(image_len - 1, 1)  # 0 at the first position, 1 at the last: the ramps end at g exactly
    g = cfg.guidance_scale
    if cfg.guidance_schedule == "constant":
        scales = torch.full_like(ramp, g)
    elif cfg.guidance_schedule == "linear":
        scales = 1 + (g - 1) * ramp
    else:  # power_cosine
        scales = 1 + (g - 1) * (1 - torch.cos(math.pi * ramp ** cfg.guidance_power)) / 2
    start, end = cfg.guidance_interval
    inside = (position / image_len >= start) & (position / image_len < end)
    return torch.where(inside, scales, torch.ones_like(scales)).float()


def _guide(logits: torch.Tensor, n: int, scales: torch.Tensor) -> torch.Tensor:
    """Rows [cond (n); uncond (n)] -> uncond + scale * (cond - uncond); where the scale is 1 (or the
    unconditional half is no longer run) the conditional logits as they are, so every path agrees."""
    cond, uncond = logits[:n], logits[n:]
    if not len(uncond):
        return cond
    return torch.where(scales == 1, cond, uncond + scales * (cond - uncond))


DECODES = ("eager", "static", "compiled", "frozen")

# torch.compile keeps at most dynamo's recompile_limit (8) compilations of one function, and every batch size a
# model's compiled step runs at is one compilation of its copy of forward_at: allow that many (set around each call)
STEP_COMPILATIONS = 256

# Frozen steps kept per model: those of the most recently used batch sizes. Every size kept holds a KV cache and
# its own compilation, with a packed copy of the weights in it (about the weights' size again: +75-100 MB per
# size for a 56 MB GPT), so sizes are not kept without bound; a run at a fixed batch size uses two (its full
# batches and the last, partial one) and compiles each once. A caller that cycles through more sizes
# recompiles (~30 s at the base size on two CPU cores) each time a size comes back.
FROZEN_BATCH_SIZES = 2


class CompiledStep:
    """GPT.forward_at through torch.compile, under a code object of its own; called as step(model, token,
    position, cache, head_rows).

    Why its own code object: dynamo keeps what it compiles on the compiled function's code object for the life
    of the process, and a frozen compilation holds the weights and the KV cache it was compiled with; with a
    copy of forward_at's code per step, `release` drops this step's compilations (and so the memory they hold)
    and nothing else (torch.compiler.reset would drop every compiled function of the process).
    """

    def __init__(self, frozen: bool, cuda: bool):
        method = GPT.forward_at
        self._code = method.__code__.replace()  # a new code object, the same bytecode
        function = types.FunctionType(self._code, method.__globals__, method.__name__)
        mode = "max-autotune" if frozen else "reduce-overhead" if cuda else None
        self._step = torch.compile(function, mode=mode, fullgraph=True, dynamic=False)
        self.frozen = frozen

    def __call__(self, model: GPT, *args) -> torch.Tensor:
        """Each call a new replay (of the CUDA graph, on CUDA): the outputs of the call before may be overwritten."""
        torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=STEP_COMPILATIONS), \
                torch._inductor.config.patch(freezing=self.frozen):
            return self._step(model, *args)

    def release(self) -> None:
        torch._dynamo.reset_code(self._code)  # no public API drops one function's compilations


@dataclass
class _ModelSteps:
    """One model's compiled steps. Holds no reference to the model, so that the model is freed when its
    caller drops it; the model's finalizer then releases these."""
    compiled: CompiledStep | None = None
    frozen: OrderedDict = field(default_factory=OrderedDict)  # batch size -> (CompiledStep, KVCache), oldest first
    generating: threading.Lock = field(default_factory=threading.Lock)  # one frozen generation at a time

    def release(self) -> None:
        for step in [self.compiled, *(step for step, _ in self.frozen.values())]:
            if step is not None:
                step.release()
        self.compiled = None
        self.frozen.clear()


_model_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # GPT -> _ModelSteps
_model_steps_lock = threading.Lock()  # creating a model's entry


def _steps_of(model: GPT, compiled: bool = False) -> _ModelSteps:
    """The model's entry, made on first use (with its compiled step when `compiled`)."""
    with _model_steps_lock:
        steps = _model_steps.get(model)
        if steps is None:
            steps = _model_steps[model] = _ModelSteps()
            weakref.finalize(model, steps.release).atexit = False  # nothing to free at exit
        if compiled and steps.compiled is None:
            steps.compiled = CompiledStep(frozen=False, cuda=model.tok_emb.weight.is_cuda)
        return steps


def compiled_step(model: GPT):
    """model.forward_at through torch.compile (sampling.decode=compiled): compiled once per model and batch size;
    on CUDA mode "reduce-overhead" (a CUDA graph). Its compilations are dropped when the model is."""
    return functools.partial(_steps_of(model, compiled=True).compiled, model)


@contextmanager
def frozen_step(model: GPT, batch_size: int):
    """The frozen step of this model at this batch size with its KV cache, emptied (sampling.decode=frozen), held
    for one generation: `with frozen_step(model, n) as (step, cache): ... step(token, position, cache, rows)`.

    Frozen: model.forward_at compiled with the weights in it as constants (inductor's freezing) and the matrix
    products autotuned (mode "max-autotune"; a CUDA graph on GPUs as well). Why: with constant weights inductor
    pre-packs them for its own C++ GEMM, which it times against the BLAS call and keeps where faster; at batch 1
    on a CPU that reads the weights on every core, where torch's matrix-vector product reads each one through a
    single core (~2.5x faster per step at the base size: experiments/RESULTS.md). The costs: the first call at
    each batch size compiles and autotunes (~30 s at the base size on two CPU cores); each batch size kept
    (FROZEN_BATCH_SIZES, the most recently used) holds a packed copy of the weights and a KV cache, dropped with
    the model; the weights must not change after the first call (the step would keep the old ones: build a new
    model); and which kernel autotuning keeps can change the last bits of the logits from run to run.

    The step is compiled for its cache's buffers, so the cache is reused from one generation to the next: a
    second frozen generation of the same model (another thread) waits until the first is done.
    torch.compile's `options` do not reach the freezing switch, so it is set around each call (the first call,
    and any recompilation, happen inside one).
    """
    steps = _steps_of(model)
    with steps.generating:
        if batch_size in steps.frozen:
            steps.frozen.move_to_end(batch_size)
        else:
            steps.frozen[batch_size] = (CompiledStep(frozen=True, cuda=model.tok_emb.weight.is_cuda),
                                        model.new_cache(batch_size))
            while len(steps.frozen) > FROZEN_BATCH_SIZES:
                steps.frozen.popitem(last=False)[1][0].release()
        step, cache = steps.frozen[batch_size]
        # stale keys and values past a position are masked (weight 0); the first forward sets `caption`
        cache.length = 0
        yield functools.partial(step, model), cache


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


def derived_seed(key: str) -> int:
    """A seed from a text (a seed and what it is for): the first 8 bytes of its sha256, below 2**63 so that any
    torch generator takes it; the same on every machine and Python (unlike hash())."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def _prompt_uniforms(seeds: Sequence[int] | None, n_prompts: int, samples_per_prompt: int, steps: int,
                    device: torch.device) -> torch.Tensor:
    """Uniform draws [n_prompts * samples_per_prompt, steps] in [0, 1): prompt i's rows from its own
    generator seeded with seeds[i] (unseeded: torch's global generator). float32 whatever the default dtype:
    trainer.precision=bf16-true makes it bf16, whose 8-bit mantissa leaves ~190 distinct values in 256 draws."""
    if seeds is None:
        return torch.rand(n_prompts * samples_per_prompt, steps, device=device, dtype=torch.float32)
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    # CPU generators: the same seed gives the same draws on every device.
    draws = [torch.rand(samples_per_prompt, steps, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
             for seed in seeds]
    return torch.cat(draws).to(device)


def _draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row of probs [B, V], the first index whose cumulative probability
    exceeds uniforms [B] (in [0, 1)) times the row's total. Zero-probability indices are never drawn."""
    # float64: the tail of a 16k-code distribution keeps its mass, and a float32 u (at most 1 - 2^-24)
    # times the total stays below the total, so some index always exceeds it.
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)


def _row_generators(seeds: Sequence[int] | None, n_prompts: int, samples_per_prompt: int,
                    greedy: bool) -> list[torch.Generator]:
    """One CPU generator per sequence (sample s of prompt i), seeded from (seeds[i], s): speculative decoding
    draws a varying number of values per sequence, so each needs its own stream for its codes to depend
    neither on the other prompts of its batch nor on how many samples its prompt has."""
    if seeds is None:  # unseeded: from torch's global generator (greedy draws only drafts, which never change its codes)
        seeds = [0] * n_prompts if greedy else torch.randint(2 ** 62, (n_prompts,)).tolist()
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    generators = []
    for seed in seeds:
        for sample in range(samples_per_prompt):
            generators.append(torch.Generator().manual_seed(derived_seed(f"{seed}|sample {sample}")))
    return generators


@torch.no_grad()
def generate_codes(model: GPT, text: torch.Tensor, cfg: SamplingConfig, use_cache: bool = True,
                   seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                   decode: str = "eager", low: torch.Tensor | None = None, window: int = 0,
                   known: torch.Tensor | None = None, samples: range | None = None) -> torch.Tensor:
    """Text ids [P, text_len] -> image codes [P * samples_per_prompt, image_len] (samples of a prompt adjacent).

    Prompt i samples from its own random stream, seeded with seeds[i]; by default cfg.seed + i
    (unseeded when cfg.seed is None). `stats`, when given, counts the model calls. `decode`: how each
    step of method=ar runs (DECODES; the module docstring); SJD's windows run eagerly.
    `samples`: only these of each prompt's cfg.samples_per_prompt samples (a range; default all), codes
    [P * len(samples), image_len], each sample's the codes the whole call gives it: a prompt's samples may
    be split over calls (`sampling_batches`).

    Conditional sampling (a superres model): `low` [P, low_len] are each prompt's low-resolution codes
    and `window` the window that follows (TokenLayout.prefix); `known` [P * samples_per_prompt, image_len]
    holds codes already fixed (-1 where a code is to be sampled): they are fed as they are, as CogView's
    sliding windows feed the overlap with the windows before. `superres_codes` runs the windows.
    """
    if decode not in DECODES:
        raise ValueError(f"sampling.decode must be one of {DECODES}, got {decode!r}")
    gpt = model.cfg
    stats = stats if stats is not None else SamplingStats()
    if seeds is None and cfg.seed is not None:
        seeds = [cfg.seed + i for i in range(len(text))]
    n_prompts = len(text)
    samples = range(cfg.samples_per_prompt) if samples is None else samples
    if samples.step != 1 or not 0 <= samples.start < samples.stop <= cfg.samples_per_prompt:
        raise ValueError(f"samples must be a range of consecutive sample indices within "
                         f"0..{cfg.samples_per_prompt - 1} (sampling.samples_per_prompt), got {samples}")
    text = text.repeat_interleave(len(samples), dim=0)
    if low is not None:
        low = low.flatten(1).repeat_interleave(len(samples), dim=0)
    if known is not None and known.shape != (len(text), gpt.image_len):
        raise ValueError(f"known codes must be [sequences={len(text)}, image_len={gpt.image_len}], got {tuple(known.shape)}")
    layout = model.layout
    prefix = layout.prefix(text, low, window)
    scales = guidance_scales(cfg, gpt.image_len).to(prefix.device)
    # the null-text half runs until the last position whose scale is not 1 (never when none is)
    guided = (scales != 1).nonzero()
    guided_until = int(guided.max()) + 1 if len(guided) else 0
    if guided_until:  # the null text (all padding) as the unconditional half
        prefix = torch.cat([prefix, layout.prefix(layout.null_text(text), low, window)])
    stats.token_by_token_calls += gpt.image_len
    if cfg.method == "sjd":
        if known is not None:
            raise ValueError("sampling.method=sjd does not take known codes (windowed super-resolution): use method=ar")
        if not use_cache:
            raise ValueError("sampling.method=sjd runs on the KV cache (use_cache=True)")
        generators = _row_generators(seeds, n_prompts, cfg.samples_per_prompt, cfg.greedy)
        generators = [g for row, g in enumerate(generators) if row % cfg.samples_per_prompt in samples]
        return _sjd_codes(model, prefix, len(text), cfg, scales, guided_until, generators, stats)
    uniforms = None if cfg.greedy else _prompt_uniforms(seeds, n_prompts, cfg.samples_per_prompt, gpt.image_len,
                                                       text.device)
    if uniforms is not None:  # the prompt's streams are drawn whole, then the wanted samples' rows kept
        uniforms = uniforms.view(n_prompts, cfg.samples_per_prompt, -1)[:, samples.start:samples.stop].flatten(0, 1)
    if use_cache and decode == "frozen":  # the frozen step and its cache are this generation's until it ends
        with frozen_step(model, len(prefix)) as (step_fn, cache):
            return _ar_codes(model, prefix, len(text), cfg, scales, guided_until, uniforms, known, stats, cache,
                             step_fn)
    cache = model.new_cache(len(prefix)) if use_cache else None
    step_fn = None
    if use_cache and decode != "eager":
        step_fn = model.forward_at if decode == "static" else compiled_step(model)
    return _ar_codes(model, prefix, len(text), cfg, scales, guided_until, uniforms, known, stats, cache, step_fn)


def _ar_codes(model: GPT, prefix: torch.Tensor, n: int, cfg: SamplingConfig, scales: torch.Tensor,
              guided_until: int, uniforms: torch.Tensor | None, known: torch.Tensor | None, stats: SamplingStats,
              cache, step_fn) -> torch.Tensor:
    """Token-by-token sampling: prefix [n (+ n null-text rows), L] -> codes [n, image_len]. `cache` None
    recomputes the whole sequence at every step; `step_fn` None runs each step eagerly, else it is a fixed-shape
    step (token, position, cache, head_rows) over `cache`."""
    gpt = model.cfg
    use_cache = cache is not None
    codes = torch.empty(n, gpt.image_len, dtype=torch.long, device=prefix.device)
    tokens = prefix
    rows = gpt.n_image_codes  # image positions produce image codes only
    if use_cache:  # the last position over the image codes: the rest of the head is never read
        logits = model(prefix, cache, last=1, head_rows=rows)[:, -1]
    else:  # EasyNLP's loop: every position, the whole head
        logits = model(prefix)[:, -1, :rows]
    stats.model_calls += 1
    if step_fn is not None:
        position = torch.full((1,), cache.length, dtype=torch.long, device=prefix.device)
    for i in range(gpt.image_len):
        logits = _guide(logits.float(), n, scales[i])
        if cfg.greedy:
            step = logits.argmax(-1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            step = _draw(probs, uniforms[:, i])
        if known is not None:  # a fixed code is fed as it is (its draw is spent all the same: streams stay aligned)
            step = torch.where(known[:, i] >= 0, known[:, i], step)
        codes[:, i] = step
        if i == gpt.image_len - 1:
            break
        # past the guided positions only the conditional half runs (the cache's first n rows); a fixed-shape
        # step keeps its batch, both halves (where the scale is 1 the conditional logits are taken as they are)
        halves = 2 if i + 1 < guided_until or (step_fn is not None and guided_until) else 1
        new = step.repeat(halves)[:, None]
        if step_fn is not None:
            logits = step_fn(new, position, cache, rows)
            position += 1
            cache.length += 1
        elif use_cache:
            logits = model(new, cache, head_rows=rows)[:, -1]
        else:
            tokens = torch.cat([tokens[:len(new)], new], 1)
            logits = model(tokens)[:, -1, :rows]
        stats.model_calls += 1
    return codes


def _sjd_codes(model: GPT, prefix: torch.Tensor, n: int, cfg: SamplingConfig, scales: torch.Tensor,
               guided_until: int, generators: list[torch.Generator], stats: SamplingStats) -> torch.Tensor:
    """Speculative Jacobi decoding (Teng et al. 2024): prefix [n (+ n null-text rows), L] -> codes [n, image_len].

    Each model call feeds the last committed code and every sequence's window of draft codes (the KV
    cache is first rolled back to the committed codes: later writes overwrite the rest), then verifies
    each sequence's drafts left to right as speculative sampling does: a draft x drawn from q is
    accepted with probability min(1, p(x) / q(x)), p the model's distribution given the codes before it
    (guided, tempered and filtered as token-by-token sampling does); at the first rejection the code is
    drawn from the residual max(0, p - q) normalised, and when the whole window is accepted the call's
    last output gives one more code. So every code is distributed as token-by-token sampling draws it,
    and every call gives at least one. The unverified rest of the window becomes the next drafts, drawn
    from this call's p at those positions (the Jacobi iteration; q = that p), and the positions new to
    the window start as uniformly random codes with q a point mass on the drawn code (the paper's
    random initialisation; accepted with probability p(x)). Greedy: a draft is accepted when it is the
    argmax, which gives exactly the greedy codes.

    Batches: sequences accept different numbers of codes. Each keeps its own count (`done`) and random
    stream; the cache keeps the codes all sequences have accepted (the minimum) and the sequences ahead
    re-feed theirs. A sequence more than a window ahead waits (draws nothing) until the others catch
    up, so each sequence's codes are those it gets alone.
    """
    gpt = model.cfg
    T, V, W = gpt.image_len, gpt.n_image_codes, cfg.sjd_window
    device = prefix.device
    start = prefix.shape[1] - 1  # the position of the token before the first code
    cache = model.new_cache(len(prefix))
    if start:  # the prompt but its last token, which the first window feeds
        model(prefix[:, :-1], cache, last=1, head_rows=1)
        stats.model_calls += 1
    before = prefix[:, -1]  # each row's token before code 0 (the null text's own in the unconditional half)
    scales = torch.cat([scales, scales.new_ones(1)])[:, None]  # position T: the output past the last code (unused)
    tokens = torch.zeros(n, T + W, dtype=torch.long, device=device)  # codes before done[i], then the drafts
    done = torch.zeros(n, dtype=torch.long, device=device)
    steps = torch.arange(W, device=device)
    # random numbers in float32 whatever the default dtype (_prompt_uniforms)
    init = torch.stack([torch.rand(W, generator=g, dtype=torch.float32) for g in generators]).to(device)
    drafts = (init * V).long().clamp(max=V - 1)
    q = F.one_hot(drafts, V).float()  # each draft's distribution
    while True:
        c = int(done.min())  # codes every sequence has accepted
        if c == T:
            return tokens[:, :T]
        active = (done < T) & (done - c <= W)
        ends = (done + W).clamp(max=T)  # each verifies its drafts at done .. ends - 1
        count = torch.where(active, ends - done, 0)
        end = int(ends[active].max())  # the window: codes c .. end - 1 (a waiting sequence's own beyond it wait too)
        tokens.scatter_(1, done[:, None] + steps, drafts)
        halves = 2 if c < guided_until else 1
        first = before[:halves * n] if c == 0 else tokens[:, c - 1].repeat(halves)
        window = torch.cat([first[:, None], tokens[:, c:end].repeat(halves, 1)], 1)
        cache.length = start + c
        logits = _guide(model(window, cache, head_rows=V).float(), n, scales[c:end + 1])  # output j: code c + j
        stats.model_calls += 1
        # the window's outputs at each sequence's positions done .. done + W
        at = ((done - c)[:, None] + torch.arange(W + 1, device=device)).clamp(max=end - c)
        draws = torch.zeros(n, 3 * W + 1, dtype=torch.float32)
        for row in active.nonzero().squeeze(1).tolist():
            draws[row] = torch.rand(3 * W + 1, generator=generators[row], dtype=torch.float32)
        draws = draws.to(device)
        u_accept, u_code, u_draft, u_init = draws[:, :W], draws[:, W], draws[:, W + 1:2 * W + 1], draws[:, 2 * W + 1:]
        if cfg.greedy:
            best = logits.argmax(-1).gather(1, at)  # [n, W + 1]
            accepted = (drafts == best[:, :W]) & (steps < count[:, None])
            m = accepted.long().cumprod(1).sum(1)  # drafts accepted, in order
            code = best.gather(1, m[:, None]).squeeze(1)
        else:
            probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
            p = probs.gather(1, at[..., None].expand(-1, -1, V))  # [n, W + 1, V]
            px = p[:, :W].gather(-1, drafts[..., None]).squeeze(-1)
            qx = q.gather(-1, drafts[..., None]).squeeze(-1)  # > 0: each draft was drawn from its q
            accepted = (u_accept < px / qx) & (steps < count[:, None])
            m = accepted.long().cumprod(1).sum(1)
            p_m = p.gather(1, m[:, None, None].expand(-1, 1, V)).squeeze(1)
            q_m = q.gather(1, m.clamp(max=W - 1)[:, None, None].expand(-1, 1, V)).squeeze(1)
            residual = (p_m - q_m).clamp_min(0)
            # rejected: the residual; the window all accepted: the next position's p (p == q up to rounding: p)
            rejected = (m < count) & (residual.sum(-1) > 0)
            code = _draw(torch.where(rejected[:, None], residual, p_m), u_code)
        new = active & (done + m < T)  # the window all accepted up to the last code gives none more
        rows = new.nonzero().squeeze(1)
        tokens[rows, done[rows] + m[rows]] = code[rows]
        # the next window: positions new_done + k, which this call's outputs cover up to ends
        source = m[:, None] + 1 + steps  # their index in `at`
        refined = source <= count[:, None]
        random = (u_init * V).long().clamp(max=V - 1)
        if cfg.greedy:
            drafted = best.gather(1, source.clamp(max=W))
            q_next = q
        else:
            p_source = p.gather(1, source.clamp(max=W)[..., None].expand(-1, -1, V))
            drafted = _draw(p_source.flatten(0, 1), u_draft.flatten()).view(n, W)
            q_next = torch.where(refined[..., None], p_source, F.one_hot(random, V).float())
        drafts = torch.where(active[:, None], torch.where(refined, drafted, random), drafts)
        q = torch.where(active[:, None, None], q_next, q)
        done = torch.where(active, (done + m + 1).clamp(max=T), done)


# ---------------------------------------------------------------------------------------------
# Captions: image codes -> text, through the `[I2T] codes [BOT] text` direction

CAPTION_STRATEGIES = ("greedy", "sample", "beam")


@dataclass
class CaptionConfig:
    """How captions are decoded (eval.py task=caption: the `caption.*` options)."""
    strategy: str = "greedy"  # greedy (argmax), sample (temperature, top-k, top-p) or beam (beam search)
    temperature: float = 1.0
    top_k: int = 0  # keep the k most likely text ids (0: all)
    top_p: float = 1.0  # keep the smallest set of text ids whose probability reaches p (1: all)
    num_beams: int = 4  # strategy=beam
    length_penalty: float = 1.0  # strategy=beam: a finished beam is ranked by log p / length ** length_penalty
    seed: int | None = 0  # strategy=sample: with the image's key, each image's seed (null: unseeded)

    def __post_init__(self):
        if self.strategy not in CAPTION_STRATEGIES:
            raise ValueError(f"caption.strategy must be one of {', '.join(CAPTION_STRATEGIES)}, got {self.strategy!r}")
        check_filtering("caption", self.temperature, self.top_k, self.top_p)
        if self.num_beams < 1:
            raise ValueError(f"caption.num_beams must be >= 1, got {self.num_beams}")


@torch.no_grad()
def generate_text(model: GPT, codes: torch.Tensor, cfg: CaptionConfig,
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """Image codes [B, h, w] (or [B, image_len]) -> caption ids [B, text_len] (tokenizer ids), through the
    image-to-text direction with the KV cache.

    A caption ends at the first padding (tokenizer id 0) the model predicts, and every position after it
    is padding; one that never predicts it runs to text_len. Text positions compete among the text ids
    only, as in training. strategy=sample draws image i's caption from its own stream (seeds[i]; by
    default cfg.seed + i, unseeded when cfg.seed is None), so it does not depend on the batch.
    """
    layout = model.layout
    prefix = layout.caption_prefix(codes)  # a clear error for a layout without a text head
    if cfg.strategy == "beam" and cfg.num_beams > 1:
        return _beam_text(model, prefix, cfg)
    n, length, rows = len(prefix), layout.text_len, layout.text_rows
    uniforms = None
    if cfg.strategy == "sample":
        if seeds is None and cfg.seed is not None:
            seeds = [cfg.seed + i for i in range(n)]
        uniforms = _prompt_uniforms(seeds, n, 1, length, prefix.device)
    text = torch.zeros(n, length, dtype=torch.long, device=prefix.device)
    ended = torch.zeros(n, dtype=torch.bool, device=prefix.device)
    cache = model.new_cache(n)
    logits = model(prefix, cache, last=1, head_rows=rows)[:, -1]
    for i in range(length):
        logits = logits.float()
        if uniforms is None:  # greedy, or a beam of one
            step = logits.argmax(-1)
        else:
            step = _draw(filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1), uniforms[:, i])
        step = step.masked_fill(ended, 0)  # an ended caption is padded, as in training
        text[:, i] = step
        ended |= step == 0
        if i == length - 1 or bool(ended.all()):
            break
        logits = model((step + layout.text_offset)[:, None], cache, head_rows=rows)[:, -1]
    return text


def _beam_text(model: GPT, prefix: torch.Tensor, cfg: CaptionConfig) -> torch.Tensor:
    """Beam search: the prefixes [n, L] -> the best of cfg.num_beams beams per image [n, text_len].

    Each step keeps the K most likely continuations (sum of log-probabilities) of the K beams; a beam
    that has ended continues with padding at no cost. At the end each image's beams are ranked by
    log p / length ** length_penalty, the length counting the end (padding) token; beams that never
    end all have text_len tokens, so the penalty does not change their order."""
    layout = model.layout
    n, k, length, rows = len(prefix), cfg.num_beams, layout.text_len, layout.text_rows
    vocab = layout.n_text_tokens
    device = prefix.device
    cache = model.new_cache(n * k)
    logits = model(prefix, cache, last=1, head_rows=rows)[:, -1]  # the prefix once per image
    cache.reorder(torch.arange(n, device=device).repeat_interleave(k))  # then in each of its beams
    log_probs = logits.float().log_softmax(-1).repeat_interleave(k, 0)
    # scores and lengths in float32 whatever the default dtype (bf16 under bf16-true)
    scores = torch.full((n, k), float("-inf"), device=device, dtype=torch.float32)
    scores[:, 0] = 0  # the beams start equal: only the first one expands at the first step
    padding_only = torch.full((vocab,), float("-inf"), device=device, dtype=torch.float32)
    padding_only[0] = 0
    text = torch.zeros(n * k, length, dtype=torch.long, device=device)
    ended = torch.zeros(n * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(n * k, device=device, dtype=torch.float32)
    for i in range(length):
        log_probs = torch.where(ended[:, None], padding_only, log_probs)
        scores, best = (scores.view(-1, 1) + log_probs).view(n, k * vocab).topk(k, dim=-1)
        parents = (torch.arange(n, device=device)[:, None] * k + best // vocab).flatten()
        step = (best % vocab).flatten()
        text, ended, lengths = text[parents], ended[parents], lengths[parents]
        text[:, i] = step
        lengths += (~ended).float()
        ended = ended | (step == 0)
        if i == length - 1 or bool(ended.all()):
            break
        cache.reorder(parents)
        log_probs = model((step + layout.text_offset)[:, None], cache, head_rows=rows)[:, -1].float().log_softmax(-1)
    ranked = scores / lengths.view(n, k).clamp_min(1) ** cfg.length_penalty
    return text.view(n, k, length)[torch.arange(n, device=device), ranked.argmax(-1)]
def _window_seed(seed: int, window: int) -> int:
    """Window k's seed from its prompt's: window 0 takes the prompt's own (one-pass super-resolution samples as
    generate_codes does), the others one derived from (seed, k)."""
    if window == 0:
        return seed
    return derived_seed(f"{seed}|window {window}")


@torch.no_grad()
def superres_codes(model: GPT, grid: SuperresGrid, text: torch.Tensor, low: torch.Tensor, cfg: SamplingConfig,
                   seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                   decode: str = "eager") -> torch.Tensor:
    """A super-resolution GPT: text ids [P, text_len] and low-resolution codes [P, h, w] -> the 2x grid's codes
    [P * samples_per_prompt, H, W] (samples of a prompt adjacent).

    One pass when one window covers the grid; else CogView's sliding windows: the windows are sampled in
    raster order, each given the whole low-resolution grid and its own [WIN_k] token, and the codes it shares
    with windows already sampled are fed as they are (generate_codes' `known`), so neighbouring windows agree
    on their overlap. Prompt i's window k draws from its own stream (seeds[i] for window 0).
    """
    layout = model.layout
    if layout.kind != "superres":
        raise ValueError(f"super-resolution needs a superres-layout GPT (python train.py experiment=superres_shapes), "
                         f"not a {layout.kind} one")
    if (layout.windows, layout.image_len, layout.low_len) != (grid.windows, grid.window_len, grid.low_len):
        raise ValueError(f"the GPT's layout ({layout.windows} windows of {layout.image_len} codes after {layout.low_len} "
                         f"low-resolution codes) does not match the grid {grid.to_dict()}")
    if tuple(low.shape[1:]) != grid.low:
        raise ValueError(f"low-resolution codes must be [N, {grid.low[0]}, {grid.low[1]}], got {tuple(low.shape)}")
    if seeds is None and cfg.seed is not None:
        seeds = [cfg.seed + i for i in range(len(text))]
    high = torch.full((len(text) * cfg.samples_per_prompt, *grid.high), -1, dtype=torch.long, device=low.device)
    for window in range(grid.windows):
        known = grid.crop(high, window)
        codes = generate_codes(model, text, cfg, seeds=None if seeds is None else [_window_seed(s, window) for s in seeds],
                               stats=stats, decode=decode, low=grid.low_context(low, window), window=window,
                               known=known if bool((known >= 0).any()) else None)
        grid.paste(high, window, codes)
    return high


def prompt_seeds(seed: int, prompts: Sequence[str]) -> list[int]:
    """Per prompt, its sampling seed from (seed, its text, how many times that text came before it).

    The same prompt and seed give the same images in any batch, process or task (task=generate,
    an evaluation grid); a prompt repeated in one run gets new images at each repeat.
    """
    seen: Counter[str] = Counter()
    seeds = []
    for prompt in prompts:
        seeds.append(derived_seed(f"{seed}|{seen[prompt]}|{prompt}"))
        seen[prompt] += 1
    return seeds


def sampling_batches(n_prompts: int, samples_per_prompt: int, batch_size: int) -> list[tuple[range, range]]:
    """How `Generator.sample_codes` splits its sequences: (prompts, samples of each) per sampling batch, in
    order, at most `batch_size` sequences each. Whole prompts while their samples fit in a batch, else each
    prompt's samples in runs of `batch_size` (a sample's codes do not depend on the split: generate_codes)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sampling.batch_size must be an integer >= 1, got {batch_size!r}")
    if samples_per_prompt <= batch_size:
        per_batch = batch_size // samples_per_prompt
        return [(range(start, min(start + per_batch, n_prompts)), range(samples_per_prompt))
                for start in range(0, n_prompts, per_batch)]
    return [(range(prompt, prompt + 1), range(start, min(start + batch_size, samples_per_prompt)))
            for prompt in range(n_prompts) for start in range(0, samples_per_prompt, batch_size)]


class Generator:
    """A trained GPT with its tokenizer and VQGAN: prompts in, codes and images out.

    `record` is the checkpoint's (t2i.checkpoints.GPTRecord): GPT config, tokenizer, VQGAN identity,
    training options, sampling defaults. `decode` is how sampling steps run (DECODES) and `weights`
    what the sampler's weights are (t2i.models.int8.WEIGHTS): `sampler` is the GPT that samples,
    `gpt` the one loaded (which scores, e.g. Caption Loss).
    """

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, vqgan: VQModel, record: GPTRecord,
                 decode: str = "eager", weights: str = "unchanged"):
        if decode not in DECODES:
            raise ValueError(f"sampling.decode must be one of {DECODES}, got {decode!r}")
        if weights != "unchanged" and decode != "frozen":
            warnings.warn(f"sampling.weights={weights} is fast only with sampling.decode=frozen (torch's int8 kernels "
                          f"come with compilation); decode={decode} turns the weights back into bf16 at every step")
        self.gpt, self.tokenizer, self.vqgan = gpt.eval(), tokenizer, vqgan.eval()
        self.sampler = quantize_weights(self.gpt, weights)
        self.record, self.decode_mode = record, decode

    @classmethod
    def from_checkpoint(cls, path: str | Path, vqgan_ckpt: str | Path | None = None, device: str = "cpu",
                        decode: str = "eager", weights: str = "unchanged") -> Generator:
        """Everything from a GPT checkpoint; the VQGAN it names (or `vqgan_ckpt`) must match its hash."""
        gpt, record = load_gpt(path)
        vqgan = load_record_vqgan(record, str(path), vqgan_ckpt)
        return cls(gpt.to(device), record.tokenizer_model(), vqgan.to(device), record, decode, weights)

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_emb.weight.device

    @torch.no_grad()
    def sample_codes(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16,
                     seeds: Sequence[int] | None = None, stats: SamplingStats | None = None) -> torch.Tensor:
        """Codes [len(prompts) * samples_per_prompt, h, w], the samples of a prompt adjacent.

        At most `batch_size` sequences sample at once (`sampling_batches`; twice as many KV-cache rows with
        guidance). Prompt i is sampled with seeds[i], by default prompt_seeds(cfg.seed, prompts): the codes do
        not depend on batch_size. `stats`, when given, counts the model calls.
        """
        if any(not p.strip() for p in prompts):
            warnings.warn("an empty prompt generates unconditionally (the null text)")
        if seeds is None and cfg.seed is not None:
            seeds = prompt_seeds(cfg.seed, prompts)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        h, w = self.record.grid
        codes = []
        for rows, samples in sampling_batches(len(prompts), cfg.samples_per_prompt, batch_size):
            text = self.tokenizer(prompts[rows.start:rows.stop]).to(self.device)
            batch_seeds = None if seeds is None else seeds[rows.start:rows.stop]
            codes.append(generate_codes(self.sampler, text, cfg, seeds=batch_seeds, stats=stats,
                                        decode=self.decode_mode, samples=samples).view(-1, h, w))
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Codes [N, h, w] -> uint8 images [N, 3, H, W] on the CPU."""
        return torch.cat([decode_to_uint8(self.vqgan, chunk).cpu() for chunk in codes.split(batch_size)])

    def __call__(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16) -> torch.Tensor:
        """uint8 images [len(prompts) * samples_per_prompt, 3, H, W], the samples of a prompt adjacent."""
        return self.decode(self.sample_codes(prompts, cfg, batch_size), batch_size)


class SuperResolver(Generator):
    """A super-resolution GPT (layout "superres") with its tokenizer and VQGAN: prompts and low-resolution
    codes in, codes and images at twice the resolution out (CogView's super-resolution stage)."""

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, vqgan: VQModel, record: GPTRecord,
                 decode: str = "eager", weights: str = "unchanged"):
        if record.superres_grid is None:
            raise ValueError("not a super-resolution GPT (its checkpoint record has no superres entry): train one "
                             "with python train.py experiment=superres_shapes (stage.superres)")
        super().__init__(gpt, tokenizer, vqgan, record, decode, weights)
        self.grid = record.superres_grid

    @property
    def low_size(self) -> int:
        """The side of the low-resolution images its low codes were encoded from."""
        return self.record.superres["low_size"]

    @torch.no_grad()
    def encode_low(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [N, 3, S, S] -> their low-resolution codes [N, h, w] under this model's VQGAN, resized
        to low_size first (antialiased bicubic) when S differs."""
        x = images.to(self.device).float() / 127.5 - 1
        if x.shape[-1] != self.low_size or x.shape[-2] != self.low_size:
            x = F.interpolate(x, size=(self.low_size, self.low_size), mode="bicubic", antialias=True).clamp(-1, 1)
        return self.vqgan.encode(x)

    @torch.no_grad()
    def upsample_codes(self, prompts: list[str], low: torch.Tensor, cfg: SamplingConfig, batch_size: int = 16,
                       seeds: Sequence[int] | None = None, stats: SamplingStats | None = None) -> torch.Tensor:
        """Prompts and their low-resolution codes [len(prompts), h, w] -> 2x codes [len(prompts) * samples, H, W].
        Prompt i samples with seeds[i], by default prompt_seeds(cfg.seed, prompts): independent of batch_size."""
        if len(low) != len(prompts):
            raise ValueError(f"{len(low)} low-resolution grids for {len(prompts)} prompts")
        if seeds is None and cfg.seed is not None:
            seeds = prompt_seeds(cfg.seed, prompts)
        per_batch = max(1, batch_size // cfg.samples_per_prompt)
        out = []
        for start in range(0, len(prompts), per_batch):
            text = self.tokenizer(prompts[start:start + per_batch]).to(self.device)
            out.append(superres_codes(self.sampler, self.grid, text, low[start:start + per_batch].to(self.device), cfg,
                                      seeds=None if seeds is None else seeds[start:start + per_batch], stats=stats,
                                      decode=self.decode_mode))
        return torch.cat(out)


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
