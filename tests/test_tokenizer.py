"""SentencePiece tokenizer: round trips, byte fallback, fixed-length encoding, training command."""

import pickle
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
