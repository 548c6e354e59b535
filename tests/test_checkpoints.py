"""The GPT checkpoint record: the current version written by the stage, version 1 (earlier t2i) read and upgraded."""

import pytest
import torch

from t2i.checkpoints import RECORD_VERSION, CheckpointError, GPTRecord, load_gpt, read_checkpoint


def test_a_version_1_record_is_upgraded(gpt_run, tmp_path):
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    record = checkpoint["t2i"]
    assert record["version"] == RECORD_VERSION
    # as t2i wrote records before they had a version
    checkpoint["t2i"] = {"gpt": record["gpt"], "tokenizer": record["tokenizer"]["model"],
                         "text_len": record["tokenizer"]["text_len"], "vqgan": record["vqgan"],
                         "caption_prob": record["training"]["caption_prob"], "sampling": record["sampling"]}
    old = tmp_path / "v1.ckpt"
    torch.save(checkpoint, old)
    gpt, upgraded = load_gpt(old)
    assert upgraded.tokenizer.to_dict() == record["tokenizer"]
    assert upgraded.caption_prob == record["training"]["caption_prob"]
    assert upgraded.vqgan.to_dict() == record["vqgan"] and upgraded.sampling == record["sampling"]
    assert upgraded.training.origin is None  # not recorded before version 2
    assert upgraded.tokenizer_model()("红色的小圆形").tolist() == \
        GPTRecord.from_checkpoint(read_checkpoint(gpt_run / "checkpoints" / "last.ckpt"), "v2").tokenizer_model()(
            "红色的小圆形").tolist()
    reference, _ = load_gpt(gpt_run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(gpt.state_dict().values(), reference.state_dict().values()))


def test_records_that_cannot_be_read_say_why(gpt_run, tmp_path):
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    checkpoint["t2i"]["version"] = RECORD_VERSION + 1
    torch.save(checkpoint, tmp_path / "future.ckpt")
    with pytest.raises(ValueError, match="update t2i"):
        load_gpt(tmp_path / "future.ckpt")
    del checkpoint["t2i"]
    torch.save(checkpoint, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="not a t2i GPT checkpoint"):
        load_gpt(tmp_path / "bare.ckpt")


def test_the_record_reads_back_as_written_and_refuses_a_malformed_field_by_name(gpt_run, tmp_path):
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    record = GPTRecord.from_checkpoint(checkpoint, "last.ckpt")
    assert record.to_dict() == checkpoint["t2i"]  # the on-disk dict, unchanged through the typed record
    assert record.vqgan.grid == list(record.grid) and record.tokenizer.kind == "sentencepiece"
    for entry, field, value, message in [
        ("vqgan", "sha256", 12345, "t2i.vqgan.sha256 must be str | None, got int"),
        ("vqgan", "grid", [8], r"t2i.vqgan.grid must be two positive sizes"),
        ("tokenizer", "text_len", "32", "t2i.tokenizer.text_len must be int, got str"),
        ("tokenizer", "kind", "bpe", "t2i.tokenizer.kind must be one of sentencepiece, wordpiece"),
        ("training", "caption_prob", "high", r"t2i.training.caption_prob must be float, got str"),
        ("training", "learning_rate", 0.1, "t2i.training has unknown field.s. learning_rate"),
        ("gpt", "n_layer", 2.5, "t2i.gpt.n_layer must be int, got float"),
    ]:
        broken = {**checkpoint, "t2i": {**checkpoint["t2i"], entry: {**checkpoint["t2i"][entry], field: value}}}
        path = tmp_path / f"{entry}-{field}.ckpt"
        torch.save(broken, path)
        with pytest.raises(CheckpointError, match=f"{path.name}: the checkpoint record's {message}"):
            load_gpt(path)
    missing = {**checkpoint, "t2i": {k: v for k, v in checkpoint["t2i"].items() if k != "tokenizer"}}
    with pytest.raises(CheckpointError, match="x.ckpt: the checkpoint record's t2i lacks tokenizer"):
        GPTRecord.from_checkpoint(missing, "x.ckpt")
