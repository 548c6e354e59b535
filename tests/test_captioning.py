"""Captioning: text generation through the image-to-text direction (t2i.sampling.generate_text), the
caption scores (BLEU-4, CIDEr-D over characters), reading shapes attributes from captions, and
eval.py task=caption on code shards, image shards and a folder of image files, with a LoRA adapter merged in."""

import copy
import itertools
import json
import math
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.adapters import LoraConfig, adapter_record, add_lora, merge_lora, save_adapter
from t2i.checkpoints import load_gpt, read_checkpoint, save_gpt
from t2i.data.shapes import WORDS, caption, random_attributes, read_caption, render
from t2i.eval.captioning import caption_scores, characters, run_captioning
from t2i.models.gpt import GPT, GPTConfig
from t2i.sampling import CaptionConfig, generate_text
from lora_factors import move_from_zero

REPO = Path(__file__).parents[1]


# -- reading attributes back from captions -------------------------------------------------------

def test_read_caption_reads_every_template_and_synonym():
    for seed in range(2000):  # every template and synonym many times over
        rng = np.random.default_rng(seed)
        attrs = random_attributes(rng)
        assert read_caption(caption(attrs, rng)) == attrs
    for name, table in WORDS.items():
        for value, synonyms in table.items():
            for word in synonyms:
                assert read_caption(f"有{word}。")[name] == value, word


def test_read_caption_takes_the_longest_word_and_the_first_mention():
    # 右上方块: the position 右上方, then 块 (no shape); 正方形 is a square, not 方形 after 正
    assert read_caption("右上方块")["position"] == "top_right" and read_caption("右上方块")["shape"] is None
    assert read_caption("正中间一个正方形")["position"] == "center"
    # a caption that runs on past its end: the later words do not override the first ones
    read = read_caption("白色底,右上方有个红的大号方块,背景是白的,左下圆形蓝色")
    assert read == {"shape": "square", "color": "red", "position": "top_right", "size": "large",
                    "background": "white"}
    assert read_caption("一张照片") == dict.fromkeys(read)


# -- scores ----------------------------------------------------------------------------------------

def test_bleu_and_cider_follow_the_libraries_documented_conventions_by_hand():
    assert characters("红色，圆 形。") == ["红", "色", "圆", "形"]
    # BLEU-4: precisions 4/5, 3/4, 2/3, 1/2 of the character n-grams, equal lengths (no brevity penalty)
    scores = caption_scores(["一二三四五"], [["一二三四六"]])
    assert scores["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    # shorter than the closest reference: brevity penalty exp(1 - 6/5)
    scores = caption_scores(["一二三四五"], [["一二三四五六", "一"]])
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 6 / 5), abs=1e-6)
    # CIDEr-D over two images (document frequencies from their references, log(2) for each n-gram):
    # image 1, "红圆" against "红圆": cosine 1 for 1- and 2-grams, no 3-, 4-grams: (1 + 1 + 0 + 0) / 4 x 10 = 5;
    # image 2, "蓝方" against "蓝角": 1-grams {蓝, 方} . {蓝, 角} / 2 = 1/2, nothing else: 0.5 / 4 x 10 = 1.25
    scores = caption_scores(["红，圆", "蓝方"], [["红圆"], ["蓝角"]])
    assert scores["cider_d_per_image"] == pytest.approx([5.0, 1.25])
    assert scores["cider_d"] == pytest.approx(3.125)
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["红"], [[]])


# -- generation ------------------------------------------------------------------------------------

def _model(pos="learned", n_text_tokens=6, text_len=4, seed=0):
    """A tiny random GPT whose captions depend on the image and sometimes end (padding) early."""
    torch.manual_seed(seed)
    cfg = GPTConfig(n_image_codes=16, n_text_tokens=n_text_tokens, text_len=text_len, image_len=4, n_layer=2,
                    n_head=2, n_embd=32, pos=pos)
    gpt = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than at initialisation: peaked, image-dependent predictions
        for parameter in gpt.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.5)
        gpt.head.weight.normal_(0, 0.3)
        if pos == "learned":
            gpt.pos_emb.normal_(0, 1)
    return gpt


def _codes(n, seed=1):
    return torch.randint(0, 16, (n, 2, 2), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _log_prob(gpt, codes, text):
    """log p(text | codes) up to and including the first padding, by recomputing the whole sequence."""
    layout = gpt.layout
    sequence = layout.image_to_text(codes[None], torch.tensor([text]))
    logits = gpt(sequence[:, :-1])[0, -layout.text_len:, layout.text_rows].float().log_softmax(-1)
    total, length = 0.0, 0
    for position, token in enumerate(text):
        total += float(logits[position, token])
        length += 1
        if token == 0:
            break
    return total, length


@pytest.mark.parametrize("pos", ["learned", "rope2d"])
def test_greedy_captions_with_the_cache_are_those_of_full_recomputation(pos):
    gpt, codes = _model(pos, seed=1), _codes(6)
    layout = gpt.layout
    text = generate_text(gpt, codes, CaptionConfig(strategy="greedy"))
    assert text.shape == (6, layout.text_len)
    for row, image in zip(text, codes):
        recomputed = []
        for _ in range(layout.text_len):
            ids = torch.tensor([recomputed + [0] * (layout.text_len - len(recomputed))])
            logits = gpt(layout.image_to_text(image[None], ids)[:, :-1])[0, layout.image_len + 1 + len(recomputed)]
            recomputed.append(int(logits[layout.text_rows].argmax()))
            if recomputed[-1] == 0:  # the end: padding from here on
                recomputed += [0] * (layout.text_len - len(recomputed))
                break
        assert row.tolist() == recomputed
    # padding ends a caption: nothing but padding after the first one
    for row in text.tolist():
        if 0 in row:
            assert set(row[row.index(0):]) == {0}


@pytest.mark.parametrize("pos, seed", [("learned", 2), ("rope", 1)])
def test_beam_search_finds_the_best_caption_when_the_beams_hold_every_hypothesis(pos, seed):
    gpt, codes = _model(pos, n_text_tokens=4, text_len=3, seed=seed), _codes(5, seed=2)
    vocab, length = 4, 3
    greedy = generate_text(gpt, codes, CaptionConfig(strategy="greedy"))
    found = {}
    for penalty in (0.0, 1.0):
        found[penalty] = generate_text(gpt, codes, CaptionConfig(strategy="beam", num_beams=vocab ** length,
                                                                 length_penalty=penalty))
        for image, best in zip(codes, found[penalty].tolist()):
            ranked = {}
            for text in itertools.product(range(vocab), repeat=length):
                if 0 in text and set(text[text.index(0):]) != {0}:
                    continue  # not a caption: something after its end
                total, n = _log_prob(gpt, image, list(text))
                ranked[text] = total / n ** penalty
            assert best == list(max(ranked, key=ranked.get)), (penalty, best)
    # the search is not trivial here: it beats greedy somewhere, and the length penalty matters
    assert not torch.equal(found[1.0], greedy) and not torch.equal(found[0.0], found[1.0])
    assert torch.equal(generate_text(gpt, codes, CaptionConfig(strategy="beam", num_beams=1)), greedy)  # a beam of one


def test_sampled_captions_follow_each_images_seed_not_its_batch():
    gpt, codes = _model(), _codes(5)
    cfg = CaptionConfig(strategy="sample", temperature=1.5, top_k=4)
    seeds = [11, 12, 13, 14, 15]
    together = generate_text(gpt, codes, cfg, seeds=seeds)
    alone = torch.cat([generate_text(gpt, codes[i:i + 1], cfg, seeds=seeds[i:i + 1]) for i in range(5)])
    assert torch.equal(together, alone)
    other = generate_text(gpt, codes, cfg, seeds=[21, 22, 23, 24, 25])
    assert not torch.equal(together, other)
    # top_k=1 keeps the argmax only: sampling gives the greedy captions
    assert torch.equal(generate_text(gpt, codes, CaptionConfig(strategy="sample", top_k=1), seeds=seeds),
                       generate_text(gpt, codes, CaptionConfig(strategy="greedy")))


def test_bad_caption_options_and_layouts_are_clear_errors():
    with pytest.raises(ValueError, match="caption.strategy"):
        CaptionConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="caption.num_beams"):
        CaptionConfig(strategy="beam", num_beams=0)
    pai = GPT(GPTConfig(n_image_codes=16, n_text_tokens=6, text_len=4, image_len=4, n_layer=1, n_head=2, n_embd=16,
                        layout="paipainter"))
    with pytest.raises(ValueError, match="no image-to-text direction"):
        generate_text(pai, _codes(1), CaptionConfig())


# -- eval.py task=caption ----------------------------------------------------------------------------

def _lines(run):
    return [json.loads(line) for line in (run / "captions.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def captioned_val(codes_root, gpt_run, tmp_path_factory):
    """eval.py task=caption on the code shards' val split, as a user runs it."""
    out = tmp_path_factory.mktemp("caption") / "run"
    result = subprocess.run([sys.executable, "eval.py", "task=caption", f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}",
                             "data=shapes_codes", f"data.root={codes_root}", "split=val", "data.num_workers=0",
                             "caption.batch_size=5", f"hydra.run.dir={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_eval_py_task_caption_writes_captions_scores_and_attributes(captioned_val):
    results = json.loads((captioned_val / "results.json").read_text())
    assert results["task"] == "caption" and results["images"] == 16 == results["images_with_references"]
    assert 0 <= results["bleu4"] <= 1 and results["cider_d"] >= 0
    assert set(results["attributes"]) == {"color", "shape", "position", "size", "background", "all"}
    rows = _lines(captioned_val)
    assert len(rows) == 16 and len({row["key"] for row in rows}) == 16
    for row in rows:  # each scored against its image's caption, its attributes read from its own text
        assert len(row["references"]) == 1 and row["attributes_read"] == read_caption(row["caption"])
    truths = [row["attributes_true"] for row in rows]
    assert results["attributes"]["all"] == pytest.approx(
        sum(all(row["attributes_read"][a] == t[a] for a in ("color", "shape", "position")) for row, t in zip(rows, truths))
        / 16)
    table = (captioned_val / "results.md").read_text(encoding="utf-8")
    assert "BLEU-4" in table and "CIDEr-D" in table and rows[0]["caption"] in table


def test_image_shards_encoded_by_the_checkpoints_vqgan_give_the_code_shards_captions(captioned_val, codes_root, gpt_run,
                                                                                      tmp_path):
    data = {"name": "shapes", "root": str(codes_root.parent / "shapes"), "image_size": 32, "num_workers": 0}
    results = run_captioning(gpt_run / "checkpoints" / "last.ckpt", CaptionConfig(), tmp_path, data=data, split="val",
                             batch_size=7)
    assert results["images"] == 16
    assert [(r["key"], r["caption"]) for r in _lines(tmp_path)] == [(r["key"], r["caption"]) for r in _lines(captioned_val)]
    # the first N distinct images only
    assert run_captioning(gpt_run / "checkpoints" / "last.ckpt", CaptionConfig(), tmp_path, data=data, split="val",
                          num_images=3)["images"] == 3
    with pytest.raises(ValueError, match="data.image_size=32"):
        run_captioning(gpt_run / "checkpoints" / "last.ckpt", CaptionConfig(), tmp_path,
                       data={**data, "image_size": 24}, split="val")


def test_a_folder_of_image_files_is_captioned_with_the_references_beside_them(gpt_run, tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index, name in enumerate(["b.png", "a.jpg", "sub/c.png"]):
        attrs = random_attributes(rng)
        Image.fromarray(render(attrs, 48 + 8 * index, rng)).save(folder / name)  # any size: scaled and cropped
    (folder / "a.txt").write_text("红色的圆形", encoding="utf-8")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    results = run_captioning(gpt_run / "checkpoints" / "last.ckpt", CaptionConfig(strategy="beam", num_beams=3),
                             tmp_path / "out", images=folder, batch_size=2)
    assert results["images"] == 3 and results["images_with_references"] == 1 and "attributes" not in results
    rows = _lines(tmp_path / "out")
    assert [r["key"] for r in rows] == ["a.jpg", "b.png", "sub/c.png"]
    assert rows[0]["references"] == ["红色的圆形"] and rows[1]["references"] == []
    assert run_captioning(gpt_run / "checkpoints" / "last.ckpt", CaptionConfig(), tmp_path / "two", images=folder,
                          num_images=2)["images"] == 2


def test_captioning_errors_name_what_to_fix(codes_root, gpt_run, tmp_path):
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    checkpoint["t2i"]["training"]["caption_prob"] = 0.0
    no_captions = tmp_path / "no_captions.ckpt"
    torch.save(checkpoint, no_captions)
    data = {"name": "shapes_codes", "root": str(codes_root), "num_workers": 0}
    with pytest.raises(ValueError, match="stage.caption_prob"):
        run_captioning(no_captions, CaptionConfig(), tmp_path, data=data, split="val")
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="is not a folder of image files"):
        run_captioning(ckpt, CaptionConfig(), tmp_path, images=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no jpg"):
        run_captioning(ckpt, CaptionConfig(), tmp_path, images=tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read .*x.png"):
        run_captioning(ckpt, CaptionConfig(), tmp_path, images=tmp_path / "broken")
    with pytest.raises(ValueError, match="caption.batch_size"):
        run_captioning(ckpt, CaptionConfig(), tmp_path, data=data, split="val", batch_size=0)
    with pytest.raises(ValueError, match="caption.num_images"):
        run_captioning(ckpt, CaptionConfig(), tmp_path, data=data, split="val", num_images=0)


def test_an_adapter_is_merged_in_and_must_have_learned_captioning(codes_root, gpt_run, tmp_path):
    """run_captioning(adapter=) (eval.py task=caption adapter=) captions as the base with the adapter merged into
    its weights does; an adapter whose own run trained no captioning (stage.caption_prob=0) is refused."""
    base_path = gpt_run / "checkpoints" / "last.ckpt"
    base, record = load_gpt(base_path)
    config = LoraConfig(rank=2, targets=["attention", "mlp", "head"])
    adapted = move_from_zero(add_lora(copy.deepcopy(base), config), std=0.5, seed=0)
    entry = adapter_record(config, base, base_path)
    save_adapter(tmp_path / "adapter.ckpt", adapted, replace(record, adapter=entry))
    no_captions = replace(record, adapter=entry, training=replace(record.training, caption_prob=0.0))
    save_adapter(tmp_path / "no_captions.ckpt", adapted, no_captions)
    save_gpt(tmp_path / "merged.ckpt", merge_lora(adapted), record)
    data = {"name": "shapes_codes", "root": str(codes_root), "num_workers": 0}
    results = run_captioning(base_path, CaptionConfig(), tmp_path / "adapter", data=data, split="val", num_images=6,
                             adapter=tmp_path / "adapter.ckpt")
    assert results["adapter"] == str(tmp_path / "adapter.ckpt")
    run_captioning(tmp_path / "merged.ckpt", CaptionConfig(), tmp_path / "merged", data=data, split="val", num_images=6)
    run_captioning(base_path, CaptionConfig(), tmp_path / "base", data=data, split="val", num_images=6)
    captions = {run: [(r["key"], r["caption"]) for r in _lines(tmp_path / run)] for run in ("adapter", "merged", "base")}
    assert captions["adapter"] == captions["merged"] != captions["base"]
    with pytest.raises(ValueError, match=r"no_captions.ckpt was trained without the image-to-text direction"):
        run_captioning(base_path, CaptionConfig(), tmp_path, data=data, split="val", adapter=tmp_path / "no_captions.ckpt")
