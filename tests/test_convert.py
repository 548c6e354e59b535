"""Converters: small fixture releases in the real raw formats, bad rows of every kind, exact counts."""

import base64
import collections
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from t2i.data import shards
from t2i.data.convert import main, run
from t2i.data.convert.flickr30k_cn import clean_caption
from t2i.data.datamodule import DataConfig
from t2i.data.shards import SKIP_REASONS, b64decode, load_image, read_manifest

pytestmark = pytest.mark.filterwarnings("ignore:.*skipped.*:UserWarning")

SMALL = ["--size", "32", "--min-size", "16", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# fixture helpers


def image_bytes(seed: int, size=(48, 40), fmt="JPEG", mode="RGB") -> bytes:
    """A small random image (w x h) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def write_lines(path: Path, lines, final_newline=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")


def convert(source, src, out, *extra):
    return run([source, "--src", str(src), "--out", str(out), *SMALL, *extra])


def read_back(manifest_or_dir, split):
    """Samples of one split read with plain webdataset: [(key, caption, PIL image, meta)]."""
    manifest = read_manifest(manifest_or_dir) if not isinstance(manifest_or_dir, dict) else manifest_or_dir
    urls = [s["path"] for s in manifest["splits"][split]["shards"]]
    if not urls:
        return []
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")
    samples = []
    for sample in dataset:
        image = next(sample[ext] for ext in shards.IMAGE_EXTENSIONS if ext in sample)
        samples.append((sample["__key__"], sample["txt"], image, sample.get("json", {})))
    return samples


def check_split(out, manifest, split, captions, skipped, size=32):
    """Counts reconcile, skips are exactly `skipped`, every expected caption is there once."""
    summary = manifest["splits"][split]
    assert summary["samples"] + sum(summary["skipped"].values()) == summary["rows_read"]
    assert summary["skipped"] == {k: v for k, v in sorted(skipped.items()) if v}
    assert set(summary["skipped"]) <= set(SKIP_REASONS)
    assert summary["samples"] == len(captions)
    assert sum(s["samples"] for s in summary["shards"]) == summary["samples"]
    samples = read_back(out, split)
    assert collections.Counter(s[1] for s in samples) == collections.Counter(captions)
    keys = [s[0] for s in samples]
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    for key, caption, image, meta in samples:
        if size:
            assert image.size == (size, size)
        assert image.mode == "RGB"
        assert meta["key"] == key and meta["caption"] == caption and meta["split"] == split
    return samples


# ---------------------------------------------------------------------------------------------
# MUGE


def make_muge(src: Path, n_good=6):
    src.mkdir(parents=True, exist_ok=True)
    good = {f"{i:032x}": image_bytes(i, fmt="PNG") for i in range(n_good)}
    images = [f"{k}\t{b64(v)}" for k, v in good.items()]
    captions = [f"{k}\t第{i}件商品，颜色鲜艳" for i, k in enumerate(good)]
    bad = {
        "bad64": "!!!not*base64!!!",
        "trunc": b64(truncated(image_bytes(100, fmt="PNG"))),
        "tiny": b64(image_bytes(101, size=(8, 8), fmt="PNG")),
        "nocap": b64(image_bytes(102, fmt="PNG")),
        "empty": b64(image_bytes(103, fmt="PNG")),
    }
    images += [f"{k}\t{v}" for k, v in bad.items()]
    captions += ["bad64\t坏的编码", "trunc\t截断的图", "tiny\t太小的图", "empty\t   ",
                 "absent\t没有这张图", "a line without a tab", captions[0]]
    write_lines(src / "T2I_train.img.tsv", images)
    write_lines(src / "T2I_train.text.tsv", captions)
    val = {f"v{i}": image_bytes(200 + i, fmt="PNG") for i in range(2)}
    write_lines(src / "T2I_val.img.tsv", [f"{k}\t{b64(v)}" for k, v in val.items()])
    write_lines(src / "T2I_val.txt.tsv", [f"{k}\t验证{k}" for k in val], final_newline=False)
    return [c.split("\t")[1] for c in captions[:n_good]]


def test_muge(tmp_path):
    good = make_muge(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = convert("muge", tmp_path / "raw", out, "--shard-size", "4")
    assert set(manifest["splits"]) == {"train", "val"}
    skipped = dict(bad_base64=1, undecodable_image=1, too_small=1, missing_caption=1, empty_caption=1,
                   missing_image=1, malformed_row=1, duplicate_pair=1)
    samples = check_split(out, manifest, "train", good, skipped)
    assert manifest["splits"]["train"]["rows_read"] == 6 + 8
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 2]
    assert samples[0][3]["source_id"] == f"{0:032x}" and samples[0][3]["original_width"] == 48
    check_split(out, manifest, "val", ["验证v0", "验证v1"], {})


def eval_prompts(path: Path) -> list[str]:
    """The prompts `eval.py task=generate prompts_file=PATH` reads (its own expression)."""
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_muge_test_captions_become_prompts(tmp_path, capsys):
    """The release's test set has texts and no images: a prompts file, with the image ids beside it."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    make_muge(raw)
    write_lines(raw / "T2I_test.tsv", [f"{i:032x}" for i in range(100, 102)])  # ids only: not read
    write_lines(raw / "T2I_test.txt.tsv", [f"{100:032x}\t红色长款羽绒服", f"{101:032x}\t儿童 卡通 雨靴"])
    assert main(["muge", "--src", str(raw), "--out", str(out), *SMALL]) == 0
    manifest = read_manifest(out)
    assert list(manifest["splits"]) == ["train", "val"] and manifest["prompts"]["test"]["prompts"] == 2
    assert eval_prompts(out / "prompts" / "test.txt") == ["红色长款羽绒服", "儿童 卡通 雨靴"]
    assert (out / "prompts" / "test.ids.txt").read_text().split() == [f"{i:032x}" for i in (100, 101)]
    assert f"prompts_file={out / 'prompts' / 'test.txt'}" in capsys.readouterr().out
    # the EasyNLP tutorial's T2I_*.txt files are not MUGE's layout: say which converter reads them
    artist = tmp_path / "artist"
    write_lines(artist / "T2I_train.txt", [f"0\t图\t{b64(image_bytes(0))}"])
    with pytest.raises(FileNotFoundError, match="easynlp"):
        convert("muge", artist, tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# Chinese-CLIP


def test_chinese_clip(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    imgs = {str(i): b64(image_bytes(i)) for i in range(1, 5)}
    imgs["5"] = b64(truncated(image_bytes(5)))
    imgs["6"] = b64(image_bytes(6, size=(10, 30)))
    imgs["7"] = b64(image_bytes(7))  # named by no text
    imgs["8"] = "%%%"
    write_lines(src / "train_imgs.tsv", [f"{k}\t{v}" for k, v in imgs.items()])
    texts = [
        {"text_id": 1, "text": "两只小狗", "image_ids": [1, 2]},
        {"text_id": 2, "text": "一件外套", "image_ids": [3, 99]},  # 99: no such image
        {"text_id": 3, "text": "无图", "image_ids": []},
        {"text_id": 4, "text": "  ", "image_ids": [4]},
        {"text_id": 5, "text": "两只小狗", "image_ids": [1]},  # same pair again
        {"text_id": 6, "text": "截断", "image_ids": [5]},
        {"text_id": 7, "text": "太小", "image_ids": [6]},
        {"text_id": 8, "text": "坏编码", "image_ids": [8]},
        {"text_id": 9, "text": "第四张", "image_ids": [4]},
    ]
    write_lines(src / "train_texts.jsonl", [json.dumps(t, ensure_ascii=False) for t in texts] + ['{"text_id": 10, "te'])
    write_lines(src / "valid_imgs.tsv", [f"10\t{b64(image_bytes(10))}"])
    write_lines(src / "valid_texts.jsonl", [json.dumps({"text_id": 20, "text": "验证", "image_ids": [10]})])
    write_lines(src / "test_imgs.tsv", [f"11\t{b64(image_bytes(11))}"])
    write_lines(src / "test_texts.jsonl", [json.dumps({"text_id": 30, "text": "测试", "image_ids": []})])
    manifest = convert("chinese_clip", src, out)
    assert list(manifest["splits"]) == ["train", "valid", "test"]
    samples = check_split(out, manifest, "train", ["两只小狗", "两只小狗", "一件外套", "第四张"],
                          dict(missing_image=2, empty_caption=1, duplicate_pair=1, undecodable_image=1,
                               too_small=1, bad_base64=1, malformed_row=1, missing_caption=1))
    assert [(s[3]["source_id"], s[3]["text_id"]) for s in samples] == [("1", 1), ("2", 1), ("3", 2), ("4", 9)]
    check_split(out, manifest, "valid", ["验证"], {})
    test = manifest["splits"]["test"]
    assert test == {"samples": 0, "rows_read": 2, "skipped": {"missing_caption": 1, "missing_image": 1}, "shards": []}


def test_chinese_clip_extra_splits(tmp_path, capsys):
    """Splits beyond train/valid/test (`test2`) are converted under their own name and can be chosen."""
    src, out = tmp_path / "raw", tmp_path / "out"

    def write_pair(name, images, texts, newline="\n"):
        src.mkdir(exist_ok=True)
        lines = {"imgs.tsv": [f"{k}\t{v}" for k, v in images.items()],
                 "texts.jsonl": [json.dumps(t, ensure_ascii=False) for t in texts]}
        for suffix, rows in lines.items():
            (src / f"{name}_{suffix}").write_bytes("".join(r + newline for r in rows).encode())

    write_pair("train", {"1": b64(image_bytes(1))}, [{"text_id": 1, "text": "训练", "image_ids": [1]}])
    write_pair("valid", {"2": b64(image_bytes(2))}, [{"text_id": 2, "text": "验证", "image_ids": [2]}])
    # as real files have it: string ids with leading zeros, CRLF line ends, both base64 alphabets
    urlsafe = base64.urlsafe_b64encode(image_bytes(3)).decode().rstrip("=")
    write_pair("test2", {"000123": urlsafe, "000124": b64(image_bytes(4))},
               [{"text_id": 7, "text": "第二个测试集", "image_ids": ["000123", "000124"]}], newline="\r\n")
    write_lines(src / "extra_imgs.tsv", [f"5\t{b64(image_bytes(5))}"])  # no texts: left out, said
    write_pair("test.v2", {"6": b64(image_bytes(6))}, [{"text_id": 8, "text": "点", "image_ids": [6]}])
    with pytest.warns(UserWarning, match="left out") as record:
        assert main(["chinese_clip", "--src", str(src), "--out", str(out), *SMALL]) == 0
    left_out = [str(w.message) for w in record if "left out" in str(w.message)]
    assert len(left_out) == 2 and "'extra' left out: extra_texts.jsonl is missing" in left_out[0]
    printed = capsys.readouterr().out
    manifest = read_manifest(out)
    assert list(manifest["splits"]) == ["train", "valid", "test2"]  # no test pair here: nothing to say
    assert set(manifest["missing_splits"]) == {"extra", "test.v2"}
    assert "not usable as a split name" in manifest["missing_splits"]["test.v2"]
    assert "left out: extra" in printed and "\ntest2 " in printed
    samples = check_split(out, manifest, "test2", ["第二个测试集"] * 2, {})
    assert sorted(s[3]["source_id"] for s in samples) == ["000123", "000124"]
    assert sorted(f.name for f in out.glob("test2-*")) == ["test2-00000.tar", "test2-00000_stats.json"]
    # the rest of the pipeline takes it as a role's split
    data = DataConfig.from_dict({"name": "cc", "root": str(out), "splits": {"train": "train", "val": "valid",
                                                                           "test": "test2"}})
    assert list(data.captions("test")) == ["第二个测试集"] * 2


# ---------------------------------------------------------------------------------------------
# EasyNLP


def test_easynlp(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    lines = [f"{i}\t图{i}\t{b64(image_bytes(i))}" for i in range(3)]
    lines += [
        "3\t坏编码\t@@@@",
        f"4\t截断\t{b64(truncated(image_bytes(4)))}",
        f"5\t小图\t{b64(image_bytes(5, size=(12, 12)))}",
        f"6\t \t{b64(image_bytes(6))}",
        "7\tonly two fields",
        lines[1],
        "8\t无图\t",
    ]
    write_lines(src / "MUGE_train_text_imgbase64.tsv", lines)
    write_lines(src / "MUGE_val_text_imgbase64.tsv", [f"v\t验证\t{b64(image_bytes(9))}"])
    write_lines(src / "notes.txt", ["not a split"])
    elsewhere = tmp_path / "test_file.tsv"
    write_lines(elsewhere, [f"t\t测试\t{b64(image_bytes(10, size=(40, 40)))}"])
    manifest = convert("easynlp", src, out, "--test", str(elsewhere))
    assert list(manifest["splits"]) == ["train", "val", "test"]
    check_split(out, manifest, "train", ["图0", "图1", "图2"],
                dict(bad_base64=1, undecodable_image=2, too_small=1, empty_caption=1, malformed_row=1,
                     duplicate_pair=1))
    check_split(out, manifest, "val", ["验证"], {})
    check_split(out, manifest, "test", ["测试"], {})
    with pytest.raises(FileNotFoundError, match="--val"):
        run(["easynlp", "--val", str(tmp_path / "nope.tsv"), "--out", str(out), "--quiet"])


def test_easynlp_text_only_file_becomes_prompts(tmp_path, capsys):
    """The painter tutorial's `MUGE_test.text.tsv` (idx<TAB>text): prompts for task=generate, no shards."""
    src, out = tmp_path / "painter", tmp_path / "out"
    write_lines(src / "MUGE_train_text_imgbase64.tsv", [f"{i}\t商品{i}\t{b64(image_bytes(i))}" for i in range(3)])
    write_lines(src / "MUGE_val_text_imgbase64.tsv", [f"v\t验证\t{b64(image_bytes(9))}"])
    write_lines(src / "MUGE_test.text.tsv", [
        "\ufeff0\t白色连衣裙", "1\t韩版 宽松 卫衣\r",  # a BOM, a CRLF line end
        "2\t", "3 no tab",  # no text, no field
        "4\t男士\x0c休闲鞋",  # a character str.splitlines() breaks at: kept on one line
        "5\t白色连衣裙",  # the same text under another id: a prompt of its own
    ])
    assert main(["easynlp", "--src", str(src), "--out", str(out), *SMALL]) == 0
    manifest = read_manifest(out)
    assert list(manifest["splits"]) == ["train", "val"]
    check_split(out, manifest, "train", ["商品0", "商品1", "商品2"], {})
    assert manifest["prompts"]["test"] == {
        "path": "prompts/test.txt", "ids": "prompts/test.ids.txt", "prompts": 4, "rows_read": 6,
        "skipped": {"empty_caption": 1, "malformed_row": 1}, "source_file": str(src / "MUGE_test.text.tsv")}
    prompts_file = out / "prompts" / "test.txt"
    assert eval_prompts(prompts_file) == ["白色连衣裙", "韩版 宽松 卫衣", "男士 休闲鞋", "白色连衣裙"]
    assert (out / "prompts" / "test.ids.txt").read_text().splitlines() == ["0", "1", "4", "5"]
    assert not list(out.glob("test-*"))
    assert f"prompts_file={prompts_file}" in capsys.readouterr().out

    # the artist tutorial's T2I_{train,val,test}.txt: found as .txt files, its test file text-only too
    artist = tmp_path / "artist"
    write_lines(artist / "T2I_train.txt", [f"{i}\t图{i}\t{b64(image_bytes(i))}" for i in range(2)])
    write_lines(artist / "T2I_val.txt", [f"v\t验证\t{b64(image_bytes(9))}"])
    write_lines(artist / "T2I_test.txt", ["t0\t一只橘猫"])
    write_lines(artist / "README.txt", ["说明"])  # names no split: not read
    manifest = convert("easynlp", artist, tmp_path / "artist_out")
    check_split(tmp_path / "artist_out", manifest, "train", ["图0", "图1"], {})
    assert list(manifest["splits"]) == ["train", "val"] and manifest["prompts"]["test"]["prompts"] == 1
    # a text-only file on its own: the prompts, and a manifest without image splits
    only = tmp_path / "only"
    manifest = run(["easynlp", "--test", str(artist / "T2I_test.txt"), "--out", str(only), "--quiet"])
    assert manifest["splits"] == {} and eval_prompts(only / "prompts" / "test.txt") == ["一只橘猫"]


# ---------------------------------------------------------------------------------------------
# COCO-CN


def make_coco_cn(src: Path, coco: Path) -> dict:
    """A COCO-CN folder and the MS-COCO images it needs; returns split -> image ids."""
    ids = {split: [f"COCO_{folder}_{n:012d}" for n in numbers] for split, folder, numbers in (
        ("train", "train2014", range(1, 7)), ("val", "val2014", [7]), ("test", "val2014", [8, 9]))}
    for split in ids:
        write_lines(src / f"coco-cn_{split}.txt", ids[split], final_newline=False)
    t = ids["train"]
    for image_id in t[:2] + ids["val"] + ids["test"]:
        folder = image_id.split("_")[1]
        (coco / folder).mkdir(parents=True, exist_ok=True)
        (coco / folder / f"{image_id}.jpg").write_bytes(image_bytes(int(image_id[-3:])))
    (coco / "train2014" / f"{t[2]}.jpg").write_bytes(truncated(image_bytes(3)))
    (coco / "train2014" / f"{t[3]}.jpg").write_bytes(image_bytes(4, size=(15, 60)))
    # t[4]: no image file; t[5]: no caption
    human = [
        f"{t[0]}#0\t一个男人在骑自行车", f"{t[0]}#1\t骑车的人", f"{t[0]}#1\t骑车的人",
        f"{t[1]}#0\t桌上的披萨", f"{t[1]}#1\t", f"{t[1]} 没有编号",
        f"{t[2]}#0\t截断的图", f"{t[3]}#0\t太小", f"{t[4]}#0\t没有图片",
        f"{ids['val'][0]}#0\t验证句子", f"{ids['test'][0]}#0\t测试一", f"{ids['test'][1]}#0\t测试二",
        "COCO_train2014_000000999999#0\t不在任何划分",
    ]
    write_lines(src / "imageid.human-written-caption.txt", human)
    write_lines(src / "imageid.manually-translated-caption.txt", [f"{ids['test'][1]}#0\t翻译句子"])
    return ids


def test_coco_cn(tmp_path):
    src, coco, out = tmp_path / "coco-cn", tmp_path / "mscoco", tmp_path / "out"
    make_coco_cn(src, coco)
    manifest = run(["coco_cn", "--src", str(src), "--coco", str(coco), "--out", str(out), *SMALL])
    samples = check_split(out, manifest, "train", ["一个男人在骑自行车", "骑车的人", "桌上的披萨"],
                          dict(duplicate_pair=1, empty_caption=1, malformed_row=1, undecodable_image=1,
                               too_small=1, missing_image=1, missing_caption=1))
    assert [s[3]["caption_index"] for s in samples] == [0, 1, 0]
    check_split(out, manifest, "val", ["验证句子"], {})
    check_split(out, manifest, "test", ["测试一", "测试二"], {})

    with pytest.warns(UserWarning, match="left out"):
        manifest = run(["coco_cn", "--src", str(src), "--coco", str(coco), "--captions", "translated",
                        "--out", str(tmp_path / "translated"), *SMALL])
    assert list(manifest["splits"]) == ["test"]
    check_split(tmp_path / "translated", manifest, "test", ["翻译句子"], dict(missing_caption=1))
    with pytest.raises(FileNotFoundError, match="--coco"):
        convert("coco_cn", src, tmp_path / "x")


def test_coco_cn_partial_release(tmp_path, capsys):
    """No test list: train and val are converted, test is named as left out; no list at all: an error."""
    src, coco, out = tmp_path / "coco-cn", tmp_path / "mscoco", tmp_path / "out"
    make_coco_cn(src, coco)
    (src / "coco-cn_test.txt").unlink()
    argv = ["coco_cn", "--src", str(src), "--coco", str(coco), *SMALL]
    with pytest.warns(UserWarning, match="'test' left out: no coco-cn_test.txt"):
        assert main([*argv, "--out", str(out)]) == 0
    assert "left out: test (no coco-cn_test.txt" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert list(manifest["splits"]) == ["train", "val"] and list(manifest["missing_splits"]) == ["test"]
    check_split(out, manifest, "val", ["验证句子"], {})
    # the translated captions cover only the test images, whose list is missing: nothing to convert
    with pytest.raises(FileNotFoundError, match="no split found.*test: no coco-cn_test.txt"):
        run([*argv, "--captions", "translated", "--out", str(tmp_path / "translated")])
    for split in ("train", "val"):
        (src / f"coco-cn_{split}.txt").unlink()
    assert main([*argv, "--out", str(tmp_path / "none")]) == 2
    assert "no COCO-CN split list" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Flickr8k-CN


def make_flickr8k_cn(src: Path) -> list[str]:
    """A Flickr8k-CN folder with its images; returns the image ids (train 0-5, val 6, test 7)."""
    images = src / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    ids = [f"{1000268201 + i}_693b08cb0e" for i in range(8)]
    for i, image_id in enumerate(ids[:3] + ids[6:]):
        (images / f"{image_id}.jpg").write_bytes(image_bytes(i))
    (images / f"{ids[3]}.jpg").write_bytes(b"not a jpeg at all")
    (images / f"{ids[4]}.jpg").write_bytes(image_bytes(9, size=(48, 12)))
    # ids[5]: no image file
    write_lines(src / "flickr8ktrain.txt", ids[:6] + ["1099999999_abcdef0123"])
    write_lines(src / "flickr8kval.txt", ids[6:7])
    write_lines(src / "flickr8ktest.txt", ids[7:])
    zhc = [
        f"{ids[0]}.jpg#zhc#0 一只黑狗在草地上奔跑", f"{ids[0]}.jpg#zhc#1\t黑色的狗 在跑",
        f"{ids[1]}.jpg#zhc#0 两个孩子", f"{ids[1]}.jpg#zhc#1 两个孩子", f"{ids[1]}.jpg#zhc#2 ",
        f"{ids[2]}.jpg#zhc 没有编号", f"{ids[2]}.jpg#zhc#0 海边",
        f"{ids[3]}.jpg#zhc#0 坏图", f"{ids[4]}.jpg#zhc#0 太小", f"{ids[5]}.jpg#zhc#0 没有图",
        f"{ids[6]}.jpg#zhc#0 验证", f"{ids[7]}.jpg#zhc#0 测试",
    ]
    write_lines(src / "flickr8kzhc.caption.txt", zhc)
    write_lines(src / "flickr8kzhb.caption.txt", [f"{i}.jpg#zhb#0 机器翻译{n}" for n, i in enumerate(ids)])
    return ids


def test_flickr8k_cn(tmp_path):
    src, out = tmp_path / "flickr8kcn", tmp_path / "out"
    ids = make_flickr8k_cn(src)
    manifest = convert("flickr8k_cn", src, out)
    samples = check_split(out, manifest, "train", ["一只黑狗在草地上奔跑", "黑色的狗 在跑", "两个孩子", "海边"],
                          dict(duplicate_pair=1, empty_caption=1, malformed_row=1, undecodable_image=1,
                               too_small=1, missing_image=1, missing_caption=1))
    assert [(s[3]["source_id"], s[3]["caption_index"]) for s in samples][:2] == [(ids[0], 0), (ids[0], 1)]
    check_split(out, manifest, "val", ["验证"], {})
    check_split(out, manifest, "test", ["测试"], {})
    manifest = convert("flickr8k_cn", src, tmp_path / "zhb", "--captions", "zhb")
    check_split(tmp_path / "zhb", manifest, "val", ["机器翻译6"], {})


def test_flickr8k_cn_zhm_and_partial_release(tmp_path, capsys):
    src = tmp_path / "flickr8kcn"
    ids = make_flickr8k_cn(src)
    # flickr8kzhmtest.captions.txt: human translations of the test images' English captions
    write_lines(src / "flickr8kzhmtest.captions.txt",
                [f"{ids[7]}.jpg#zhm#0 一个男孩在公园里踢足球", f"{ids[7]}.jpg#zhm#1 男孩踢球"])
    with pytest.warns(UserWarning, match="left out") as record:
        manifest = convert("flickr8k_cn", src, tmp_path / "zhm", "--captions", "zhm")
    assert [str(w.message).split(": ", 1)[1] for w in record if "left out" in str(w.message)] == [
        f"split '{split}' left out: the zhm captions (flickr8kzhmtest.captions.txt) cover none of its images"
        for split in ("train", "val")]
    assert list(manifest["splits"]) == ["test"] and list(manifest["missing_splits"]) == ["train", "val"]
    samples = check_split(tmp_path / "zhm", manifest, "test", ["一个男孩在公园里踢足球", "男孩踢球"], {})
    assert [(s[3]["source_id"], s[3]["caption_index"]) for s in samples] == [(ids[7], 0), (ids[7], 1)]

    # a release folder without the val list: train and test converted, val named as left out
    (src / "flickr8kval.txt").unlink()
    with pytest.warns(UserWarning, match="'val' left out: no flickr8kval.txt"):
        assert main(["flickr8k_cn", "--src", str(src), "--out", str(tmp_path / "out"), *SMALL]) == 0
    assert "left out: val (no flickr8kval.txt" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert list(manifest["splits"]) == ["train", "test"]
    check_split(tmp_path / "out", manifest, "test", ["测试"], {})
    for split in ("train", "test"):
        (src / f"flickr8k{split}.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no Flickr8k-CN split list"):
        convert("flickr8k_cn", src, tmp_path / "none")


# ---------------------------------------------------------------------------------------------
# Flickr30k-CN


def test_flickr30k_clean_caption():
    assert clean_caption("一个:m 男人:n 在:p 骑:v 自行车:n 。:wj") == "一个男人在骑自行车。"
    assert clean_caption("时间 是 12:30 的 钟") == "时间是12:30的钟"
    assert clean_caption("时间:n 是:v 12:30:t") == "时间是12:30"
    assert clean_caption("穿 T 恤 的 New York 人") == "穿T恤的New York人"
    assert clean_caption("比分:n ::wm 3:m") == "比分:3"
    assert clean_caption("  ") == ""
    # train/val: two or more spaces mark where a Chinese comma was removed
    assert clean_caption("两 个 男人  一个 穿 绿色 衬衫  另 一个 穿 白色 衬衫 。") == "两个男人，一个穿绿色衬衫，另一个穿白色衬衫。"
    assert clean_caption("一 只 狗 在 雪地 里 奔跑   嘴里 叼 着 一 根 棍子") == "一只狗在雪地里奔跑，嘴里叼着一根棍子"
    assert clean_caption("一个 女人 ，  手里 拿 着 伞 。  ") == "一个女人，手里拿着伞。"  # punctuation already there
    assert clean_caption("穿 着 T 恤  戴 着 NBA 帽子 的 男孩") == "穿着T恤，戴着NBA帽子的男孩"
    assert clean_caption("一个:m 男人:n  骑:v 车:n") == "一个男人，骑车"


def test_flickr30k_cn(tmp_path):
    src, out = tmp_path / "f30k", tmp_path / "out"
    images = src / "flickr30k-images"
    images.mkdir(parents=True)
    for i in range(1, 9):
        if i != 5:
            (images / f"{1000 + i}.jpg").write_bytes(image_bytes(i) if i != 4 else truncated(image_bytes(i)))
    (images / "1006.jpg").write_bytes(image_bytes(6, size=(5, 5)))
    train = src / "flickr30kzhbbosontrain"
    write_lines(train / "ImageSets" / "flickr30kzhbbosontrain.txt", [str(1000 + i) for i in range(1, 8)])
    write_lines(train / "TextData" / "seg.flickr30kzhbbosontrain.caption.txt", [
        "1001#zhb#0 一个 男人 在 骑 自行车", "1001#zhb#1 一个 男人 在 骑 自行车",
        "1002#zhb#0 两 只 狗", "1002#zhb#1  ", "1002#zhb#x 坏行",
        "1004#zhb#0 截断", "1005#zhb#0 没有 图", "1006#zhb#0 太 小", "1003#zhb#0 时间 是 12:30",
        "1002#zhb#2 两 只 狗 在 草地 上 玩耍  一 只 是 黑色 的  一 只 是 白色 的",
    ])
    # a layout whose file names differ from the documented ones: found by glob
    val = src / "flickr30k_cn_val"
    write_lines(val / "ImageSets" / "ids.txt", ["1008"])
    write_lines(val / "TextData" / "val.caption.txt", ["1008#zhb#0 验证 句子"])
    test = src / "flickr30kzhmbosontest"
    write_lines(test / "ImageSets" / "flickr30kzhmbosontest.txt", ["1001"])
    write_lines(test / "TextData" / "seg.flickr30kzhmbosontest.caption.txt",
                ["1001#zhm#0 一个:m 男人:n 骑:v 车:n", "1002#zhm#0 不在 测试 集"])
    manifest = convert("flickr30k_cn", src, out)
    check_split(out, manifest, "train", ["一个男人在骑自行车", "两只狗", "时间是12:30",
                                         "两只狗在草地上玩耍，一只是黑色的，一只是白色的"],
                dict(duplicate_pair=1, empty_caption=1, malformed_row=1, undecodable_image=1, missing_image=1,
                     too_small=1, missing_caption=1))  # 1007: listed, no caption
    check_split(out, manifest, "val", ["验证句子"], {})
    check_split(out, manifest, "test", ["一个男人骑车"], {})
    shutil.rmtree(val)  # a split folder missing: the others converted, it is named
    with pytest.warns(UserWarning, match="'val' left out"):
        manifest = convert("flickr30k_cn", src, tmp_path / "no_val")
    assert list(manifest["splits"]) == ["train", "test"] and list(manifest["missing_splits"]) == ["val"]


# ---------------------------------------------------------------------------------------------
# image folder


def test_folder_splits(tmp_path):
    src, out = tmp_path / "pics", tmp_path / "out"
    files = {
        "train/a.jpg": image_bytes(1), "train/a.txt": "一朵花".encode(),
        "train/a.png": image_bytes(11, fmt="PNG"),  # same stem, same caption: a duplicate pair
        "train/sub/deeper/b.PNG": image_bytes(2, fmt="PNG"), "train/sub/deeper/b.txt": "嵌套的图\n".encode(),
        "train/c.webp": image_bytes(3, fmt="WEBP"), "train/c.txt": "\ufeff网页图".encode(),
        "train/d.jpg": image_bytes(4),  # no caption
        "train/e.txt": "没有图".encode(),
        "train/f.jpg": image_bytes(5), "train/f.txt": b"   \n",
        "train/g.jpg": truncated(image_bytes(6)), "train/g.txt": "坏图".encode(),
        "train/h.jpeg": image_bytes(7, size=(100, 8)), "train/h.txt": "太扁".encode(),
        "train/notes.md": b"ignored",
        "val/v.jpg": image_bytes(8), "val/v.txt": "验证".encode(),
    }
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    manifest = convert("folder", src, out)
    assert list(manifest["splits"]) == ["train", "val"]
    samples = check_split(out, manifest, "train", ["一朵花", "网页图", "嵌套的图"],
                          dict(missing_caption=1, missing_image=1, empty_caption=1, undecodable_image=1,
                               too_small=1, duplicate_pair=1))
    assert [s[3]["source_id"] for s in samples] == ["a", "c", "sub/deeper/b"]
    check_split(out, manifest, "val", ["验证"], {})


def test_folder_without_splits(tmp_path):
    src = tmp_path / "flat"
    (src / "x").mkdir(parents=True)
    (src / "x" / "1.jpg").write_bytes(image_bytes(1))
    (src / "x" / "1.txt").write_text("平铺", encoding="utf-8")
    manifest = convert("folder", src, tmp_path / "out", "--size", "0")
    assert list(manifest["splits"]) == ["train"]
    check_split(tmp_path / "out", manifest, "train", ["平铺"], {}, size=None)
    assert read_back(tmp_path / "out", "train")[0][2].size == (48, 40)


# ---------------------------------------------------------------------------------------------
# img2dataset


def make_img2dataset(src: Path, tars, dotted=False):
    """tars: list of lists of (key, {ext: bytes})."""
    src.mkdir(parents=True, exist_ok=True)
    for n, samples in enumerate(tars):
        with tarfile.open(src / f"{n:05d}.tar", "w") as tar:
            for key, members in samples:
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (src / f"{n:05d}_stats.json").write_text(json.dumps({"count": len(samples)}))


def _i2d_sample(n, caption, image=None, **extra):
    members = {"jpg": image if image is not None else image_bytes(n), "txt": caption.encode(),
               "json": json.dumps({"url": f"http://example.com/{n}.jpg", "key": f"{n:09d}"}).encode()}
    members.update(extra)
    return f"{n:09d}", {k: v for k, v in members.items() if v is not None}


def test_img2dataset(tmp_path):
    src = tmp_path / "i2d"
    make_img2dataset(src, [
        [_i2d_sample(0, "猫"), _i2d_sample(1, "狗"), _i2d_sample(2, "", txt=None),  # no caption
         _i2d_sample(3, "没有图", jpg=None), _i2d_sample(4, "坏图", image=truncated(image_bytes(4)))],
        [_i2d_sample(5, "鸟", jpg=None, png=image_bytes(5, fmt="PNG")), _i2d_sample(6, " "),
         _i2d_sample(7, "小", image=image_bytes(7, size=(9, 9))), _i2d_sample(8, "猫")],
    ])
    out = tmp_path / "out"
    manifest = convert("img2dataset", src, out, "--split", "web")
    samples = check_split(out, manifest, "web", ["猫", "狗", "鸟", "猫"],
                          dict(missing_caption=1, missing_image=1, undecodable_image=1, empty_caption=1, too_small=1))
    assert samples[0][3]["url"] == "http://example.com/0.jpg" and samples[0][3]["source_id"] == "00000/000000000"

    reused = tmp_path / "reused"
    manifest = convert("img2dataset", src, reused, "--reuse")
    summary = manifest["splits"]["train"]
    assert not list(reused.glob("*.tar")) and (reused / "manifest.json").is_file()
    assert summary["samples"] == 7 and summary["rows_read"] == 9
    assert summary["skipped"] == {"missing_caption": 1, "missing_image": 1}
    assert summary["shards"] == [{"path": str((src / "00000.tar").resolve()), "samples": 3},
                                 {"path": str((src / "00001.tar").resolve()), "samples": 4}]
    # the manifest reads back and its shards load with plain webdataset
    back = read_manifest(reused)
    urls = [s["path"] for s in back["splits"]["train"]["shards"]]
    complete = [s for s in wds.WebDataset(urls, shardshuffle=False) if "txt" in s and ("jpg" in s or "png" in s)]
    assert len(complete) == summary["samples"]



@pytest.mark.parametrize("problem", ["dotted keys", "repeated key"])
def test_img2dataset_reuse_refuses_what_webdataset_cannot_read(tmp_path, problem):
    """webdataset cuts keys at the first dot and raises on a repeated member: re-shard those."""
    if problem == "dotted keys":
        samples = [("img.0001", {"jpg": image_bytes(1), "txt": "点".encode()}),
                   ("img.0002", {"jpg": image_bytes(2), "txt": "号".encode()})]
        captions, skipped = ["点", "号"], {}
    else:
        samples = [_i2d_sample(1, "猫"), _i2d_sample(1, "猫"), _i2d_sample(2, "狗")]
        captions, skipped = ["猫", "狗"], {"duplicate_pair": 1}
    make_img2dataset(tmp_path / "src", [samples])
    with pytest.raises(ValueError, match="without --reuse"):
        convert("img2dataset", tmp_path / "src", tmp_path / "reused", "--reuse")
    manifest = convert("img2dataset", tmp_path / "src", tmp_path / "out")
    check_split(tmp_path / "out", manifest, "train", captions, skipped)


# ---------------------------------------------------------------------------------------------
# image modes and base64


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_modes_become_rgb():
    def pixel(data):
        img = load_image(data)
        assert img.mode == "RGB"
        return tuple(int(v) for v in np.asarray(img)[0, 0])

    assert pixel(_encoded(Image.new("CMYK", (20, 20), (0, 0, 0, 0)), "JPEG")) == pytest.approx((255, 255, 255), abs=3)
    assert pixel(_encoded(Image.new("CMYK", (20, 20), (0, 0, 0, 255)), "JPEG")) == pytest.approx((0, 0, 0), abs=40)
    assert pixel(_encoded(Image.new("L", (20, 20), 128), "PNG")) == (128, 128, 128)
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    assert pixel(_encoded(palette, "PNG")) == (200, 30, 10)
    assert pixel(_encoded(palette, "PNG", transparency=1)) == (255, 255, 255)
    assert pixel(_encoded(palette, "PNG", transparency=0)) == (200, 30, 10)
    assert pixel(_encoded(Image.new("L", (20, 20), 50), "PNG", transparency=50)) == (255, 255, 255)
    assert pixel(_encoded(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG", transparency=(1, 2, 3))) == (255, 255, 255)
    assert pixel(_encoded(Image.new("RGBA", (20, 20), (10, 20, 30, 0)), "PNG")) == (255, 255, 255)
    assert pixel(_encoded(Image.new("LA", (20, 20), (10, 128)), "PNG")) == pytest.approx((132, 132, 132), abs=1)
    assert pixel(_encoded(Image.new("RGBA", (20, 20), (10, 20, 30, 255)), "PNG")) == (10, 20, 30)
    for value, expected in ((65535, 255), (0, 0), (32896, 128)):
        sixteen = Image.fromarray(np.full((20, 20), value, dtype=np.uint16))
        data = _encoded(sixteen, "PNG")
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
        assert pixel(data) == (expected,) * 3


def test_base64_variants():
    data = bytes(range(256)) * 3
    standard = base64.b64encode(data).decode()
    assert "+" in standard and "/" in standard
    assert b64decode(standard) == data
    assert b64decode(standard.rstrip("=")) == data
    urlsafe = base64.urlsafe_b64encode(data[:-1]).decode()
    assert urlsafe.endswith("=") and b64decode(urlsafe) == data[:-1]
    assert b64decode(urlsafe.rstrip("=")) == data[:-1]
    jpg = image_bytes(1)
    assert load_image(base64.b64encode(jpg).decode().rstrip("=")).size == (48, 40)


# ---------------------------------------------------------------------------------------------
# resume, workers, command line


def _tars(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def _without_out(manifest: dict) -> dict:
    manifest = json.loads(json.dumps(manifest))
    manifest["args"].pop("out")
    return manifest


@pytest.mark.parametrize("interrupt_at", [1, 3])
def test_interrupted_conversion_resumes_to_the_same_bytes(tmp_path, monkeypatch, interrupt_at):
    make_muge(tmp_path / "raw", n_good=10)
    argv = ["--shard-size", "3", "--format", "png"]
    fresh = convert("muge", tmp_path / "raw", tmp_path / "fresh", *argv)

    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        if str(dst).endswith(".tar"):
            calls.append(dst)
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", flaky_replace)
    with pytest.raises(KeyboardInterrupt):
        convert("muge", tmp_path / "raw", tmp_path / "resumed", *argv)
    monkeypatch.undo()
    assert len(_tars(tmp_path / "resumed")) == interrupt_at - 1
    resumed = convert("muge", tmp_path / "raw", tmp_path / "resumed", *argv)

    assert _tars(tmp_path / "resumed") == _tars(tmp_path / "fresh") and len(_tars(tmp_path / "fresh")) == 5
    assert _without_out(resumed) == _without_out(fresh)
    listed = [s["path"] for split in resumed["splits"].values() for s in split["shards"]]
    assert all(p.endswith(".tar") and (tmp_path / "resumed" / p).is_file() for p in listed)
    assert not list((tmp_path / "resumed").glob("*.tmp"))
    for stats in (tmp_path / "fresh").glob("*_stats.json"):
        assert (tmp_path / "resumed" / stats.name).read_bytes() == stats.read_bytes()


def test_workers_give_the_same_bytes(tmp_path):
    make_muge(tmp_path / "raw")
    one = convert("muge", tmp_path / "raw", tmp_path / "w0", "--shard-size", "4", "--workers", "0")
    two = convert("muge", tmp_path / "raw", tmp_path / "w2", "--shard-size", "4", "--workers", "2")
    assert _tars(tmp_path / "w0") == _tars(tmp_path / "w2") and _tars(tmp_path / "w0")
    assert one["splits"] == two["splits"]


def test_command_line(tmp_path):
    make_muge(tmp_path / "raw")
    cmd = [sys.executable, "-m", "t2i.data.convert", "muge", "--src", str(tmp_path / "raw"),
           "--out", str(tmp_path / "out"), *SMALL]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()}
    assert rows["train"][1:4] == ["6", "1", "14"]  # samples, shards, rows read (8 skipped)
    assert rows["val"][1] == "2"
    cmd[cmd.index("--src") + 1] = str(tmp_path / "no_such_folder")
    failed = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode != 0 and "--src" in failed.stderr
