"""The commands users type do what they say: the used-by command trains the large GPT on MUGE over 8
GPUs, train.py resolves its stage, data and precision from what is asked and what is on disk, and says
its plan before it starts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from t2i.data.datamodule import DataConfig
from t2i.plan import auto_precision, gpt_data_root, resolve_run

REPO = Path(__file__).parents[1]


def compose_train(overrides: list[str], run_dir: Path):
    """train.py's config for `overrides`, writing to run_dir (Hydra's run-dir settings given directly)."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=[
            *overrides, f"trainer.default_root_dir={run_dir}",
            f"callbacks.model_checkpoint.dirpath={run_dir / 'checkpoints'}", f"logger.save_dir={run_dir}"])


def fake_gpus(monkeypatch, count: int = 8, bf16: bool = True) -> None:
    """A machine with `count` CUDA GPUs as far as the device check and precision choice can tell."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


@pytest.fixture
def data_dir(codes_root, tmp_path, monkeypatch):
    """paths.data_dir with MUGE as the tests' tiny shards: data/muge (images) and data/muge_codes (codes)."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(codes_root.parent / "shapes", data / "muge")  # image shards
    (data / "muge_codes").symlink_to(codes_root)
    monkeypatch.setenv("T2I_DATA_DIR", str(data))
    return data


def test_the_used_by_command_trains_the_large_gpt_on_muge_codes_over_8_gpus(data_dir, tmp_path, monkeypatch, caplog):
    sys.path.insert(0, str(REPO))
    import train

    fake_gpus(monkeypatch)
    cfg = compose_train(["model=large", "data=muge", "trainer.devices=8", "dry_run=true"], tmp_path / "run")
    with caplog.at_level("INFO"):
        assert train.train_lightning_stage(cfg) == {}  # a dry run: everything built, nothing trained
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["stage"] == "gpt" and plan["model"].startswith("GPT 24 layers x 16 heads x 1024 wide")
    assert 300e6 < plan["parameters"] < 310e6  # 24 x 12.6M blocks + embeddings of the tiny vocabularies
    assert plan["data"] == "muge" and plan["data_kind"] == "codes"
    assert Path(plan["data_root"]) == data_dir / "muge_codes"
    assert (plan["devices"], plan["nodes"], plan["strategy"], plan["precision"]) == (8, 1, "ddp", "bf16-mixed")
    assert plan["effective_batch"] == 8 * cfg.data.batch_size
    assert "the plan:" in caplog.text and "8 per node x 1 node(s), strategy ddp, precision bf16-mixed" in caplog.text


def test_the_used_by_command_stops_before_building_on_a_machine_without_the_gpus(data_dir, tmp_path):
    result = subprocess.run([sys.executable, "train.py", "model=large", "data=muge", "trainer.devices=8",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "trainer.devices=8 but this machine has no CUDA GPU and" in result.stderr
    assert not (tmp_path / "run" / "plan.json").exists()


def test_precision_follows_the_hardware(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert auto_precision("auto") == "32-true" and auto_precision("cpu") == "32-true"
    fake_gpus(monkeypatch, 1, bf16=True)
    assert auto_precision("auto") == "bf16-mixed" and auto_precision("gpu") == "bf16-mixed"
    fake_gpus(monkeypatch, 1, bf16=False)
    assert auto_precision("gpu") == "16-mixed"


def test_fp16_gpus_get_pb_relax_advice(data_dir, tmp_path, monkeypatch, caplog):
    fake_gpus(monkeypatch, 1, bf16=False)
    cfg = compose_train(["model=base", "data=muge", "trainer=gpu"], tmp_path)
    with caplog.at_level("WARNING"):
        resolve_run(cfg)
    assert cfg.trainer.precision == "16-mixed" and "model.pb_relax=true" in caplog.text


def test_a_gpt_reads_code_shards_when_made_else_image_shards_with_a_vqgan(data_dir, tmp_path):
    cfg = compose_train(["data=muge"], tmp_path)
    assert gpt_data_root(cfg) == (str(data_dir / "muge_codes"), "codes")
    with_vqgan = compose_train(["data=muge", "vqgan_ckpt=VQGAN.ckpt"], tmp_path)
    assert gpt_data_root(with_vqgan) == (str(data_dir / "muge"), "image")
    (data_dir / "muge_codes").unlink()
    with pytest.raises(FileNotFoundError) as neither:
        gpt_data_root(cfg)
    message = str(neither.value)
    assert f"python -m t2i.pretokenize --data {data_dir / 'muge'} --out {data_dir / 'muge_codes'}" in message
    assert "vqgan_ckpt=VQGAN.ckpt" in message
    shutil.rmtree(data_dir / "muge")
    with pytest.raises(FileNotFoundError, match="python -m t2i.data.convert muge --src RAW"):
        gpt_data_root(cfg)


def test_the_tokenizer_stage_keeps_an_existing_model(codes_root, tmp_path):
    sys.path.insert(0, str(REPO))
    import train

    root = tmp_path / "shapes"
    shutil.copytree(codes_root.parent / "shapes", root)
    before = (root / "tokenizer.model").read_bytes()

    def fit(*extra):
        cfg = compose_train(["stage=tokenizer", "data=shapes", f"data.root={root}", "data.tokenizer.vocab_size=310",
                             *extra], tmp_path)
        return train.train_tokenizer(cfg)

    with pytest.raises(FileExistsError, match="stage.overwrite=true"):
        fit()
    assert (root / "tokenizer.model").read_bytes() == before
    assert fit("stage.overwrite=true")["vocab_size"] <= 310
    assert (root / "tokenizer.model").read_bytes() != before
    assert DataConfig(root=str(root)).tokenizer_path == root / "tokenizer.model"


def test_old_spellings_are_refused_with_the_new_name(tmp_path):
    """One name per concept: every renamed setting of every entry point is refused, naming its new spelling."""
    from t2i.command_line import RENAMED

    programs = {"train": ["train.py"], "eval": ["eval.py"], "demo": ["-m", "t2i.demo"]}
    cases = [(entry, old, new) for entry, table in RENAMED.items() for old, new in table.items()]
    argvs = [[*programs[entry], f"{old}=X", f"hydra.run.dir={tmp_path}"] for entry, old, _ in cases]
    result = subprocess.run([sys.executable, "tests/run_each.py", json.dumps(argvs)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for (entry, old, new), (code, said) in zip(cases, json.loads(result.stdout.splitlines()[-1])):
        assert code != 0 and f"{old} is now {new}: write {new}=X" in said, (entry, old, said[-1000:])
    for entry, table in RENAMED.items():  # the new names are settings the entry point has
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose({"train": "train", "eval": "eval", "demo": "demo"}[entry])
        for new in table.values():
            assert OmegaConf.select(cfg, new, default="missing") != "missing", (entry, new)
