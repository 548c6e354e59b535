"""What sampling is asked to do: the option dataclasses, their checks and the names they accept."""

from __future__ import annotations

import math
from dataclasses import dataclass

# how a step runs (sampling.step): t2i.sampling.steps; "auto" is one of the others, chosen by `auto_step_mode`
STEP_MODES = ("auto", "eager", "static", "compiled", "frozen")
METHODS = ("ar", "sjd")  # "ar": one position per model call; "sjd": speculative Jacobi decoding
# how SJD redraws a draft that its window did not reach (t2i.sampling.sjd): "maximal" keeps the previous draft as
# often as the new distribution allows (coupled, So et al. 2025), "none" draws it afresh (Teng et al. 2024)
SJD_COUPLINGS = ("maximal", "none")
GUIDANCE_SCHEDULES = ("constant", "linear", "power_cosine")
CAPTION_STRATEGIES = ("greedy", "sample", "beam")


def check_filtering(group: str, temperature: float, top_k: int, top_p: float) -> None:
    """The temperature and top-k/top-p of images (group "sampling") or captions ("caption"), or an error naming them."""
    if temperature <= 0:
        raise ValueError(f"{group}.temperature must be > 0, got {temperature}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"{group}.top_k must be >= 0 and {group}.top_p in (0, 1], got {top_k}, {top_p}")


def check_step_mode(step: str, runs: bool = False, setting: str = "sampling.step") -> None:
    """A step mode of STEP_MODES, or an error naming `setting` and listing them; `runs`: one that a generation
    runs, not "auto"."""
    if step not in STEP_MODES:
        raise ValueError(f"{setting} must be one of {', '.join(STEP_MODES)}, got {step!r}")
    if runs and step == "auto":
        raise ValueError(f"step=auto is chosen by the pipelines (T2IPipeline.resolve_step, or auto_step_mode): "
                         f"a generation runs one of {', '.join(STEP_MODES[1:])}")


# sampling.step=auto on a CPU: the image positions (sequences x image_len) a run must sample, per batch size
# compiled, for frozen steps to pay back their compile, by sequences per sampling batch (up to that many; above the
# largest, eager). A frozen step compiles and autotunes once per batch size (20-125 s on two cores) and then saves a
# fixed time per step, a gain that falls as the batch grows: at batch 1 its products read the weights on every
# core where torch's matrix-vector product uses one, and at 16 (32 rows with guidance) it no longer beats eager.
# Each figure is the compile over the saving per position, measured with guidance at the quickstart size
# (experiments/bench_generate.py --break-even --quickstart --batches 1 2 4 8 16): the larger of a cold and a cached
# compile's, and a batch takes the largest figure of the batches up to it.
FROZEN_BREAK_EVEN = {1: 5_400, 2: 23_400, 4: 23_400, 8: 42_600}


def frozen_break_even(batch_size: int) -> float:
    """Positions per batch size compiled from which frozen steps beat eager ones on a CPU (infinite: never)."""
    for largest in sorted(FROZEN_BREAK_EVEN):
        if batch_size <= largest:
            return FROZEN_BREAK_EVEN[largest]
    return math.inf


def auto_step_mode(device_type: str, positions: int, batch_size: int = 1, compilations: int = 1,
                   weights: str = "unchanged") -> str:
    """The step mode sampling.step=auto runs: on CUDA "compiled" (one CUDA graph per batch size, replayed: the
    fastest there); int8 weights "frozen" on any device (their fast kernels come with it); on a CPU "frozen" when
    `positions`, the image positions to be sampled `batch_size` sequences at a time, pay back `compilations`
    compiles (one per batch size) by FROZEN_BREAK_EVEN, else "eager" (a one-off, or a batch too large for frozen
    steps to win); "eager" on any other device."""
    if weights != "unchanged":
        return "frozen"
    if device_type == "cuda":
        return "compiled"
    if device_type == "cpu" and positions >= frozen_break_even(batch_size) * compilations:
        return "frozen"
    return "eager"


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
    method: str = "ar"  # METHODS
    sjd_window: int = 16  # draft codes verified per model call (method=sjd)
    sjd_coupling: str = "maximal"  # SJD_COUPLINGS; both keep the sampling distribution exactly
    # method=sjd: > 0 accepts a draft by the probability of its group, the codes within this many ranks of it in the
    # model's distribution (grouped speculative decoding): fewer calls, but NOT the sampling distribution exactly
    sjd_group_size: int = 0

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
        if self.sjd_coupling not in SJD_COUPLINGS:
            raise ValueError(f"sampling.sjd_coupling must be one of {', '.join(SJD_COUPLINGS)}, got {self.sjd_coupling!r}")
        if self.sjd_group_size < 0:
            raise ValueError(f"sampling.sjd_group_size must be >= 0 (0: off), got {self.sjd_group_size}")


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


@dataclass
class SamplingStats:
    """Model calls made, and how many token-by-token sampling (method=ar) would have made for the same codes."""
    model_calls: int = 0
    token_by_token_calls: int = 0

    @property
    def speedup(self) -> float:
        return self.token_by_token_calls / max(self.model_calls, 1)


def resolve_sampling(options: dict, checkpoint_defaults: dict | None = None) -> SamplingConfig:
    """Sampling options: those given (not None) win over the checkpoint's (what its training grids used)."""
    merged = {**(checkpoint_defaults or {}), **{k: v for k, v in options.items() if v is not None}}
    return SamplingConfig(**merged)
