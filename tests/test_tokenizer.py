"""SentencePiece tokenizer: round trips, byte fallback, fixed-length encoding, training command."""

import pickle
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i.data.shards import ImageOptions, Row, write_manifest, write_split
from t2i.data.tokenizer import PAD_ID, UNK_ID, TextTokenizer, train_sentencepiece

CAPTIONS = [
    "画面左上角有一个红色的小圆形，背景是白色的",
    "白色背景上，右下方有一个大的蓝色正方形",
    "一个小三角形位于中间，底色为灰色",
    "黑色的底上画着一个黄色的大圆圈",
] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer(train_sentencepiece(CAPTIONS, 500), text_len=64)


@pytest.mark.parametrize("text, expected", [
    ("画面左上角有一个红色的小圆形", "画面左上角有一个红色的小圆形"),
    ("ＡＢＣ１２３，全角！", "ABC123,全角!"),  # NFKC folds full-width forms
    ("mixed Latin 和中文 text", "mixed Latin 和中文 text"),
    ("emoji 😀🎨 ok", "emoji 😀🎨 ok"),
    ("", ""),
    ("  two   spaces  ", "two spaces"),  # extra whitespace collapses
])
def test_round_trip(tokenizer, text, expected):
    ids = tokenizer.encode(text)
    assert UNK_ID not in ids, "byte fallback must leave nothing unknown"
    assert tokenizer.decode(ids) == expected
    assert tokenizer.decode(tokenizer(text)) == expected  # padded form decodes the same


def test_unseen_characters_use_bytes_not_unk(tokenizer):
    ids = tokenizer.encode("龘")  # never in the training captions
    assert UNK_ID not in ids and len(ids) == 3  # its three UTF-8 bytes


def test_fixed_length_padding_and_truncation(tokenizer):
    tokenizer = TextTokenizer(tokenizer.model, text_len=16)
    with pytest.warns(UserWarning, match="cut to text_len=16"):
        batch = tokenizer(["红色", "红色的小圆形" * 10])
    assert batch.shape == (2, 16) and batch.dtype == torch.long
    n = len(tokenizer.encode("红色"))
    assert (batch[0, n:] == PAD_ID).all() and (batch[0, :n] != PAD_ID).all()
    assert (batch[1] != PAD_ID).all()
    assert tokenizer.truncated == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only: a second truncation is silent
        tokenizer(["红色的小圆形" * 10])
    assert tokenizer.truncated == 2


def test_pickles_through_its_bytes(tokenizer):
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(copy("蓝色正方形"), tokenizer("蓝色正方形"))
    assert copy.model == tokenizer.model


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(CAPTIONS, 100)
    with pytest.raises(ValueError, match="no captions"):
        train_sentencepiece(["", "  "], 500)
    # more distinct characters than the ceiling holds: SentencePiece's reason, and the setting to raise
    many = ["".join(chr(0x4E00 + i * 8 + j) for j in range(8)) for i in range(60)]  # 480 characters
    with pytest.raises(ValueError, match=r"data.tokenizer.vocab_size=300 .*required_chars.* Raise data.tokenizer"):
        train_sentencepiece(many, 300)
    with pytest.raises(FileNotFoundError, match="stage=tokenizer"):
        TextTokenizer.from_file(tmp_path / "missing.model")
    with pytest.raises(ValueError, match="SentencePiece"):
        TextTokenizer(b"garbage")


def test_train_command_writes_model_next_to_shards(tmp_path):
    root = tmp_path / "tiny"
    rows = [Row(f"r{i}", CAPTIONS[i % 4], np.full((8, 8, 3), i, np.uint8)) for i in range(20)]
    shards = write_split(rows, root, "train", ImageOptions(size=8, format="png", min_size=0), source="test",
                         shard_size=7, progress=False)
    write_manifest(root, {"train": shards}, source="test")
    result = subprocess.run(
        [sys.executable, "train.py", "stage=tokenizer", "data=shapes", f"data.root={root}", "data.tokenizer.vocab_size=400",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    tokenizer = TextTokenizer.from_file(root / "tokenizer.model")
    assert tokenizer.decode(tokenizer(CAPTIONS[0])) == "画面左上角有一个红色的小圆形,背景是白色的"
    assert '"captions": 20' in (tmp_path / "run" / "train.log").read_text()


def _bert_vocab(tmp_path):
    head = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(0x21, 0x3000) if chr(c).strip() and not (0xD800 <= c < 0xE000)]
    chars += [chr(c) for c in range(0x4E00, 0x4E00 + 2000)] + ["\U0002B823", "\U00020000"]
    words = ["hello", "##llo", "he", "cafe", "ab", "##b", "mask"]
    vocab = list(dict.fromkeys(head + [c.lower() for c in chars] + ["##" + c for c in chars[:300]] + words))
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def test_wordpiece_matches_the_slow_bert_tokenizer_easynlp_uses(tmp_path):
    from transformers import BertTokenizer, BertTokenizerLegacy  # the slow (Python) and fast implementations

    from t2i.data.tokenizer import WordPieceTokenizer, load_tokenizer

    vocab = _bert_vocab(tmp_path)
    slow, fast = BertTokenizerLegacy(str(vocab)), BertTokenizer(str(vocab))
    ours = WordPieceTokenizer(vocab.read_bytes(), text_len=32)
    texts = ["一只戴着帽子的猫，坐在桌子上！", "ÀÉÎ Café HELLO hello123", "[MASK]是 [mask] 和 [UNK]", "", "  \t\n",
             "\x00\x07控制\u200b字符\ufeff", "全角　空格ＡＢＣ", "a" * 101, "🎨 emoji", "e\u0301 İstanbul"]
    rng = random.Random(0)
    pool = [chr(c) for c in range(0x20, 0x3000) if not (0xD800 <= c < 0xE000)] + ["中", "[MASK]", " ", "\u0378"] * 20
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 25))) for _ in range(300)]
    # where the fast (Rust) BERT normalizer differs from the slow one: an unassigned code point (slow drops it,
    # fast emits [UNK]), CJK Extension E (slow splits it off as a Chinese character), a mark newer than the
    # fast tables (slow strips it as an accent)
    differing = ["a\u0378b 中", "a\U0002B823b", "ab\U00011C38"]
    for text in texts + differing:
        expected = slow.convert_tokens_to_ids(slow.tokenize(text))
        assert ours.encode(text) == expected, repr(text)
    assert sum(fast.encode(t, add_special_tokens=False) != ours.encode(t) for t in differing) == len(differing)
    ids = ours(["一只猫 [MASK]", ""])
    assert ids.shape == (2, 32) and ids[1].tolist() == [0] * 32 and 103 in ids[0].tolist()
    assert ours.decode(ours("一丁 Hello")) == "一丁hello"
    clone = pickle.loads(pickle.dumps(ours))  # data workers get a copy
    assert clone.encode(texts[0]) == ours.encode(texts[0])
    assert load_tokenizer("wordpiece", vocab.read_bytes(), 8).encode("猫") == ours.encode("猫")
    with pytest.raises(ValueError, match="\\[PAD\\]"):
        WordPieceTokenizer("[UNK]\n[PAD]\n".encode(), 4)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer("bpe", b"", 4)
