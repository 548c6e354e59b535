"""Chinese-CLIP score and R-precision of generated images (and of the real images: the reference row).

The model is OFA-Sys Chinese-CLIP through transformers' ChineseCLIP classes (`ChineseCLIPModel`,
`ChineseCLIPProcessor`): the Hub copies (`OFA-Sys/chinese-clip-vit-base-patch16`, `-large-patch14`,
...) are OFA-Sys's own conversions, a Hub id downloads once into the Hugging Face cache, a local
folder loads offline, and a tiny random model can be built from a config (the tests). The
`cn_clip` package would add its own downloads and a second loader for the same weights.

- **CLIP score**: per image, 100 x the cosine between its image embedding and its prompt's text
  embedding, clipped at 0, averaged over the images: the convention of torchmetrics' `CLIPScore`
  (whose code clips the average rather than each image: the same number whenever no cosine is
  negative, as with trained CLIPs). torchmetrics' CLIPScore cannot read transformers 5's
  ChineseCLIP as it is (its `get_*_features` return model outputs, not tensors), so the scores are
  computed here with the same processor calls and checked against CLIPScore in the tests.
- **R-precision** (MUGE's text-to-image benchmark, after AttnGAN): the prompt and `distractors`
  other captions of the split, drawn with a seed per image; a hit when the prompt has the highest
  cosine with the image; the metric is the fraction of hits (top-1 accuracy among 1 + distractors:
  chance is 1 / (1 + distractors)). Distractors are distinct caption texts of the split's other
  images, never a text equal to the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from t2i.precision import exact_fp32

DEFAULT_MODEL = "OFA-Sys/chinese-clip-vit-base-patch16"
# Chinese-CLIP's text context in tokens: [CLS], up to 50 tokens, [SEP]. What its models were trained and are
# evaluated with (cn_clip's `tokenize(texts, context_length=52)`); transformers' config states only the text
# BERT's 512 position embeddings, which would let a longer caption in than Chinese-CLIP ever reads.
CONTEXT_LENGTH = 52
SCORE = "100 x cosine(image, prompt), clipped at 0 per image, averaged (torchmetrics CLIPScore's convention)"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists() or name.count("/") > 1


def load_chinese_clip(name_or_path: str, setting: str = "eval.clip_model"):
    """(ChineseCLIPModel in eval mode, ChineseCLIPProcessor) from a local folder or a Hub id, or an
    error naming `setting` and how to provide the weights."""
    from transformers import AutoConfig, ChineseCLIPModel, ChineseCLIPProcessor

    name = str(name_or_path)
    off = "or skip the CLIP metrics with eval.clip=false"
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{setting}={name}: no Chinese-CLIP folder there (expected config.json and the "
                                    "weights as save_pretrained writes them, or a Hub download such as "
                                    f"`huggingface-cli download {DEFAULT_MODEL} --local-dir DIR`), {off}")
        name = str(path)
    try:
        config = AutoConfig.from_pretrained(name)
    except OSError as error:  # no network and nothing cached, a wrong id, a truncated download
        raise RuntimeError(
            f"could not load the Chinese-CLIP model {setting}={name} ({error}). A Hub id downloads once into the "
            f"Hugging Face cache; offline, download it on a machine with internet access (`huggingface-cli download "
            f"{DEFAULT_MODEL} --local-dir DIR`) and pass {setting}=DIR, {off}") from error
    if config.model_type != "chinese_clip":
        raise ValueError(f"{setting}={name} is a '{config.model_type}' model, not a Chinese-CLIP (model_type "
                         f"chinese_clip, e.g. {DEFAULT_MODEL}), {off}")
    model, info = ChineseCLIPModel.from_pretrained(name, output_loading_info=True)
    missing = [key for key in info["missing_keys"] if "position_ids" not in key]
    if missing or info.get("mismatched_keys"):  # partly random weights would give meaningless scores
        raise ValueError(f"{setting}={name}: the weights do not fit ChineseCLIPModel (missing {missing[:5]}, "
                         f"mis-shaped {list(info.get('mismatched_keys') or [])[:5]})")
    return model.eval(), ChineseCLIPProcessor.from_pretrained(name)


class TensorFeatures(torch.nn.Module):
    """A transformers 5 ChineseCLIPModel with transformers 4's feature API (tensors, not model outputs): what
    torchmetrics' CLIPScore calls, through its `model_name_or_path=callable`; the tests and
    experiments/bench_clip.py check t2i's scores against CLIPScore with it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class ChineseClip:
    """A Chinese-CLIP as two functions: uint8 images [N, 3, H, W] and texts to unit embeddings
    (float32, on the CPU), computed in exact fp32 whatever the run's autocast and matmul settings
    (as FID's Inception features: t2i.precision)."""

    def __init__(self, model, processor, source: str, device="cpu", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"eval.clip_batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.source = model.eval().to(device), processor, source
        self.device, self.batch_size = torch.device(device), batch_size
        self.max_tokens = min(CONTEXT_LENGTH, model.config.text_config.max_position_embeddings)  # texts cut there
        self.revision = getattr(model.config, "_commit_hash", None)  # the Hub commit, when it came from there
        self._texts: dict[str, torch.Tensor] = {}  # caption -> its embedding (prompts recur across image sets)

    @classmethod
    def load(cls, name_or_path: str, device="cpu", batch_size: int = 64) -> ChineseClip:
        model, processor = load_chinese_clip(name_or_path)
        return cls(model, processor, str(name_or_path), device, batch_size)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {list(images.shape)}")
        parts = []
        for chunk in images.cpu().split(self.batch_size):
            # the processor's own resize, crop and normalisation (as torchmetrics calls it)
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"].to(self.device)
            with exact_fp32(self.device.type):
                parts.append(self.model.get_image_features(pixel_values=pixels).pooler_output.float())
        return F.normalize(torch.cat(parts), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        new = list(dict.fromkeys(text for text in texts if text not in self._texts))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start: start + self.batch_size]
            tokens = self.processor(text=chunk, padding=True, truncation=True, max_length=self.max_tokens,
                                    return_tensors="pt").to(self.device)
            with exact_fp32(self.device.type):
                features = self.model.get_text_features(input_ids=tokens["input_ids"],
                                                        attention_mask=tokens["attention_mask"]).pooler_output
            self._texts.update(zip(chunk, F.normalize(features.float(), dim=-1).cpu()))
        if not texts:
            return torch.empty(0, self.model.config.projection_dim)
        return torch.stack([self._texts[text] for text in texts])


def draw_distractors(captions_by_image: dict[str, list[str]], prompts: dict[str, tuple[str, str]], count: int,
                     seed: int = 0, split: str = "the split") -> dict[str, list[str]]:
    """R-precision's distractors: for each prompt (sample key -> (image id, caption)), `count` distinct
    caption texts of the split's other images (`captions_by_image`: image id -> its caption rows, in
    split order), none equal to the prompt, drawn with Random(seed, image id): the same for every
    model and any number of processes. An error before any sampling when the split has too few."""
    if count < 1:
        raise ValueError(f"eval.rprecision_distractors must be >= 1, got {count}")
    pool = list(dict.fromkeys(text for rows in captions_by_image.values() for text in rows))
    in_pool = set(pool)
    drawn = {}
    for key, (image, caption) in prompts.items():
        excluded = set(captions_by_image.get(image, ())) | {caption}
        available = len(pool) - len(excluded & in_pool)
        if available < count:
            raise ValueError(f"R-precision draws eval.rprecision_distractors={count} other captions per prompt, but "
                             f"{split} has only {available} distinct captions besides those of image {image}: lower "
                             "eval.rprecision_distractors, evaluate a larger split=, or set eval.clip=false")
        order = random.Random(f"{seed}|{image}").sample(range(len(pool)), min(len(pool), count + len(excluded)))
        drawn[key] = [pool[i] for i in order if pool[i] not in excluded][:count]
    return drawn


class ClipMetrics:
    """Per image: its CLIP score (100 x cosine with its prompt, unclipped: a ranking for reranking) and
    its R-precision hit (the prompt ranks first among itself and its distractors)."""

    def __init__(self, clip: ChineseClip, prompts: dict[str, str], distractors: dict[str, list[str]], seed: int = 0):
        self.clip, self.prompts, self.distractors, self.seed = clip, prompts, distractors, seed

    def __call__(self, images: torch.Tensor, keys: Sequence[str], per_prompt: int = 1) -> dict[str, torch.Tensor]:
        """images [len(keys) x per_prompt, 3, H, W] (a prompt's samples together) -> {"clip_score": [N],
        "r_precision_hit": [N] (1.0 / 0.0)}."""
        if len(images) != len(keys) * per_prompt:
            raise ValueError(f"{len(images)} images for {len(keys)} prompts x {per_prompt} samples")
        image = self.clip.image_embeddings(images).view(len(keys), per_prompt, -1)  # [n, S, D]
        texts = [[self.prompts[key], *self.distractors[key]] for key in keys]
        text = self.clip.text_embeddings([t for row in texts for t in row]).view(len(keys), len(texts[0]), -1)
        similarity = torch.einsum("nsd,ncd->nsc", image, text)  # [n, S, 1 + distractors]; column 0: the prompt
        hits = similarity[..., 0] > similarity[..., 1:].amax(-1)
        return {"clip_score": 100 * similarity[..., 0].flatten(), "r_precision_hit": hits.flatten().float()}

    def protocol(self) -> dict:
        distractors = len(next(iter(self.distractors.values()), []))
        return {"model": self.clip.source, "revision": self.clip.revision,
                "library": "transformers ChineseCLIPModel + ChineseCLIPProcessor (its resize, crop, normalisation)",
                "clip_score": SCORE, "text_max_tokens": self.clip.max_tokens,
                "text_context": f"texts cut at {self.clip.max_tokens} tokens, [CLS] and [SEP] included "
                                f"(Chinese-CLIP's context: cn_clip's tokenize)",
                "r_precision": f"top-1 among the prompt and {distractors} distinct captions of the split's other "
                               f"images, drawn with eval.rprecision_seed={self.seed} "
                               f"(chance {1 / (1 + distractors):.3f})"}


class ClipTally:
    """One image set's CLIP scores and R-precision hits on this process; metrics() over every process's state()."""

    def __init__(self):
        self.scores: list[torch.Tensor] = []
        self.hits: list[torch.Tensor] = []

    def add(self, result: dict[str, torch.Tensor]) -> None:
        self.scores.append(result["clip_score"])
        self.hits.append(result["r_precision_hit"])

    def state(self) -> dict:
        return {"scores": self.scores, "hits": self.hits}

    @staticmethod
    def metrics(states: list[dict]) -> dict:
        """{"clip_score", "r_precision"}, or {} when nothing was scored."""
        scores = [part for state in states for part in state["scores"]]
        if not scores:
            return {}
        hits = torch.cat([part for state in states for part in state["hits"]])
        return {"clip_score": float(torch.cat(scores).clamp(min=0).mean()), "r_precision": float(hits.mean())}


def save_random_chinese_clip(path: str | Path, vocab: Sequence[str], seed: int = 0, image_size: int = 32,
                             patch_size: int = 8, width: int = 32, layers: int = 1, heads: int = 2,
                             projection_dim: int = 16, text_width: int | None = None,
                             text_layers: int | None = None) -> str:
    """Write a randomly initialised Chinese-CLIP with a processor as save_pretrained does: a BERT
    WordPiece vocabulary of the special tokens plus `vocab` (e.g. every character of the captions),
    images resized to `image_size`. For checks of the pipeline, not of the figures (the tests, the
    cost measurement at ViT-B/16's size: width 768, 12 layers, 12 heads, image 224, patch 16, 512)."""
    from transformers import (BertTokenizer, ChineseCLIPConfig, ChineseCLIPImageProcessor, ChineseCLIPModel,
                              ChineseCLIPProcessor)

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [t for t in dict.fromkeys(vocab) if t not in tokens and t.strip()]
    text_width = text_width or width
    config = ChineseCLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=text_width, num_hidden_layers=text_layers or layers,
                         num_attention_heads=heads, intermediate_size=4 * text_width, max_position_embeddings=512),
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * width, image_size=image_size, patch_size=patch_size,
                           projection_dim=projection_dim),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = ChineseCLIPModel(config)
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate(tokens)})
    images = ChineseCLIPImageProcessor(size={"shortest_edge": image_size},
                                       crop_size={"height": image_size, "width": image_size})
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    ChineseCLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return str(path)
