"""Caption Loss, self-reranking, which prompts and seeds an evaluation uses (one caption per image
of multi-caption data, the same seeds as task=generate), and `python eval.py ckpt=... data=...` on
a tiny trained GPT (its bad inputs too)."""

import itertools
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from run_each import run_each
from t2i.checkpoints import read_checkpoint
from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.data.shards import ImageOptions, Row, write_manifest, write_split
from t2i.data.stream import complete_samples
from t2i.data.tokenizer import train_sentencepiece
from t2i.eval.fidelity import InceptionFeatures
from t2i.eval.text_to_image import (
    Pick,
    PromptSet,
    _ImageSet,
    prompt_loader,
    select_prompts,
)
from t2i.models.gpt import GPT, GPTConfig
from t2i.sampling import SamplingConfig, generate_codes, prompt_seeds
from t2i.scorers import caption_loss, rerank, take

REPO = Path(__file__).parents[1]


def test_caption_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_image_codes=40, n_text_tokens=30, text_len=4, image_len=6, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    cfg = model.layout
    codes = torch.randint(0, 40, (2, 6))
    text = torch.tensor([[5, 9, 2, 0], [7, 0, 0, 0]])  # padding (0) is not a text token
    expected = []
    for c, t in zip(codes, text):
        sequence = [cfg.special("I2T"), *c.tolist(), cfg.special("BOT"), *(t + cfg.text_offset).tolist()]
        logits = model(torch.tensor([sequence]))[0]
        nlls = []
        for position in range(len(sequence) - cfg.text_len, len(sequence)):
            token = sequence[position] - cfg.text_offset
            if token == 0:
                continue
            text_logits = logits[position - 1, cfg.text_offset: cfg.text_offset + cfg.n_text_tokens]
            nlls.append(-text_logits.log_softmax(-1)[token].item())
        expected.append(sum(nlls) / len(nlls))
    got = caption_loss(model, codes, text)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    assert math.isnan(caption_loss(model, codes[:1], torch.zeros(1, 4, dtype=torch.long)).item())  # empty caption


def test_rerank_keeps_the_lowest_caption_loss_or_the_highest_score():
    codes = torch.arange(2 * 3 * 2 * 2 * 2).view(2, 3, 2, 2, 2)  # 2 prompts, 3 candidates, 2 samples, 2x2 grid
    losses = torch.tensor([[[3.0, 0.5], [1.0, 0.7], [2.0, 0.6]], [[float("nan"), 9.0], [5.0, 8.0], [4.0, 7.0]]])
    chosen, best = rerank(codes, losses)
    assert chosen.shape == (2, 2, 2, 2)
    for prompt, sample, candidate in [(0, 0, 1), (0, 1, 0), (1, 0, 2), (1, 1, 2)]:
        assert torch.equal(chosen[prompt, sample], codes[prompt, candidate, sample])
    assert take(losses, best).tolist() == [[1.0, 0.5], [4.0, 7.0]]
    # by a score where higher is better (CLIP): the highest, and a NaN never wins either way
    chosen, best = rerank(codes, losses, highest=True)
    assert best.tolist() == [[0, 1], [1, 0]]
    assert torch.equal(chosen, take(codes, best)) and torch.equal(take(losses, best), torch.tensor([[3.0, 0.7], [5.0, 9.0]]))


def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(n_image_codes=40, n_text_tokens=30, text_len=4, image_len=9, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    text = torch.tensor([[5, 9, 2, 0], [7, 0, 0, 0], [3, 4, 0, 0]])
    sampling = SamplingConfig(samples_per_prompt=2, top_k=20, temperature=2.0)
    seeds = prompt_seeds(0, ["红色", "蓝色", "红色"])
    together = generate_codes(model, text, sampling, seeds=seeds)
    alone = torch.cat([generate_codes(model, text[i:i + 1], sampling, seeds=seeds[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone)
    assert not torch.equal(together[:2], together[2:4])  # distinct streams per prompt


def test_prompt_seeds_follow_the_text_and_its_repeats():
    first, second, repeat = prompt_seeds(0, ["红色", "蓝色", "红色"])
    assert prompt_seeds(0, ["红色"]) == [first] and prompt_seeds(0, ["蓝色", "红色"]) == [second, first]
    assert len({first, second, repeat}) == 3  # a repeat gets a stream of its own
    assert prompt_seeds(1, ["红色"]) != [first]
    assert all(0 <= seed < 2 ** 63 for seed in (first, second, repeat))


def test_prompt_set_seeds_are_generates_seeds_in_selection_order():
    picks = [Pick(0, "a.tar", i, f"val_{i}", caption) for i, caption in enumerate(["红色", "蓝色", "红色"])]
    prompts = PromptSet("val", picks, captions_available=3, split_images=3, split_captions=3, caption_seed=0)
    assert prompts.seeds(5) == dict(zip(["val_0", "val_1", "val_2"], prompt_seeds(5, ["红色", "蓝色", "红色"])))
    assert prompts.seeds(None) is None


def test_grid_entries_are_copies_that_do_not_carry_their_batch():
    """What each process sends to the main one: a grid prompt's own images, not the batch they came in."""
    image_set = _ImageSet(None, grid_prompts=2)
    for start in (8, 0):  # a second batch with smaller keys replaces the first one's grid prompts
        images = torch.randint(0, 255, (8 * 3, 3, 16, 16), dtype=torch.uint8)  # 8 prompts x 3 samples
        keys = [f"val_{i:02d}" for i in range(start, start + 8)]
        image_set.add(images, keys, 3, None, None)
        del images
    grid = image_set.state()["grid"]
    assert list(grid) == ["val_00", "val_01"]
    one_prompt = 3 * 3 * 16 * 16
    for entry in grid.values():
        assert entry.shape == (3, 3, 16, 16) and entry.untyped_storage().nbytes() == one_prompt
    assert len(pickle.dumps(grid)) < 3 * one_prompt  # two prompts' pixels and a little framing, not 8 prompts'


def _keys(root, split):
    """The keys of a split's samples, in order."""
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    return [sample["__key__"] for shard in manifest["splits"][split]["shards"]
            for sample in complete_samples(str(Path(root) / shard["path"]))]


def test_on_one_caption_per_image_the_prompts_are_the_first_samples(codes_root):
    """The shapes data: the prompt set (hence the real images of FID) is what it was, the first N samples."""
    root = codes_root.parent / "shapes"
    dm = ShardDataModule({"name": "shapes", "root": str(root), "image_size": 32, "text_len": 26})
    prompts = select_prompts(dm, "val", 5)
    assert [pick.key for pick in prompts.picks] == _keys(root, "val")[:5]
    first_captions = itertools.islice(DataConfig(root=str(root)).captions("val"), 5)
    assert [pick.caption for pick in prompts.picks] == list(first_captions)
    assert (prompts.images, prompts.captions_available, prompts.split_images, prompts.split_captions) == (5, 5, 16, 16)
    assert select_prompts(dm, "val", None).images == 16
    with pytest.raises(ValueError, match="eval.num_prompts"):
        select_prompts(dm, "val", 0)


def test_each_process_reads_its_share_given_explicitly_even_in_spawned_workers(codes_root, monkeypatch):
    """The rank travels with the loader: workers started with spawn (no inherited process group) read
    their own process's share, not rank 0's."""
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(variable, raising=False)
    data = {"name": "shapes", "root": str(codes_root.parent / "shapes"), "num_workers": 1, "image_size": 32,
            "text_len": 26}
    dm = ShardDataModule(data)
    prompts = select_prompts(dm, "val", 5)
    shares = []
    for rank in range(2):
        stream = prompt_loader(dm, prompts, 2, rank, 2).dataset
        loader = DataLoader(stream, batch_size=None, num_workers=1, multiprocessing_context="spawn")
        shares.append([key for batch in loader for key in batch["key"]])
        assert len(loader) == len(stream) == [1, 2][rank]
    assert shares == [[pick.key for pick in prompts.picks[:2]], [pick.key for pick in prompts.picks[2:]]]
    two_workers = prompt_loader(dm, prompts, 1, 0, 1).dataset
    keys = sorted(key for batch in DataLoader(two_workers, batch_size=None, num_workers=2) for key in batch["key"])
    assert keys == sorted(pick.key for pick in prompts.picks)  # two workers: every prompt once


def test_a_split_without_samples_is_a_clear_error(codes_root, tmp_path):
    images = codes_root.parent / "shapes"
    manifest = json.loads((images / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] = 0  # every sample of the split was dropped
    manifest["splits"]["val"]["shards"][0]["path"] = str(images / "val-00000.tar")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dm = ShardDataModule({"name": "shapes", "root": str(tmp_path), "tokenizer": {"path": str(images / "tokenizer.model")}})
    with pytest.raises(ValueError, match="split=val .* has no samples with a caption"):
        select_prompts(dm, "val", None)


def _evaluate(args, out):
    # the CLIP metrics are tests/test_clip_metrics.py's: here nothing downloads their model
    return subprocess.run([sys.executable, "eval.py", "eval.clip=false", *args, f"hydra.run.dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_eval_py_scores_with_and_without_reranking(codes_root, gpt_run, inception_weights, tmp_path):
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    images = codes_root.parent / "shapes"
    fid = [f"eval.inception_weights={inception_weights}", "eval.fid_layer=64", "eval.isc_splits=2",
           f"eval.stats_cache={tmp_path / 'stats'}"]
    result = _evaluate([f"ckpt={ckpt}", "data=shapes", f"data.root={images}", "data.batch_size=4", "data.num_workers=0",
                        "split=val", "eval.num_prompts=6", "sampling.samples_per_prompt=2", "eval.rerank=3", *fid], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["prompts"] == 6 and results["images_per_set"] == 12 and results["caption_model"] == "self"
    plain, reranked = results["plain"], results["rerank_3"]
    assert reranked["caption_loss"] <= plain["caption_loss"]  # the best of 3 is never worse on average
    for metrics in (plain, reranked):
        assert set(metrics["attributes"]) >= {"color", "shape", "position", "all"}
        assert metrics["fid"] > 0 and math.isfinite(metrics["is_mean"])
        protocol = metrics["protocol"]
        assert protocol["real_images"] == 6 and protocol["generated_images"] == 12 and protocol["feature_layer"] == "64"
    assert results["precision"] == {"trainer": "32-true", "matmul": "highest"}  # recorded with the numbers
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1  # real statistics computed once, shared
    assert results["sampling"]["top_k"] == 100  # the checkpoint's sampling options (stage.sampling)
    assert results["sampling_step"] == {"asked": "auto", "ran": "eager"}  # 36 sequences of 64 positions: a one-off
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "grid_rerank_3.png").is_file()
    table = (tmp_path / "results.md").read_text()
    assert "| plain |" in table and "| rerank_3 |" in table


def test_without_a_captioning_model_the_rest_still_runs(codes_root, gpt_run, tmp_path):
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    checkpoint["t2i"]["training"]["caption_prob"] = 0.0
    ckpt = tmp_path / "no_captions.ckpt"
    torch.save(checkpoint, ckpt)
    out = tmp_path / "run"
    result = _evaluate([f"ckpt={ckpt}", "data=shapes", f"data.root={codes_root.parent / 'shapes'}", "split=val",
                        "data.num_workers=0", "eval.num_prompts=3", "eval.rerank=2", "eval.fid=false"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert "caption direction" in results["caption_loss_unavailable"] and results["rerank"] == 1
    assert "caption_loss" not in results["plain"] and "attributes" in results["plain"] and "fid" not in results["plain"]
    assert "unavailable" in (out / "results.md").read_text()


def test_paper_table_has_a_row_per_model_and_reranking(tmp_path):
    def write(name, data, fid, rerank=None):
        results = {"task": "t2i", "name": name, "ckpt": "x", "data": data,
                   "plain": {"fid": fid, "is_mean": 3.0, "caption_loss": 2.5}}
        if rerank:
            results["rerank_4"] = {"fid": rerank, "is_mean": 3.5, "caption_loss": 2.0}
        path = tmp_path / f"{name}_{data}.json"
        path.write_text(json.dumps(results))
        return str(path)

    files = [write("base", "muge", 30.0, rerank=25.0), write("base", "coco_cn", 40.0), write("large", "muge", 20.0)]
    result = subprocess.run([sys.executable, "experiments/paper_table.py", *files], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("| model | COCO-CN FID↓ | COCO-CN IS↑ | COCO-CN CapLoss↓ | MUGE FID↓")  # paper order
    assert "| base | 40.0 | 3.00 | 2.500 | 30.0 | 3.00 | 2.500 |" in lines
    assert "| base + rerank 4 | - | - | - | 25.0 | 3.50 | 2.000 |" in lines
    assert "| large | - | - | - | 20.0 | 3.00 | 2.500 |" in lines


def test_too_few_images_for_fid_or_is_fail_before_sampling(codes_root, gpt_run, tmp_path):
    common = [f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}", "data=shapes", f"data.root={codes_root.parent / 'shapes'}",
              "split=val", "trainer.accelerator=cpu", "eval.inception_weights=/nonexistent"]  # never loaded
    evaluate = ["eval.py", "eval.clip=false", *common]  # as _evaluate, the three in one process
    one, few, moved = run_each(
        [*evaluate, "eval.num_prompts=1", "sampling.samples_per_prompt=4", f"hydra.run.dir={tmp_path / 'one'}"],
        [*evaluate, "eval.num_prompts=3", "eval.isc_splits=10", f"hydra.run.dir={tmp_path / 'few'}"],
        [*evaluate, "+eval.samples_per_prompt=4", f"hydra.run.dir={tmp_path / 'moved'}"])  # the setting's old place
    assert one[0] != 0
    assert "FID needs at least 2 real and 2 generated images" in one[1] and "1 real and 4 generated" in one[1]
    assert "eval.num_prompts" in one[1] and "eval.fid=false" in one[1]
    assert few[0] != 0 and "eval.isc_splits=10 needs at least 10 generated images" in few[1]
    assert moved[0] != 0 and "eval.samples_per_prompt is now sampling.samples_per_prompt" in moved[1]


# -- multi-caption data (COCO-CN, Flickr-CN layout): several caption rows per image --------------

CAPTION_COUNTS = [1, 5, 3, 5, 2, 4]  # captions of images 0..5


def _image(index):
    """A 32x32 picture of its own: a flat colour and a stripe at an index-dependent place."""
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:] = (37 * index % 256, 255 - 29 * index, 90 + 25 * index)
    pixels[:, 4 * index: 4 * index + 6] = (250, 250, 250)
    return pixels


@pytest.fixture(scope="module")
def multi_caption_root(tmp_path_factory):
    """Image shards with the rows of Flickr8k-CN's caption file: every image's first caption, then
    every second one... (an image's rows scattered over the split), source ids shared by its rows."""
    root = tmp_path_factory.mktemp("data") / "multi"
    rows = [Row(f"img{image}", f"第{image}张图的第{n}句描述", _image(image))
            for n in range(max(CAPTION_COUNTS)) for image, count in enumerate(CAPTION_COUNTS) if n < count]
    shards = write_split(rows, root, "val", ImageOptions(size=32, format="png"), source="multi", shard_size=7,
                         progress=False)
    write_manifest(root, {"val": shards}, source="multi", image_size=32, image_format="png")
    captions = [row.caption for row in rows]
    (root / "tokenizer.model").write_bytes(train_sentencepiece(captions * 5, 300, model_type="char"))
    return root


def _multi_dm(root, **options):
    return ShardDataModule({"name": "multi", "root": str(root), "image_size": 32, "text_len": 16, "num_workers": 0,
                            **options})


def test_multi_caption_prompts_are_one_caption_of_each_distinct_image(multi_caption_root):
    dm = _multi_dm(multi_caption_root)
    prompts = select_prompts(dm, "val", 4)
    images = [pick.caption.split("张")[0] for pick in prompts.picks]
    assert images == ["第0", "第1", "第2", "第3"]  # N prompts cover N images, in order of first appearance
    assert prompts.captions_available == sum(CAPTION_COUNTS[:4])
    # every caption row of each chosen image, wherever it lies in the split (task=caption's references)
    assert prompts.references == [[f"第{image}张图的第{n}句描述" for n in range(count)]
                                  for image, count in enumerate(CAPTION_COUNTS[:4])]
    assert (prompts.split_images, prompts.split_captions) == (6, sum(CAPTION_COUNTS))
    assert select_prompts(dm, "val", None).images == 6 and select_prompts(dm, "val", 100).images == 6
    # the caption drawn for an image is reproducible and follows eval.caption_seed
    assert select_prompts(dm, "val", 4).picks == prompts.picks
    drawn = {tuple(pick.caption for pick in select_prompts(dm, "val", 6, caption_seed=seed).picks) for seed in range(8)}
    assert len(drawn) > 1
    assert prompts.protocol()["captions_available"] == sum(CAPTION_COUNTS[:4])


def test_multi_caption_shares_do_not_depend_on_the_number_of_processes(multi_caption_root):
    dm = _multi_dm(multi_caption_root, num_workers=2)
    prompts = select_prompts(dm, "val", None, caption_seed=3)
    chosen = {pick.key: pick.caption for pick in prompts.picks}
    for world in (1, 2, 3):
        read = {}
        for rank in range(world):
            for batch in prompt_loader(dm, prompts, 2, rank, world):
                assert batch["image"].shape[1:] == (3, 32, 32)
                read.update(zip(batch["key"], batch["caption"]))
        assert read == chosen, world


@pytest.fixture(scope="module")
def multi_caption_eval(multi_caption_root, gpt_run, inception_weights, tmp_path_factory):
    """eval.py on the multi-caption shards: 4 images, 2 samples each, best of 2 candidates."""
    out = tmp_path_factory.mktemp("multi_eval")
    result = _evaluate([f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}", "data=shapes", "data.name=multi",
                        f"data.root={multi_caption_root}", "data.text_len=16", "data.num_workers=0", "split=val",
                        "eval.num_prompts=4", "sampling.samples_per_prompt=2", "sampling.batch_size=4",
                        "eval.rerank=2", "eval.save_images=true", f"eval.inception_weights={inception_weights}",
                        "eval.fid_layer=64", "eval.isc_splits=2", f"eval.stats_cache={out / 'stats'}"], out / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def test_fid_real_statistics_count_each_distinct_image_once(multi_caption_eval, multi_caption_root, inception_weights):
    results = json.loads((multi_caption_eval / "results.json").read_text())
    assert results["prompts"] == 4 and results["prompt_set"]["images"] == 4
    assert results["prompt_set"]["captions_available"] == sum(CAPTION_COUNTS[:4])
    for name in ("plain", "rerank_2"):
        protocol = results[name]["protocol"]
        assert protocol["real_images"] == 4 and protocol["generated_images"] == 8
        assert protocol["captions_available"] == sum(CAPTION_COUNTS[:4])
        assert "caption_seed=0" in protocol["caption_choice"]
    (stats,) = Path(results["plain"]["protocol"]["real_statistics"]).parent.glob("*.npz")
    with np.load(stats) as cached:
        mu, n = cached["mu"], int(cached["n"])
    # the features of the four images, each once (what the statistics must be), and weighted by
    # their caption rows (what counting every row gives)
    features = InceptionFeatures(["64"], inception_weights)(torch.from_numpy(
        np.stack([_image(i) for i in range(4)])).permute(0, 3, 1, 2).contiguous())["64"].double()
    rows = torch.tensor(CAPTION_COUNTS[:4], dtype=torch.float64)[:, None]
    assert n == 4
    np.testing.assert_allclose(mu, features.mean(0).numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(mu, ((features * rows).sum(0) / rows.sum()).numpy(), rtol=1e-4, atol=1e-6)


def test_a_caption_gives_the_same_images_in_task_generate_and_in_an_evaluation(multi_caption_eval, gpt_run, tmp_path):
    """The plain images of the evaluation (2 samples of each of 4 prompts, drawn with a second
    candidate each for reranking, 4 sequences a batch) are task=generate's for the same captions
    (3 sequences a batch); a repeated prompt gets new images."""
    grid = (multi_caption_eval / "grid.md").read_text(encoding="utf-8")
    captions = [line.split(". ", 1)[1] for line in grid.splitlines() if line[:1].isdigit()]
    keys = sorted(path.name[:-len("_00.png")] for path in (multi_caption_eval / "samples").glob("*_00.png"))
    assert len(captions) == len(keys) == 4
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*captions, captions[0]]) + "\n", encoding="utf-8")
    out = tmp_path / "generate"
    result = _evaluate(["task=generate", f"ckpt={gpt_run / 'checkpoints' / 'last.ckpt'}", f"prompts_file={prompts}",
                        "sampling.samples_per_prompt=2", "sampling.batch_size=3", "trainer.accelerator=cpu"], out)
    assert result.returncode == 0, result.stderr[-3000:]

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"))

    for index, key in enumerate(keys):  # the grid lists the prompts in key order, as the files sort
        for sample in range(2):
            np.testing.assert_array_equal(pixels(out / "samples" / f"{index:04d}_{sample:02d}.png"),
                                          pixels(multi_caption_eval / "samples" / f"{key}_{sample:02d}.png"))
    assert not np.array_equal(pixels(out / "samples" / "0004_00.png"), pixels(out / "samples" / "0000_00.png"))
