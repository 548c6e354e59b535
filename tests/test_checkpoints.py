"""The GPT checkpoint record: the current version written by the stage, version 1 (earlier t2i) read and upgraded."""

import pytest
import torch

from t2i.checkpoints import RECORD_VERSION, GPTRecord, load_gpt, read_checkpoint


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
    assert upgraded.tokenizer == record["tokenizer"] and upgraded.caption_prob == record["training"]["caption_prob"]
    assert upgraded.vqgan == record["vqgan"] and upgraded.sampling == record["sampling"]
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
