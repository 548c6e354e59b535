"""Text tokenizer: SentencePiece trained on the train captions, fixed-length encoding.

Byte fallback means no text is ever unknown (any emoji or rare character becomes UTF-8 bytes),
and NFKC normalisation folds full-width forms (ＡＢＣ１２３，) into their usual ones. Id 0 is
padding. The model lives as bytes so a GPT checkpoint can carry it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch

PAD_ID = 0
UNK_ID = 1
# 256 byte pieces + pad + unk must fit, plus room for real pieces
MIN_VOCAB_SIZE = 300


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    seed: int = 0,
) -> bytes:
    """Train a SentencePiece model on `texts`; returns the serialized model.

    The vocabulary size is a ceiling (`hard_vocab_limit=False`): a small corpus such as the
    shapes captions yields fewer pieces instead of failing.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"tokenizer vocab_size must be >= {MIN_VOCAB_SIZE} (256 byte pieces are reserved), got {vocab_size}")
    if model_type not in ("unigram", "bpe", "char"):
        raise ValueError(f"tokenizer model_type must be unigram, bpe or char, got {model_type!r}")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no captions to train the tokenizer on: is the train split empty?")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False,  # Chinese has no word spaces: a leading "▁" would waste a position
        split_digits=True,
        required_chars="\u2581",  # the space piece: without it spaces decode as a literal "▁"
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_id=-1,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def fit_tokenizer(captions: Iterable[str], path: str | Path, vocab_size: int, model_type: str = "unigram",
                  text_len: int = 32, **train_options) -> dict:
    """Train on `captions`, save the model to `path`; returns statistics about the fit."""
    captions = list(captions)
    model = train_sentencepiece(captions, vocab_size, model_type, **train_options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    tokenizer = TextTokenizer(model, text_len)
    lengths = [len(ids) for ids in tokenizer._sp.EncodeAsIds(captions)]
    byte_pieces = sum(tokenizer._sp.IsByte(i) for i in range(tokenizer.vocab_size))
    return {
        "path": str(path),
        "captions": len(captions),
        "vocab_size": tokenizer.vocab_size,
        "byte_pieces": byte_pieces,
        "mean_tokens": sum(lengths) / max(len(lengths), 1),
        "max_tokens": max(lengths, default=0),
        "text_len": text_len,
        "truncated_at_text_len": sum(n > text_len for n in lengths),
    }


class TextTokenizer:
    """SentencePiece encode/decode with fixed-length `text_len` output padded with id 0."""

    def __init__(self, model: bytes, text_len: int = 32):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.model = model
        self.text_len = text_len
        self.truncated = 0  # texts cut to text_len so far (warned once)
        self._sp = self._load(model)

    @staticmethod
    def _load(model: bytes) -> spm.SentencePieceProcessor:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model)
        except RuntimeError as e:
            raise ValueError(f"not a SentencePiece model ({e})") from None
        return sp

    @classmethod
    def from_file(cls, path: str | Path, text_len: int = 32) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer model {path} not found: train it with `python train.py stage=tokenizer data=...` "
                "or set data.tokenizer.path"
            )
        return cls(path.read_bytes(), text_len)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model)

    # worker processes get a copy: send the bytes, rebuild the processor there
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = self._load(self.model)

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, unpadded and untruncated."""
        return self._sp.EncodeAsIds(text)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Fixed-length ids: LongTensor [text_len] for one text, [B, text_len] for a list."""
        if isinstance(texts, str):
            return torch.tensor(self._fixed_length(texts), dtype=torch.long)
        return torch.tensor([self._fixed_length(t) for t in texts], dtype=torch.long).view(-1, self.text_len)

    def _fixed_length(self, text: str) -> list[int]:
        ids = self._sp.EncodeAsIds(text)  # one string at a time: a list call spins up threads (~40x slower)
        if len(ids) > self.text_len:
            self.truncated += 1
            if self.truncated == 1:
                warnings.warn(f"a text of {len(ids)} tokens was cut to text_len={self.text_len} "
                              "(warned once; TextTokenizer.truncated counts them)", stacklevel=3)
            return ids[: self.text_len]
        return ids + [PAD_ID] * (self.text_len - len(ids))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence; padding is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._sp.DecodeIds([i for i in ids if i != PAD_ID])
