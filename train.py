"""Train one stage of the pipeline: python train.py stage=<tokenizer|vqgan|gpt> data=<name> [key=value ...]"""

import json
import logging

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from t2i.data.datamodule import DataConfig, ShardDataModule
from t2i.data.tokenizer import fit_tokenizer
from t2i.stages.gpt_stage import GPTStage
from t2i.stages.vqgan_stage import VQGANStage

log = logging.getLogger("train")

LIGHTNING_STAGES = {"vqgan": VQGANStage, "gpt": GPTStage}


def train_tokenizer(cfg: DictConfig) -> dict:
    data = DataConfig.from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    stats = fit_tokenizer(
        data.captions("train"), data.tokenizer_path, data.tokenizer.vocab_size, data.tokenizer.model_type,
        text_len=data.text_len, character_coverage=cfg.stage.character_coverage,
        max_sentences=cfg.stage.max_sentences, seed=cfg.seed,
    )
    log.info("tokenizer: %s", json.dumps(stats, ensure_ascii=False))
    return stats


def train_lightning_stage(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    datamodule = ShardDataModule(OmegaConf.to_container(cfg.data, resolve=True))
    stage = LIGHTNING_STAGES[cfg.stage.name].from_config(cfg, datamodule)
    logger = instantiate(cfg.logger) if cfg.logger else False
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the resolved config (W&B: the run config)
    trainer = L.Trainer(**cfg.trainer, logger=logger,
                        callbacks=[instantiate(callback) for callback in cfg.callbacks.values()])
    trainer.fit(stage, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    log.info("final metrics: %s", json.dumps(metrics))
    return metrics


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    if cfg.stage.name == "tokenizer":
        return train_tokenizer(cfg)
    return train_lightning_stage(cfg)


if __name__ == "__main__":
    main()
