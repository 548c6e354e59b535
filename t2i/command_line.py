"""Checks of an entry point's command line before Hydra composes it: Hydra's own errors for these name
neither the new setting nor the package to install.

- Renamed settings: the old spelling is refused with the new one (one name per concept, the same place in
  every entry point: checkpoints are top-level `*_ckpt` settings, how a step runs is `sampling.step`, ...).
- Sweeps that need a Hydra plugin (an optional extra) say which extra to install.
"""

from __future__ import annotations

from t2i.extras import require

# entry point -> {old setting: new setting}
RENAMED = {
    "train": {"stage.init_ckpt": "init_ckpt", "stage.vqgan_ckpt": "vqgan_ckpt"},
    "eval": {"eval.caption_ckpt": "caption_ckpt", "superres.vqgan_ckpt": "superres_vqgan_ckpt",
             "caption.method": "caption.strategy", "eval.samples_per_prompt": "sampling.samples_per_prompt",
             "eval.batch_size": "sampling.batch_size", "sampling.decode": "sampling.step"},
    "demo": {"decode": "sampling.step", "sampling.decode": "sampling.step", "weights": "sampling.weights",
             "sampling.rerank": "rerank"},
}

# command-line overrides that need a Hydra plugin, which Hydra looks for before any of our code runs
PLUGIN_OVERRIDES = {"hparams_search=": "hydra_plugins.hydra_optuna_sweeper",
                    "hydra/launcher=slurm": "hydra_plugins.hydra_submitit_launcher"}


def check_command_line(entry: str, argv: list[str]) -> None:
    """Raise SystemExit naming the new spelling of a renamed setting; require the plugins a sweep needs."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key in RENAMED[entry]:
            raise SystemExit(f"{key} is now {RENAMED[entry][key]}: write {RENAMED[entry][key]}={value or '...'}")
        for override, module in PLUGIN_OVERRIDES.items():
            if arg.startswith(override) and not arg.endswith("=null"):
                require(module)
