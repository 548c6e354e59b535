"""Bad checkpoint files of every kind, through every loader t2i has: each is refused with a message naming
the file and the problem, and nothing pickled in a file runs."""

import os
import zipfile
from pathlib import Path

import pytest
import torch

from t2i.callbacks import AtomicCheckpointIO, saved_wandb_run_id
from t2i.checkpoints import CheckpointError, load_gpt, load_vqgan, read_checkpoint
from t2i.interop.paipainter import import_paipainter
from t2i.models.vqgan import VQGANConfig
from t2i.sampling import SuperResPipeline


class RunsCode:
    """What a hostile checkpoint pickles: a call made while unpickling, here one that writes a file."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


class Settings(dict):
    """A dict subclass, as some projects keep hyper-parameters."""


def _vqgan_config(codes_root) -> VQGANConfig:
    return VQGANConfig(**read_checkpoint(codes_root.parent / "vqgan.ckpt")["t2i"]["vqgan"])


def _loaders(codes_root, tmp_path):
    """Every way t2i reads a checkpoint file a user names: path -> the loaded thing (or an error)."""
    def paipainter(path: Path):
        folder = tmp_path / "pai"
        folder.mkdir(exist_ok=True)
        (folder / "pytorch_model.bin").write_bytes(path.read_bytes())
        (folder / "config.json").write_text("{}")
        (folder / "vocab.txt").write_text("[PAD]\n")
        return import_paipainter(folder, tmp_path / "pai.ckpt")

    return {
        "gpt": load_gpt,
        "vqgan": lambda path: load_vqgan(path, _vqgan_config(codes_root)),
        "superres": SuperResPipeline.from_checkpoint,
        "paipainter": paipainter,
        "resume": AtomicCheckpointIO().load_checkpoint,  # what trainer.fit(ckpt_path=...) reads with (train.py)
        "wandb_run_id": saved_wandb_run_id,  # train.py reads the resume file for the W&B run first
    }


def _bad_files(gpt_run, codes_root, tmp_path, marker: Path) -> dict[str, tuple[Path, str]]:
    """kind -> (file, what the message must say)."""
    good = gpt_run / "checkpoints" / "last.ckpt"
    files = {}
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["truncated"] = (truncated, "not a readable torch checkpoint")
    other_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(other_zip, "w") as archive:
        archive.writestr("readme.txt", "not weights")
    files["zip of something else"] = (other_zip, "not a readable torch checkpoint")
    text = tmp_path / "notes.ckpt"
    text.write_text("a text file named like a checkpoint\n")
    files["not a torch file"] = (text, "refused|not a readable")
    foreign = tmp_path / "other_project.ckpt"
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.0",
                "state_dict": {"model.encoder.weight": torch.zeros(4, 4), "model.head.bias": torch.zeros(4)},
                "loops": {}, "optimizer_states": [], "lr_schedulers": []}, foreign)
    files["another project's Lightning checkpoint"] = (foreign, "not a (t2i|checkpoint of a t2i)|does not fit|neither")
    # a pickle that runs code: a call torch never allows (os.system) and one it does not know (builtins.open)
    for name, call, args in (("os.system", os.system, (f"touch {marker}",)),
                             ("builtins.open", open, (str(marker), "w"))):
        checkpoint = read_checkpoint(good)
        checkpoint["payload"] = RunsCode(call, *args)
        path = tmp_path / f"runs_{name}.ckpt"
        torch.save(checkpoint, path)
        files[f"a pickle calling {name}"] = (path, "refused|blocked|beyond tensors")
    return files


def test_every_loader_refuses_every_bad_file_naming_it_and_runs_nothing(gpt_run, codes_root, tmp_path):
    marker = tmp_path / "written_by_the_checkpoint"
    loaders = _loaders(codes_root, tmp_path)
    for kind, (path, message) in _bad_files(gpt_run, codes_root, tmp_path, marker).items():
        for name, load in loaders.items():
            if name == "vqgan" and kind == "a pickle calling builtins.open":
                continue  # taming's .ckpt pickles foreign objects: kept as inert stand-ins (below)
            if name == "wandb_run_id" and kind == "another project's Lightning checkpoint":
                assert load(path) is None  # only reads an entry: the resume that follows refuses it
                continue
            with pytest.raises(CheckpointError, match=message) as error:
                load(path)
            if name != "paipainter":
                assert str(path) in str(error.value), (kind, name, str(error.value))
            else:
                assert "pytorch_model.bin" in str(error.value), (kind, name, str(error.value))
            assert not marker.exists(), (kind, name)
    # the VQGAN loader reads taming's foreign objects as data: the call is kept, not made
    path = tmp_path / "runs_builtins.open.ckpt"
    assert type(read_checkpoint(path)["payload"]).__name__ == "open" and not marker.exists()
    with pytest.raises(CheckpointError, match=f"{path} does not fit this VQGAN config"):
        load_vqgan(path, _vqgan_config(codes_root))  # a GPT's weights: named, not loaded


def test_wrong_shaped_and_non_tensor_weights_are_named(gpt_run, codes_root, tmp_path):
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    shape = tuple(checkpoint["state_dict"]["gpt.tok_emb.weight"].shape)
    checkpoint["state_dict"]["gpt.tok_emb.weight"] = torch.zeros(shape[0] + 1, shape[1])
    path = tmp_path / "misshaped.ckpt"
    torch.save(checkpoint, path)
    for load in (load_gpt, SuperResPipeline.from_checkpoint):
        with pytest.raises(CheckpointError, match=f"(?s){path} does not fit .*tok_emb.weight: checkpoint"):
            load(path)
    vqgan = read_checkpoint(codes_root.parent / "vqgan.ckpt")
    vqgan["state_dict"]["vqgan.quantize.embedding.weight"] = torch.zeros(3, 3)
    vqgan["state_dict"]["vqgan.quant_conv.bias"] = "not a tensor"
    path = tmp_path / "vqgan_bad.ckpt"
    torch.save(vqgan, path)
    with pytest.raises(CheckpointError, match=f"{path}: weights that are not tensors: quant_conv.bias"):
        load_vqgan(path)
    del vqgan["state_dict"]["vqgan.quant_conv.bias"]
    torch.save(vqgan, path)
    with pytest.raises(CheckpointError, match="quantize.embedding.weight: checkpoint .3, 3."):
        load_vqgan(path)


def test_foreign_dict_subclasses_are_refused_not_rebuilt(tmp_path):
    """torch's weights-only loading fills plain dicts only: a dict subclass with items is named and refused."""
    path = tmp_path / "settings.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": Settings(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match=f"{path} was refused.*Settings"):
        read_checkpoint(path)


def test_train_py_refuses_to_resume_from_a_pickle_that_runs_code(gpt_run, codes_root, tmp_path, monkeypatch):
    """The resume path as train.py runs it: a real Trainer with t2i's checkpoint IO."""
    from test_resume import _config

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1]))
    import train

    marker = tmp_path / "written_by_the_checkpoint"
    checkpoint = read_checkpoint(gpt_run / "checkpoints" / "last.ckpt")
    checkpoint["payload"] = RunsCode(open, str(marker), "w")
    path = tmp_path / "hostile.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path} pickles objects beyond tensors and containers .io.open."):
        train.train_lightning_stage(_config(codes_root, tmp_path / "run", f"ckpt_path={path}", quiet=True))
    assert not marker.exists()
