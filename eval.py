"""Evaluate: python eval.py task=oracle data=shapes [split=test]"""

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from t2i.data.datamodule import ShardDataModule
from t2i.data.shapes import oracle_accuracy

log = logging.getLogger("eval")


def oracle_on_real_images(cfg: DictConfig) -> dict:
    """How often the shapes oracle reads the true attributes off the dataset's own images."""
    dm = ShardDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    images, attributes = [], []
    for batch in tqdm(dm.loader(cfg.split), desc=f"oracle on {cfg.split}"):
        if any("attributes" not in meta for meta in batch["meta"]):
            raise ValueError(f"task=oracle needs samples with true attributes (data=shapes), not data={cfg.data.name}")
        images += list(batch["image"].permute(0, 2, 3, 1).numpy())
        attributes += [meta["attributes"] for meta in batch["meta"]]
    return {"task": "oracle", "data": cfg.data.name, "split": cfg.split, "images": len(images),
            "accuracy": oracle_accuracy(images, attributes)}


TASKS = {"oracle": oracle_on_real_images}


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task} is not one of: {', '.join(TASKS)}")
    results = TASKS[cfg.task](cfg)
    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, ensure_ascii=False, indent=1))
    log.info("%s\nwritten to %s", json.dumps(results, ensure_ascii=False, indent=1), out)
    return results


if __name__ == "__main__":
    main()
