"""Caption Loss, self-reranking, which prompts and seeds an evaluation uses, and
`python eval.py ckpt=... data=...` on a tiny trained GPT (its bad inputs too)."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.data.stream import Shard
from t2i.eval.text_to_image import (
    caption_loss,
    first_samples,
    pick_best,
    prompt_loader,
    prompt_seed,
)
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.vqgan import read_checkpoint
from t2i.sampling import SamplingConfig, generate_codes

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


def test_pick_best_keeps_the_lowest_caption_loss():
    codes = torch.arange(2 * 1 * 3 * 2 * 2).view(2, 1, 3, 2, 2)  # 2 prompts, 1 sample, 3 candidates, 2x2 grid
    losses = torch.tensor([[[3.0, 1.0, 2.0]], [[float("nan"), 5.0, 4.0]]])
    chosen, chosen_losses = pick_best(codes, losses)
    assert torch.equal(chosen[0, 0], codes[0, 0, 1]) and torch.equal(chosen[1, 0], codes[1, 0, 2])
    assert chosen_losses.tolist() == [[1.0], [4.0]]


def test_a_prompts_samples_depend_on_its_seed_not_on_its_batch():
    torch.manual_seed(0)
    cfg = GPTConfig(n_image_codes=40, n_text_tokens=30, text_len=4, image_len=9, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg).eval()
    text = torch.tensor([[5, 9, 2, 0], [7, 0, 0, 0], [3, 4, 0, 0]])
    sampling = SamplingConfig(samples_per_prompt=2, top_k=20, temperature=2.0)
    seeds = [prompt_seed(0, key) for key in ("val_00000", "val_00001", "val_00002")]
    together = generate_codes(model, text, sampling, seeds=seeds)
    alone = torch.cat([generate_codes(model, text[i:i + 1], sampling, seeds=seeds[i:i + 1]) for i in range(3)])
    assert torch.equal(together, alone)
    assert not torch.equal(together[:2], together[2:4])  # distinct streams per prompt
    assert prompt_seed(0, "val_00000") != prompt_seed(1, "val_00000") != prompt_seed(0, "val_00001")


def test_first_samples_cuts_the_shard_list():
    shards = [Shard("a", 4), Shard("b", 0), Shard("c", 5)]
    assert first_samples(shards, 6) == [Shard("a", 4), Shard("c", 2)]
    assert first_samples(shards, 3) == [Shard("a", 3)]
    assert first_samples(shards, None) == [Shard("a", 4), Shard("c", 5)]


def test_prompt_loader_takes_the_first_samples_whatever_the_ranks_and_workers(codes_root, monkeypatch):
    root = codes_root.parent / "shapes"
    first = list(itertools.islice(DataConfig(root=str(root)).captions("val"), 5))
    data = {"name": "shapes", "root": str(root), "batch_size": 2, "num_workers": 2, "image_size": 32, "text_len": 26}
    dm = ShardDataModule(data)
    shares = []
    for rank in range(2):  # what torch.distributed tells the stream, here through the launcher's variables
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader, count = prompt_loader(dm, "val", 5)
        shares.append([caption for batch in loader for caption in batch["caption"]])
    assert count == 5 and [len(share) for share in shares] == [2, 3]
    assert sorted(shares[0] + shares[1]) == sorted(first)
    with pytest.raises(ValueError, match="eval.num_prompts"):
        prompt_loader(dm, "val", 0)


def test_a_split_without_samples_is_a_clear_error(codes_root, tmp_path):
    images = codes_root.parent / "shapes"
    manifest = json.loads((images / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] = 0  # every sample of the split was dropped
    manifest["splits"]["val"]["shards"][0]["path"] = str(images / "val-00000.tar")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    dm = ShardDataModule({"name": "shapes", "root": str(tmp_path), "tokenizer": {"path": str(images / "tokenizer.model")}})
    with pytest.raises(ValueError, match="split=val .* has no samples with a caption"):
        prompt_loader(dm, "val", None)


def _evaluate(args, out):
    return subprocess.run([sys.executable, "eval.py", *args, f"hydra.run.dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def test_eval_py_scores_with_and_without_reranking(codes_root, gpt_run, inception_weights, tmp_path):
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    images = codes_root.parent / "shapes"
    fid = [f"eval.inception_weights={inception_weights}", "eval.fid_layer=64", "eval.isc_splits=2",
           f"eval.stats_cache={tmp_path / 'stats'}"]
    result = _evaluate([f"ckpt={ckpt}", "data=shapes", f"data.root={images}", "data.batch_size=4", "data.num_workers=0",
                        "split=val", "eval.num_prompts=6", "eval.samples_per_prompt=2", "eval.rerank=3", *fid], tmp_path)
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
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 1  # real statistics computed once, shared
    assert results["sampling"]["top_k"] == 100  # the checkpoint's sampling options (stage.sampling)
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
    one = _evaluate([*common, "eval.num_prompts=1", "eval.samples_per_prompt=4"], tmp_path / "one")
    assert one.returncode != 0
    assert "FID needs at least 2 real and 2 generated images" in one.stderr and "1 real and 4 generated" in one.stderr
    assert "eval.num_prompts" in one.stderr and "eval.fid=false" in one.stderr
    few = _evaluate([*common, "eval.num_prompts=3", "eval.isc_splits=10"], tmp_path / "few")
    assert few.returncode != 0 and "eval.isc_splits=10 needs at least 10 generated images" in few.stderr
