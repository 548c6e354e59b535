"""GPTStage: token layout, losses, conditioning dropout, pkeep, and train.py on real code shards."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i.checkpoints import RECORD_VERSION, read_checkpoint
from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.models.gpt import GPTConfig
from t2i.stages.configs import GPTStageConfig
from t2i.stages.gpt_stage import GPTStage

REPO = Path(__file__).parents[1]
TINY = dict(n_image_codes=40, n_text_tokens=30, text_len=4, image_len=6, n_layer=1, n_head=2, n_embd=16)


def _stage(**options):
    return GPTStage(GPTConfig(**TINY), GPTStageConfig(**options), torch.optim.AdamW)


def test_text_to_image_layout_and_targets():
    stage = _stage(cond_drop=0)
    cfg = stage.gpt.layout
    codes, text = torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([[7, 8, 0, 0]])
    inputs, targets = stage.sequences(codes, text, train=True)
    full = [cfg.special("T2I"), 47, 48, 40, 40, cfg.special("BOI"), 1, 2, 3, 4, 5, 6]
    assert inputs.tolist() == [full[:-1]] and targets.tolist() == [full[1:]]


def test_cond_drop_pkeep_and_caption_direction():
    cfg = GPTConfig(**TINY).tokens
    codes, text = torch.randint(0, 40, (64, 6)), torch.randint(1, 30, (64, 4))
    _, targets = _stage(cond_drop=1.0).sequences(codes, text, train=True)
    assert (targets[:, :4] == cfg.text_offset).all()  # null text: all padding
    _, kept = _stage(cond_drop=1.0).sequences(codes, text, train=False)
    assert torch.equal(kept[:, :4], text + cfg.text_offset)  # evaluation never drops
    inputs, targets = _stage(cond_drop=0, pkeep=0.0).sequences(codes, text, train=True)
    assert torch.equal(targets[:, -6:], codes)  # targets stay true
    assert (inputs[:, -5:] != codes[:, :5]).float().mean() > 0.5 and inputs[:, -5:].max() < 40
    inputs, targets = _stage(cond_drop=0, caption_prob=1.0).sequences(codes, text, train=True)
    assert (inputs[:, 0] == cfg.special("I2T")).all() and torch.equal(targets[:, :6], codes)
    assert (targets[:, 6] == cfg.special("BOT")).all() and torch.equal(targets[:, 7:], text + cfg.text_offset)
    # validation scores what the run trains: a captioner's (caption_prob 1) captions, else text to image
    _, captioner = _stage(cond_drop=0, caption_prob=1.0).sequences(codes, text, train=False)
    assert torch.equal(captioner, targets)
    _, mixed = _stage(cond_drop=0, caption_prob=0.5).sequences(codes, text, train=False)
    assert torch.equal(mixed[:, :4], text + cfg.text_offset)
    with pytest.raises(ValueError, match="stage.pkeep"):
        _stage(pkeep=1.5)


def test_loss_weights_tokens_as_cogview_and_reads_each_range():
    stage = _stage(txt_loss_scale=2.0)
    cfg = stage.gpt.layout
    targets = torch.tensor([[cfg.text_offset + 3, cfg.text_offset, cfg.special("BOI"), 5, 9]])
    logits = torch.randn(1, 5, cfg.vocab_size)
    loss, logs = stage.loss(logits, targets)
    image = torch.nn.functional.cross_entropy(logits[0, 3:, :40], torch.tensor([5, 9]), reduction="none")
    text = torch.nn.functional.cross_entropy(logits[0, :1, 40:70], torch.tensor([3]), reduction="none")
    assert torch.allclose(logs["image_loss"], image.mean()) and torch.allclose(logs["text_loss"], text.mean())
    # per token: 2 image tokens at weight 1, 1 text token at weight 2 -> sum(w CE) / sum(w)
    assert torch.allclose(loss, (image.sum() + 2.0 * text.sum()) / (2 + 2.0))
    assert torch.allclose(_stage(txt_loss_scale=0.0).loss(logits, targets)[0], image.mean())  # EasyNLP's loss
    logits[0, 3:, 40:] += 100  # text/special logits cannot compete at image positions
    assert torch.allclose(stage.loss(logits, targets)[1]["image_loss"], image.mean())


def test_caption_end_makes_the_first_padding_of_a_caption_a_text_target():
    cfg = GPTConfig(**TINY).tokens
    codes, text = torch.randint(0, 40, (2, 6)), torch.tensor([[5, 6, 0, 0], [0, 0, 0, 0]])
    inputs, targets = _stage(cond_drop=0, caption_prob=1.0).sequences(codes, text, train=True)
    logits = torch.randn(2, targets.shape[1], cfg.vocab_size)
    plain = _stage(caption_prob=1.0).loss(logits, targets)[1]["text_loss"]
    ending = _stage(caption_prob=1.0, caption_end=True).loss(logits, targets)[1]["text_loss"]
    text_logits = logits[0, 7:10, 40:70]  # row 0: the targets after codes and [BOT]: 5, 6 and the end (padding)
    ce = torch.nn.functional.cross_entropy(text_logits, torch.tensor([5, 6, 0]), reduction="none")
    assert torch.allclose(plain, ce[:2].mean()) and torch.allclose(ending, ce.mean())  # the empty row adds nothing


def test_paipainter_layout_trains_on_image_codes_only():
    model = GPTConfig(**TINY, layout="paipainter")
    stage = GPTStage(model, GPTStageConfig(txt_loss_scale=0.0, cond_drop=0), torch.optim.AdamW)
    codes, text = torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.tensor([[7, 8, 0, 0]])
    inputs, targets = stage.sequences(codes, text, train=True)
    assert inputs.tolist() == [[47, 48, 40, 40, 1, 2, 3, 4, 5]] and targets[0, 3:].tolist() == [1, 2, 3, 4, 5, 6]
    logits = stage.gpt(inputs)
    assert logits.shape == (1, 9, 40)
    loss, logs = stage.loss(logits, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 3:], codes[0])  # EasyNLP: CE over the 256 image tokens
    assert torch.allclose(loss, expected) and logs["text_loss"] == 0
    with pytest.raises(ValueError, match="no text head"):
        GPTStage(model, GPTStageConfig(txt_loss_scale=1.0), torch.optim.AdamW)
    with pytest.raises(ValueError, match="no text head"):
        GPTStage(model, GPTStageConfig(txt_loss_scale=0.0, caption_prob=0.1), torch.optim.AdamW)


def test_train_py_on_code_shards_writes_a_self_contained_checkpoint(codes_root, gpt_run):
    run_dir = gpt_run
    metrics = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    for name in ("train/image_loss", "train/text_loss", "train/tokens_per_s", "train/mfu", "val/loss"):
        assert name in metrics
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    record = checkpoint["t2i"]
    manifest = json.loads((codes_root / "manifest.json").read_text())
    assert record["version"] == RECORD_VERSION
    assert record["gpt"]["image_len"] == 8 * 8 and record["gpt"]["n_image_codes"] == 64
    assert record["gpt"]["layout"] == "t2i"
    assert record["tokenizer"] == {"kind": "sentencepiece", "model": (codes_root / "tokenizer.model").read_bytes(),
                                   "text_len": record["gpt"]["text_len"]}
    assert record["vqgan"]["sha256"] == manifest["vqgan_sha256"]
    assert record["training"]["caption_prob"] == 0.5 and record["training"]["origin"] == "trained from scratch"


def test_sample_grids_are_logged_with_their_captions(codes_root, gpt_run):
    images = gpt_run / "csv" / "version_0" / "images"
    grids = sorted(images.glob("samples-step*.png"))
    assert [g.name for g in grids] == ["samples-step0000003.png", "samples-step0000006.png"]
    # stage.sample_step=auto is resolved at the first grid for the run: 2 prompts x 3 samples of 64 positions
    assert (gpt_run / "train.log").read_text().count("sampling.step=auto -> eager (cpu, 384 positions, batches of 6)") == 1
    # 3 samples x 2 prompts, 32 px cells enlarged 4x (t2i.grids.captioned_grid), a caption above each row
    width, height = Image.open(grids[0]).size
    assert width == 4 + 3 * (128 + 4) and height > 2 * (128 + 8)
    captions = grids[0].with_suffix(".md").read_text(encoding="utf-8")
    first_two = list(itertools.islice(DataConfig(root=str(codes_root)).captions("val"), 2))
    assert all(f"{i + 1}. {c}\n" in captions for i, c in enumerate(first_two))


def test_image_shards_need_a_vqgan_and_encode_like_pretokenize(codes_root, tmp_path):
    images_root = codes_root.parent / "shapes"
    refused = subprocess.run(  # image shards whose code shards were not made, and no VQGAN for them
        [sys.executable, "train.py", "stage=gpt", "data=shapes", f"data.root={images_root}",
         f"data.codes_root={tmp_path / 'no_codes'}", f"hydra.run.dir={tmp_path / 'refused'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "vqgan_ckpt=VQGAN.ckpt" in refused.stderr and "python -m t2i.pretokenize" in refused.stderr

    # the slow path's codes for a batch are exactly the code shards' for the same samples
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["stage=gpt", "model=shapes", "model.n_layer=1", "data=shapes",
                                          f"data.root={images_root}", "data.num_workers=0",
                                          f"vqgan_ckpt={codes_root.parent / 'vqgan.ckpt'}"])
    images_dm = ShardDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    stage = GPTStage.from_config(cfg, images_dm)
    assert stage.gpt.cfg.image_len == 64 and stage.gpt.cfg.n_image_codes == 64
    codes_dm = ShardDataModule({**OmegaConf.to_container(cfg.data, resolve=True), "root": str(codes_root)})
    image_batch = images_dm.on_after_batch_transfer(next(iter(images_dm.loader("val"))), 0)
    code_batch = next(iter(codes_dm.loader("val")))
    assert image_batch["key"] == code_batch["key"]
    assert torch.equal(stage._codes(image_batch), code_batch["codes"].flatten(1))
    manifest = json.loads((codes_root / "manifest.json").read_text())
    assert stage.record.vqgan.sha256 == manifest["vqgan_sha256"]

    # and train.py runs on them
    run = subprocess.run(
        [sys.executable, "train.py", "stage=gpt", "model=shapes", "model.n_layer=1", "model.n_embd=32",
         "model.n_head=2", "data=shapes", f"data.root={images_root}", "data.batch_size=16", "data.num_workers=0",
         f"vqgan_ckpt={codes_root.parent / 'vqgan.ckpt'}", "trainer=cpu", "trainer.max_steps=3",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
         "stage.sample_every_n_steps=0", f"hydra.run.dir={tmp_path / 'slow'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # last.ckpt is the final state, also when the run stops between validations (at 2 and 4 here)
    assert read_checkpoint(tmp_path / "slow" / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_generate_command_writes_pngs_and_grid(codes_root, gpt_run, tmp_path):
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "gen"
    result = subprocess.run(
        [sys.executable, "eval.py", "task=generate", f"ckpt={ckpt}", "prompts=['红色的小圆形','','🎨 mixed text']",
         "sampling.samples_per_prompt=2", f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "empty prompt" in result.stderr
    pngs = sorted((out / "samples").glob("0*.png"))
    assert len(pngs) == 6 and (out / "samples" / "grid.png").is_file()
    assert Image.open(pngs[0]).size == (32, 32)
    results = json.loads((out / "results.json").read_text())
    # sampling.step=auto resolved once for the run's 6 sequences of 64 positions, said and recorded
    assert "sampling.step=auto -> eager (cpu, 384 positions, batches of 6)" in result.stdout + result.stderr
    assert results["sampling_step"] == {"asked": "auto", "ran": "eager"}
    codes = np.load(out / "samples" / "codes.npy")
    assert codes.dtype == np.int64 and codes.shape == (6, 8, 8) and codes.max() < 64
    assert len(results["text_ids"]) == 3 and results["text_ids"][1] == [0] * len(results["text_ids"][1])
    assert results["prefix_ids"][0][1:-1] == [i + 64 for i in results["text_ids"][0]]
    # a VQGAN other than the one the GPT was trained with is refused
    other = tmp_path / "other.ckpt"
    state = torch.load(codes_root.parent / "vqgan.ckpt", weights_only=True)
    state["state_dict"]["vqgan.quant_conv.bias"] += 1
    torch.save(state, other)
    refused = subprocess.run(
        [sys.executable, "eval.py", "task=generate", f"ckpt={ckpt}", "prompts=['红色']", f"vqgan_ckpt={other}",
         f"hydra.run.dir={tmp_path / 'gen2'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "is not the one" in refused.stderr
