"""Text-guided completion (t2i.sampling.complete, T2IPipeline.complete) on a tiny GPT and VQGAN built here: regions
from mask images and boxes, bad regions refused, known codes kept, the region sampled with the seed, the choice
among region candidates by the codes after them, reranking and step modes as in generation."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2i.checkpoints import GPTRecord, TokenizerRecord, vqgan_identity
from t2i.data.tokenizer import TextTokenizer, train_sentencepiece
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import VQGANConfig, VQModel
from t2i.sampling import SamplingConfig, T2IPipeline, prompt_seeds
from t2i.sampling.complete import following_codes_nll, grid_mask_from_box, grid_mask_from_image

SIZE, GRID = 16, (4, 4)  # f4: 16x16 pixels -> 4x4 codes
PROMPTS = ["红色的小圆形", "蓝色的大方块"]


@pytest.fixture(scope="module")
def pipeline():
    captions = ["红色的小圆形", "蓝色的大方块", "背景是白色的"] * 20
    tokenizer = TextTokenizer(train_sentencepiece(captions, 300), 8)
    torch.manual_seed(0)
    vqgan = VQModel(VQGANConfig(resolution=SIZE, ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
                                z_channels=8, embed_dim=4, n_embed=16)).eval()
    vqgan.quantize.embedding.weight.data.normal_()
    cfg = GPTConfig(n_image_codes=16, n_text_tokens=300, text_len=8, image_len=16, n_layer=2, n_head=2, n_embd=32)
    gpt = GPT(cfg).eval()
    record = GPTRecord(gpt=cfg, tokenizer=TokenizerRecord.of(tokenizer), vqgan=vqgan_identity(vqgan, None, GRID))
    return T2IPipeline(gpt, tokenizer, vqgan, record)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def encoded(pipeline, image):
    return pipeline.vqgan.encode(torch.as_tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]


def test_regions_from_mask_images_and_boxes(pipeline):
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[5, 9] = 255  # one pixel of cell (row 1, column 2)
    assert grid_mask_from_image(mask, GRID, SIZE).nonzero().tolist() == [[1, 2]]
    rgb = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    rgb[12:, :4] = 255  # white in the bottom-left cell; a dark grey elsewhere is kept
    rgb[:4, :4] = 100
    assert grid_mask_from_image(rgb, GRID, SIZE).nonzero().tolist() == [[3, 0]]
    assert pipeline.region(box=[1, 0, 3, 2], box_units="codes").nonzero().tolist() == [[0, 1], [0, 2], [1, 1], [1, 2]]
    # pixels 5..8 across (cells 1 and 2), 0..3 down (cell 0)
    assert pipeline.region(box=[5, 0, 9, 4], box_units="pixels").nonzero().tolist() == [[0, 1], [0, 2]]
    assert torch.equal(grid_mask_from_box([0, 0, SIZE, SIZE], GRID, SIZE, "pixels"), torch.ones(GRID, dtype=torch.bool))


@pytest.mark.parametrize("region, message", [
    (dict(mask=np.zeros((SIZE, SIZE), dtype=np.uint8)), "covers nothing of the image: paint the region .* white"),
    (dict(mask=np.full((SIZE + 1, SIZE), 255, dtype=np.uint8)), "16x17 .* draw the mask at the image's size"),
    (dict(box=[2, 2, 5, 3], box_units="codes"), r"inside the image: it needs 0 <= x0 < x1 <= 4"),
    (dict(box=[3, 3, 3, 4], box_units="pixels"), "not a box inside the image"),
    (dict(box=[-1, 0, 2, 2], box_units="pixels"), "not a box inside the image"),
    (dict(box=[0.5, 0, 2, 2], box_units="codes"), "whole cells .* box_units=pixels"),
    (dict(box=[0, 0, 2, 2]), "box_units=codes .* box_units=pixels"),
    (dict(box=[0, 0, 2, 2], box_units="cells"), "box_units must be one of codes, pixels"),
    (dict(), "mask image .* or a box"),
    (dict(mask=np.ones((SIZE, SIZE), dtype=bool), box=[0, 0, 1, 1], box_units="codes"), "one of them"),
])
def test_bad_regions_are_refused_naming_the_fix(pipeline, region, message):
    with pytest.raises(ValueError, match=message):
        pipeline.region(**region)


def test_a_wrong_image_or_method_is_refused_naming_the_fix(pipeline, image):
    region = pipeline.region(box=[0, 0, 2, 2], box_units="codes")
    cfg = SamplingConfig(seed=0)
    big = np.zeros((2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="32x32 pixels .* resize .* to 16x16"):
        pipeline.complete(PROMPTS[:1], [big], [region], cfg)
    with pytest.raises(ValueError, match=r"uint8 \[height, width, 3\]"):
        pipeline.complete(PROMPTS[:1], [image.astype(np.float32)], [region], cfg)
    with pytest.raises(ValueError, match="one each"):
        pipeline.complete(PROMPTS, [image], [region], cfg)
    with pytest.raises(ValueError, match="method=sjd does not take known codes .* use method=ar"):
        pipeline.complete(PROMPTS[:1], [image], [region], replace(cfg, method="sjd"))


def test_known_codes_are_kept_and_the_region_is_sampled_with_the_seed(pipeline, image):
    region = pipeline.region(box=[1, 1, 3, 3], box_units="codes")
    cfg = SamplingConfig(seed=0, temperature=2.0, guidance_scale=2.0, samples_per_prompt=3)
    images, regions = [image] * 2, [region] * 2
    samples = pipeline.complete(PROMPTS, images, regions, cfg)
    codes, truth = samples.codes, encoded(pipeline, image)
    assert codes.shape == (6, *GRID) and samples.images.shape == (6, 3, SIZE, SIZE)
    assert (codes[:, ~region] == truth[~region]).all()  # every sample keeps every known code
    assert samples.seeds == prompt_seeds(0, PROMPTS)
    # the same seed, the same completions (in any batch); another seed, other codes in the region
    again = pipeline.complete(PROMPTS, images, regions, cfg, batch_size=2)
    assert torch.equal(again.codes, codes) and torch.equal(again.images, samples.images)
    other = pipeline.complete(PROMPTS, images, regions, replace(cfg, seed=1)).codes
    assert not torch.equal(other[:, region], codes[:, region]) and (other[:, ~region] == truth[~region]).all()
    assert len({tuple(c[region].tolist()) for c in codes}) > 1  # the samples differ from each other too
    # a fixed-shape step samples what the eager step samples
    static = T2IPipeline(pipeline.gpt, pipeline.tokenizer, pipeline.vqgan, pipeline.record, step="static")
    assert torch.equal(static.complete(PROMPTS, images, regions, cfg).codes, codes)


def test_region_candidates_keep_the_draw_the_following_codes_like_best(pipeline, image):
    region = pipeline.region(box=[0, 1, 2, 2], box_units="codes")  # row 1, columns 0-1: known codes follow
    cfg = SamplingConfig(seed=3, temperature=2.0)
    known = encoded(pipeline, image).masked_fill(region, -1)[None]
    draws = pipeline.sample_codes(PROMPTS[:1], replace(cfg, samples_per_prompt=4), known=known)
    text = pipeline.tokenizer(PROMPTS[:1]).repeat(4, 1)
    nll = following_codes_nll(pipeline.gpt, text, draws, region.expand(4, *GRID))
    # by hand: the mean NLL of the known codes after position 4 (the region's first cell)
    layout = pipeline.gpt.layout
    logits = pipeline.gpt(layout.text_to_image(text, draws.flatten(1)))[:, layout.prefix_len - 1:-1, :16]
    after = torch.zeros(16, dtype=torch.bool)
    after[5:] = True
    after &= ~region.flatten()
    by_hand = F.cross_entropy(logits.transpose(1, 2), draws.flatten(1), reduction="none")[:, after].mean(1)
    assert torch.allclose(nll, by_hand, atol=1e-5)
    chosen = pipeline.complete(PROMPTS[:1], [image], [region], cfg, region_candidates=4).codes
    assert torch.equal(chosen[0], draws[nll.argmin()])
    assert len({tuple(d[region].tolist()) for d in draws}) > 1  # there was a choice to make


def test_reranking_takes_the_best_completion_by_the_scorer(pipeline, image):
    region = pipeline.region(box=[0, 0, 16, 8], box_units="pixels")
    cfg = SamplingConfig(seed=0, temperature=2.0, samples_per_prompt=2)
    first_cell = lambda prompts, codes, batch_size: codes[:, 0, 0].float()  # noqa: E731 (a scorer: lower wins)
    ranked = pipeline.complete(PROMPTS, [image] * 2, [region] * 2, cfg, scorer=first_cell, rerank=3)
    candidates = pipeline.complete(PROMPTS, [image] * 2, [region] * 2, replace(cfg, samples_per_prompt=6)).codes
    # image i's candidate c is sample c * S + i of its prompt
    best = candidates.view(2, 3, 2, *GRID)[:, :, :, 0, 0].min(1).values
    assert torch.equal(ranked.codes[:, 0, 0], best.flatten()) and torch.equal(ranked.scores, best.flatten().float())
    with pytest.raises(ValueError, match="region_candidates must be an integer >= 1"):
        pipeline.complete(PROMPTS[:1], [image], [region], cfg, region_candidates=0)


def test_completion_finetune_splices_another_object_into_the_region_only():
    """experiments/completion_finetune.py's examples: the new drawing differs from the train image only inside the
    region (the old object lies wholly in it), and the caption names the new object."""
    import importlib.util
    from pathlib import Path

    from t2i.data import shapes

    path = Path(__file__).resolve().parents[1] / "experiments" / "completion_finetune.py"
    spec = importlib.util.spec_from_file_location("completion_finetune", path)
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    size, grid, checked = 32, 8, 0
    for index in range(12):
        original, caption, new, (x0, y0, x1, y1), new_caption = finetune.spliced_example(index, 0, size, grid)
        assert caption == shapes.sample(index, "train", 0, 16)[1]
        cell = size // grid
        outside = np.ones((size, size), dtype=bool)
        outside[y0 * cell:y1 * cell, x0 * cell:x1 * cell] = False
        assert not (original[~outside] == new[~outside]).all()  # a new object was drawn in the region
        assert shapes.read_caption(new_caption)["background"] == shapes.read_caption(caption)["background"]
        if outside.any():  # (a centred object fits no half: its region is the whole image)
            assert (original[outside] == new[outside]).all()
            checked += 1
    assert checked >= 6
