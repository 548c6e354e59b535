"""The token layout: both conventions built and read back, id ranges, what each loss reads."""

import pytest
import torch

from t2i.models.layout import TokenLayout

T2I = TokenLayout("t2i", n_image_codes=40, n_text_tokens=30, text_len=4, image_len=6)
PAI = TokenLayout("paipainter", n_image_codes=40, n_text_tokens=30, text_len=4, image_len=6)


def test_t2i_layout_round_trip():
    text, codes = torch.tensor([[7, 8, 0, 0]]), torch.tensor([[1, 2, 3, 4, 5, 6]])
    seq = T2I.text_to_image(text, codes)
    assert seq.tolist() == [[T2I.special("T2I"), 47, 48, 40, 40, T2I.special("BOI"), 1, 2, 3, 4, 5, 6]]
    assert seq.shape[1] == T2I.block_size == T2I.prefix_len + 6
    assert torch.equal(seq[:, 1:1 + 4] - T2I.text_offset, text) and torch.equal(seq[:, T2I.prefix_len:], codes)
    i2t = T2I.image_to_text(codes.view(1, 2, 3), text)
    assert i2t.tolist() == [[T2I.special("I2T"), 1, 2, 3, 4, 5, 6, T2I.special("BOT"), 47, 48, 40, 40]]
    assert [T2I.special(n) for n in ("T2I", "I2T", "BOI", "BOT")] == [70, 71, 72, 73] and T2I.vocab_size == 74
    assert T2I.head_size == 74 and T2I.predicts_text
    targets = i2t[:, 1:]
    assert T2I.image_targets(targets).sum() == 6
    assert T2I.text_targets(targets).sum() == 2  # padding excluded, [BOT] is no text
    # the end of a caption: the first padding after its text, in image-to-text rows only
    assert T2I.caption_end_targets(targets).nonzero().tolist() == [[0, 6 + 1 + 2]]
    full, empty = torch.tensor([[7, 8, 9, 5]]), torch.tensor([[0, 0, 0, 0]])
    assert not T2I.caption_end_targets(T2I.image_to_text(codes, full)[:, 1:]).any()  # fills text_len: no end
    assert not T2I.caption_end_targets(T2I.image_to_text(codes, empty)[:, 1:]).any()  # the null text: none
    assert not T2I.caption_end_targets(seq[:, 1:]).any()  # text to image
    assert T2I.caption_prefix(codes).tolist() == [i2t[0, :8].tolist()]


def test_paipainter_layout_round_trip():
    text, codes = torch.tensor([[7, 8, 0, 0]]), torch.tensor([[1, 2, 3, 4, 5, 6]])
    seq = PAI.text_to_image(text, codes)
    assert seq.tolist() == [[47, 48, 40, 40, 1, 2, 3, 4, 5, 6]]  # EasyNLP: ids + 16384-style offset, [PAD] kept
    assert PAI.block_size == 10 and PAI.prefix_len == 4 and PAI.vocab_size == 70 and PAI.head_size == 40
    # the last text position predicts the first code: target index prefix_len - 1 is code 0
    assert seq[:, 1:][0, PAI.prefix_len - 1] == 1
    assert PAI.null_text(text).tolist() == [[0, 0, 0, 0]]
    with pytest.raises(ValueError, match="no image-to-text"):
        PAI.image_to_text(codes, text)
    with pytest.raises(ValueError, match="no \\[T2I\\]"):
        PAI.special("T2I")
    with pytest.raises(ValueError, match="text_len=4"):
        PAI.prefix(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="model.layout"):
        TokenLayout("dalle", 1, 1, 1, 1)
