"""A loaded model with its tokenizer and VQGAN: prompts -> codes -> uint8 images (`T2IPipeline`, and
`SuperResPipeline` for CogView's 2x stage), and the one path from prompts to files: `T2IPipeline.sample` gives
`Samples` (tokenized, seeded with prompt_seeds, sampled in sampling batches, scored and reranked when asked,
decoded); t2i.sampling.files.write_samples writes them. eval.py's task=generate, the training grids and the
demo use it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.checkpoints import GPTRecord, load_gpt, load_record_vqgan
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.models.gpt import GPT
from t2i.models.int8 import quantize_weights
from t2i.models.vqgan import VQModel
from t2i.sampling.ar import generate_codes
from t2i.sampling.options import SamplingConfig, SamplingStats, auto_step_mode, check_step_mode
from t2i.sampling.progress import Progress, progress_part
from t2i.sampling.seeds import prompt_seeds
from t2i.sampling.superres import superres_codes
from t2i.scorers import Scorer, rerank as best_candidates, take

log = logging.getLogger(__name__)


def decode_to_uint8(vqgan: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, h, w] -> uint8 images [B, 3, H, W]."""
    pixels = vqgan.decode(codes).float()
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def sampling_batches(n_prompts: int, samples_per_prompt: int, batch_size: int) -> list[tuple[range, range]]:
    """How `T2IPipeline.sample_codes` splits its sequences: (prompts, samples of each) per sampling batch, in
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


@dataclass
class Samples:
    """What `T2IPipeline.sample` made: codes [P * S, h, w] and uint8 images [P * S, 3, H, W] on the CPU, the
    S = samples_per_prompt samples of a prompt adjacent; seeds: each prompt's (None: unseeded); scores [P * S]:
    each image's score when a scorer was given (its Caption Loss)."""
    prompts: list[str]
    seeds: list[int] | None
    codes: torch.Tensor
    images: torch.Tensor
    samples_per_prompt: int
    scores: torch.Tensor | None = None


class T2IPipeline:
    """A trained GPT with its tokenizer and VQGAN: prompts in, codes and images out.

    `record` is the checkpoint's (t2i.checkpoints.GPTRecord): GPT config, tokenizer, VQGAN identity,
    training options, sampling defaults. `step_mode` is how sampling steps run (STEP_MODES): "auto" until
    `resolve_step` picks one for the work ahead (at the first sampling call if no one called it before), and
    `step_asked` what was asked. `weights` is what the sampler's weights are (t2i.models.int8.WEIGHTS):
    `sampler` is the GPT that samples, `gpt` the one loaded (which scores, e.g. Caption Loss).
    """

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, vqgan: VQModel, record: GPTRecord,
                 step: str = "auto", weights: str = "unchanged"):
        check_step_mode(step)
        if weights != "unchanged" and step not in ("frozen", "auto"):
            warnings.warn(f"sampling.weights={weights} is fast only with sampling.step=frozen (torch's int8 kernels "
                          f"come with compilation); step={step} turns the weights back into bf16 at every step")
        self.gpt, self.tokenizer, self.vqgan = gpt.eval(), tokenizer, vqgan.eval()
        self.sampler = quantize_weights(self.gpt, weights)
        self.record, self.step_asked, self.step_mode, self.weights = record, step, step, weights

    @property
    def positions_per_sequence(self) -> int:
        """Image positions one sequence samples."""
        return self.gpt.cfg.image_len

    def resolve_step(self, sequences: int, batch_size: int) -> str:
        """The step mode for sampling `sequences` sequences, `batch_size` at a time: sampling.step=auto made
        concrete by auto_step_mode (the device, the weights, the positions, the batch and how many batch sizes
        compile: the full batches' and the last one's), logged, and kept for this pipeline's later calls; any
        other mode as asked."""
        if self.step_mode == "auto":
            positions = sequences * self.positions_per_sequence
            full = min(sequences, batch_size)
            compilations = len({full, sequences % batch_size or full})
            self.step_mode = auto_step_mode(self.device.type, positions, full, compilations, self.weights)
            log.info("sampling.step=auto -> %s (%s, %d positions, batches of %d%s)", self.step_mode,
                     self.device.type, positions, full,
                     "" if self.weights == "unchanged" else f", {self.weights} weights")
        return self.step_mode

    def step_record(self) -> dict:
        """What results.json records of the step mode: as asked, and as run."""
        return {"asked": self.step_asked, "ran": self.step_mode}

    @classmethod
    def from_checkpoint(cls, path: str | Path, vqgan_ckpt: str | Path | None = None, device: str = "cpu",
                        step: str = "auto", weights: str = "unchanged"):
        """Everything from a GPT checkpoint; the VQGAN it names (or `vqgan_ckpt`) must match its hash."""
        gpt, record = load_gpt(path)
        vqgan = load_record_vqgan(record, str(path), vqgan_ckpt)
        return cls(gpt.to(device), record.tokenizer_model(), vqgan.to(device), record, step, weights)

    @property
    def device(self) -> torch.device:
        return self.gpt.tok_emb.weight.device

    def _seeds(self, prompts: list[str], cfg: SamplingConfig, seeds: Sequence[int] | None) -> list[int] | None:
        """The prompts' seeds: those given, else prompt_seeds(cfg.seed, prompts) (None: unseeded)."""
        if seeds is None and cfg.seed is not None:
            seeds = prompt_seeds(cfg.seed, prompts)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        return None if seeds is None else list(seeds)

    @torch.no_grad()
    def sample_codes(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16,
                     seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                     progress: Progress | None = None) -> torch.Tensor:
        """Codes [len(prompts) * samples_per_prompt, h, w], the samples of a prompt adjacent.

        At most `batch_size` sequences sample at once (`sampling_batches`; twice as many KV-cache rows with
        guidance). Prompt i is sampled with seeds[i], by default prompt_seeds(cfg.seed, prompts): the codes do
        not depend on batch_size. `stats`, when given, counts the model calls; `progress(done, total)` is called
        after each model call with the image positions fixed so far over all sampling batches.
        """
        if any(not p.strip() for p in prompts):
            warnings.warn("an empty prompt generates unconditionally (the null text)")
        seeds = self._seeds(prompts, cfg, seeds)
        h, w = self.record.grid
        self.resolve_step(len(prompts) * cfg.samples_per_prompt, batch_size)
        batches = sampling_batches(len(prompts), cfg.samples_per_prompt, batch_size)
        image_len = self.gpt.cfg.image_len
        codes = []
        for index, (rows, samples) in enumerate(batches):
            text = self.tokenizer(prompts[rows.start:rows.stop]).to(self.device)
            batch_seeds = None if seeds is None else seeds[rows.start:rows.stop]
            batch_progress = progress_part(progress, index * image_len, len(batches) * image_len)
            codes.append(generate_codes(self.sampler, text, cfg, seeds=batch_seeds, stats=stats, step=self.step_mode,
                                        samples=samples, progress=batch_progress).view(-1, h, w))
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Codes [N, h, w] -> uint8 images [N, 3, H, W] on the CPU."""
        return torch.cat([decode_to_uint8(self.vqgan, chunk).cpu() for chunk in codes.split(batch_size)])

    @torch.no_grad()
    def sample(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16,
               seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
               progress: Progress | None = None, scorer: Scorer | None = None, rerank: int = 1) -> Samples:
        """Prompts -> Samples: their codes (sample_codes) and images (decode), `batch_size` sequences at a time.

        With `scorer` (prompts, codes -> a score per image, the lower the better: t2i.scorers.CaptionScorer) each
        image is scored; with `rerank` K > 1 each image is the best of K candidates (CogView's self-reranking):
        K * samples_per_prompt sequences are sampled per prompt, image i's candidate c being sample c * S + i, and
        only the chosen ones are decoded."""
        if not isinstance(rerank, int) or rerank < 1:
            raise ValueError(f"rerank must be an integer >= 1 (candidates per image), got {rerank!r}")
        if rerank > 1 and scorer is None:
            raise ValueError("reranking needs a scorer (a captioning model): set rerank to 1 or give caption_ckpt=")
        seeds = self._seeds(prompts, cfg, seeds)
        n, k, s = len(prompts), rerank, cfg.samples_per_prompt
        candidates = replace(cfg, samples_per_prompt=k * s) if k > 1 else cfg
        codes = self.sample_codes(prompts, candidates, batch_size, seeds=seeds, stats=stats, progress=progress)
        scores = None
        if scorer is not None:
            scores = scorer([p for p in prompts for _ in range(k * s)], codes, batch_size).cpu().view(n, k, s)
        codes = codes.view(n, k, s, *codes.shape[1:])
        if k > 1:
            codes, best = best_candidates(codes, scores)
            scores = take(scores, best)
        else:
            codes, scores = codes[:, 0], None if scores is None else scores[:, 0]
        codes = codes.flatten(0, 1)
        return Samples(list(prompts), seeds, codes, self.decode(codes, batch_size), s,
                       None if scores is None else scores.flatten())


class SuperResPipeline(T2IPipeline):
    """A super-resolution GPT (layout "superres") with its tokenizer and VQGAN: prompts and low-resolution
    codes in, codes and images at twice the resolution out (CogView's super-resolution stage)."""

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, vqgan: VQModel, record: GPTRecord,
                 step: str = "auto", weights: str = "unchanged"):
        if record.superres_grid is None:
            raise ValueError("not a super-resolution GPT (its checkpoint record has no superres entry): train one "
                             "with python train.py experiment=superres_shapes (stage.superres)")
        super().__init__(gpt, tokenizer, vqgan, record, step, weights)
        self.grid = record.superres_grid

    @property
    def positions_per_sequence(self) -> int:
        """Image positions one 2x sequence samples: every window's."""
        return self.grid.windows * self.grid.window_len

    @property
    def low_size(self) -> int:
        """The side of the low-resolution images its low codes were encoded from."""
        return self.record.superres.low_size

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
                       seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                       progress: Progress | None = None) -> torch.Tensor:
        """Prompts and their low-resolution codes [len(prompts), h, w] -> 2x codes [len(prompts) * samples, H, W].
        Prompt i samples with seeds[i], by default prompt_seeds(cfg.seed, prompts): independent of batch_size.
        `progress(done, total)`: positions fixed over all batches and windows."""
        if len(low) != len(prompts):
            raise ValueError(f"{len(low)} low-resolution grids for {len(prompts)} prompts")
        seeds = self._seeds(prompts, cfg, seeds)
        self.resolve_step(len(prompts) * cfg.samples_per_prompt, batch_size)
        per_batch = max(1, batch_size // cfg.samples_per_prompt)
        starts = range(0, len(prompts), per_batch)
        positions = self.grid.windows * self.grid.window_len  # per batch
        out = []
        for index, start in enumerate(starts):
            text = self.tokenizer(prompts[start:start + per_batch]).to(self.device)
            out.append(superres_codes(self.sampler, self.grid, text, low[start:start + per_batch].to(self.device), cfg,
                                      seeds=None if seeds is None else seeds[start:start + per_batch], stats=stats,
                                      step=self.step_mode,
                                      progress=progress_part(progress, index * positions, len(starts) * positions)))
        return torch.cat(out)
