"""Text tokenizers with fixed-length output (id 0 = padding), two kinds:

* `sentencepiece` (t2i's own): trained on the train captions. Byte fallback means no text is
  ever unknown (any emoji or rare character becomes UTF-8 bytes), and NFKC normalisation folds
  full-width forms (ＡＢＣ１２３，) into their usual ones.
* `wordpiece`: BERT-Chinese's WordPiece from a `vocab.txt`, as EasyNLP's pai-painter tokenizes
  (its slow BertTokenizer: no [CLS]/[SEP], cut to text_len, [PAD]-padded).

The model lives as bytes (the SentencePiece proto, or vocab.txt) so a GPT checkpoint carries it;
`load_tokenizer(kind, model, text_len)` rebuilds either.
"""

from __future__ import annotations

import io
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece

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
    try:
        _train(texts, model, vocab_size, model_type, character_coverage, max_sentences)
    except RuntimeError as error:  # SentencePiece's own words, e.g. more distinct characters than vocab_size
        raise ValueError(f"SentencePiece could not train a vocabulary of data.tokenizer.vocab_size={vocab_size} on "
                         f"these {len(texts)} captions: {str(error).strip()}. Raise data.tokenizer.vocab_size: it is a "
                         "ceiling, so a larger one costs nothing when the captions need fewer pieces") from error
    return model.getvalue()


def _train(texts: list[str], model: io.BytesIO, vocab_size: int, model_type: str, character_coverage: float,
           max_sentences: int) -> None:
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


def fit_tokenizer(captions: Iterable[str], path: str | Path, vocab_size: int, model_type: str = "unigram",
                  text_len: int = 32, **train_options) -> dict:
    """Train on `captions`, save the model to `path`; returns statistics about the fit."""
    captions = list(captions)
    model = train_sentencepiece(captions, vocab_size, model_type, **train_options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model)
    tokenizer = TextTokenizer(model, text_len)
    lengths = [len(ids) for ids in tokenizer._backend.EncodeAsIds(captions)]
    byte_pieces = sum(tokenizer._backend.IsByte(i) for i in range(tokenizer.vocab_size))
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


class FixedLengthTokenizer:
    """Text -> `text_len` ids, cut or padded with id 0; subclasses say how a text becomes ids."""

    kind = ""
    missing_hint = ""  # what to do when from_file finds no model file

    def __init__(self, model: bytes, text_len: int = 32):
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        self.model = model
        self.text_len = text_len
        self.truncated = 0  # texts cut to text_len so far (warned once)
        self._backend = self._load_backend()

    def _load_backend(self):
        """The library object that encodes, built from self.model (rebuilt in each worker process)."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str | Path, text_len: int = 32) -> "FixedLengthTokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{cls.kind} model {path} not found: {cls.missing_hint}")
        return cls(path.read_bytes(), text_len)

    # worker processes get a copy: send the bytes, rebuild the library object there
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_backend"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._backend = self._load_backend()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, unpadded and untruncated."""
        raise NotImplementedError

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Fixed-length ids: LongTensor [text_len] for one text, [B, text_len] for a list."""
        if isinstance(texts, str):
            return torch.tensor(self._fixed_length(texts), dtype=torch.long)
        return torch.tensor([self._fixed_length(t) for t in texts], dtype=torch.long).view(-1, self.text_len)

    def _fixed_length(self, text: str) -> list[int]:
        ids = self.encode(text)
        if len(ids) > self.text_len:
            self.truncated += 1
            if self.truncated == 1:
                warnings.warn(f"a text of {len(ids)} tokens was cut to text_len={self.text_len} "
                              "(warned once; the tokenizer's `truncated` counts them)", stacklevel=3)
            return ids[: self.text_len]
        return ids + [PAD_ID] * (self.text_len - len(ids))

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(self.model)


class TextTokenizer(FixedLengthTokenizer):
    """SentencePiece encode/decode with fixed-length `text_len` output padded with id 0."""

    kind = "sentencepiece"
    missing_hint = "train it with `python train.py stage=tokenizer data=...` or set data.tokenizer.path"

    def _load_backend(self) -> spm.SentencePieceProcessor:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self.model)
        except RuntimeError as e:
            raise ValueError(f"not a SentencePiece model ({e})") from None
        return sp

    @property
    def vocab_size(self) -> int:
        return self._backend.GetPieceSize()

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, unpadded and untruncated."""
        return self._backend.EncodeAsIds(text)  # one string at a time: a list call spins up threads (~40x slower)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence; padding is dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._backend.DecodeIds([i for i in ids if i != PAD_ID])


BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# CJK ideograph blocks BERT puts a word boundary around (its fixed list, not a Unicode property)
_BERT_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
             (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class WordPieceTokenizer(FixedLengthTokenizer):
    """BERT's uncased WordPiece over a `vocab.txt`, token for token as EasyNLP's pai-painter.

    EasyNLP tokenizes with its copy of the slow (Python) BertTokenizer: special tokens written in
    the text ("[MASK]") stay whole; the rest is cleaned (control, format, unassigned and
    private-use characters dropped, whitespace unified), spaced around CJK ideographs, lower-cased,
    stripped of accents, split at punctuation, and each word cut into the longest vocabulary
    pieces ("##" continuations; [UNK] for a word that cannot be cut or is over 100 characters).
    The word-level rules read Python's `unicodedata`, as the slow tokenizer does: the fast (Rust)
    BERT normalizer uses older Unicode tables and differs on characters assigned since (it keeps
    unassigned and drops newer ones, misses CJK Extension E, keeps newer accents). The WordPiece
    step itself is the `tokenizers` package's.
    """

    kind = "wordpiece"

    missing_hint = "give the vocab.txt of the pai-painter checkpoint folder"

    def _load_backend(self) -> Tokenizer:
        self._vocab = self._read_vocab(self.model)
        return Tokenizer(WordPiece(self._vocab, unk_token="[UNK]", max_input_chars_per_word=100))

    @staticmethod
    def _read_vocab(vocab: bytes) -> dict[str, int]:
        # as the slow tokenizer reads it: text lines (any line ending), a repeated token keeps its last id
        lines = io.TextIOWrapper(io.BytesIO(vocab), encoding="utf-8").readlines()
        tokens = {line.rstrip("\n"): index for index, line in enumerate(lines)}
        missing = [t for t in ("[PAD]", "[UNK]") if t not in tokens]
        if missing:
            raise ValueError(f"not a BERT vocab.txt: no {' or '.join(missing)} token")
        if tokens["[PAD]"] != PAD_ID:
            raise ValueError(f"vocab.txt has [PAD] at line {tokens['[PAD]'] + 1}: t2i needs it first (id 0), as in "
                             "BERT-Chinese's vocabulary")
        return tokens

    @property
    def vocab_size(self) -> int:
        return max(self._vocab.values()) + 1

    def words(self, text: str) -> list[str]:
        """The words WordPiece cuts: special tokens kept whole, the rest through BERT's basic rules."""
        words = []
        for chunk in self._split_specials(text):
            words += [chunk] if chunk in BERT_SPECIAL_TOKENS else _bert_basic_words(chunk)
        return words

    def encode(self, text: str) -> list[int]:
        words = self.words(text)
        if not words:
            return []
        return self._backend.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def _split_specials(self, text: str) -> list[str]:
        specials = [t for t in BERT_SPECIAL_TOKENS if t in self._vocab]
        chunks = [text]
        for token in specials:
            chunks = [part for chunk in chunks
                      for part in ([chunk] if chunk in specials else _split_keep(chunk, token))]
        return chunks

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence: pieces joined (Chinese needs no spaces), padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        pieces = [self._backend.id_to_token(i) for i in ids if i != PAD_ID]
        return "".join(p[2:] if p and p.startswith("##") else p for p in pieces if p is not None)


def _split_keep(text: str, token: str) -> list[str]:
    """`text` split at every `token`, the tokens kept as their own parts (empty parts dropped)."""
    parts = []
    for i, piece in enumerate(text.split(token)):
        if i:
            parts.append(token)
        if piece:
            parts.append(piece)
    return parts


def _bert_basic_words(text: str) -> list[str]:
    """BERT's basic tokenization (uncased) with Python's Unicode tables."""
    cleaned = []
    for char in text:
        category = unicodedata.category(char)
        if char in "\x00\ufffd" or (category[0] == "C" and char not in "\t\n\r"):
            continue  # control, format, unassigned, private use, surrogate
        if char in " \t\n\r" or category == "Zs":
            cleaned.append(" ")
        elif any(lo <= ord(char) <= hi for lo, hi in _BERT_CJK):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    words = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for char in word:
            if _is_bert_punctuation(char):
                words += [current, char] if current else [char]
                current = ""
            else:
                current += char
        if current:
            words.append(current)
    return words


def _is_bert_punctuation(char: str) -> bool:
    # BERT counts every non-alphanumeric ASCII symbol ($, +, ^ ...) as punctuation, besides Unicode's P*
    code = ord(char)
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 \
        or unicodedata.category(char).startswith("P")


TOKENIZERS = {cls.kind: cls for cls in (TextTokenizer, WordPieceTokenizer)}


def load_tokenizer(kind: str, model: bytes, text_len: int) -> FixedLengthTokenizer:
    """A tokenizer of `kind` (sentencepiece or wordpiece) from its model bytes."""
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind](model, text_len)
