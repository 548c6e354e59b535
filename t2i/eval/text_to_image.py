"""Text-to-image evaluation of a GPT checkpoint on a split's captions.

For every caption: `samples_per_prompt` images, each the best of `rerank` candidates by Caption
Loss (CogView: the mean negative log-likelihood per text token of the caption given the image,
under a captioning model). Reported with and without reranking (the first candidate is what
plain sampling gives): FID and IS against the split's real images, mean Caption Loss, and on the
shapes data the oracle's attribute accuracy.

Prompts are identified by their sample keys: a prompt's seed comes from its key and everything is
ordered by key before the metrics, so several processes (each evaluating a share of the split)
give the numbers of one.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from t2i.data.datamodule import ShardDataModule
from t2i.data.shapes import oracle_accuracy
from t2i.data.stream import Shard, ShardStream
from t2i.checkpoints import load_gpt
from t2i.data.tokenizer import FixedLengthTokenizer
from t2i.models.gpt import GPT
from t2i.sampling import Generator, SamplingConfig, save_captioned_grid


@torch.no_grad()
def caption_loss(model: GPT, codes: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Per sample: mean NLL of the text tokens (padding excluded) in the image-to-text sequence.

    codes [N, image_len] (or [N, h, w]), text ids [N, text_len] -> [N] (NaN for an empty text).
    As in training, a text position competes only among text ids: only the text positions are
    projected, and only onto the text rows of the head.
    """
    layout = model.layout
    sequence = layout.image_to_text(codes, text)  # a clear error for a layout without captioning
    text_rows = slice(layout.text_offset, layout.text_offset + layout.n_text_tokens)
    logits = model(sequence[:, :-1], last=layout.text_len, head_rows=text_rows)
    nll = F.cross_entropy(logits.float().transpose(1, 2), text, reduction="none")
    real = text > 0
    return (nll * real).sum(1) / real.sum(1)  # 0/0 = NaN: an empty caption has no loss


class CaptionScorer:
    """Caption Loss under a captioning GPT (one trained with stage.caption_prob > 0)."""

    def __init__(self, gpt: GPT, tokenizer: FixedLengthTokenizer, source: str):
        self.gpt, self.tokenizer, self.source = gpt.eval(), tokenizer, source

    @classmethod
    def for_generator(cls, generator: Generator, caption_ckpt: str | None) -> tuple[CaptionScorer | None, str]:
        """The evaluated model itself when it learned captioning, else `caption_ckpt`; (None, reason) when neither."""
        if caption_ckpt:
            gpt, record = load_gpt(caption_ckpt)
            if not record.caption_prob:
                return None, f"eval.caption_ckpt={caption_ckpt} was trained without the caption direction"
            ours, theirs = generator.record.vqgan.get("sha256"), record.vqgan.get("sha256")
            if ours != theirs:
                raise ValueError(f"eval.caption_ckpt={caption_ckpt} reads codes of another VQGAN "
                                 f"({str(theirs)[:12]}..., the evaluated model's is {str(ours)[:12]}...)")
            return cls(gpt.to(generator.device), record.tokenizer_model(), str(caption_ckpt)), str(caption_ckpt)
        if generator.record.caption_prob:
            return cls(generator.gpt, generator.tokenizer, "self"), "self"
        if not generator.gpt.layout.predicts_text:
            return None, (f"a {generator.gpt.layout.kind}-layout model has no text head to score captions with "
                          "(pass eval.caption_ckpt=a t2i captioning model over the same VQGAN)")
        return None, ("the checkpoint was trained without the caption direction (stage.caption_prob=0) and no "
                      "eval.caption_ckpt was given")

    def __call__(self, prompts: list[str], codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Caption Loss [N] of prompts[i] for codes[i]."""
        text = self.tokenizer(prompts).to(codes.device)
        return torch.cat([caption_loss(self.gpt, c, t) for c, t in zip(codes.split(batch_size), text.split(batch_size))])


@dataclass
class EvalConfig:
    samples_per_prompt: int = 1
    rerank: int = 1  # candidates per sample; the lowest Caption Loss is kept
    batch_size: int = 16  # sequences per sampling batch
    grid_prompts: int = 16  # prompts shown in the captioned grids (and the logger's table)
    save_images: bool = False  # every generated image as a PNG under samples/

    def __post_init__(self):
        values = {name: getattr(self, name) for name in ("samples_per_prompt", "rerank", "batch_size", "grid_prompts")}
        if min(values.values()) < 1:
            raise ValueError(f"eval.{', eval.'.join(values)} must be >= 1, got {values}")


def first_samples(shards: list[Shard], n: int | None) -> list[Shard]:
    """The shards cut to the first n samples of their concatenation (all of them when n is None)."""
    kept, left = [], n
    for shard in shards:
        take = shard.samples if left is None else min(shard.samples, left)
        if take > 0:
            kept.append(Shard(shard.url, take))
            left = None if left is None else left - take
    return kept


def prompt_loader(dm: ShardDataModule, split: str, num_prompts: int | None) -> tuple[DataLoader, int]:
    """A loader over the first `num_prompts` samples of a split (all when None), and how many that is.

    The prompts are chosen before the split is cut over processes and data workers (whose batches
    arrive interleaved), so any number of processes evaluates the same prompts; each process's
    loader reads its share.
    """
    if num_prompts is not None and num_prompts < 1:
        raise ValueError(f"eval.num_prompts must be >= 1 (or null: the whole split), got {num_prompts}")
    full = dm.dataset(split)
    shards = first_samples(full.shards, num_prompts)
    count = sum(shard.samples for shard in shards)
    if count == 0:
        raise ValueError(f"split={split} of data={dm.cfg.name} ({dm.cfg.root}) has no samples with a caption: "
                         "evaluate another split (split=val or split=test) or convert the data again")
    stream = ShardStream(shards, full.decode, full.batch_size, mode="eval", shuffle_buffer=0, seed=full.seed,
                         collate_fn=full.collate_fn)
    return dm.loader_for(stream), count


def prompt_seed(seed: int, key: str) -> int:
    """A prompt's sampling seed, from the run's seed and its sample key: the same whichever process,
    batch or position the prompt lands in."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # below 2**63: any torch generator takes it


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
    (sample key, sample index), Caption Loss and oracle reading, plus the grid prompts' images."""

    def __init__(self, fidelity, grid_prompts: int):
        self.fidelity, self.grid_prompts = fidelity, grid_prompts
        self.labels: list[tuple[str, int]] = []
        self.caption_losses: list[torch.Tensor] = []
        self.oracle_hits: list[dict] = []  # per image: oracle_accuracy of that image alone (1.0 / 0.0)
        self.grid: dict[str, torch.Tensor] = {}  # sample key -> its images, for the smallest keys seen

    def add(self, images: torch.Tensor, keys: list[str], per_prompt: int, losses: torch.Tensor | None,
            attributes: list[dict] | None) -> None:
        labels = [(key, sample) for key in keys for sample in range(per_prompt)]
        self.labels += labels
        if self.fidelity is not None:
            self.fidelity.add_generated(images, labels)
        if losses is not None:
            self.caption_losses.append(losses)
        if attributes is not None:
            pixels = images.permute(0, 2, 3, 1).numpy()
            truths = [a for a in attributes for _ in range(per_prompt)]
            self.oracle_hits += [oracle_accuracy([image], [truth]) for image, truth in zip(pixels, truths)]
        # the grids show the first prompts by key: keep the smallest keys seen so far (as copies: a
        # view would keep, and send to the main process, its whole batch)
        self.grid.update(zip(keys, images.view(len(keys), per_prompt, *images.shape[1:]).clone()))
        self.grid = dict(sorted(self.grid.items())[: self.grid_prompts])

    def state(self) -> dict:
        return {"labels": self.labels, "caption_losses": self.caption_losses, "oracle_hits": self.oracle_hits,
                "grid": self.grid, "fidelity": self.fidelity.state() if self.fidelity is not None else None}

    def metrics(self, states: list[dict], oracle: bool) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor | None]:
        """(metrics, the grid prompts' images by key, Caption Losses in label order) from every process's state()."""
        labels = [label for state in states for label in state["labels"]]
        order = sorted(range(len(labels)), key=labels.__getitem__)
        out, losses = {}, None
        if any(state["caption_losses"] for state in states):
            losses = torch.cat([loss for state in states for loss in state["caption_losses"]])[order]
            out["caption_loss"] = float(losses[~losses.isnan()].mean())
        if oracle:
            hits = [hit for state in states for hit in state["oracle_hits"]]
            out["attributes"] = {name: sum(hit[name] for hit in hits) / len(hits) for name in hits[0]}
        if self.fidelity is not None:
            for state in states[1:]:  # this process's own state is already in its accumulator
                self.fidelity.merge(state["fidelity"])
            out.update(self.fidelity.compute())
        grid = dict(sorted(item for state in states for item in state["grid"].items())[: self.grid_prompts])
        return out, grid, losses


@torch.no_grad()
def evaluate(generator: Generator, batches: Iterable[dict], sampling: SamplingConfig, cfg: EvalConfig,
             out_dir: Path, scorer: CaptionScorer | None = None, fidelity_factory=None, logger=None) -> dict | None:
    """Generate for every caption of `batches` (loader batches of a split, see prompt_loader) and score;
    see the module doc.

    `fidelity_factory()` makes a FidelityAccumulator (FID, IS), or None to skip them. Prompts are
    ordered by sample key, and prompt `key` samples with seed prompt_seed(sampling.seed, key).
    Under torch.distributed every process evaluates its share of the split and the main process
    gathers everything: the results are those of one process. It writes the grids, logs to
    `logger` (a Lightning logger, e.g. WandbLogger) and returns the results; other processes
    return None.
    """
    if cfg.rerank > 1 and scorer is None:
        raise ValueError("eval.rerank > 1 needs a captioning model: see caption_loss_unavailable")
    per_prompt, k = cfg.samples_per_prompt, cfg.rerank
    candidates = replace(sampling, samples_per_prompt=per_prompt * k)
    sets = {"plain": _ImageSet(fidelity_factory() if fidelity_factory else None, cfg.grid_prompts)}
    if k > 1:
        sets[f"rerank_{k}"] = _ImageSet(fidelity_factory() if fidelity_factory else None, cfg.grid_prompts)
    plain = sets["plain"]
    prompts: dict[str, str] = {}  # sample key -> caption
    oracle = True  # every sample knows its true attributes (the shapes data)
    for batch in tqdm(batches, desc="evaluate"):
        keys, captions = list(batch["key"]), list(batch["caption"])
        n = len(keys)
        oracle = oracle and all("attributes" in meta for meta in batch["meta"])
        attributes = [meta["attributes"] for meta in batch["meta"]] if oracle else None
        if plain.fidelity is not None:  # the reranked set reads the real statistics from the cache
            plain.fidelity.add_real(batch["image"], keys)
        seeds = None if sampling.seed is None else [prompt_seed(sampling.seed, key) for key in keys]
        codes = generator.sample_codes(captions, candidates, cfg.batch_size, seeds)
        losses = scorer([c for c in captions for _ in range(per_prompt * k)], codes).cpu() if scorer else None
        codes = codes.view(n, per_prompt, k, *codes.shape[1:])
        images = generator.decode(codes[:, :, 0].flatten(0, 1), cfg.batch_size)  # the first candidate: plain sampling
        plain.add(images, keys, per_prompt, losses.view(n, per_prompt, k)[:, :, 0].flatten() if scorer else None,
                  attributes)
        if k > 1:
            chosen, chosen_losses = pick_best(codes, losses.view(n, per_prompt, k))
            sets[f"rerank_{k}"].add(generator.decode(chosen.flatten(0, 1), cfg.batch_size), keys, per_prompt,
                                    chosen_losses.flatten(), attributes)
        if cfg.save_images:  # each process writes its own prompts' images
            _save_images(images, out_dir / "samples", keys, per_prompt)
        prompts.update(zip(keys, captions))
    shares = gather_to_main({"prompts": prompts, "oracle": oracle,
                             "sets": {name: image_set.state() for name, image_set in sets.items()}})
    if shares is None:
        return None
    prompts = {key: caption for share in shares for key, caption in share["prompts"].items()}
    if len(prompts) < sum(len(share["prompts"]) for share in shares):
        warnings.warn("the split has samples with the same key: prompts are ordered and seeded by key, so the "
                      "results may depend on the number of processes")
    if not prompts:
        raise ValueError("the split has no captions to generate from")
    if not any(caption.strip() for caption in prompts.values()):
        raise ValueError(f"all {len(prompts)} captions are empty: there is no text to evaluate text-to-image on "
                         "(evaluate another split=)")
    oracle = all(share["oracle"] for share in shares)
    results = {"prompts": len(prompts), "samples_per_prompt": per_prompt, "rerank": k,
               "sampling": asdict(replace(sampling, samples_per_prompt=per_prompt)),
               "images_per_set": len(prompts) * per_prompt}
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


def pick_best(codes: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-reranking: codes [n, S, K, h, w] and Caption Losses [n, S, K] -> the lowest-loss candidate of each."""
    best = losses.nan_to_num(float("inf")).argmin(-1)  # [n, S]
    index = best[:, :, None, None, None].expand(-1, -1, 1, *codes.shape[3:])
    return codes.gather(2, index)[:, :, 0], losses.gather(2, best[:, :, None])[:, :, 0]


def _save_images(images: torch.Tensor, folder: Path, keys: list[str], per_prompt: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        prompt, sample = divmod(index, per_prompt)
        name = keys[prompt].replace("/", "_")  # keys may look like paths
        torchvision.utils.save_image(image.float() / 255, folder / f"{name}_{sample:02d}.png")


def flat_metrics(results: dict) -> dict[str, float]:
    """The numbers of every image set as flat logger keys: eval/fid, eval/attributes/color,
    eval/rerank_4/fid... (the protocol is left to results.json)."""
    flat = {}
    for name in (s for s in results if s == "plain" or s.startswith("rerank_")):
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
    """results.md: one row per image set (plain, reranked)."""
    sets = [name for name in results if name == "plain" or name.startswith("rerank_")]
    columns = ["fid", "is_mean", "caption_loss"]
    attribute_names = ["color", "shape", "position", "all"]
    has_attributes = any("attributes" in results[s] for s in sets)
    header = ["set", *columns] + ([f"{a} %" for a in attribute_names] if has_attributes else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sets:
        metrics = results[name]
        row = [name] + [f"{metrics[c]:.3f}" if c in metrics else "n/a" for c in columns]
        if has_attributes:
            row += [f"{100 * metrics['attributes'][a]:.1f}" for a in attribute_names]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"{results['prompts']} prompts x {results['samples_per_prompt']} samples, sampling {results['sampling']}"]
    if results["rerank"] > 1:
        notes.append(f"rerank_{results['rerank']}: the lowest Caption Loss of {results['rerank']} candidates per image "
                     f"(scored by {results.get('caption_model')})")
    if results.get("caption_loss_unavailable"):
        notes.append(f"Caption Loss and reranking unavailable: {results['caption_loss_unavailable']}")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def warn_unavailable(reason: str) -> None:
    warnings.warn(f"Caption Loss and reranking unavailable: {reason}")
