"""Optional features and the pip extra that brings each (pyproject.toml's optional-dependencies).

`pip install .` installs what training, sampling and the core evaluation (FID/IS, Caption Loss,
captions, the shapes oracle) need; a feature outside it stops at once with the command that adds it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (the pip extra that installs it, what needs it)
EXTRAS = {
    "transformers": ("eval", "the Chinese-CLIP metrics (score, R-precision, CLIP reranking)"),
    "gradio": ("demo", "the web demo"),
    "peft": ("lora", "LoRA adapters (stage.lora, adapter=)"),
    "wandb": ("wandb", "logging to Weights & Biases (logger=wandb)"),
    "hydra_plugins.hydra_optuna_sweeper": ("sweeps", "Optuna searches (hparams_search=...)"),
    "hydra_plugins.hydra_submitit_launcher": ("sweeps", "SLURM jobs (hydra/launcher=slurm)"),
}


def require(module: str, instead: str | None = None) -> ModuleType:
    """Import an optional module, or raise an error naming the extra that installs it (and `instead`:
    the setting that does without it)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra, feature = EXTRAS[module]
        alternative = f", or {instead}" if instead else ""
        raise ModuleNotFoundError(f"{feature} needs {module.split('.')[-1]}, which is not installed: "
                                  f"pip install 't2i[{extra}]' (from a clone: pip install -e '.[{extra}]')"
                                  f"{alternative}", name=module) from error


def require_logger(logger: dict | None) -> None:
    """The logger's package, before a run builds anything (Lightning's CSV logger needs none)."""
    if logger and str(logger.get("_target_", "")).endswith("WandbLogger"):
        require("wandb", instead="logger=csv")

