"""The model's thread: a queue of requests, batching those of equal settings, sampling and reranking.

The `Engine` takes the oldest waiting request together with the others that ask for the same
settings (up to max_batch) and samples them as one run, each prompt from its own seed (the seed
`eval.py task=generate` gives it), so batching never changes a request's images. A request's
`Job` carries its progress (steps done of total while it samples, the requests ahead while it
waits) and, once done, its images or the error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from t2i.demo.settings import Settings
from t2i.models.gpt import GPT
from t2i.sampling import Generator, prompt_seeds, sampling_batches
from t2i.scorers import CaptionScorer, rerank, take

log = logging.getLogger("demo")


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
        if k > 1:  # Settings.check allows it only with a scorer
            codes, best = rerank(codes, losses)
            losses = take(losses, best)
        else:
            codes, losses = codes[:, 0], None if losses is None else losses[:, 0]
        images = generator.decode(codes.flatten(0, 1), self.batch_size)
        images = images.view(n, s, *images.shape[1:])
        for i, job in enumerate(jobs):
            job.images = images[i]
            job.losses = None if losses is None else losses[i]
