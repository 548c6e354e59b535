"""How one sampling step runs, split as gpt-fast splits it: a prefill (the prefix once, into the KV cache) and
a one-position step after it. `sampling_steps` gives the token-by-token loop one object for the step of a mode:

- "eager": the cache's length a Python int, attention over the filled part;
- "static": GPT.forward_at, fixed shapes, the position a tensor;
- "compiled": the static step through torch.compile (on CUDA mode "reduce-overhead", which captures it once as
  a CUDA graph and replays it: no per-kernel launch cost, the gpt-fast / LlamaGen pattern);
- "frozen": compiled with the weights folded in as constants (`frozen_step`).
sampling.step=auto is one of these, picked for the device and the work (t2i.sampling.options.auto_step_mode).
All give the same codes up to float rounding. Without the cache (`use_cache=False`) every step recomputes the
whole sequence, as EasyNLP's generate loop does (kept for the benchmark and the equivalence tests).

Speculative Jacobi decoding (t2i.sampling.sjd) runs its windows through the same steps (`fixed_shape_step` with
a window): W drafts and the code before them, W + 1 positions per row, in a KV cache with W positions of room
past the sequence's end, so that every window, the last ones too, has one shape.

Compiled and frozen steps are kept per model (compiled once per batch size and window) and dropped with their
model.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch

from t2i.models.gpt import GPT, KVCache
from t2i.sampling.options import check_step_mode

# torch.compile keeps at most dynamo's recompile_limit (8) compilations of one function, and every batch size a
# model's compiled step runs at is one compilation of its copy of forward_at: allow that many (set around each call)
STEP_COMPILATIONS = 256

# Frozen steps kept per model: those of the most recently used batch sizes (and SJD windows). Every size kept holds
# a KV cache and its own compilation, with a packed copy of the weights in it (about the weights' size again:
# +75-100 MB per size for a 56 MB GPT), so sizes are not kept without bound; a run at a fixed batch size uses two
# (its full batches and the last, partial one) and compiles each once. A caller that cycles through more sizes
# recompiles (~30 s at the base size on two CPU cores) each time a size comes back.
FROZEN_BATCH_SIZES = 2


class CompiledStep:
    """GPT.forward_at through torch.compile, under a code object of its own; called as step(model, tokens,
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
    # (batch size, window) -> (CompiledStep, KVCache), oldest first; window 0: the one-position step
    frozen: OrderedDict = field(default_factory=OrderedDict)
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
    """model.forward_at through torch.compile (sampling.step=compiled): compiled once per model and shape (batch
    size, positions per call); on CUDA mode "reduce-overhead" (a CUDA graph). Its compilations are dropped when
    the model is."""
    return functools.partial(_steps_of(model, compiled=True).compiled, model)


def release_steps(model: GPT) -> None:
    """Drop the model's compiled and frozen steps (and the memory they hold): the next compiled or frozen
    generation compiles again, with the weights the model has then (a frozen step keeps those of its first call)."""
    with _model_steps_lock:
        steps = _model_steps.get(model)
    if steps is not None:
        with steps.generating:
            steps.release()


@contextmanager
def frozen_step(model: GPT, batch_size: int, window: int = 0):
    """The frozen step of this model at this batch size with its KV cache, emptied (sampling.step=frozen), held
    for one generation: `with frozen_step(model, n) as (step, cache): ... step(tokens, position, cache, rows)`.
    `window` W > 0: a step of W + 1 positions per row (speculative Jacobi decoding), its cache with room for W
    positions past block_size; each (batch size, window) is a step of its own.

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
    shape = (batch_size, window)
    with steps.generating:
        if shape in steps.frozen:
            steps.frozen.move_to_end(shape)
        else:
            steps.frozen[shape] = (CompiledStep(frozen=True, cuda=model.tok_emb.weight.is_cuda),
                                   model.new_cache(batch_size, model.cfg.block_size + window))
            while len(steps.frozen) > FROZEN_BATCH_SIZES:
                steps.frozen.popitem(last=False)[1][0].release()
        step, cache = steps.frozen[shape]
        # stale keys and values past a position are masked (weight 0); the first forward sets `caption`
        cache.length = 0
        yield functools.partial(step, model), cache


class SamplingSteps(Protocol):
    """The model calls of one token-by-token generation: `prefill(prefix)` once, then `forward_one(tokens)` per
    position; each returns the logits of the last position over the first `head_rows` rows of the head."""

    # True: every call runs the whole batch it was built for (the null-text half too, once it is no longer needed)
    fixed_shape: bool

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor: ...  # [B, L] -> [B, head_rows]

    def forward_one(self, tokens: torch.Tensor) -> torch.Tensor: ...  # [b, 1] -> [b, head_rows], b <= B


class RecomputedSteps:
    """No cache: every call runs the whole sequence so far (EasyNLP's loop); a call may drop the last rows."""
    fixed_shape = False

    def __init__(self, model: GPT, head_rows: int):
        self.model, self.head_rows = model, head_rows
        self.tokens = None

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        self.tokens = prefix
        return self.model(prefix)[:, -1, :self.head_rows]

    def forward_one(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = torch.cat([self.tokens[:len(tokens)], tokens], 1)
        return self.model(self.tokens)[:, -1, :self.head_rows]


class EagerSteps:
    """The KV cache, each call attending over its filled part; a call may run only the first rows of the cache."""
    fixed_shape = False

    def __init__(self, model: GPT, cache: KVCache, head_rows: int):
        self.model, self.cache, self.head_rows = model, cache, head_rows

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.model(prefix, self.cache, last=1, head_rows=self.head_rows)[:, -1]

    def forward_one(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, self.cache, head_rows=self.head_rows)[:, -1]


class FixedShapeSteps(EagerSteps):
    """The prefill as EagerSteps; then `step(tokens, position, cache, head_rows)` (forward_at, compiled or not)
    with the position a tensor, always over the whole batch."""
    fixed_shape = True

    def __init__(self, model: GPT, cache: KVCache, head_rows: int, step: Callable[..., torch.Tensor]):
        super().__init__(model, cache, head_rows)
        self.step = step
        self.position = None

    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        logits = super().prefill(prefix)
        self.position = torch.full((1,), self.cache.length, dtype=torch.long, device=prefix.device)
        return logits

    def forward_one(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.step(tokens, self.position, self.cache, self.head_rows)[:, -1]
        self.position += 1
        self.cache.length += 1
        return logits


@contextmanager
def fixed_shape_step(model: GPT, step: str, batch_size: int, window: int = 0):
    """The fixed-shape step of mode `step` (static, compiled or frozen) and a KV cache for `batch_size` rows,
    held for one generation: `with fixed_shape_step(...) as (step, cache): step(tokens, position, cache, rows)`
    (GPT.forward_at's arguments after the model). `window` W > 0: speculative Jacobi decoding's windows of W + 1
    positions per row, the cache with W positions of room past block_size."""
    if step not in ("static", "compiled", "frozen"):
        raise ValueError(f"a fixed-shape step is static, compiled or frozen, got {step!r}")
    if step == "frozen":
        with frozen_step(model, batch_size, window) as held:
            yield held
    else:
        forward_at = model.forward_at if step == "static" else compiled_step(model)
        yield forward_at, model.new_cache(batch_size, model.cfg.block_size + window)


@contextmanager
def sampling_steps(model: GPT, step: str, batch_size: int, head_rows: int,
                   use_cache: bool = True) -> Iterator[SamplingSteps]:
    """The steps of one generation of `batch_size` rows in step mode `step` (STEP_MODES), held until it ends
    (a frozen step and its cache serve one generation at a time); `use_cache=False`: recomputed steps."""
    check_step_mode(step, runs=True)
    if not use_cache:
        yield RecomputedSteps(model, head_rows)
    elif step == "eager":
        yield EagerSteps(model, model.new_cache(batch_size), head_rows)
    else:
        with fixed_shape_step(model, step, batch_size) as (forward_at, cache):
            yield FixedShapeSteps(model, cache, head_rows, forward_at)
