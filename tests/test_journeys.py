"""Two journeys a user takes, end to end on tiny data, with the commands the README gives:

1. Own images: a folder of captioned images -> convert -> tokenizer -> VQGAN -> pre-tokenize -> GPT ->
   eval.py (FID/IS and CLIP on offline random weights) -> task=generate -> the demo's API returns images.
2. pai-painter: an EasyNLP folder -> import -> generate -> fine-tune on the folder -> eval.py on the folder
   (Caption Loss from a captioner over the same VQGAN, caption_ckpt) -> task=caption -> export ->
   re-import gives the same weights; a LoRA adapter trained on the import -> exported merged -> re-imported,
   it samples as the import with the adapter beside it.

Each journey's commands run one after another in one process (tests/run_each.py): a Python start per command
would cost more than the tiny runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.adapters import read_adapter
from t2i.checkpoints import load_gpt
from t2i.interop.paipainter import import_paipainter
from t2i.sampling import SamplingConfig, T2IPipeline
from t2i.data import shapes

REPO = Path(__file__).parents[1]
TINY_RUN = ["debug=tiny"]  # conf/debug/tiny.yaml: a tiny GPT, 4 CPU steps
TINY_GPT = ["stage.sample_every_n_steps=0"]


def run_each(*commands: list[str], data_dir: Path) -> None:
    """Run the commands in order in one process; fail naming the first that failed."""
    result = subprocess.run([sys.executable, "tests/run_each.py", json.dumps([list(map(str, c)) for c in commands])],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "T2I_DATA_DIR": str(data_dir)})
    assert result.returncode == 0, result.stderr[-3000:]
    for command, (code, said) in zip(commands, json.loads(result.stdout.splitlines()[-1])):
        assert code == 0, f"{' '.join(map(str, command))}\n{said[-4000:]}"


@pytest.fixture(scope="module")
def picture_folder(tmp_path_factory) -> Path:
    """A user's own folder: train/ and val/ of PNGs with same-stem .txt captions (the shapes pictures)."""
    src = tmp_path_factory.mktemp("pictures")
    for split, count in (("train", 24), ("val", 8)):
        (src / split).mkdir()
        for index, (_, caption, image) in enumerate(shapes.generate(count, split, size=32)):
            Image.fromarray(image).save(src / split / f"{index:03d}.png")
            (src / split / f"{index:03d}.txt").write_text(caption, encoding="utf-8")
    return src


def test_own_images_from_a_folder_to_the_demo(picture_folder, inception_weights, chinese_clip, tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    folder = ["data=folder", f"data.root={data / 'pics'}", "data.image_size=32"]
    vqgan, gpt = runs / "vqgan" / "checkpoints" / "last.ckpt", runs / "gpt" / "checkpoints" / "last.ckpt"
    run_each(
        ["-m", "t2i.data.convert", "folder", "--src", picture_folder, "--out", data / "pics", "--size", "32"],
        ["train.py", "stage=tokenizer", *folder, f"hydra.run.dir={runs / 'tok'}"],
        ["train.py", "stage=vqgan", "vqgan=shapes", *folder, *TINY_RUN, "stage.loss.perceptual_weight=0",
         "stage.loss.disc_weight=0", "stage.lr_scaling=none", f"hydra.run.dir={runs / 'vqgan'}"],
        ["-m", "t2i.pretokenize", "--data", data / "pics", "--out", data / "pics_codes", "--vqgan", vqgan],
        # the GPT is the default stage, and its data the code shards just made (data.codes_root)
        ["train.py", *folder, *TINY_GPT, *TINY_RUN, "stage.caption_prob=0.5", f"hydra.run.dir={runs / 'gpt'}"],
        ["eval.py", f"ckpt={gpt}", *folder, "split=val", "eval.num_prompts=4", "eval.fid_layer=64", "eval.isc_splits=2",
         f"eval.inception_weights={inception_weights}", f"eval.clip_model={chinese_clip}",
         "eval.rprecision_distractors=3", f"hydra.run.dir={runs / 'eval'}"],
        ["eval.py", "task=generate", f"ckpt={gpt}", "prompts=['画面左上角有一个红色的小圆形']",
         f"hydra.run.dir={runs / 'generate'}"],
        data_dir=data)
    plan = json.loads((runs / "gpt" / "plan.json").read_text())
    assert (plan["stage"], plan["data_kind"], Path(plan["data_root"]).name) == ("gpt", "codes", "pics_codes")
    plain = json.loads((runs / "eval" / "results.json").read_text())["plain"]
    for metric in ("fid", "is_mean", "caption_loss", "clip_score", "r_precision"):
        assert np.isfinite(plain[metric]), metric
    assert (runs / "generate" / "samples" / "grid.png").is_file()

    from test_demo import start_demo  # the demo test's server, on this journey's GPT

    from gradio_client import Client

    with start_demo(str(gpt), tmp_path / "demo") as (url, _, _):
        gallery, _, files = Client(url, verbose=False).predict("红色的小圆形", 2, 3.0, 1.0, 10, 1.0, 4, False, 1,
                                                               api_name="/generate")
    assert len(gallery) == 2 and all(Image.open(item["image"]).size == (32, 32) for item in gallery)


def test_paipainter_import_finetune_evaluate_caption_export(picture_folder, tmp_path):
    from test_interop import bert_vocab, write_paipainter

    data, runs = tmp_path / "data", tmp_path / "runs"
    captions = [p.read_text(encoding="utf-8") for p in sorted(picture_folder.glob("*/*.txt"))]
    src = write_paipainter(tmp_path / "pai-painter-tiny", bert_vocab(captions))
    pai, pai_vqgan = tmp_path / "ckpt" / "pai.ckpt", tmp_path / "ckpt" / "pai.vqgan.ckpt"
    folder = ["data=folder", f"data.root={data / 'pics'}", "data.image_size=32"]
    tuned, captioner = runs / "tuned" / "checkpoints" / "last.ckpt", runs / "captioner" / "checkpoints" / "last.ckpt"
    lora = runs / "lora" / "checkpoints" / "last.ckpt"
    captioner_tokenizer = [f"data.tokenizer.path={tmp_path / 'captioner.model'}"]
    run_each(
        ["-m", "t2i.interop", "paipainter", "--src", src, "--out", pai],
        ["eval.py", "task=generate", f"ckpt={pai}", "prompts=['一只戴帽子的猫']", f"hydra.run.dir={runs / 'gen'}"],
        ["-m", "t2i.data.convert", "folder", "--src", picture_folder, "--out", data / "pics", "--size", "32"],
        # fine-tuned on the folder's images, encoded by the import's own VQGAN at every step
        ["train.py", "experiment=paipainter_finetune", f"init_ckpt={pai}", *folder, *TINY_RUN,
         "stage.sample_every_n_steps=0", f"hydra.run.dir={runs / 'tuned'}"],
        # a captioner over the same VQGAN (the import has no text head), its tokenizer kept apart: the folder
        # itself has no tokenizer.model, as a folder converted for a pai-painter model has not
        ["train.py", "stage=tokenizer", *folder, *captioner_tokenizer, f"hydra.run.dir={runs / 'tok'}"],
        ["-m", "t2i.pretokenize", "--data", data / "pics", "--out", data / "pics_codes", "--vqgan", pai_vqgan],
        ["train.py", *folder, *captioner_tokenizer, *TINY_GPT, *TINY_RUN, "stage.caption_prob=1.0",
         "stage.cond_drop=0", f"hydra.run.dir={runs / 'captioner'}"],
        ["eval.py", f"ckpt={tuned}", *folder, "split=val", "eval.num_prompts=4", "eval.fid=false", "eval.clip=false",
         f"caption_ckpt={captioner}", "eval.rerank=2", f"hydra.run.dir={runs / 'eval'}"],
        ["eval.py", "task=caption", f"ckpt={captioner}", *folder, "split=val", f"hydra.run.dir={runs / 'caption'}"],
        ["-m", "t2i.interop", "export-paipainter", "--ckpt", tuned, "--out", tmp_path / "exported"],
        ["-m", "t2i.interop", "paipainter", "--src", tmp_path / "exported", "--out", tmp_path / "again.ckpt"],
        ["train.py", "experiment=paipainter_finetune", f"init_ckpt={pai}", *folder, *TINY_RUN, "stage.lora={rank: 8}",
         "stage.sample_every_n_steps=0", f"hydra.run.dir={runs / 'lora'}"],
        ["-m", "t2i.interop", "export-paipainter", "--ckpt", pai, "--adapter", lora, "--out", tmp_path / "lora-export"],
        data_dir=data)
    assert not (data / "pics" / "tokenizer.model").exists()
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert np.isfinite(results["plain"]["caption_loss"]) and results["caption_model"] == str(captioner)
    assert json.loads((runs / "caption" / "results.json").read_text())["images"] == 8
    tuned_gpt, _ = load_gpt(tuned)
    again, _ = load_gpt(tmp_path / "again.ckpt")
    assert tuned_gpt.cfg == again.cfg
    for key, value in tuned_gpt.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    original = torch.load(src / "pytorch_model.bin", map_location="cpu", weights_only=True)
    exported = torch.load(tmp_path / "exported" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert exported.keys() == original.keys()
    assert not torch.equal(exported["transformer.head.weight"], original["transformer.head.weight"])  # it learned

    # LoRA on the import: the minGPT's attention and MLP linears adapted, merged by the export
    weights, _ = read_adapter(lora)
    adapted = {name.split(".lora_")[0] for name in weights}
    assert adapted == {f"blocks.{i}.{layer}" for i in range(2) for layer in
                       ("attn.key", "attn.query", "attn.value", "attn.proj", "mlp.0", "mlp.2")}
    merged = torch.load(tmp_path / "lora-export" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert merged.keys() == original.keys()
    assert not torch.equal(merged["transformer.blocks.0.attn.query.weight"],
                           original["transformer.blocks.0.attn.query.weight"])  # it learned
    assert torch.equal(merged["transformer.head.weight"], original["transformer.head.weight"])  # not a target
    reimported, _ = import_paipainter(tmp_path / "lora-export", tmp_path / "lora-again.ckpt")
    prompts, greedy = captions[:2], SamplingConfig(greedy=True)
    assert torch.equal(T2IPipeline.from_checkpoint(reimported).sample_codes(prompts, greedy),
                       T2IPipeline.from_checkpoint(pai, adapter=lora, merge=False).sample_codes(prompts, greedy))
