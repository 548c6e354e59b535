"""Fixtures shared across test files: a small shapes set pre-tokenized with a random VQGAN, one
short GPT training run on it (its checkpoint serves the generation and evaluation tests), and a
randomly initialised InceptionV3 weights file for FID/IS, a random VGG16 for LPIPS and a tiny random
Chinese-CLIP for the CLIP metrics (nothing is downloaded)."""

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torchvision

from t2i import pretokenize
from t2i.data.convert import run as convert
from t2i.data.datamodule import DataConfig
from t2i.data.tokenizer import train_sentencepiece
from t2i.eval.clip import save_random_chinese_clip
from t2i.eval.fidelity import save_random_inception
from t2i.models.vqgan import VQGANConfig, VQModel

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def codes_root(tmp_path_factory):
    images = tmp_path_factory.mktemp("data") / "shapes"
    convert(["shapes", "--out", str(images), "--train", "64", "--val", "16", "--test", "0", "--size", "32", "--quiet"])
    (images / "tokenizer.model").write_bytes(train_sentencepiece(["红色的小圆形", "蓝色的大方块", "背景是白色的"] * 20, 300))
    cfg = VQGANConfig(resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
                      embed_dim=8, n_embed=64)
    torch.manual_seed(0)
    vqgan = VQModel(cfg)
    vqgan.quantize.embedding.weight.data.normal_()
    ckpt = images.parent / "vqgan.ckpt"
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in vqgan.state_dict().items()}, "t2i": {"vqgan": asdict(cfg)}}, ckpt)
    out = images.parent / "shapes_codes"
    assert pretokenize.main(["--data", str(images), "--out", str(out), "--vqgan", str(ckpt), "--quiet"]) == 0
    return out


@pytest.fixture(scope="session")
def gpt_run(codes_root, tmp_path_factory):
    """One short train.py run on the code shards, shared by the tests that need a GPT checkpoint."""
    run_dir = tmp_path_factory.mktemp("gpt_run")
    result = subprocess.run(
        [sys.executable, "train.py", "debug=tiny", "data=shapes_codes", f"data.root={codes_root}", "data.batch_size=16",
         "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=1.0",
         "trainer.num_sanity_val_steps=2", "stage.warmup_steps=2", "stage.sample_every_n_steps=3",
         "stage.num_sample_prompts=2", "stage.sampling.samples_per_prompt=3", "stage.caption_prob=0.5",
         "callbacks.throughput.window=2", "callbacks.throughput.peak_flops=1e9",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def lora_run(codes_root, gpt_run, tmp_path_factory):
    """A LoRA adapter trained on gpt_run's checkpoint (its layers and head adapted; a sample grid drawn by the
    unmerged adapter at step 2), resumed from its adapter checkpoint for a third step, then evaluated with
    eval.py task=t2i adapter=: the commands one after another in one process."""
    from run_each import run_each

    run_dir = tmp_path_factory.mktemp("lora_run")
    base = gpt_run / "checkpoints" / "last.ckpt"
    train = ["train.py", "debug=tiny", "data=shapes_codes", f"data.root={codes_root}", f"init_ckpt={base}",
             "stage.lora={rank: 4, targets: [attention, mlp, head]}", "stage.sample_every_n_steps=2",
             "stage.num_sample_prompts=1", "stage.sampling.samples_per_prompt=1", f"hydra.run.dir={run_dir}"]
    evaluate = ["eval.py", f"ckpt={base}", f"adapter={run_dir / 'checkpoints' / 'last.ckpt'}", "data=shapes_codes",
                f"data.root={codes_root}", "split=val", "eval.num_prompts=2", "eval.fid=false", "eval.clip=false",
                "sampling.batch_size=2", f"hydra.run.dir={run_dir / 'eval'}"]
    runs = run_each([*train, "trainer.max_steps=2"], [*train, "trainer.max_steps=3", "ckpt_path=last"], evaluate)
    for code, said in runs:
        assert code == 0, said[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A randomly initialised InceptionV3 saved the way torch-fidelity loads weights: a plain state dict."""
    return save_random_inception(tmp_path_factory.mktemp("inception") / "inception-random.pth")


@pytest.fixture(scope="session")
def random_vgg16(tmp_path_factory):
    """A torchvision vgg16 state dict: random feature layers, zero classifier (LPIPS never uses it)."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    with torch.device("meta"):
        reference = torchvision.models.vgg16().state_dict()
    state = {key: torch.zeros(value.shape) for key, value in reference.items()}
    state.update({"features." + key: value for key, value in features.state_dict().items()})
    assert set(state) == set(reference)
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="session")
def chinese_clip(codes_root, tmp_path_factory):
    """A tiny randomly initialised Chinese-CLIP (transformers' classes, save_pretrained's folder) whose
    vocabulary holds every character of the shapes captions: eval.clip_model=<this folder>."""
    captions = DataConfig(root=str(codes_root.parent / "shapes")).captions("train")
    return save_random_chinese_clip(tmp_path_factory.mktemp("clip") / "chinese-clip-tiny",
                                    sorted({char for caption in captions for char in caption}))
