"""The model's thread: a queue of requests, batching those of equal settings, sampling and reranking.

The `Engine` takes the oldest waiting request together with the others of the same kind (generate, or
complete an image's region) that ask for the same settings, style included (up to max_batch), activates that
style (t2i.adapters.use_adapter: one of the adapters attached to the one GPT, or none) and samples them as one run,
each prompt from its own seed (the seed `eval.py task=generate` or task=complete gives it), so batching never
changes a request's images: generation through T2IPipeline.sample, completion through T2IPipeline.complete. A request's
`Job` carries its progress and, once done, its images or the error. While it waits the progress is
the requests ahead; while it samples, the sampler's own count (`progress=` of
T2IPipeline.sample_codes, after each model call): image positions fixed so far over all the
sampling batches of its batch, whatever the step mode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from t2i.adapters import BASE_STYLE, use_adapter
from t2i.demo.settings import Settings
from t2i.sampling import T2IPipeline, prompt_seeds
from t2i.scorers import CaptionScorer

log = logging.getLogger("demo")


@dataclass
class Job:
    """One request: waiting, sampling (steps of total), then done with images or an error."""

    prompt: str
    seed: int
    settings: Settings
    image: np.ndarray | None = None  # to complete: uint8 [S, S, 3] at the model's size (None: generate)
    region: torch.Tensor | None = None  # to complete: bool [h, w] on the code grid, True where codes are sampled
    steps: int = 0  # image positions fixed so far (over all the sampling batches of its batch)
    total: int = 0  # positions to fix in all; 0 until the sampler first reports
    ahead: int = 0  # requests the model takes before this one (while waiting)
    images: torch.Tensor | None = None  # uint8 [samples, 3, H, W]
    losses: torch.Tensor | None = None  # Caption Loss of each image, when there is a captioning model
    error: BaseException | None = None
    batched_with: int = 1  # requests in the batch it was sampled in
    seconds: float = 0.0  # how long its codes took to sample
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def kind(self) -> str:
        return "generate" if self.image is None else "complete"


class Engine:
    """The model's thread: takes waiting jobs in order, batching those with equal settings."""

    def __init__(self, pipeline: T2IPipeline, scorer: CaptionScorer | None, batch_size: int = 16, max_batch: int = 4,
                 start: bool = True):
        self.pipeline, self.scorer = pipeline, scorer
        self.batch_size, self.max_batch = batch_size, max_batch
        self._waiting: deque[Job] = deque()
        self._lock = threading.Condition()
        self.batches = 0  # batches sampled so far
        self.style: str | None = BASE_STYLE  # the style the GPT runs now (None: while switching)
        if start:
            self.start()

    def start(self) -> None:
        threading.Thread(target=self._serve, name="t2i-demo-model", daemon=True).start()

    def submit(self, prompt: str, seed: int, settings: Settings, image: np.ndarray | None = None,
               region: torch.Tensor | None = None) -> Job:
        """A request to generate, or with `image` and `region` to complete (both or neither)."""
        if (image is None) != (region is None):
            raise ValueError("a completion needs both the image and the region")
        job = Job(prompt, seed, settings, image, region)
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
            batch = [first] + [job for job in self._waiting
                               if job.kind == first.kind and job.settings == first.settings][: self.max_batch - 1]
            for job in batch[1:]:
                self._waiting.remove(job)
            for job in batch:  # none ahead now: the page says so until the sampler's first report
                job.ahead = 0
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
        """Images (and Caption Losses) for jobs of one kind and equal settings, as one sampling run."""
        settings = jobs[0].settings
        sampling = settings.sampling()
        prompts = [job.prompt for job in jobs]
        seeds = [prompt_seeds(job.seed, [job.prompt])[0] for job in jobs]  # as task=generate seeds each prompt
        for job in jobs:
            job.steps, job.total, job.batched_with = 0, 0, len(jobs)

        started = time.perf_counter()

        def report(done: int, total: int):  # the sampler's own count, after each model call
            for job in jobs:  # the last report ends the sampling: its time is the codes' (not scoring, decoding)
                job.steps, job.total, job.seconds = done, total, time.perf_counter() - started

        self.use_style(settings.style)  # for the whole batch: sampling and the Caption Loss of its images
        # task=generate's path (task=complete's for completions), each image the best of settings.rerank candidates
        # by the scorer
        if jobs[0].kind == "generate":
            samples = self.pipeline.sample(prompts, sampling, self.batch_size, seeds, progress=report,
                                           scorer=self.scorer, rerank=settings.rerank)
        else:
            samples = self.pipeline.complete(prompts, [job.image for job in jobs], [job.region for job in jobs],
                                             sampling, self.batch_size, seeds, progress=report, scorer=self.scorer,
                                             rerank=settings.rerank)
        images = samples.images.view(len(jobs), settings.samples, *samples.images.shape[1:])
        losses = None if samples.scores is None else samples.scores.view(len(jobs), settings.samples)
        for i, job in enumerate(jobs):
            job.images = images[i]
            job.losses = None if losses is None else losses[i]

    def use_style(self, style: str) -> None:
        """Make `style` the one the GPT runs (an attached adapter's name, or BASE_STYLE: none), unless it is already."""
        if style != self.style:
            self.style = None  # a switch that fails half-way leaves no style assumed
            use_adapter(self.pipeline.gpt, None if style == BASE_STYLE else style)
            self.style = style
