"""Pre-tokenization: image shards -> VQGAN code shards, resuming, and streaming code shards."""

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

import t2i.pretokenize as pretokenize
from t2i.data import shards
from t2i.data.convert import run as convert
from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.data.stream import decode_codes
from t2i.data.tokenizer import train_sentencepiece
from t2i.checkpoints import weights_hash
from t2i.models.vqgan import VQGANConfig, VQModel

N_TRAIN, N_VAL, SHARD, BATCH = 40, 8, 16, 5  # 3 train shards (16, 16, 8); batches of 5 leave partial ones
CFG = VQGANConfig(resolution=32, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
                  embed_dim=8, n_embed=300)  # 300 codes: some exceed one byte
GRID = [8, 8]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: one thread is as fast, and far faster when other processes share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    convert(["shapes", "--out", str(out), "--train", str(N_TRAIN), "--val", str(N_VAL), "--test", "0", "--size", "32",
             "--shard-size", str(SHARD), "--quiet"])
    captions = [json.loads(line)["caption"] for line in _jsons(out, "train")]
    (out / "tokenizer.model").write_bytes(train_sentencepiece(captions, 400))
    return out


def _jsons(root, split):
    for url in _tars(root, split):
        for sample in wds.WebDataset(url, shardshuffle=False):
            yield sample["json"].decode()


def _tars(root, split):
    return sorted(str(p) for p in Path(root).glob(f"{split}-*.tar"))


@pytest.fixture(scope="module")
def vqgan(tmp_path_factory):
    torch.manual_seed(0)
    model = VQModel(CFG).eval()
    model.quantize.embedding.weight.data.normal_()  # a spread-out codebook: many distinct codes
    path = tmp_path_factory.mktemp("vqgan") / "vqgan.ckpt"
    torch.save({"state_dict": {"vqgan." + k: v for k, v in model.state_dict().items()},
                "t2i": {"vqgan": asdict(CFG)}}, path)
    return model, path


def _pretokenize(images_dir, out, ckpt, *extra):
    argv = ["--data", str(images_dir), "--out", str(out), "--vqgan", str(ckpt), "--batch-size", str(BATCH), "--quiet",
            *extra]
    assert pretokenize.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def codes_dir(images_dir, vqgan, tmp_path_factory):
    return _pretokenize(images_dir, tmp_path_factory.mktemp("codes"), vqgan[1])


def _image_samples(root, split):
    """(key, uint8 HxWx3 pixels, txt, json) straight from the image shards, decoded with PIL."""
    for url in _tars(root, split):
        for s in wds.WebDataset(url, shardshuffle=False):
            yield s["__key__"], np.array(Image.open(io.BytesIO(s["png"])).convert("RGB")), s["txt"], json.loads(s["json"])


def _code_samples(root, split):
    """(key, codes [h, w] as int64, txt, json) from the code shards with plain webdataset and numpy."""
    for url in _tars(root, split):
        for s in wds.WebDataset(url, shardshuffle=False):
            meta = json.loads(s["json"])
            codes = np.frombuffer(s["codes"], dtype="<u2").reshape(meta["codes_shape"])
            yield s["__key__"], torch.from_numpy(codes.astype(np.int64)), s["txt"], meta


def _encode(model, pixels):
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return model.encode(x)


@pytest.mark.parametrize("split", ["train", "val"])
def test_codes_equal_a_direct_encode_of_the_images(images_dir, vqgan, codes_dir, split):
    model, _ = vqgan
    images = list(_image_samples(images_dir, split))
    codes = list(_code_samples(codes_dir, split))
    assert [c[0] for c in codes] == [i[0] for i in images]  # same keys, same order
    expected = _encode(model, [i[1] for i in images])  # one batch here, batches of 5 in the shards
    written = torch.stack([c[1] for c in codes])
    assert written.shape == (len(images), *GRID)
    assert torch.equal(written, expected)
    if split == "train":
        assert written.max() > 255 and len(written.unique()) > 20  # uint16 carries the high byte
    for (_, _, txt, meta), (_, _, code_txt, code_meta) in zip(images, codes):
        assert code_txt == txt
        assert code_meta == {**meta, "codes_shape": GRID, "hflip": False}


def test_manifest_records_the_vqgan_and_the_counts(images_dir, vqgan, codes_dir):
    model, ckpt = vqgan
    source = shards.read_manifest(images_dir)
    manifest = shards.read_manifest(codes_dir)
    assert manifest["kind"] == "codes" and manifest["source"] == "shapes"
    assert manifest["vqgan_sha256"] == weights_hash(model)
    assert manifest["vqgan"] == asdict(CFG)
    assert manifest["vqgan_checkpoint"] == str(Path(ckpt).resolve())
    assert manifest["grid"] == GRID and manifest["image_size"] == 32 and manifest["hflip"] is False
    assert manifest["data_dir"] == str(images_dir.resolve())
    assert set(manifest["splits"]) == set(source["splits"]) == {"train", "val"}
    for name, split in source["splits"].items():
        assert manifest["splits"][name]["samples"] == split["samples"]
        assert [Path(s["path"]).name for s in manifest["splits"][name]["shards"]] == \
               [Path(s["path"]).name for s in split["shards"]]
        assert [s["samples"] for s in manifest["splits"][name]["shards"]] == [s["samples"] for s in split["shards"]]
    assert len(manifest["splits"]["train"]["shards"]) == 3
    assert (codes_dir / "tokenizer.model").read_bytes() == (images_dir / "tokenizer.model").read_bytes()
    assert manifest["tokenizer"] == "tokenizer.model"
    assert "codes shards, code grid 8x8" in shards.describe(manifest)


def test_hflip_adds_a_flipped_copy_of_every_sample(images_dir, vqgan, tmp_path):
    model, ckpt = vqgan
    out = _pretokenize(images_dir, tmp_path / "flip", ckpt, "--hflip", "--splits", "val")
    manifest = shards.read_manifest(out)
    assert list(manifest["splits"]) == ["val"] and manifest["hflip"] is True
    assert manifest["splits"]["val"]["samples"] == 2 * N_VAL
    images = list(_image_samples(images_dir, "val"))
    codes = list(_code_samples(out, "val"))
    keys = [k for k, *_ in images]
    assert [c[0] for c in codes] == [k for key in keys for k in (key, key + "_flip")]
    assert all("." not in c[0] for c in codes)
    plain, flipped = torch.stack([c[1] for c in codes[0::2]]), torch.stack([c[1] for c in codes[1::2]])
    assert torch.equal(plain, _encode(model, [i[1] for i in images]))
    assert torch.equal(flipped, _encode(model, [i[1][:, ::-1] for i in images]))
    assert not torch.equal(plain, flipped)
    metas = [c[3] for c in codes]
    assert [m["hflip"] for m in metas] == [False, True] * N_VAL
    assert [m["key"] for m in metas] == [c[0] for c in codes]


def test_interrupted_run_resumes_to_the_same_bytes(images_dir, vqgan, codes_dir, tmp_path, monkeypatch):
    _, ckpt = vqgan
    out = tmp_path / "resumed"
    real_replace = shards.os.replace
    tar_renames = []

    def crash_on_second_tar(src, dst):
        if str(dst).endswith(".tar"):
            tar_renames.append(dst)
            if len(tar_renames) == 2:
                raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(shards.os, "replace", crash_on_second_tar)
    with pytest.raises(OSError, match="simulated crash"):
        pretokenize.main(["--data", str(images_dir), "--out", str(out), "--vqgan", str(ckpt),
                          "--batch-size", str(BATCH), "--quiet"])
    monkeypatch.setattr(shards.os, "replace", real_replace)
    assert (out / "train-00000.tar").exists() and not (out / "train-00001.tar").exists()
    assert not (out / shards.MANIFEST).exists()

    encoded = []
    real_encode = pretokenize.encode_images
    monkeypatch.setattr(pretokenize, "encode_images", lambda m, x, d: encoded.append(len(x)) or real_encode(m, x, d))
    _pretokenize(images_dir, out, ckpt)
    assert sum(encoded) == N_TRAIN + N_VAL - SHARD  # the finished shard was not encoded again
    assert max(encoded) == BATCH
    names = sorted(p.name for p in codes_dir.glob("*-*.tar")) + sorted(p.name for p in codes_dir.glob("*_stats.json"))
    assert len(names) == 2 * 4
    for name in names:
        assert (out / name).read_bytes() == (codes_dir / name).read_bytes(), name
    assert not list(out.glob("*.tmp"))
    resumed, reference = (json.loads((d / shards.MANIFEST).read_text()) for d in (out, codes_dir))
    assert resumed.pop("args")["out"] == str(out) and reference.pop("args")["out"] == str(codes_dir)
    assert resumed == reference


def test_rerun_with_another_vqgan_refuses_the_old_shards(images_dir, codes_dir, tmp_path, capsys):
    out = tmp_path / "old"
    shutil.copytree(codes_dir, out)
    torch.manual_seed(1)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"vqgan." + k: v for k, v in VQModel(CFG).state_dict().items()},
                "t2i": {"vqgan": asdict(CFG)}}, other)
    argv = ["--data", str(images_dir), "--out", str(out), "--vqgan", str(other), "--quiet"]
    assert pretokenize.main(argv) == 2
    assert "other settings (vqgan_sha256" in capsys.readouterr().err


def _module(root, **overrides):
    cfg = dict(name="codes", root=str(root), batch_size=8, num_workers=2, shuffle_buffer=10,
               splits={"train": "train", "val": "train", "test": "val"})  # val reads train: 40 samples in eval mode
    cfg.update(overrides)
    return ShardDataModule(cfg)


def test_datamodule_streams_code_shards(codes_dir):
    written = {key: codes for key, codes, _, _ in _code_samples(codes_dir, "train")}
    dm = _module(codes_dir, num_workers=0)
    assert dm.cfg.kind() == "codes"
    dataset = dm.dataset("train", rank=0, world_size=1)
    batches = list(DataLoader(dataset, batch_size=None, num_workers=0))
    assert len(batches) == len(dataset) == N_TRAIN // 8
    for batch in batches:
        batch = dm.on_after_batch_transfer(batch)  # what Lightning does; no image to convert
        assert "image" not in batch
        assert batch["codes"].dtype == torch.long and batch["codes"].shape == (8, *GRID)
        assert batch["text"].dtype == torch.long and batch["text"].shape == (8, 32)
        for key, codes in zip(batch["key"], batch["codes"]):
            assert torch.equal(codes, written[key])
        assert [m["caption"] for m in batch["meta"]] == batch["caption"]
    assert sorted(k for b in batches for k in b["key"]) == sorted(written)


def test_datamodule_eval_reads_every_code_sample_once_over_ranks_and_workers(codes_dir):
    dm = _module(codes_dir, eval_batch_size=3)
    keys = []
    for rank in range(2):
        dataset = dm.dataset("val", rank=rank, world_size=2)
        batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
        assert len(batches) == len(dataset)
        keys += [k for b in batches for k in b["key"]]
    assert sorted(keys) == sorted(k for k, *_ in _code_samples(codes_dir, "train"))


def test_image_augmentation_settings_are_refused_for_code_shards(codes_dir):
    with pytest.raises(ValueError, match="data.hflip"):
        _module(codes_dir, hflip=True).dataset("train", rank=0, world_size=1)


def test_config_that_does_not_fit_the_checkpoint_names_the_keys(images_dir, vqgan, tmp_path, capsys):
    _, ckpt = vqgan
    yaml = tmp_path / "wrong.yaml"
    yaml.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in {**asdict(CFG), "n_embed": 512}.items())
                    + "\ninit_ckpt: null\n")
    argv = ["--data", str(images_dir), "--out", str(tmp_path / "out"), "--vqgan", str(ckpt),
            "--vqgan-config", str(yaml), "--quiet"]
    assert pretokenize.main(argv) == 2
    err = capsys.readouterr().err
    assert "mis-shaped" in err and "quantize.embedding.weight: checkpoint (300, 8), model (512, 8)" in err
    assert not (tmp_path / "out").exists()


def test_missing_manifest_and_unknown_split_are_clear_errors(images_dir, vqgan, tmp_path, capsys):
    _, ckpt = vqgan
    (tmp_path / "empty").mkdir()
    assert pretokenize.main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--vqgan", str(ckpt)]) == 2
    assert "no shard manifest at" in capsys.readouterr().err
    assert pretokenize.main(["--data", str(images_dir), "--out", str(tmp_path / "o"), "--vqgan", str(ckpt),
                             "--splits", "test"]) == 2
    assert "split 'test' is not in" in capsys.readouterr().err
    assert pretokenize.main(["--data", str(images_dir), "--out", str(tmp_path / "o"), "--vqgan", str(ckpt),
                             "--vqgan-config", "no_such_config"]) == 2
    assert "no VQGAN config 'no_such_config'" in capsys.readouterr().err


def test_decode_codes_round_trip_and_size_check():
    grid = np.array([[0, 1, 300], [65535, 256, 7]], dtype=np.uint16)
    data = pretokenize.codes_to_bytes(grid)
    assert data == grid.astype("<u2").tobytes() and len(data) == 12
    codes = decode_codes(data, [2, 3])
    assert codes.dtype == torch.long and codes.tolist() == grid.tolist()
    with pytest.raises(ValueError, match="does not hold 3x3"):
        decode_codes(data, [3, 3])


def test_shapes_codes_config_and_missing_root_hint(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=shapes_codes", f"paths.data_dir={tmp_path}"])
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    assert data.name == "shapes_codes" and data.source == "pretokenize"
    assert data.root == f"{tmp_path}/shapes_codes" and data.tokenizer.path is None  # <root>/tokenizer.model
    with pytest.raises(FileNotFoundError, match=r"python -m t2i\.pretokenize --data IMAGE_SHARDS"):
        data.root_dir()


def test_vqgan_config_names_resolve_to_conf_vqgan():
    assert pretokenize.load_vqgan_config("f16_16384") == VQGANConfig()  # taming's values are the defaults
    assert pretokenize.load_vqgan_config("shapes").grid == 8
