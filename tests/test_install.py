"""`pip install .` without extras: what it installs is enough for training, sampling and the core
evaluation, and every optional feature stops at once naming the extra that brings it.

The environment without extras is this test environment's site-packages less the extras'
distributions (their files and metadata), seen by a fresh virtualenv: what `pip install .` would give,
without installing torch again."""

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from t2i.extras import EXTRAS

REPO = Path(__file__).parents[1]
EXTRA_DISTRIBUTIONS = ["transformers", "gradio", "wandb", "hydra-optuna-sweeper", "hydra-submitit-launcher", "peft"]


def _site_packages_without(view: Path, hidden: set[str], source: Path) -> None:
    """Mirror the folder `source` into `view` by symlinks, leaving out the entries named in `hidden`."""
    view.mkdir()
    for entry in source.iterdir():
        if entry.name not in hidden:
            (view / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def core_python(tmp_path_factory) -> str:
    """A Python whose packages are this environment's less the extras' distributions."""
    root = tmp_path_factory.mktemp("core_install")
    site = Path(importlib.metadata.distribution("torch").locate_file(""))
    hidden = {file.parts[0] for name in EXTRA_DISTRIBUTIONS for file in importlib.metadata.distribution(name).files
              if file.parts[0] != ".."}  # their packages and metadata (hydra_plugins/ holds only the two plugins)
    _site_packages_without(root / "site", hidden, site)
    venv.create(root / "venv", with_pip=False)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    # site.addsitedir also runs the .pth files there (the editable install of t2i among them)
    (root / "venv" / "lib" / version / "site-packages" / "view.pth").write_text(
        f"import site; site.addsitedir({str(root / 'site')!r})\n")
    return str(root / "venv" / "bin" / "python")


def _run(python: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "WANDB"))}
    return subprocess.run([python, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_core_install_has_no_extras(core_python):
    probe = _run(core_python, "-c", "import importlib, json, t2i, torch, lightning, hydra, webdataset\n"
                 "def found(module):\n"
                 "    try:\n        return bool(importlib.import_module(module))\n"
                 "    except ImportError:\n        return False\n"
                 f"print(json.dumps({{m: found(m) for m in {sorted(EXTRAS)!r}}}))")
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert json.loads(probe.stdout) == {module: False for module in EXTRAS}
    core = [r for r in importlib.metadata.requires("t2i") if "extra ==" not in r]
    assert not [r for r in core if r.split(">")[0].split("=")[0].strip() in EXTRA_DISTRIBUTIONS], core


def test_eval_without_extras_works_or_names_the_extra(core_python, gpt_run, codes_root, tmp_path):
    ckpt = gpt_run / "checkpoints" / "last.ckpt"
    data = [f"ckpt={ckpt}", "data=shapes_codes", f"data.root={codes_root}", "split=val", "eval.num_prompts=2",
            "eval.fid=false", "sampling.batch_size=2"]
    defaults = _run(core_python, "eval.py", *data, f"hydra.run.dir={tmp_path / 'a'}")
    assert defaults.returncode != 0
    assert "pip install 't2i[eval]'" in defaults.stderr and "eval.clip=false" in defaults.stderr
    assert not (tmp_path / "a" / "results.json").exists()
    core = _run(core_python, "eval.py", *data, "eval.clip=false", f"hydra.run.dir={tmp_path / 'b'}")
    assert core.returncode == 0, core.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["task"] == "t2i"


FEATURES = [  # (command, the extra it needs)
    (["train.py", "logger=wandb", "data=shapes_codes"], "wandb"),
    (["train.py", "-m", "hparams_search=gpt_optuna", "experiment=shapes"], "sweeps"),
    (["train.py", "-m", "hydra/launcher=slurm", "experiment=shapes"], "sweeps"),
    (["eval.py", "ckpt=GPT.ckpt", "logger=wandb"], "wandb"),
    (["-m", "t2i.demo", "ckpt=GPT.ckpt"], "demo"),
    (["eval.py", "task=generate", "ckpt=GPT.ckpt", "adapter=ADAPTER.ckpt", "prompts=[x]"], "lora"),
]
def test_each_optional_feature_names_its_extra(core_python, tmp_path):
    commands = [[*command, f"hydra.run.dir={tmp_path / str(i)}"] for i, (command, _) in enumerate(FEATURES)]
    result = _run(core_python, "tests/run_each.py", json.dumps(commands))
    assert result.returncode == 0, result.stderr[-3000:]
    for (command, extra), (code, said) in zip(FEATURES, json.loads(result.stdout.splitlines()[-1])):
        assert code != 0 and f"pip install 't2i[{extra}]'" in said, (command, said[-2000:])
