"""Text-to-image evaluation of a GPT checkpoint on a split's captions.

For every caption: `samples_per_prompt` images, each the best of `rerank` candidates by Caption
Loss (CogView: the mean negative log-likelihood per text token of the caption given the image,
under a captioning model; t2i.scorers scores and reranks). Reported with and without reranking
(the first candidate is what plain sampling gives): FID and IS against the split's real images, mean Caption Loss, the
Chinese-CLIP score and R-precision (t2i.eval.clip; also of the real images, the reference row; reranking
may use the CLIP score instead), and on the shapes data the oracle's attribute accuracy.

The prompts are one caption of each of the split's first distinct images (multi-caption datasets
such as COCO-CN and Flickr-CN hold ~5 rows per image; see PromptSet), chosen before the split is
shared out, so any number of processes evaluates the same prompts. A prompt samples with the seed
task=generate would give its text (t2i.sampling.prompt_seeds), and everything is ordered by sample
key before the metrics, so several processes (each evaluating a share) give the numbers of one.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed
import torchvision
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from t2i.data.datamodule import ShardDataModule
from t2i.data.shapes import oracle_accuracy
from t2i.data.stream import complete_samples
from t2i.eval.clip import ClipMetrics, ClipTally
from t2i.grids import save_captioned_grid
from t2i.sampling import SamplingConfig, SamplingStats, T2IPipeline, prompt_seeds
from t2i.scorers import CaptionScorer, rerank, take


@dataclass
class EvalConfig:
    """The evaluation's own options (eval.*). How many images per prompt and the sampling batch are
    sampling options (sampling.samples_per_prompt, sampling.batch_size), shared with task=generate."""

    rerank: int = 1  # candidates per sample; the best by rerank_by is kept
    rerank_by: str = "caption_loss"  # the lowest Caption Loss, or the highest (Chinese-)CLIP score: clip_score
    grid_prompts: int = 16  # prompts shown in the captioned grids (and the logger's table)
    save_images: bool = False  # every generated image as a PNG under samples/

    def __post_init__(self):
        values = {name: getattr(self, name) for name in ("rerank", "grid_prompts")}
        if min(values.values()) < 1:
            raise ValueError(f"eval.{', eval.'.join(values)} must be >= 1, got {values}")
        if self.rerank_by not in ("caption_loss", "clip_score"):
            raise ValueError(f"eval.rerank_by must be caption_loss or clip_score, got {self.rerank_by!r}")


def image_id(key: str, meta: dict) -> str:
    """Which image a sample shows: its source id (every caption row of an image shares it), the
    mirrored copies of pre-tokenized shards apart; a sample without one is an image of its own."""
    source = meta.get("source_id")
    if source in (None, ""):
        return f"key:{key}"
    return f"{source}|flip" if meta.get("hflip") else str(source)


@dataclass(frozen=True)
class Pick:
    """One chosen sample: where it is (the shard's place in the split, its URL, its position among
    the shard's complete samples), its key and its caption."""

    shard: int
    url: str
    index: int
    key: str
    caption: str
    image: str = ""  # the image's id (image_id): its other caption rows share it


@dataclass
class PromptSet:
    """The prompts of an evaluation: one caption row of each of the split's first `len(picks)`
    distinct images (by source id, in the order they first appear in the split).

    Which caption of an image is drawn from `caption_seed` and the image's id alone, so the set does
    not depend on the number of processes or data workers, nor on the model evaluated. On data with
    one caption per image (shapes) it is the split's first samples. FID compares the chosen rows'
    images (each distinct image once) with the images generated for their captions.
    """

    split: str
    picks: list[Pick]
    captions_available: int  # caption rows of the chosen images in the split
    split_images: int  # distinct images in the split
    split_captions: int  # caption rows in the split
    caption_seed: int
    captions_by_image: dict[str, list[str]] = field(default_factory=dict, repr=False)  # the split's rows (R-precision)

    @property
    def references(self) -> list[list[str]]:
        """Every caption row of each chosen image (captioning's references), in the order of the picks."""
        return [self.captions_by_image[pick.image] for pick in self.picks]

    @property
    def images(self) -> int:
        return len(self.picks)

    def seeds(self, seed: int | None) -> dict[str, int] | None:
        """Each prompt's sampling seed by sample key (None: unseeded), as task=generate seeds the
        captions in this order: a caption repeated across images gets new images at each repeat."""
        if seed is None:
            return None
        return dict(zip((pick.key for pick in self.picks), prompt_seeds(seed, [pick.caption for pick in self.picks])))

    def real_set(self) -> str:
        """What the real images of FID are, for the statistics' cache key."""
        return f"first-{self.images}-distinct-images-by-source-id"

    def protocol(self) -> dict:
        return {"images": self.images, "captions_available": self.captions_available,
                "caption_choice": f"one caption row per image, drawn with eval.caption_seed={self.caption_seed}",
                "split_images": self.split_images, "split_captions": self.split_captions}


def select_prompts(dm: ShardDataModule, split: str, num_prompts: int | None, caption_seed: int = 0) -> PromptSet:
    """The prompts of an evaluation of `split` on its first `num_prompts` distinct images (all when None).

    Reads the split's captions and JSON once (a pass over its shards, images left undecoded): an
    image's caption rows may lie anywhere in the split (Flickr8k-CN lists every image's first
    caption, then every second one...).
    """
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"eval.num_prompts must be >= 1 (or null: the whole split), got {num_prompts}")
    groups: dict[str, list[Pick]] = {}  # image id -> its caption rows, in the order images first appear
    for position, shard in enumerate(dm.cfg.shards(split)):
        for index, sample in enumerate(complete_samples(shard.url)):
            if index >= shard.samples:  # as the loaders read it: the manifest's count
                break
            key = sample["__key__"]
            try:
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except ValueError:  # a corrupt JSON: the decoder skips the sample (with a warning) if it is chosen
                meta = {}
            caption = sample["txt"].decode("utf-8", errors="replace")
            image = image_id(key, meta)
            groups.setdefault(image, []).append(Pick(position, shard.url, index, key, caption, image))
    if not groups:
        raise ValueError(f"split={split} of data={dm.cfg.name} ({dm.cfg.root}) has no samples with a caption: "
                         "evaluate another split (split=val or split=test) or convert the data again")
    chosen = list(groups.items())[:num_prompts]
    picks = [rows[random.Random(f"{caption_seed}|{image}").randrange(len(rows))] for image, rows in chosen]
    return PromptSet(split, picks, captions_available=sum(len(rows) for _, rows in chosen),
                     split_images=len(groups), split_captions=sum(len(rows) for rows in groups.values()),
                     caption_seed=caption_seed,
                     captions_by_image={image: [row.caption for row in rows] for image, rows in groups.items()})


class PromptStream(IterableDataset):
    """Batches of the chosen samples (decoded as the datamodule decodes evaluation samples) that one
    process evaluates: rank `rank` of `world_size` reads a contiguous share of the picks, and each
    data worker a contiguous share of the rank's batches.

    The rank is given, not read from torch.distributed inside the workers: a worker started with
    spawn or forkserver (macOS; Python 3.14's Linux default) has no process group and would read
    rank 0's share.
    """

    def __init__(self, picks: list[Pick], decode, batch_size: int, rank: int, world_size: int, collate_fn):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        self.decode, self.batch_size, self.collate_fn = decode, batch_size, collate_fn
        self.picks = picks[len(picks) * rank // world_size: len(picks) * (rank + 1) // world_size]

    def __len__(self) -> int:
        return math.ceil(len(self.picks) / self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first, end = len(self) * worker // workers, len(self) * (worker + 1) // workers
        mine = sorted(self.picks[first * self.batch_size: end * self.batch_size], key=lambda p: (p.shard, p.index))
        batch = []
        for sample in self._decoded(mine):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate_fn(batch)
                batch = []
        if batch:
            yield self.collate_fn(batch)

    def _decoded(self, picks: list[Pick]) -> Iterator[dict]:
        """The picks' samples decoded, in shard order (one pass over each shard that holds some)."""
        by_shard: dict[str, set[int]] = {}
        for pick in picks:
            by_shard.setdefault(pick.url, set()).add(pick.index)
        for url, indices in by_shard.items():
            last = max(indices)
            for index, sample in enumerate(complete_samples(url)):
                if index in indices:
                    try:
                        yield self.decode(sample, random.Random(sample["__key__"]))
                    except Exception as error:  # a bad sample must not end an evaluation
                        warnings.warn(f"skipped corrupt sample {sample['__key__']} in {url}: {error!r}")
                if index >= last:
                    break


def prompt_loader(dm: ShardDataModule, prompts: PromptSet, batch_size: int, rank: int = 0,
                  world_size: int = 1) -> DataLoader:
    """A loader (the datamodule's workers and pinning) over the prompts process `rank` of
    `world_size` evaluates, `batch_size` samples a batch. Pass the rank after the processes start
    (fabric.launch()): the data workers must not guess it."""
    full = dm.dataset(prompts.split, rank=0, world_size=1)  # its decoder and collation
    return dm.loader_for(PromptStream(prompts.picks, full.decode, batch_size, rank, world_size, full.collate_fn))


def gather_to_main(obj):
    """Every process's `obj` (a list in rank order) on the main process, None on the others; [obj]
    without torch.distributed. Tensors in `obj` must be on the CPU."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    main = torch.distributed.get_rank() == 0
    gathered = [None] * torch.distributed.get_world_size() if main else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


class _ImageSet:
    """What one image set (plain or reranked) collects on this process: per image its label
    (sample key, sample index), Caption Loss, oracle reading and CLIP score / R-precision hit, plus the
    grid prompts' images."""

    def __init__(self, fidelity, grid_prompts: int):
        self.fidelity, self.grid_prompts = fidelity, grid_prompts
        self.labels: list[tuple[str, int]] = []
        self.caption_losses: list[torch.Tensor] = []
        self.oracle_hits: list[dict] = []  # per image: oracle_accuracy of that image alone (1.0 / 0.0)
        self.grid: dict[str, torch.Tensor] = {}  # sample key -> its images, for the smallest keys seen
        self.clip = ClipTally()

    def add(self, images: torch.Tensor, keys: list[str], per_prompt: int, losses: torch.Tensor | None,
            attributes: list[dict] | None, clip: dict[str, torch.Tensor] | None = None) -> None:
        labels = [(key, sample) for key in keys for sample in range(per_prompt)]
        self.labels += labels
        if clip is not None:
            self.clip.add(clip)
        if self.fidelity is not None:
            self.fidelity.add_generated(images, labels)
        if losses is not None:
            self.caption_losses.append(losses)
        if attributes is not None:
            pixels = images.permute(0, 2, 3, 1).numpy()
            truths = [a for a in attributes for _ in range(per_prompt)]
            self.oracle_hits += [oracle_accuracy([image], [truth]) for image, truth in zip(pixels, truths)]
        # the grids show the first prompts by key: keep the smallest keys seen so far, each a copy of
        # its own images (a view, even of a copy of the batch, would keep its whole batch alive and
        # send it to the main process)
        for key, group in zip(keys, images.view(len(keys), per_prompt, *images.shape[1:])):
            if len(self.grid) < self.grid_prompts or key < max(self.grid):
                self.grid[key] = group.clone()
        self.grid = dict(sorted(self.grid.items())[: self.grid_prompts])

    def state(self) -> dict:
        return {"labels": self.labels, "caption_losses": self.caption_losses, "oracle_hits": self.oracle_hits,
                "grid": self.grid, "fidelity": self.fidelity.state() if self.fidelity is not None else None,
                "clip": self.clip.state()}

    def metrics(self, states: list[dict], oracle: bool) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
        """(metrics, the grid prompts' images by key, Caption Losses in label order) from every process's state()."""
        labels = [label for state in states for label in state["labels"]]
        order = sorted(range(len(labels)), key=labels.__getitem__)
        out, losses = {}, None
        if any(state["caption_losses"] for state in states):
            losses = torch.cat([loss for state in states for loss in state["caption_losses"]])[order]
            out["caption_loss"] = float(losses[~losses.isnan()].mean())
        out.update(ClipTally.metrics([state["clip"] for state in states]))
        if oracle:
            hits = [hit for state in states for hit in state["oracle_hits"]]
            out["attributes"] = {name: sum(hit[name] for hit in hits) / len(hits) for name in hits[0]}
        if self.fidelity is not None:
            for state in states[1:]:  # this process's own state is already in its accumulator
                self.fidelity.merge(state["fidelity"])
            out.update(self.fidelity.compute())
        items = [item for state in states for item in state["grid"].items()]
        grid = dict(sorted(items, key=lambda item: item[0])[: self.grid_prompts])
        return out, grid, losses


@torch.no_grad()
def evaluate(pipeline: T2IPipeline, batches: Iterable[dict], sampling: SamplingConfig, cfg: EvalConfig,
             out_dir: Path, scorer: CaptionScorer | None = None, fidelity_factory=None, logger=None,
             seeds: dict[str, int] | None = None, batch_size: int = 16, clip: ClipMetrics | None = None) -> dict | None:
    """Generate `sampling.samples_per_prompt` images for every caption of `batches` (see prompt_loader)
    and score them; see the module doc.

    `seeds` gives each prompt's sampling seed by sample key (PromptSet.seeds; None: unseeded), and
    `batch_size` the sequences per sampling batch. With reranking a prompt's candidates are drawn
    as one longer run of its stream: the plain images are its first samples_per_prompt, exactly the
    images task=generate gives for the caption. `fidelity_factory()` makes a FidelityAccumulator
    (FID, IS), or None to skip them. `clip` (ClipMetrics) adds the CLIP score and R-precision of
    every set and of the real images (the "real" row). Under torch.distributed every process
    evaluates its share and the main process gathers everything: the results are those of one process. It writes the
    grids, logs to `logger` (a Lightning logger, e.g. WandbLogger) and returns the results; other
    processes return None.
    """
    if cfg.rerank > 1 and cfg.rerank_by == "caption_loss" and scorer is None:
        raise ValueError("eval.rerank > 1 needs a captioning model: see caption_loss_unavailable "
                         "(or rerank by eval.rerank_by=clip_score)")
    if cfg.rerank > 1 and cfg.rerank_by == "clip_score" and clip is None:
        raise ValueError("eval.rerank_by=clip_score needs the CLIP model (eval.clip=true)")
    if seeds is None and sampling.seed is not None:
        raise ValueError("evaluate() needs the prompts' seeds (PromptSet.seeds) when sampling.seed is set")
    per_prompt, k = sampling.samples_per_prompt, cfg.rerank
    candidates = replace(sampling, samples_per_prompt=per_prompt * k)  # candidate c of sample s: row c * S + s
    sets = {"plain": _ImageSet(fidelity_factory() if fidelity_factory else None, cfg.grid_prompts)}
    if k > 1:
        sets[f"rerank_{k}"] = _ImageSet(fidelity_factory() if fidelity_factory else None, cfg.grid_prompts)
    plain = sets["plain"]
    real = ClipTally()  # the real images' CLIP score and R-precision: the reference row
    prompts: dict[str, str] = {}  # sample key -> caption
    calls = SamplingStats()  # model calls (sampling.method=sjd makes fewer than token-by-token sampling)
    oracle = True  # every sample knows its true attributes (the shapes data)
    for batch in tqdm(batches, desc="evaluate"):
        keys, captions = list(batch["key"]), list(batch["caption"])
        n = len(keys)
        oracle = oracle and all("attributes" in meta for meta in batch["meta"])
        attributes = [meta["attributes"] for meta in batch["meta"]] if oracle else None
        if plain.fidelity is not None:  # the reranked set reads the real statistics from the cache
            plain.fidelity.add_real(batch["image"], keys)
        if clip is not None and "image" in batch:  # code shards carry no real images
            real.add(clip(batch["image"], keys))
        codes = pipeline.sample_codes(captions, candidates, batch_size,
                                       None if seeds is None else [seeds[key] for key in keys], stats=calls)
        losses = scorer([c for c in captions for _ in range(per_prompt * k)], codes).cpu() if scorer else None
        codes = codes.view(n, k, per_prompt, *codes.shape[1:])
        losses = None if losses is None else losses.view(n, k, per_prompt)
        images = pipeline.decode(codes[:, 0].flatten(0, 1), batch_size)  # the first candidates: plain sampling
        scores = None if clip is None else clip(images, keys, per_prompt)
        plain.add(images, keys, per_prompt, None if losses is None else losses[:, 0].flatten(), attributes, scores)
        if k > 1 and cfg.rerank_by == "clip_score":  # every candidate's image and CLIP score, the highest kept
            others = pipeline.decode(codes[:, 1:].flatten(0, 2), batch_size)
            others = others.view(n, k - 1, per_prompt, *images.shape[1:])
            every = torch.cat([images.view(n, 1, per_prompt, *images.shape[1:]), others], 1)
            other_scores = clip(others.flatten(0, 2), keys, (k - 1) * per_prompt)  # a prompt's candidates together
            every_scores = {name: torch.cat([scores[name].view(n, 1, per_prompt), value.view(n, k - 1, per_prompt)], 1)
                            for name, value in other_scores.items()}
            chosen_images, best = rerank(every, every_scores["clip_score"], highest=True)
            sets[f"rerank_{k}"].add(chosen_images.flatten(0, 1), keys, per_prompt,
                                    None if losses is None else take(losses, best).flatten(), attributes,
                                    {name: take(value, best).flatten() for name, value in every_scores.items()})
        elif k > 1:
            chosen, best = rerank(codes, losses)
            chosen_images = pipeline.decode(chosen.flatten(0, 1), batch_size)
            sets[f"rerank_{k}"].add(chosen_images, keys, per_prompt, take(losses, best).flatten(), attributes,
                                    None if clip is None else clip(chosen_images, keys, per_prompt))
        if cfg.save_images:  # each process writes its own prompts' images
            _save_images(images, out_dir / "samples", keys, per_prompt)
        prompts.update(zip(keys, captions))
    shares = gather_to_main({"prompts": prompts, "oracle": oracle, "calls": asdict(calls), "real": real.state(),
                             "sets": {name: image_set.state() for name, image_set in sets.items()}})
    if shares is None:
        return None
    prompts = {key: caption for share in shares for key, caption in share["prompts"].items()}
    if len(prompts) < sum(len(share["prompts"]) for share in shares):
        warnings.warn("the split has samples with the same key: prompts are ordered by key, so the results may "
                      "depend on the number of processes")
    if not prompts:
        raise ValueError("the split has no captions to generate from")
    if not any(caption.strip() for caption in prompts.values()):
        raise ValueError(f"all {len(prompts)} captions are empty: there is no text to evaluate text-to-image on "
                         "(evaluate another split=)")
    oracle = all(share["oracle"] for share in shares)
    results = {"prompts": len(prompts), "samples_per_prompt": per_prompt, "rerank": k,
               "sampling": asdict(sampling),
               "images_per_set": len(prompts) * per_prompt}
    if k > 1:
        results["reranked_by"] = cfg.rerank_by  # (not "rerank_...": those keys are image sets)
    if clip is not None:
        results["clip"] = clip.protocol()
        real_metrics = ClipTally.metrics([share["real"] for share in shares])
        if real_metrics:
            results["real"] = real_metrics
    if sampling.method != "ar":  # the calls saved; summed over processes and batches, so they depend on both
        results["model_calls"] = {name: sum(share["calls"][name] for share in shares) for name in asdict(calls)}
    shown = {}  # set name -> (the grid images, their Caption Losses)
    for name, image_set in sets.items():
        results[name], grid, losses = image_set.metrics([share["sets"][name] for share in shares], oracle)
        grid_prompts = [prompts[key] for key in grid]  # the same first keys in every set
        images = torch.cat(list(grid.values()))
        save_captioned_grid(images, grid_prompts, out_dir / _grid_file(name), per_prompt)
        shown[name] = (images, None if losses is None else losses[: len(images)])  # labels sort as the grid
    if logger is not None:
        log_results(logger, results, grid_prompts, shown)
    return results


def _grid_file(set_name: str) -> str:
    return "grid.png" if set_name == "plain" else f"grid_{set_name}.png"


def _save_images(images: torch.Tensor, folder: Path, keys: list[str], per_prompt: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        prompt, sample = divmod(index, per_prompt)
        name = keys[prompt].replace("/", "_")  # keys may look like paths
        torchvision.utils.save_image(image.float() / 255, folder / f"{name}_{sample:02d}.png")


def flat_metrics(results: dict) -> dict[str, float]:
    """The numbers of every image set as flat logger keys: eval/fid, eval/attributes/color,
    eval/rerank_4/fid..., and the real images' eval/real/clip_score... (the protocol is left to results.json)."""
    flat = {}
    for name in (s for s in results if s in ("plain", "real") or s.startswith("rerank_")):
        prefix = "eval" if name == "plain" else f"eval/{name}"
        for metric, value in results[name].items():
            if metric == "attributes":
                flat.update({f"{prefix}/attributes/{a}": float(v) for a, v in value.items()})
            elif isinstance(value, (int, float)):
                flat[f"{prefix}/{metric}"] = float(value)
    return flat


def log_results(logger, results: dict, grid_prompts: list[str], shown: dict) -> None:
    """Metrics to a Lightning logger; to W&B also a table with a row per grid image: its prompt, the
    image and its Caption Loss, for plain sampling and for each reranked set."""
    logger.log_metrics(flat_metrics(results))
    if not hasattr(logger, "log_table"):  # CSV and the like take numbers only
        return
    import wandb  # the logger is a WandbLogger: wandb is installed

    per_prompt = results["samples_per_prompt"]
    columns = ["prompt", "sample"]
    for name, (_, losses) in shown.items():
        label = "" if name == "plain" else f"{name}_"
        columns += [f"{label}image"] + ([f"{label}caption_loss"] if losses is not None else [])
    rows = []
    for index in range(len(grid_prompts) * per_prompt):
        row = [grid_prompts[index // per_prompt], index % per_prompt]
        for images, losses in shown.values():
            row.append(wandb.Image(images[index].permute(1, 2, 0).numpy()))
            if losses is not None:
                row.append(float(losses[index]))
        rows.append(row)
    logger.log_table("eval/samples", columns=columns, data=rows)


def markdown_table(results: dict) -> str:
    """results.md: one row per image set (plain, reranked), and the real images' row when the CLIP
    metrics were computed."""
    sets = [name for name in results if name == "plain" or name.startswith("rerank_")] + \
        (["real"] if "real" in results else [])
    columns = ["fid", "is_mean", "caption_loss"] + (["clip_score", "r_precision"] if "clip" in results else [])
    attribute_names = ["color", "shape", "position", "all"]
    has_attributes = any("attributes" in results[s] for s in sets)
    header = ["set", *columns] + ([f"{a} %" for a in attribute_names] if has_attributes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sets:
        metrics = results[name]
        row = [name] + [f"{metrics[c]:.3f}" if c in metrics else "n/a" for c in columns]
        if has_attributes:
            row += [f"{100 * metrics['attributes'][a]:.1f}" if "attributes" in metrics else "n/a"
                    for a in attribute_names]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"{results['prompts']} prompts x {results['samples_per_prompt']} samples, sampling {results['sampling']}"]
    if "prompt_set" in results:
        chosen = results["prompt_set"]
        notes.append(f"prompts: one caption of each of {chosen['images']} distinct images "
                     f"({chosen['captions_available']} captions available; {chosen['caption_choice']})")
    if "model_calls" in results:
        calls = results["model_calls"]
        notes.append(f"sampling made {calls['model_calls']} model calls ({calls['token_by_token_calls']} token by token; "
                     "both depend on the sampling batch and the number of processes)")
    if results["rerank"] > 1 and results.get("reranked_by") == "clip_score":
        notes.append(f"rerank_{results['rerank']}: the highest CLIP score of {results['rerank']} candidates per image "
                     "(by the CLIP model that scores: its CLIP score and R-precision are biased upward)")
    elif results["rerank"] > 1:
        notes.append(f"rerank_{results['rerank']}: the lowest Caption Loss of {results['rerank']} candidates per image "
                     f"(scored by {results.get('caption_model')})")
    if "clip" in results:
        clip = results["clip"]
        notes.append(f"clip_score: {clip['clip_score']}; r_precision: {clip['r_precision']}; model {clip['model']}; "
                     f"{clip.get('text_context', 'texts cut at %d tokens' % clip['text_max_tokens'])}")
        notes.append("real: the split's real images with their prompts (the reference row)" if "real" in results else
                     "real: no reference row (the shards hold codes, not images)")
    if "precision" in results:
        notes.append(f"computed in {results['precision']['trainer']}, float32 matmuls at "
                     f"'{results['precision']['matmul']}' precision")
    if results.get("caption_loss_unavailable"):
        notes.append(f"Caption Loss and reranking unavailable: {results['caption_loss_unavailable']}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def warn_unavailable(reason: str) -> None:
    warnings.warn(f"Caption Loss and reranking unavailable: {reason}")
