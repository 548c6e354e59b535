"""Chinese-CLIP score and R-precision (t2i/eval/clip.py): the scores against torchmetrics' CLIPScore on
the same model, R-precision and the clipping on a CLIP whose embeddings are known by construction, the
distractor draw, the loading errors, and eval.py end to end (plain, reranked by CLIP score, the real
images' row, the paper table) on a tiny random Chinese-CLIP saved by the fixture (nothing downloads)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.multimodal import clip_score as torchmetrics_clip_score
from transformers import BertConfig

from t2i.data.datamodule import ShardDataModule
from t2i.eval.clip import ChineseClip, ClipMetrics, ClipTally, TensorFeatures, draw_distractors, load_chinese_clip
from t2i.eval.text_to_image import select_prompts
from t2i.scorers import take

REPO = Path(__file__).parents[1]
CAPTIONS = ["画面左上角有一个红色的小圆形", "蓝色的大方块在右下方", "背景是白色的，中间有绿色三角形"]


def test_clip_scores_are_torchmetrics_clipscore_on_the_same_model(chinese_clip):
    clip = ChineseClip.load(chinese_clip)
    assert clip.processor.tokenizer.unk_token_id not in clip.processor(text=CAPTIONS)["input_ids"][0]  # a real vocab
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 24, 40), dtype=torch.uint8)  # not square, not the model's size
    metrics = ClipMetrics(clip, dict(zip("abc", CAPTIONS)), {key: ["绿色"] for key in "abc"})
    ours = metrics(images, list("abc"))["clip_score"]
    adapter = TensorFeatures(clip.model)
    for image, caption, score in zip(images, CAPTIONS, ours):
        theirs = torchmetrics_clip_score(image, caption, model_name_or_path=lambda: (adapter, clip.processor))
        assert float(theirs.detach()) == pytest.approx(max(float(score), 0.0), abs=1e-3)
    assert ours.abs().max() > 1  # random embeddings still give non-trivial cosines


def test_texts_are_cut_at_chinese_clips_context_of_52_tokens(chinese_clip):
    clip = ChineseClip.load(chinese_clip)
    assert clip.model.config.text_config.max_position_embeddings == 512  # all that transformers' config states
    characters = [t for t in clip.processor.tokenizer.get_vocab() if len(t) == 1 and "\u4e00" <= t <= "\u9fff"]
    long = "".join(characters * 80)[:80]
    assert len(clip.processor.tokenizer.tokenize(long)) == 80  # a token per character
    embedded = clip.text_embeddings([long, long[:50], long[:49]])  # 50 characters and [CLS], [SEP]: 52 tokens
    cut, shorter = (embedded[0] - embedded[1]).abs().max(), (embedded[0] - embedded[2]).abs().max()
    assert cut < 1e-6 and shorter > 1e-5  # a random tiny CLIP: one character moves its embedding ~1e-4
    protocol = ClipMetrics(clip, {}, {}).protocol()
    assert protocol["text_max_tokens"] == 52 and "52 tokens" in protocol["text_context"]


class _HandMadeClip(ChineseClip):
    """A CLIP known by construction: a solid-colour image embeds as its RGB direction, a text as the
    colour it names (red, green, blue, or their negations for "非" texts)."""

    COLOURS = {"红": [1.0, 0.0, 0.0], "绿": [0.0, 1.0, 0.0], "蓝": [0.0, 0.0, 1.0]}

    def __init__(self):  # no model: the embeddings below
        self.source, self.revision, self.max_tokens = "hand-made", None, 0

    def image_embeddings(self, images):
        return torch.nn.functional.normalize(images.float().mean((2, 3)), dim=-1)

    def text_embeddings(self, texts):
        rows = [torch.tensor(self.COLOURS[t[-1]]) * (-1 if t.startswith("非") else 1) for t in texts]
        return torch.stack(rows)


def _solid(rgb):
    return torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, 4, 4)


def test_scores_and_r_precision_of_a_clip_known_by_construction():
    prompts = {"k0": "红", "k1": "绿", "k2": "非蓝"}
    distractors = {"k0": ["绿", "蓝"], "k1": ["红", "蓝"], "k2": ["红", "绿"]}
    # per prompt two samples: k0 red and blue; k1 green and yellow (= red + green); k2 red, blue
    images = torch.stack([_solid(c) for c in [(200, 0, 0), (0, 0, 90), (0, 50, 0), (80, 80, 0), (9, 0, 0),
                                                (0, 0, 255)]])
    result = ClipMetrics(_HandMadeClip(), prompts, distractors)(images, ["k0", "k1", "k2"], per_prompt=2)
    cos45 = 100 / np.sqrt(2)
    np.testing.assert_allclose(result["clip_score"].numpy(), [100, 0, 100, cos45, 0, -100], atol=1e-4)
    # a hit only when the prompt is strictly the most similar: yellow ties red and green for k1
    assert result["r_precision_hit"].tolist() == [1, 0, 1, 0, 0, 0]
    tally = ClipTally()
    tally.add(result)
    other = ClipTally()  # a second process's share
    other.add({"clip_score": torch.tensor([50.0]), "r_precision_hit": torch.tensor([1.0])})
    metrics = ClipTally.metrics([tally.state(), other.state()])
    assert metrics["clip_score"] == pytest.approx((100 + 0 + 100 + cos45 + 0 + 0 + 50) / 7)  # -100 clipped at 0
    assert metrics["r_precision"] == pytest.approx(3 / 7)
    assert ClipTally.metrics([ClipTally().state()]) == {}


def test_take_picks_each_samples_candidate_along_any_trailing_shape():
    values = torch.arange(2 * 3 * 2 * 3 * 4 * 4).view(2, 3, 2, 3, 4, 4)  # n, K, S, image
    best = torch.tensor([[2, 0], [1, 1]])
    chosen = take(values, best)
    assert chosen.shape == (2, 2, 3, 4, 4)
    for prompt, sample in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        assert torch.equal(chosen[prompt, sample], values[prompt, best[prompt, sample], sample])


def test_distractors_are_other_images_captions_drawn_per_image():
    by_image = {f"img{i}": [f"图{i}句{j}" for j in range(1 + i % 3)] for i in range(40)}
    by_image["img5"].append("图0句0")  # the same text as img0's caption: never img0's distractor
    prompts = {f"key{i}": (f"img{i}", by_image[f"img{i}"][0]) for i in range(10)}
    drawn = draw_distractors(by_image, prompts, 20, seed=3)
    for key, (image, caption) in prompts.items():
        texts = drawn[key]
        assert len(texts) == len(set(texts)) == 20
        assert caption not in texts and not set(texts) & set(by_image[image])
    # the draw depends on the image and the seed, not on which other prompts are evaluated
    assert draw_distractors(by_image, {"key7": prompts["key7"]}, 20, seed=3) == {"key7": drawn["key7"]}
    assert draw_distractors(by_image, prompts, 20, seed=4) != drawn
    assert len({tuple(texts) for texts in drawn.values()}) == 10
    with pytest.raises(ValueError, match="eval.rprecision_distractors=90 .* split=val has only"):
        draw_distractors(by_image, prompts, 90, split="split=val")


def test_missing_or_wrong_clip_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.clip_model=.*nowhere.*eval.clip=false"):
        load_chinese_clip(str(tmp_path / "nowhere"))
    BertConfig().save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="'bert' model, not a Chinese-CLIP"):
        load_chinese_clip(str(tmp_path / "bert"))


def _evaluate(args, out, env=None):
    return subprocess.run([sys.executable, "eval.py", *args, f"hydra.run.dir={out}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})}, check=False)


def test_offline_without_the_clip_model_eval_py_says_how_to_provide_it(codes_root, gpt_run, tmp_path):
    result = _evaluate([f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}", "data=shapes",
                        f"data.root={codes_root.parent / 'shapes'}", "split=val", "eval.num_prompts=2",
                        "eval.fid=false", "eval.rprecision_distractors=5", "data.num_workers=0", "trainer.accelerator=cpu"], tmp_path,
                       {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})  # nothing cached, no network
    assert result.returncode != 0
    assert "OFA-Sys/chinese-clip-vit-base-patch16" in result.stderr
    assert "eval.clip_model=DIR" in result.stderr and "eval.clip=false" in result.stderr


@pytest.fixture(scope="module")
def clip_eval(codes_root, gpt_run, chinese_clip, tmp_path_factory):
    """eval.py with the CLIP metrics: 5 prompts x 2 samples, the best of 3 candidates by CLIP score."""
    out = tmp_path_factory.mktemp("clip_eval")
    result = _evaluate([f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}", "data=shapes",
                        f"data.root={codes_root.parent / 'shapes'}", "split=val", "eval.num_prompts=5",
                        "sampling.samples_per_prompt=2", "eval.rerank=3", "eval.rerank_by=clip_score", "eval.fid=false",
                        f"eval.clip_model={chinese_clip}", "eval.rprecision_distractors=6", "eval.save_images=true",
                        "data.num_workers=0", "trainer.accelerator=cpu", "name=tiny"], out / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def test_eval_py_reports_clip_metrics_of_every_set_and_the_real_images(clip_eval, codes_root, chinese_clip):
    results = json.loads((clip_eval / "results.json").read_text())
    assert results["reranked_by"] == "clip_score" and results["clip"]["model"] == chinese_clip
    assert "6 distinct captions" in results["clip"]["r_precision"]
    plain, reranked, real = results["plain"], results["rerank_3"], results["real"]
    for metrics in (plain, reranked, real):
        assert 0 <= metrics["clip_score"] <= 100 and 0 <= metrics["r_precision"] <= 1
    assert reranked["clip_score"] >= plain["clip_score"]  # the best of 3 by that score, per image
    assert "caption_loss" in reranked  # still scored by the captioning model
    # the plain score is the saved images' (PNG round trip is exact: uint8) against their prompts
    dm = ShardDataModule({"name": "shapes", "root": str(codes_root.parent / "shapes"), "image_size": 32})
    captions = {pick.key: pick.caption for pick in select_prompts(dm, "val", 5).picks}
    files = sorted((clip_eval / "samples").glob("*.png"))
    assert len(files) == 10
    images = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    clip = ChineseClip.load(chinese_clip)
    prompts = [captions[f.name[:-len("_00.png")]] for f in files]
    scores = 100 * (clip.image_embeddings(images) * clip.text_embeddings(prompts)).sum(-1)
    assert plain["clip_score"] == pytest.approx(float(scores.clamp(min=0).mean()), abs=1e-3)
    table = (clip_eval / "results.md").read_text()
    assert "clip_score | r_precision" in table and "| real |" in table and "highest CLIP score of 3" in table
    flat = subprocess.run([sys.executable, "-c", "import json,sys; from t2i.eval.text_to_image import flat_metrics; "
                           "print(json.dumps(flat_metrics(json.load(open(sys.argv[1])))))",
                           str(clip_eval / "results.json")], cwd=REPO, capture_output=True, text=True, check=True)
    logged = json.loads(flat.stdout)  # what W&B receives
    assert {"eval/clip_score", "eval/r_precision", "eval/rerank_3/clip_score", "eval/real/r_precision"} <= set(logged)


def test_paper_table_shows_the_clip_columns_and_the_real_images_row(clip_eval):
    result = subprocess.run([sys.executable, "experiments/paper_table.py", str(clip_eval / "results.json")], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    header, _, *rows = result.stdout.splitlines()
    assert header.endswith("shapes CapLoss↓ | shapes CLIP↑ | shapes R-prec↑ |")
    assert [row.split(" | ")[0] for row in rows] == ["| tiny", "| tiny + rerank 3 by CLIP", "| real images"]
    real = json.loads((clip_eval / "results.json").read_text())["real"]
    assert rows[-1] == f"| real images | - | - | - | {real['clip_score']:.2f} | {real['r_precision']:.3f} |"
