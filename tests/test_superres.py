"""The super-resolution stage (CogView's second model): pre-tokenizing two grids, the superres token layout
and its windows, windowed sampling with the KV cache, and train.py / eval.py end to end on real shards."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i import pretokenize
from t2i.checkpoints import load_gpt
from t2i.data.convert import run as convert
from t2i.data.datamodule import ShardDataModule
from t2i.data.stream import complete_samples, decode_codes, decode_image
from t2i.data.tokenizer import train_sentencepiece
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.layout import SuperresGrid, TokenLayout
from t2i.models.vqgan import VQGANConfig, VQModel
from t2i.sampling import SamplingConfig, SuperResPipeline, generate_codes, superres_codes
from t2i.stages.configs import GPTStageConfig
from t2i.stages.gpt_stage import GPTStage

REPO = Path(__file__).parents[1]
VQ = VQGANConfig(resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=16,
                 embed_dim=8, n_embed=64)  # f4: 32x32 -> 8x8 codes, 64x64 -> 16x16


@pytest.fixture(scope="module")
def sr_data(tmp_path_factory):
    """Shapes stored at 64x64, a random f4 VQGAN, and code shards with both grids (8x8 of the 32x32 image,
    16x16 of the 64x64 one)."""
    root = tmp_path_factory.mktemp("sr")
    images = root / "shapes"
    convert(["shapes", "--out", str(images), "--train", "48", "--val", "8", "--test", "12", "--size", "64", "--quiet"])
    (images / "tokenizer.model").write_bytes(train_sentencepiece(["红色的小圆形", "蓝色的大方块", "背景是白色的"] * 20, 300))
    torch.manual_seed(1)  # not conftest's VQGAN (seed 0): the base GPT of gpt_run reads another one
    vqgan = VQModel(VQ).eval()
    vqgan.quantize.embedding.weight.data.normal_()
    ckpt = root / "vqgan.ckpt"
    torch.save({"state_dict": {f"vqgan.{k}": v for k, v in vqgan.state_dict().items()}, "t2i": {"vqgan": asdict(VQ)}},
               ckpt)
    codes = root / "shapes_sr_codes"
    assert pretokenize.main(["--data", str(images), "--out", str(codes), "--vqgan", str(ckpt), "--image-size", "32",
                             "--superres-size", "64", "--quiet"]) == 0
    return images, codes, vqgan, ckpt


def test_pretokenize_writes_both_grids_of_the_same_image(sr_data):
    images, codes, vqgan, _ = sr_data
    manifest = json.loads((codes / "manifest.json").read_text())
    assert manifest["grid"] == [8, 8] and manifest["hr_grid"] == [16, 16] and manifest["hr_image_size"] == 64
    pixels = {s["__key__"]: s["png"] for s in complete_samples(str(images / "val-00000.tar"))}
    samples = list(complete_samples(str(codes / "val-00000.tar")))
    assert len(samples) == 8
    import random
    for sample in samples[:3]:
        meta = json.loads(sample["json"])
        for field, shape_key, size in (("codes", "codes_shape", 32), ("hrcodes", "hr_codes_shape", 64)):
            image = decode_image(pixels[sample["__key__"]], size, "center", 1.0, False, random.Random(0))
            expected = vqgan.encode(image.permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
            assert torch.equal(decode_codes(sample[field], meta[shape_key]), expected)
    dm = ShardDataModule({"name": "sr", "root": str(codes), "image_size": 32, "text_len": 26, "batch_size": 4,
                          "num_workers": 0, "shuffle_buffer": 0, "seed": 0})
    batch = next(iter(dm.loader("val")))
    assert batch["codes"].shape == (4, 8, 8) and batch["hr_codes"].shape == (4, 16, 16)
    # a size that is not a larger multiple of the image size is refused before anything is written
    with pytest.raises(ValueError, match="superres-size"):
        pretokenize.pretokenize(images, codes.parent / "bad", vqgan, image_size=32, superres_size=48, progress=False)


def test_windows_tile_the_grid_and_crop_and_paste_are_inverse():
    grid = SuperresGrid(low=(8, 8), high=(16, 16), window=(8, 8), stride=(4, 4))  # CogView's 3x3 windows
    assert grid.windows == 9 and grid.offsets[:4] == [(0, 0), (0, 4), (0, 8), (4, 0)]
    high = torch.arange(2 * 256).view(2, 16, 16)
    window = grid.crop(high, torch.tensor([0, 4]))
    assert window[0].tolist() == high[0, :8, :8].flatten().tolist()
    assert window[1].tolist() == high[1, 4:12, 4:12].flatten().tolist()
    blank = torch.full_like(high, -1)
    for k in range(grid.windows):
        grid.paste(blank, k, grid.crop(high, k))
    assert torch.equal(blank, high)  # every cell is in some window
    assert SuperresGrid((8, 8), (16, 16), (16, 16), (16, 16)).windows == 1
    with pytest.raises(ValueError, match="without gaps"):
        SuperresGrid((8, 8), (16, 16), (8, 8), (6, 6))
    with pytest.raises(ValueError, match="larger than"):
        SuperresGrid((8, 8), (16, 16), (32, 8), (4, 4))


def test_superres_layout_sequence_and_targets():
    layout = TokenLayout("superres", n_image_codes=10, n_text_tokens=5, text_len=2, image_len=4, low_len=3, windows=2)
    assert layout.specials == ("SR", "LOW", "WIN0", "WIN1") and layout.vocab_size == 19
    assert layout.prefix_len == 2 + 3 + 3 and layout.block_size == 12
    text, low, codes = torch.tensor([[1, 0]]), torch.tensor([[7, 8, 9]]), torch.tensor([[1, 2, 3, 4]])
    sequence = layout.text_to_image(text, codes, low, window=1)
    assert sequence.tolist() == [[layout.special("SR"), 11, 10, layout.special("LOW"), 7, 8, 9, layout.special("WIN1"),
                                  1, 2, 3, 4]]
    targets = sequence[:, 1:]
    # only the window's codes are image targets, not the given low-resolution ones
    assert layout.image_targets(targets).nonzero()[:, 1].tolist() == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="low-resolution codes"):
        layout.prefix(text)
    with pytest.raises(ValueError, match="window index"):
        layout.prefix(text, low, window=2)
    with pytest.raises(ValueError, match="rope2d"):
        GPTConfig(n_image_codes=10, n_text_tokens=5, text_len=2, image_len=4, n_layer=1, n_head=2, n_embd=16,
                  layout="superres", low_len=3, windows=2, pos="rope2d")
    with pytest.raises(ValueError, match="superres settings"):
        TokenLayout("t2i", 10, 5, 2, 4, low_len=3)


def _tiny_superres_gpt(grid: SuperresGrid, **options) -> GPT:
    torch.manual_seed(1)
    cfg = GPTConfig(n_image_codes=12, n_text_tokens=6, text_len=3, image_len=grid.window_len, n_layer=2, n_head=2,
                    n_embd=16, layout="superres", low_len=grid.low_len, windows=grid.windows, **options)
    model = GPT(cfg).eval()
    for p in model.parameters():  # sharper distributions than the init's: greedy choices depend on the context
        p.data.mul_(8)
    return model


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_windowed_greedy_sampling_is_the_argmax_given_every_earlier_window(pos):
    """Each window's new codes are the greedy codes of a full recomputation of its sequence, in which the
    codes it shares with earlier windows are the ones those windows wrote (CogView's sliding windows)."""
    grid = SuperresGrid(low=(2, 2), high=(4, 4), window=(2, 4), stride=(1, 4))  # 3 windows, overlapping rows
    model = _tiny_superres_gpt(grid, pos=pos)
    layout = model.layout
    text, low = torch.tensor([[1, 2, 0], [3, 0, 0]]), torch.randint(12, (2, 2, 2))
    high = superres_codes(model, grid, text, low, SamplingConfig(greedy=True))
    assert high.shape == (2, 4, 4) and (high >= 0).all() and (high < 12).all()
    seen = torch.zeros(4, 4, dtype=torch.bool)
    for k in range(grid.windows):
        window = grid.crop(high, k)
        logits = model(layout.text_to_image(text, window, low, k))[:, layout.prefix_len - 1:-1, :12]
        rows, cols = grid.window_index(k)
        new = ~seen[rows[0], cols[0]]
        assert torch.equal(window[:, new], logits.argmax(-1)[:, new]), k
        seen[rows[0], cols[0]] = True
    assert new.sum() < grid.window_len  # the later windows did share codes with the earlier ones


def test_known_codes_are_kept_and_one_window_is_one_pass():
    grid = SuperresGrid(low=(2, 2), high=(4, 4), window=(4, 4), stride=(4, 4))
    model = _tiny_superres_gpt(grid)
    text, low = torch.tensor([[1, 2, 0]]), torch.randint(12, (1, 2, 2))
    known = torch.full((2, 16), -1)
    known[:, 3:6] = torch.tensor([7, 8, 9])
    cfg = SamplingConfig(seed=5, samples_per_prompt=2, temperature=1.5)
    sampled = generate_codes(model, text, cfg, seeds=[5], low=low, known=known)
    assert (sampled[:, 3:6] == torch.tensor([7, 8, 9])).all()
    # the same draws for the free codes without the cache (EasyNLP's loop) as with it
    assert torch.equal(sampled, generate_codes(model, text, cfg, seeds=[5], low=low, known=known, use_cache=False))
    one_pass = superres_codes(model, grid, text, low, SamplingConfig(seed=5), seeds=[5])
    assert torch.equal(one_pass.flatten(1), generate_codes(model, text, SamplingConfig(seed=5), seeds=[5], low=low))
    with pytest.raises(ValueError, match="method=ar"):
        generate_codes(model, text, SamplingConfig(method="sjd"), low=low, known=known[:1])


def test_a_superres_stage_needs_both_grids_and_no_captioning():
    grid = SuperresGrid(low=(2, 2), high=(4, 4), window=(2, 2), stride=(2, 2))
    cfg = asdict(_tiny_superres_gpt(grid).cfg)
    stage = GPTStage(GPTConfig(**cfg), GPTStageConfig(cond_drop=0), torch.optim.AdamW, superres=grid)
    low, high, text = torch.randint(12, (4, 2, 2)), torch.randint(12, (4, 4, 4)), torch.randint(1, 6, (4, 3))
    inputs, targets = stage.sequences(low.flatten(1), text, train=False, hr_codes=high)
    layout = stage.gpt.layout
    assert torch.equal(targets[:, layout.prefix_len - 1:], grid.crop(high, torch.arange(4) % 4))
    assert torch.equal(inputs[:, layout.text_len + 2:layout.text_len + 6], low.flatten(1))
    with pytest.raises(ValueError, match="--superres-size"):
        stage.sequences(low.flatten(1), text, train=True)
    with pytest.raises(ValueError, match="caption_prob=0"):
        GPTStage(GPTConfig(**cfg), GPTStageConfig(caption_prob=0.1), torch.optim.AdamW, superres=grid)
    with pytest.raises(ValueError, match="caption_prob=0"):
        GPTStageConfig(caption_prob=0.1, superres={"window": [2, 2]})
    with pytest.raises(ValueError, match="stage.superres"):
        GPTStage(GPTConfig(**cfg), GPTStageConfig(), torch.optim.AdamW)


def _run(args, out):
    result = subprocess.run([sys.executable, *args, f"hydra.run.dir={out}"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_train_superres_then_score_and_generate_at_2x(sr_data, gpt_run, tmp_path):
    """train.py experiment=superres_shapes (windows) on real shards; eval.py task=superres with a text-to-image GPT
    over another VQGAN (its images are re-encoded); task=generate superres_ckpt= writes the 2x images."""
    images, codes, _, _ = sr_data
    run = _run(["train.py", "experiment=superres_shapes", f"data.root={codes}", "model.n_layer=1", "model.n_embd=32",
                "model.n_head=2", "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=3",
                "trainer.val_check_interval=3", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                "stage.warmup_steps=1", "stage.superres.window=[8,8]", "stage.superres.stride=[4,8]"],
               tmp_path / "train")
    ckpt = run / "checkpoints" / "last.ckpt"
    gpt, record = load_gpt(ckpt)
    assert record.superres.to_dict() == {"low": [8, 8], "high": [16, 16], "window": [8, 8], "stride": [4, 8], "context": "window",
                               "low_size": 32, "high_size": 64}
    assert gpt.cfg.layout == "superres" and gpt.cfg.windows == 3 * 2 and gpt.cfg.image_len == 64
    assert gpt.cfg.low_len == 16  # the 4x4 low codes under an 8x8 window (the recipe's context=window)
    assert record.grid == (16, 16)
    base = gpt_run / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match="not a super-resolution GPT"):
        SuperResPipeline.from_checkpoint(base)

    scored = _run(["eval.py", "task=superres", f"superres_ckpt={ckpt}", f"ckpt={base}", "data=shapes",
                   f"data.root={images}", "data.num_workers=0", "data.batch_size=5", "superres.num_images=7"],
                  tmp_path / "eval")
    results = json.loads((scored / "results.json").read_text())
    assert results["images"] == 7 and results["size"] == [64, 64]
    for name in ("superres", "bicubic", "bicubic_real", "vqgan_high"):
        assert 0 < results[name]["psnr"] < 100 and -1 <= results[name]["ssim"] <= 1
    assert results["psnr_gain_over_bicubic"] == pytest.approx(results["superres"]["psnr"] - results["bicubic"]["psnr"])
    assert results["oracle"]["real_high"]["all"] == 1.0  # the oracle reads the real 64x64 images
    assert set(results["oracle"]) >= {"superres", "generated_low", "generated_2x"}
    assert "re-encoded" in results["generated"]["low_codes"]  # the base GPT reads another VQGAN
    assert Image.open(scored / "grid.png").size[0] > 64 and (scored / "results.md").is_file()

    # the super-resolution model's VQGAN moved away: named by its setting, and found again through it
    vqgan_path = Path(record.vqgan.checkpoint)
    moved = tmp_path / "moved.vqgan.ckpt"
    vqgan_path.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match="superres_vqgan_ckpt=PATH"):
            SuperResPipeline.from_checkpoint(ckpt)
        generated = _run(["eval.py", "task=generate", f"ckpt={base}", f"superres_ckpt={ckpt}",
                          f"superres_vqgan_ckpt={moved}", "prompts=['红色的小圆形','蓝色']",
                          "sampling.samples_per_prompt=2"], tmp_path / "gen")
    finally:
        moved.rename(vqgan_path)
    out = generated / "samples"
    assert len(list(out.glob("0*_2x.png"))) == 4 and Image.open(out / "0001_01_2x.png").size == (64, 64)
    assert np.load(out / "codes_2x.npy").shape == (4, 16, 16) and (out / "grid_2x.png").is_file()


def test_superres_task_names_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, "eval.py", "task=superres", f"hydra.run.dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "superres_ckpt=PATH" in result.stderr


def test_window_context_reads_the_low_codes_under_each_window():
    grid = SuperresGrid(low=(4, 4), high=(8, 8), window=(4, 4), stride=(2, 2), context="window")
    assert grid.low_window == (2, 2) and grid.low_len == 4 and grid.windows == 9
    low = torch.arange(16).view(1, 4, 4)
    assert grid.low_context(low, 0).tolist() == [[0, 1, 4, 5]]
    assert grid.low_context(low, 4).tolist() == [[5, 6, 9, 10]]  # window (2, 2) of the 8x8 grid
    assert grid.low_context(low.expand(2, 4, 4), torch.tensor([2, 8])).tolist() == [[2, 3, 6, 7], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="whole low-resolution"):
        SuperresGrid(low=(4, 4), high=(8, 8), window=(3, 3), stride=(1, 1), context="window")
    # windowed sampling with the local context: still the argmax given the earlier windows' codes
    model = _tiny_superres_gpt(grid)
    text, lows = torch.tensor([[1, 2, 0]]), torch.randint(12, (1, 4, 4))
    high = superres_codes(model, grid, text, lows, SamplingConfig(greedy=True))
    layout = model.layout
    last = grid.windows - 1
    logits = model(layout.text_to_image(text, grid.crop(high, last), grid.low_context(lows, last), last))
    assert torch.equal(grid.crop(high, last)[:, -1], logits[:, -2, :12].argmax(-1))


@pytest.mark.parametrize("recipe, window, context, layers", [("superres_shapes", [8, 8], "window", 4),
                                                             ("superres_muge_base", [16, 16], "whole", 12)])
def test_superres_recipes_compose(recipe, window, context, layers):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={recipe}"])
        vqgan_2x = compose("train", overrides=["experiment=vqgan_shapes_2x", "init_ckpt=X.ckpt"])
    assert cfg.stage.superres.window == window and cfg.stage.superres.get("context", "whole") == context
    assert cfg.stage.caption_prob == 0 and cfg.stage.sample_every_n_steps == 0 and cfg.model.n_layer == layers
    assert cfg.data.root.endswith("superres_codes") and cfg.trainer.max_steps > 0
    assert vqgan_2x.data.image_size == 64 and vqgan_2x.stage.name == "vqgan"
    assert set(vqgan_2x.stage.image_sizes) == {32, 64}  # one VQGAN for both grids
