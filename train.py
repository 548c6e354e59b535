"""Train one stage of the pipeline: python train.py stage=tokenizer data=shapes [key=value ...]"""

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from t2i.data.datamodule import DataConfig
from t2i.data.tokenizer import fit_tokenizer

log = logging.getLogger("train")


def train_tokenizer(cfg: DictConfig) -> dict:
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    stats = fit_tokenizer(
        data.captions("train"), data.tokenizer_path, data.tokenizer.vocab_size, data.tokenizer.model_type,
        text_len=data.text_len, character_coverage=cfg.stage.character_coverage,
        max_sentences=cfg.stage.max_sentences, seed=cfg.seed,
    )
    log.info("tokenizer: %s", json.dumps(stats, ensure_ascii=False))
    return stats


STAGES = {"tokenizer": train_tokenizer}


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    return STAGES[cfg.stage.name](cfg)


if __name__ == "__main__":
    main()
