"""Every command the docs show (README.md, docs/*.md, the recipes' comments in conf/experiment/) composes and
resolves to what the docs say it does; the cheap ones run on the tests' tiny data.

A command is a line of a fenced code block, or of a recipe's comment, that starts with `python train.py`,
`python eval.py`, `python -m t2i.` or `make` (`srun` before it allowed). Placeholders (CKPT, GPT.ckpt, RAW,
<name>, ...) stand for the tests' fixtures. DOCUMENTED says what each command does, as the docs say it:
a command in the docs that is not there fails (say what it does), and so does an entry the docs dropped.
"""

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from t2i.checkpoints import load_vqgan
from t2i.data import shapes

from t2i.plan import resolve_run, strategy_name

REPO = Path(__file__).parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "conf" / "experiment").glob("*.yaml"))]
COMMAND = re.compile(r"^(?:srun (?:\.\.\. )?)?(python (?:train|eval)\.py\b|python -m t2i\.|make\b)")

# What each command does, on a machine with the GPUs it asks for: train.py "stage model data:shard-folder
# <devices>x<nodes> strategy precision" (model: GPT layers/heads/width, or the VQGAN's codes; "(built)": built up to
# training on the fixtures); eval.py "task data <devices>x<nodes>" (generation and reconstruction also run);
# python -m: the module (its parser takes the arguments); make: the target (make -n takes it)
DOCUMENTED = {
    'make quickstart':
        'quickstart',
    'make test':
        'test',
    'python -m t2i.data.convert <source> --src RAW --out data/<name>':
        't2i.data.convert',
    'python train.py stage=tokenizer data=<name>':
        'tokenizer - shapes',
    'python train.py stage=vqgan vqgan=<config> data=<name>':
        'vqgan 16384codes shapes:shapes 1x1 single-device 32-true',
    'python -m t2i.pretokenize --data data/<name> --out data/<name>_codes --vqgan CKPT':
        't2i.pretokenize',
    'python train.py model=<size> data=<name>':
        'gpt 12/12/768 shapes:shapes_codes 1x1 single-device 32-true',
    'python -m t2i.data.convert folder --src DIR --out data/mine':
        't2i.data.convert',
    'python train.py stage=tokenizer data=folder data.root=data/mine':
        'tokenizer - folder',
    'python train.py stage=vqgan vqgan=f16_16384 data=folder data.root=data/mine trainer=gpu':
        'vqgan 16384codes folder:mine 1x1 single-device bf16-mixed',
    'python -m t2i.pretokenize --data data/mine --out data/mine_codes --vqgan VQGAN.ckpt':
        't2i.pretokenize',
    'python train.py model=base data=folder data.root=data/mine trainer=gpu':
        'gpt 12/12/768 folder:mine_codes 1x1 single-device bf16-mixed',
    'python eval.py ckpt=GPT.ckpt data=folder data.root=data/mine split=val':
        't2i folder 1x1',
    'python eval.py task=generate ckpt=GPT.ckpt "prompts=[\'...\']"':
        'generate shapes 1x1',
    'python eval.py task=complete ckpt=GPT.ckpt image=IMG.png mask=MASK.png "prompts=[\'...\']"':
        'complete shapes 1x1',
    'python eval.py task=complete ckpt=GPT.ckpt image=IMG.png mask=MASK.png "prompts=[\'画面右下角有一个蓝色的小方块\']"':
        'complete shapes 1x1',
    'python eval.py task=complete ckpt=GPT.ckpt image=IMG.png box=[4,4,8,8] box_units=codes "prompts=[\'右下方有个绿色的大三角形\']"':
        'complete shapes 1x1',
    'python -m t2i.demo ckpt=GPT.ckpt':
        't2i.demo',
    'python -m t2i.demo ckpt=GPT.ckpt "adapters={mine: ADAPTER.ckpt}"':
        't2i.demo',
    'python eval.py task=generate ckpt=GPT_CKPT "prompts=[\'...\']"':
        'generate shapes 1x1',
    'python eval.py ckpt=GPT_CKPT data=<name>':
        't2i shapes 1x1',
    'python train.py stage=vqgan vqgan=f16_16384 data=muge trainer=gpu':
        'vqgan 16384codes muge:muge 1x1 single-device bf16-mixed',
    'python train.py stage=vqgan vqgan=f16_16384 init_ckpt=last.ckpt ...':
        'vqgan 16384codes shapes:shapes 1x1 single-device 32-true',
    'python train.py experiment=vqgan_shapes':
        'vqgan 512codes shapes:shapes 1x1 single-device 32-true (built)',
    'python train.py experiment=vqgan_shapes vqgan.codebook=simvq stage.codebook.restart_every=0':
        'vqgan 512codes shapes:shapes 1x1 single-device 32-true (built)',
    'python train.py experiment=vqgan_shapes vqgan.entropy_weight=0.05':
        'vqgan 512codes shapes:shapes 1x1 single-device 32-true (built)',
    'python eval.py task=reconstruct ckpt=CKPT data=shapes split=val':
        'reconstruct shapes 1x1',
    'python eval.py task=reconstruct ckpt=CKPT data=muge split=val eval.rfid=true eval.lpips=true eval.inception_weights=PATH eval.lpips_vgg_path=PATH':
        'reconstruct muge 1x1',
    'python train.py stage=gpt model=base data=muge data.root=data/muge_codes trainer=gpu':
        'gpt 12/12/768 muge:muge_codes 1x1 single-device bf16-mixed',
    'python train.py stage=gpt model=base data=muge vqgan_ckpt=VQGAN.ckpt trainer=gpu':
        'gpt 12/12/768 muge:muge 1x1 single-device bf16-mixed',
    'python train.py experiment=shapes':
        'gpt 4/4/96 shapes_codes:shapes_codes 1x1 single-device 32-true (built)',
    'python eval.py task=generate ckpt=GPT.ckpt "prompts=[\'画面左上角有一个红色的小圆形\']" sampling.guidance_scale=3 sampling.top_k=100 sampling.samples_per_prompt=4':
        'generate shapes 1x1',
    'python eval.py task=generate ckpt=GPT.ckpt prompts_file=experiments/prompts/shapes.txt':
        'generate shapes 1x1',
    'python train.py experiment=vqgan_shapes_2x init_ckpt=VQGAN.ckpt':
        'vqgan 512codes shapes:shapes 1x1 single-device 32-true',
    'python -m t2i.pretokenize --data data/shapes --out data/shapes_superres_codes --vqgan VQGAN_2X.ckpt --image-size 32 --superres-size 64':
        't2i.pretokenize',
    'python train.py experiment=superres_shapes':
        'gpt 4/4/96 shapes_superres_codes:shapes_superres_codes 1x1 single-device 32-true',
    'python eval.py task=superres superres_ckpt=SR.ckpt ckpt=GPT.ckpt data=shapes split=test':
        'superres shapes 1x1',
    'python eval.py task=generate ckpt=GPT.ckpt superres_ckpt=SR.ckpt prompts_file=experiments/prompts/shapes.txt':
        'generate shapes 1x1',
    'python -m t2i.interop paipainter --src pai-painter-base-zh --out ckpt/pai_base.ckpt':
        't2i.interop',
    'python eval.py task=generate ckpt=ckpt/pai_base.ckpt "prompts=[\'一只戴着帽子的猫\']" sampling.top_k=100':
        'generate shapes 1x1',
    'python train.py experiment=paipainter_finetune init_ckpt=ckpt/pai_base.ckpt data=<name> trainer=gpu':
        "gpt init_ckpt's shapes:shapes 1x1 single-device bf16-mixed",
    'python -m t2i.interop export-paipainter --ckpt logs/paipainter_finetune/.../checkpoints/last.ckpt --out pai-tuned':
        't2i.interop',
    'python train.py init_ckpt=GPT.ckpt data=folder data.root=data/mine "stage.lora={rank: 8}" trainer=gpu':
        "gpt init_ckpt's+lora folder:mine 1x1 single-device bf16-mixed",
    'python eval.py task=generate ckpt=GPT.ckpt adapter=ADAPTER.ckpt "prompts=[\'...\']"':
        'generate shapes 1x1',
    'python eval.py ckpt=GPT.ckpt adapter=ADAPTER.ckpt data=folder data.root=data/mine split=val':
        't2i folder 1x1',
    'python train.py experiment=paipainter_finetune init_ckpt=ckpt/pai_base.ckpt data=<name> "stage.lora={rank: 8}" '
    'trainer=gpu':
        "gpt init_ckpt's+lora shapes:shapes 1x1 single-device bf16-mixed",
    'python eval.py task=generate ckpt=ckpt/pai_base.ckpt adapter=ADAPTER.ckpt "prompts=[\'一只戴着帽子的猫\']"':
        'generate shapes 1x1',
    'python -m t2i.interop export-paipainter --ckpt ckpt/pai_base.ckpt --adapter ADAPTER.ckpt --out pai-style':
        't2i.interop',
    'python eval.py task=complete ckpt=GPT.ckpt adapter=ADAPTER.ckpt image=IMG.png box=[4,4,8,8] box_units=codes '
    '"prompts=[\'右下方有个绿色的大三角形\']"':
        'complete shapes 1x1',
    'python eval.py ckpt=GPT.ckpt data=muge split=val':
        't2i muge 1x1',
    'python eval.py ckpt=GPT.ckpt data=shapes eval.num_prompts=200 eval.rerank=4':
        't2i shapes 1x1',
    'python eval.py ckpt=GPT.ckpt data=muge eval.clip_model=DIR eval.rerank=4 eval.rerank_by=clip_score':
        't2i muge 1x1',
    'python eval.py ckpt=GPT.ckpt data=muge trainer.devices=4':
        't2i muge 4x1',
    'python eval.py ckpt=GPT.ckpt data=muge logger=wandb':
        't2i muge 1x1',
    'python eval.py task=caption ckpt=GPT.ckpt data=shapes split=test':
        'caption shapes 1x1',
    'python eval.py task=caption ckpt=GPT.ckpt data=coco_cn split=test caption.strategy=beam caption.num_beams=4':
        'caption coco_cn 1x1',
    'python eval.py task=caption ckpt=GPT.ckpt images=DIR caption.strategy=sample caption.temperature=0.7 caption.top_k=20':
        'caption shapes 1x1',
    'python -m t2i.demo ckpt=logs/quickstart/gpt/checkpoints/last.ckpt':
        't2i.demo',
    'python -m t2i.demo ckpt=GPT.ckpt port=8000 host=0.0.0.0 device=cuda sampling.samples_per_prompt=8 queue.max_batch=8':
        't2i.demo',
    'python train.py experiment=muge_base':
        'gpt 12/12/768 muge:muge_codes 8x1 ddp bf16-mixed',
    'python train.py experiment=shapes dry_run=true hydra.run.dir=logs/plan':
        'gpt 4/4/96 shapes_codes:shapes_codes 1x1 single-device 32-true (built)',
    'python train.py model=large data=muge trainer.devices=8':
        'gpt 24/16/1024 muge:muge_codes 8x1 ddp bf16-mixed',
    'python train.py stage=gpt ... trainer=gpu trainer.precision=16-mixed model.pb_relax=true':
        'gpt 12/12/768 shapes:shapes_codes 1x1 single-device 16-mixed',
    'python train.py stage=gpt ... trainer.accumulate_grad_batches=4 trainer.gradient_clip_val=1.0':
        'gpt 12/12/768 shapes:shapes_codes 1x1 single-device 32-true',
    'python train.py stage=gpt model=large ... trainer=fsdp':
        'gpt 24/16/1024 shapes:shapes_codes 8x1 FSDPStrategy bf16-mixed',
    'srun python train.py experiment=muge_large trainer.num_nodes=$SLURM_NNODES trainer.devices=8 hydra.run.dir=logs/muge_large/$SLURM_JOB_ID':
        'gpt 24/16/1024 muge:muge_codes 8x4 ddp bf16-mixed',
    'python train.py experiment=muge_base trainer.devices=8':
        'gpt 12/12/768 muge:muge_codes 8x1 ddp bf16-mixed',
    'python train.py -m model=base,large optim.lr=1e-4,3e-4 data=muge ...':
        'gpt 12/12/768 muge:muge_codes 1x1 single-device 32-true',
    'python train.py -m hparams_search=gpt_optuna experiment=shapes':
        'gpt 4/4/96 shapes_codes:shapes_codes 1x1 single-device 32-true',
    'python train.py -m hydra/launcher=slurm experiment=muge_base optim.lr=1e-4,3e-4':
        'gpt 12/12/768 muge:muge_codes 8x1 ddp bf16-mixed',
    'python -m t2i.data.convert coco_cn --src RAW --out data/coco_cn':
        't2i.data.convert',
    'python train.py stage=tokenizer data=coco_cn':
        'tokenizer - coco_cn',
    'python -m t2i.pretokenize --data data/coco_cn --out data/coco_cn_codes --vqgan TAMING.ckpt --vqgan-config f16_16384':
        't2i.pretokenize',
    'python train.py experiment=coco_cn_base':
        'gpt 12/12/768 coco_cn:coco_cn_codes 8x1 ddp bf16-mixed',
    'python eval.py ckpt=<run dir>/checkpoints/last.ckpt data=coco_cn split=test trainer.devices=8 eval.rerank=4':
        't2i coco_cn 8x1',
    'python -m t2i.data.convert flickr30k_cn --src RAW --out data/flickr30k_cn':
        't2i.data.convert',
    'python train.py stage=tokenizer data=flickr30k_cn':
        'tokenizer - flickr30k_cn',
    'python -m t2i.pretokenize --data data/flickr30k_cn --out data/flickr30k_cn_codes --vqgan TAMING.ckpt --vqgan-config f16_16384':
        't2i.pretokenize',
    'python train.py experiment=flickr30k_cn_base':
        'gpt 12/12/768 flickr30k_cn:flickr30k_cn_codes 8x1 ddp bf16-mixed',
    'python eval.py ckpt=<run dir>/checkpoints/last.ckpt data=flickr30k_cn split=test trainer.devices=8 eval.rerank=4':
        't2i flickr30k_cn 8x1',
    'python -m t2i.data.convert muge --src RAW --out data/muge':
        't2i.data.convert',
    'python train.py stage=tokenizer data=muge':
        'tokenizer - muge',
    'python -m t2i.pretokenize --data data/muge --out data/muge_codes --vqgan TAMING.ckpt --vqgan-config f16_16384':
        't2i.pretokenize',
    'srun ... python train.py experiment=muge_large':
        'gpt 24/16/1024 muge:muge_codes 8x4 ddp bf16-mixed',
    'python train.py experiment=paipainter_finetune init_ckpt=ckpt/pai_base.ckpt data=<name>':
        "gpt init_ckpt's shapes:shapes 1x1 single-device 32-true",
    'python -m t2i.pretokenize --data data/<name> --out data/<name>_pai --vqgan ckpt/pai_base.vqgan.ckpt':
        't2i.pretokenize',
    'python train.py experiment=paipainter_finetune init_ckpt=ckpt/pai_base.ckpt data=<name> data.root=data/<name>_pai':
        "gpt init_ckpt's shapes:shapes_pai 1x1 single-device 32-true",
    'python train.py experiment=superres_muge_base':
        'gpt 12/12/768 muge:muge_superres_codes 8x1 ddp bf16-mixed',
    'python -m t2i.data.convert muge --src RAW --out data/muge512 --size 512':
        't2i.data.convert',
    'python -m t2i.pretokenize --data data/muge512 --out data/muge_superres_codes --vqgan TAMING.ckpt --vqgan-config f16_16384 --image-size 256 --superres-size 512':
        't2i.pretokenize',
    'python eval.py task=generate ckpt=MUGE_T2I.ckpt superres_ckpt=... prompts_file=...':
        'generate shapes 1x1',
    'python train.py experiment=vqgan_shapes_2x init_ckpt=logs/quickstart/vqgan/checkpoints/last.ckpt':
        'vqgan 512codes shapes:shapes 1x1 single-device 32-true',
    'python train.py experiment=shapes_captioner init_ckpt=logs/quickstart/gpt/checkpoints/last.ckpt hydra.run.dir=logs/quickstart/captioner':
        "gpt init_ckpt's shapes_codes:shapes_codes 1x1 single-device 32-true (built)",
    'python eval.py task=caption ckpt=logs/quickstart/captioner/checkpoints/last.ckpt data=shapes split=test':
        'caption shapes 1x1',
    'python eval.py ckpt=logs/quickstart/gpt/checkpoints/last.ckpt data=shapes eval.num_prompts=200 eval.fid=false eval.clip=false eval.rerank=4 caption_ckpt=logs/quickstart/captioner/checkpoints/last.ckpt':
        't2i shapes 1x1',
}


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for every command line of the docs, continuation lines joined, comments dropped."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_code = path.suffix == ".yaml"
        index = 0
        while index < len(lines):
            line = lines[index]
            if path.suffix == ".md" and line.lstrip().startswith("```"):
                in_code = not in_code
            text = line.strip().lstrip("#").strip() if path.suffix == ".yaml" else line.strip().removeprefix("-> ")
            if in_code and COMMAND.match(text):
                while text.endswith("\\") and index + 1 < len(lines):
                    index += 1
                    text = text[:-1].rstrip() + " " + lines[index].strip().lstrip("#").strip()
                text = re.sub(r"\s+#.*$", "", re.sub(r"\s+\(README .*\)$", "", text))
                text = re.sub(r"\s{3,}\S.*$", "", text).strip()  # a diagram's column of outputs
                found.append((path.relative_to(REPO).as_posix(), re.sub(r"\s+", " ", text)))
            index += 1
    return found


def test_the_docs_commands_are_the_documented_ones():
    commands = {command for _, command in doc_commands()}
    undocumented = sorted(commands - set(DOCUMENTED))
    assert not undocumented, f"commands in the docs that this test does not know: add what each does: {undocumented}"
    dropped = sorted(set(DOCUMENTED) - commands)
    assert not dropped, f"commands no longer in the docs: remove them from DOCUMENTED: {dropped}"


# placeholders -> the fixtures (`data/` becomes the tests' data folder)
def _placeholders(fixtures: dict) -> dict:
    gpt, vqgan, data = fixtures["gpt"], fixtures["vqgan"], fixtures["data_dir"]
    return {"<name>": "shapes", "<source>": "muge", "<size>": "base", "<config>": "f16_16384",
            "<run dir>/checkpoints/last.ckpt": gpt, "logs/quickstart/gpt/checkpoints/last.ckpt": gpt,
            "logs/quickstart/captioner/checkpoints/last.ckpt": gpt, "GPT_CKPT": gpt, "GPT.ckpt": gpt, "MUGE_T2I.ckpt": gpt, "ckpt/pai_base.ckpt": gpt, "SR.ckpt": gpt,
            "logs/paipainter_finetune/.../checkpoints/last.ckpt": gpt, "CKPT": vqgan, "VQGAN.ckpt": vqgan,
            "VQGAN_2X.ckpt": vqgan, "TAMING.ckpt": vqgan, "ckpt/pai_base.vqgan.ckpt": vqgan,
            "logs/quickstart/vqgan/checkpoints/last.ckpt": vqgan, "last.ckpt": vqgan, "$SLURM_NNODES": "4",
            "$SLURM_JOB_ID": "1", "data/": f"{data}/", "IMG.png": fixtures["image"], "MASK.png": fixtures["mask"],
            "ADAPTER.ckpt": fixtures["adapter"]}


def _substitute(value: str, table: dict) -> str:
    if value in table:
        return table[value]
    for key in ("<run dir>/checkpoints/last.ckpt", "<name>", "<source>", "<size>", "<config>", "$SLURM_NNODES",
                "$SLURM_JOB_ID"):
        value = value.replace(key, table[key])
    return table["data/"] + value.removeprefix("data/") if value.startswith("data/") else value


def _arguments(command: str, fixtures: dict) -> list[str]:
    """The command's arguments after the program, with the fixtures in place of the placeholders."""
    table = _placeholders(fixtures)
    command = command.replace("<run dir>/checkpoints/last.ckpt", table["<run dir>/checkpoints/last.ckpt"])
    words = [word for word in shlex.split(command.removeprefix("srun ").removeprefix("... ")) if word != "..."]
    out = []
    for word in words:
        key, is_setting, value = word.partition("=")
        out.append(f"{key}={_substitute(value, table)}" if is_setting and not word.startswith("-")
                   else _substitute(word, table))
    return out


def _fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def _compose(name: str, overrides: list[str], run_dir: Path):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        extra = [f"trainer.default_root_dir={run_dir}", f"callbacks.model_checkpoint.dirpath={run_dir / 'ckpts'}"] \
            if name == "train" else []
        return compose(name, overrides=[*overrides, *extra])


def train_facts(args: list[str], run_dir: Path, monkeypatch) -> str:
    """What `python train.py args` resolves to on a machine with the GPUs it asks for; a command that trains a
    CPU-size model on data the fixtures have is also built, up to the start of training (dry_run=true)."""
    overrides = [a.split(",")[0] if "=" in a and "," in a and "[" not in a else a for a in args if a != "-m"]
    overrides = [a for a in overrides if not a.startswith(("hydra.run.dir=", "hydra/launcher="))]
    cfg = _compose("train", overrides, run_dir)
    trainer = cfg.trainer
    wants_gpus = trainer.accelerator in ("gpu", "cuda") or trainer.devices in (-1, "auto") or int(trainer.devices) > 1
    _fake_gpus(monkeypatch, 8 if wants_gpus else 0)
    if cfg.stage.name == "tokenizer":
        return f"tokenizer - {cfg.data.name}"
    devices = resolve_run(cfg)
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else instantiate(trainer.strategy)
    world = f"{devices}x{trainer.num_nodes} {strategy_name(strategy, devices * trainer.num_nodes)}"
    if cfg.stage.name == "gpt":
        model = "init_ckpt's" if cfg.init_ckpt else f"{cfg.model.n_layer}/{cfg.model.n_head}/{cfg.model.n_embd}"
        model += "+lora" if cfg.stage.lora is not None else ""
    else:
        model = f"{cfg.vqgan.n_embed}codes"
    facts = f"{cfg.stage.name} {model} {cfg.data.name}:{Path(cfg.data.root).name} {world} {trainer.precision}"
    # a CPU-size model, or a CPU fine-tune of the tests' GPT (the shapes recipes' init_ckpt)
    cpu_sized = not wants_gpus and "-m" not in args and (model in ("4/4/96", "512codes") and not cfg.init_ckpt
                                                         or model == "init_ckpt's" and trainer.accelerator == "cpu")
    if cpu_sized and Path(cfg.data.root).is_dir():
        monkeypatch.syspath_prepend(str(REPO))
        import train

        cfg.dry_run = True
        assert train.train_lightning_stage(cfg) == {}
        assert (run_dir / "plan.json").is_file()
        facts += " (built)"
    return facts


def eval_facts(args: list[str], run_dir: Path, monkeypatch) -> str:
    cfg = _compose("eval", args, run_dir)
    return f"{cfg.task} {cfg.data.name} {cfg.trainer.devices}x{cfg.trainer.num_nodes}"


def module_facts(args: list[str], run_dir: Path, monkeypatch) -> str:
    """The module's own parser takes the arguments (a Hydra entry point composes them)."""
    module, args = args[2], args[3:]
    if module == "t2i.demo":
        _compose("demo", args, run_dir)
    elif module == "t2i.data.shards":  # prints the manifest: cheap, so it runs
        monkeypatch.setattr(sys, "argv", [module, *args])
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_module(module, run_name="__main__")
        assert "split" in out.getvalue()
    else:
        __import__(module + ".__main__" if module == "t2i.interop" else module)
        parser = sys.modules[module + ".__main__" if module == "t2i.interop" else module].build_parser()
        parser.parse_args(args)
    return module


def make_facts(args: list[str], run_dir: Path, monkeypatch) -> str:
    target = args[1]
    dry = subprocess.run(["make", "-n", *args[1:]], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    return target


FACTS = {"train.py": train_facts, "eval.py": eval_facts, "-m": module_facts, "make": make_facts}


@pytest.fixture(scope="module")
def fixtures(codes_root, gpt_run, lora_run, tmp_path_factory):
    """The checkpoints and a data folder where every dataset name is the tests' tiny shapes data."""
    data = tmp_path_factory.mktemp("docs_data")
    for name in ("shapes", "muge", "coco_cn", "flickr8k_cn", "flickr30k_cn", "guohua", "mine"):
        (data / name).symlink_to(codes_root.parent / "shapes")
        if name != "shapes":
            (data / f"{name}_codes").symlink_to(codes_root)
    (data / "shapes_codes").symlink_to(codes_root)
    (data / "shapes_pai").symlink_to(codes_root)  # the pai-painter recipe's code shards
    # task=complete's image (a shapes image at the tests' 32x32) and its mask (white: the bottom-right quarter)
    attributes = {"shape": "circle", "color": "red", "position": "top_left", "size": "large", "background": "white"}
    Image.fromarray(shapes.render(attributes, 32)).save(data / "image.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[16:, 16:] = 255
    Image.fromarray(mask).save(data / "mask.png")
    return {"gpt": str(gpt_run / "checkpoints" / "last.ckpt"), "vqgan": str(codes_root.parent / "vqgan.ckpt"),
            "data_dir": str(data), "image": str(data / "image.png"), "mask": str(data / "mask.png"),
            "adapter": str(lora_run / "checkpoints" / "last.ckpt")}


def facts_of(command: str, fixtures: dict, run_dir: Path, monkeypatch) -> str:
    monkeypatch.setenv("T2I_DATA_DIR", fixtures["data_dir"])
    args = _arguments(command, fixtures)
    program = args[0] if args[0] == "make" else args[1]
    return FACTS[program](args if program in ("make", "-m") else args[2:], run_dir, monkeypatch)


def _runs_here(command: str) -> bool:
    """eval.py commands cheap on the fixtures: generation, completion, and reconstructions of the shapes images."""
    if not command.startswith("python eval.py") or "superres" in command or "..." in command:
        return False
    return "task=generate" in command or "task=complete" in command or ("task=reconstruct" in command and "data=shapes" in command
                                          and "eval.rfid=true" not in command)


@pytest.fixture(scope="module")
def eval_runs(fixtures, tmp_path_factory) -> dict:
    """{command: (exit code, stderr)} of the eval.py commands that run on the fixtures, all in one process."""
    commands = sorted({command for _, command in doc_commands() if _runs_here(command)})
    runs = tmp_path_factory.mktemp("eval_runs")
    argvs = [[*_arguments(command, fixtures)[1:], "sampling.samples_per_prompt=1", f"hydra.run.dir={runs / str(i)}"]
             if "task=generate" in command or "task=complete" in command
             else [*_arguments(command, fixtures)[1:], f"hydra.run.dir={runs / str(i)}"]
             for i, command in enumerate(commands)]
    result = subprocess.run([sys.executable, "tests/run_each.py", json.dumps(argvs)], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "T2I_DATA_DIR": fixtures["data_dir"]})
    assert result.returncode == 0, result.stderr[-3000:]
    return {command: (*said, runs / str(i))
            for i, (command, said) in enumerate(zip(commands, json.loads(result.stdout.splitlines()[-1])))}


@pytest.mark.parametrize("command", sorted({command for _, command in doc_commands()}))
def test_each_command_does_what_the_docs_say(command, fixtures, eval_runs, tmp_path, monkeypatch):
    if command not in DOCUMENTED:
        pytest.fail(f"{command!r} is in the docs but not in DOCUMENTED: add what it does")
    assert facts_of(command, fixtures, tmp_path, monkeypatch) == DOCUMENTED[command]
    if command in eval_runs:
        code, said, _ = eval_runs[command]
        assert code == 0, said[-3000:]


def test_the_documented_completions_keep_the_image_outside_their_region(fixtures, eval_runs):
    """task=complete's codes are the image's own VQGAN codes outside the region (mask or box) and sampled in it."""
    image = torch.from_numpy(np.array(Image.open(fixtures["image"]).convert("RGB"))).permute(2, 0, 1)
    truth = load_vqgan(fixtures["vqgan"]).encode(image[None].float() / 127.5 - 1)[0]
    runs = [run for command, (_, _, run) in eval_runs.items() if "task=complete" in command]
    assert len(runs) == 3  # docs/generation.md's, one with a LoRA adapter (the README's prompt is a placeholder)
    adapters = set()
    for run in runs:
        results = json.loads((run / "results.json").read_text(encoding="utf-8"))
        adapters.add(results["adapter"])
        region = torch.tensor(results["region"], dtype=torch.bool)
        assert region.sum() == 16  # the bottom-right quarter of the 8x8 grid, by the mask or the box
        codes = torch.from_numpy(np.load(results["codes"]))
        assert (codes[:, ~region] == truth[~region]).all() and len(results["files"]) == len(results["prompts"])
    assert adapters == {None, fixtures["adapter"]}
