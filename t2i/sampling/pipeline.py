"""A loaded model with its tokenizer and VQGAN: prompts -> codes -> uint8 images (`T2IPipeline`, and
`SuperResPipeline` for CogView's 2x stage), and the one path from prompts to files: `T2IPipeline.sample` gives
`Samples` (tokenized, seeded with prompt_seeds, sampled in sampling batches, scored and reranked when asked,
decoded); t2i.sampling.files.write_samples writes them. eval.py's task=generate, the training grids and the
demo use it. `T2IPipeline.complete` (text-guided completion of an image's region, t2i.sampling.complete) runs
the same path with the image's other codes fixed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.adapters import load_adapted_gpt
from t2i.checkpoints import GPTRecord, load_record_vqgan
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.models.gpt import GPT
from t2i.models.int8 import quantize_weights
from t2i.models.vqgan import VQModel
from t2i.sampling.ar import generate_codes
from t2i.sampling.complete import check_image, following_codes_nll, known_codes, region_mask
from t2i.sampling.options import SamplingConfig, SamplingStats, auto_step_mode, check_step_mode
from t2i.sampling.progress import Progress, progress_part
from t2i.sampling.seeds import prompt_seeds
from t2i.sampling.superres import superres_codes
from t2i.scorers import Scorer, rerank as best_candidates, take

log = logging.getLogger(__name__)


def decode_to_uint8(vqgan: VQModel, codes: torch.Tensor) -> torch.Tensor:
    """Codes [B, h, w] -> uint8 images [B, 3, H, W]."""
    return pixels_to_uint8(vqgan.decode(codes))


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """A decoder's output [B, 3, H, W], roughly in [-1, 1] -> uint8 images."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


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
                        step: str = "auto", weights: str = "unchanged", adapter: str | Path | None = None,
                        merge: bool = True):
        """Everything from a GPT checkpoint; the VQGAN it names (or `vqgan_ckpt`) must match its hash.

        `adapter`: a LoRA adapter checkpoint of this GPT (t2i.adapters; refused on any other base), merged into
        the weights (`merge`: as fast as the base) or kept beside them; the adapter's record is then the
        pipeline's (its training, its sampling defaults)."""
        if adapter is not None and not merge and weights != "unchanged":
            raise ValueError(f"sampling.weights={weights} quantizes plain linear layers: merge the adapter "
                             "(merge=True) or keep the weights unchanged")
        gpt, record = load_adapted_gpt(path, adapter, merge)
        vqgan = load_record_vqgan(record, str(adapter or path), vqgan_ckpt)
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
                     progress: Progress | None = None, known: torch.Tensor | None = None) -> torch.Tensor:
        """Codes [len(prompts) * samples_per_prompt, h, w], the samples of a prompt adjacent.

        At most `batch_size` sequences sample at once (`sampling_batches`; twice as many KV-cache rows with
        guidance). Prompt i is sampled with seeds[i], by default prompt_seeds(cfg.seed, prompts): the codes do
        not depend on batch_size. `stats`, when given, counts the model calls; `progress(done, total)` is called
        after each model call with the image positions fixed so far over all sampling batches. `known` [len(prompts),
        h, w]: each prompt's fixed codes (-1: to be sampled), fed as they are in every sample of it.
        """
        if any(not p.strip() for p in prompts):
            warnings.warn("an empty prompt generates unconditionally (the null text)")
        seeds = self._seeds(prompts, cfg, seeds)
        h, w = self.record.grid
        if known is not None and known.shape != (len(prompts), h, w):
            raise ValueError(f"known codes must be [prompts={len(prompts)}, {h}, {w}], got {tuple(known.shape)}")
        self.resolve_step(len(prompts) * cfg.samples_per_prompt, batch_size)
        batches = sampling_batches(len(prompts), cfg.samples_per_prompt, batch_size)
        image_len = self.gpt.cfg.image_len
        codes = []
        for index, (rows, samples) in enumerate(batches):
            text = self.tokenizer(prompts[rows.start:rows.stop]).to(self.device)
            batch_seeds = None if seeds is None else seeds[rows.start:rows.stop]
            batch_known = None if known is None else \
                known[rows.start:rows.stop].flatten(1).repeat_interleave(len(samples), 0).to(self.device)
            batch_progress = progress_part(progress, index * image_len, len(batches) * image_len)
            codes.append(generate_codes(self.sampler, text, cfg, seeds=batch_seeds, stats=stats, step=self.step_mode,
                                        samples=samples, known=batch_known, progress=batch_progress).view(-1, h, w))
        return torch.cat(codes)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Codes [N, h, w] -> uint8 images [N, 3, H, W] on the CPU."""
        return torch.cat([decode_to_uint8(self.vqgan, chunk).cpu() for chunk in codes.split(batch_size)])

    @property
    def image_size(self) -> int:
        """The side of the images this model's codes stand for (its code grid times the VQGAN's downsampling)."""
        return self.record.grid[0] * self.vqgan.cfg.downsample

    @torch.no_grad()
    def sample(self, prompts: list[str], cfg: SamplingConfig, batch_size: int = 16,
               seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
               progress: Progress | None = None, scorer: Scorer | None = None, rerank: int = 1) -> Samples:
        """Prompts -> Samples: their codes (sample_codes) and images (decode), `batch_size` sequences at a time.

        With `scorer` (prompts, codes -> a score per image, the lower the better: t2i.scorers.CaptionScorer) each
        image is scored; with `rerank` K > 1 each image is the best of K candidates (CogView's self-reranking):
        K * samples_per_prompt sequences are sampled per prompt, image i's candidate c being sample c * S + i, and
        only the chosen ones are decoded."""
        return self._sample(prompts, cfg, batch_size, seeds, stats, progress, scorer, rerank)

    def region(self, mask=None, box: Sequence[float] | None = None, box_units: str | None = None) -> torch.Tensor:
        """The region to complete as bool [h, w] on this model's code grid, from a mask image (white = to be
        sampled, at the image's size) or a box [x0, y0, x1, y1] in box_units "codes" or "pixels"
        (t2i.sampling.complete.region_mask)."""
        return region_mask(self.record.grid, self.image_size, mask, box, box_units)

    @torch.no_grad()
    def complete(self, prompts: list[str], images: Sequence, regions: Sequence[torch.Tensor], cfg: SamplingConfig,
                 batch_size: int = 16, seeds: Sequence[int] | None = None, stats: SamplingStats | None = None,
                 progress: Progress | None = None, scorer: Scorer | None = None, rerank: int = 1,
                 region_candidates: int = 1) -> Samples:
        """Text-guided completion: prompt i's image images[i] (uint8 [H, W, 3] at image_size, as a file or an
        upload gives it) with its region regions[i] (bool [h, w], `region`) sampled with the text and its other
        codes, the VQGAN's codes of the image, kept. Samples as `sample` makes them (seeds, guidance, step modes,
        `scorer` and `rerank`), the known codes unchanged in every sample.

        `region_candidates` K > 1: each sample (each rerank candidate) is the best of K draws of the region by the
        likelihood the model gives the known codes after it (t2i.sampling.complete: the raster remedy)."""
        if len(images) != len(prompts) or len(regions) != len(prompts):
            raise ValueError(f"{len(images)} images and {len(regions)} regions for {len(prompts)} prompts: one each")
        pixels = torch.stack([check_image(image, self.image_size) for image in images]).to(self.device)
        codes = self.vqgan.encode(pixels.float() / 127.5 - 1)
        masks = torch.stack([torch.as_tensor(region, dtype=torch.bool) for region in regions])
        if masks.shape != codes.shape:
            raise ValueError(f"regions must be [{', '.join(map(str, codes.shape[1:]))}] on the code grid (use "
                             f"pipeline.region(...)), got {tuple(masks.shape[1:])}")
        return self._sample(prompts, cfg, batch_size, seeds, stats, progress, scorer, rerank,
                            known=known_codes(codes, masks), region_candidates=region_candidates)

    def _sample(self, prompts: list[str], cfg: SamplingConfig, batch_size: int, seeds: Sequence[int] | None,
                stats: SamplingStats | None, progress: Progress | None, scorer: Scorer | None, rerank: int,
                known: torch.Tensor | None = None, region_candidates: int = 1) -> Samples:
        """The one body of sample and complete: R = rerank candidates of K = region_candidates draws each of the S
        samples of every prompt, sample (c * K + k) * S + i of a prompt being draw k of candidate c of image i."""
        if not isinstance(rerank, int) or rerank < 1:
            raise ValueError(f"rerank must be an integer >= 1 (candidates per image), got {rerank!r}")
        if rerank > 1 and scorer is None:
            raise ValueError("reranking needs a scorer (a captioning model): set rerank to 1 or give caption_ckpt=")
        if not isinstance(region_candidates, int) or region_candidates < 1:
            raise ValueError(f"region_candidates must be an integer >= 1 (draws of the region per image), "
                             f"got {region_candidates!r}")
        seeds = self._seeds(prompts, cfg, seeds)
        n, r, k, s = len(prompts), rerank, region_candidates, cfg.samples_per_prompt
        candidates = replace(cfg, samples_per_prompt=r * k * s) if r * k > 1 else cfg
        codes = self.sample_codes(prompts, candidates, batch_size, seeds=seeds, stats=stats, progress=progress,
                                  known=known)
        grid = codes.shape[1:]
        if k > 1:  # the draw of each region that the known codes after it like best
            rows = r * k * s
            text = self.tokenizer(prompts).to(self.device).repeat_interleave(rows, 0)
            nll = following_codes_nll(self.gpt, text, codes, (known < 0).repeat_interleave(rows, 0), batch_size)
            codes, _ = best_candidates(codes.view(n * r, k, s, *grid), nll.cpu().view(n * r, k, s))
            codes = codes.reshape(n * r * s, *grid)
        scores = None
        if scorer is not None:
            scores = scorer([p for p in prompts for _ in range(r * s)], codes, batch_size).cpu().view(n, r, s)
        codes = codes.view(n, r, s, *grid)
        if r > 1:
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
