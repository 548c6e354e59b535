"""GPTStage: trains the text-to-image GPT on code shards with Lightning.

Each batch becomes token sequences of the model's token layout (t2i.models.layout):

    text to image:  [T2I] text [BOI] codes      (text replaced by padding with prob. cond_drop:
                    (pai-painter: text codes)    the null text of classifier-free guidance)
    image to text:  [I2T] codes [BOT] text      (with prob. caption_prob: the captioning direction
                                                 that Caption Loss and reranking use; t2i layout only)

Validation scores text to image, except a captioner's (caption_prob 1, experiment=shapes_captioner): its
captions, so that its val/loss and the checkpoint monitor follow what it learns.

Loss: CogView's per-token weighting, sum(w * CE) / sum(w) over the image tokens (w = 1) and the
text tokens (w = txt_loss_scale; padding excluded, except with `caption_end` the first padding after
a caption, so that captioning learns where to stop), each position competing only within its own id
range; txt_loss_scale = 0 is EasyNLP's image-only loss (the only one a pai-painter model, whose head
scores image codes only, can take). `pkeep` < 1 replaces that fraction of the *input* image codes
by random codes (targets stay true), as taming/EasyNLP do, drawing only from the image codes.
`init_ckpt` starts from a GPT checkpoint (e.g. an imported pai-painter model): its architecture,
layout, weights and tokenizer, fine-tuned on the data given.

Super-resolution (`stage.superres`, CogView's second model): code shards pre-tokenized with
`--superres-size` hold each image's codes at two sizes; the model (layout "superres") reads
`[SR] text [LOW] low-res codes [WIN_k] window of the 2x codes`, one window per sample (drawn at random
in training, window i % windows for sample i in validation), and learns the window's codes.

Codes come from code shards (fast path: `python -m t2i.pretokenize`) or from image shards encoded
on the fly by a frozen VQGAN (`vqgan_ckpt`, EasyNLP's way): the data manifest decides.
Every `sample_every_n_steps` steps rank 0 samples images for fixed prompts (the first validation
captions unless `stage.sample_prompts` names them) and logs the grid with its captions.

Speed switches (conf/stage/gpt.yaml; none changes what is computed): `compile` runs the GPT's training
and validation forward through torch.compile (the sample grids' steps run as `sample_step` says: auto, as in
eval.py, resolved at the first grid for the run);
`fused_optimizer` picks the optimizer's single-kernel implementation (auto: on CUDA);
`activation_checkpointing` recomputes each block's activations in the backward pass. The run's log
records what each resolved to (run/...).
"""

from __future__ import annotations

import inspect
import itertools
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from t2i.adapters import add_lora, adapter_record, adapter_weights, load_adapter_weights
from t2i.checkpoints import (
    GPTRecord,
    SuperresRecord,
    TokenizerRecord,
    TrainingRecord,
    VQGANRecord,
    load_gpt,
    load_record_vqgan,
    load_vqgan,
    vqgan_identity,
    weights_hash,
)
from t2i.extras import require
from t2i.models.gpt import GPT, GPTConfig
from t2i.models.layout import SuperresGrid
from t2i.models.vqgan import VQGANConfig, VQModel
from t2i.sampling import T2IPipeline, write_samples
from t2i.sampling.steps import release_steps
from t2i.stages.configs import GPTStageConfig, SuperresOptions, typed_stage_config
from t2i.stages.scaling import apply_lr_scaling, grad_norm, run_steps, warmup_cosine, weight_decay_groups


class GPTStage(L.LightningModule):
    def __init__(
        self,
        model: GPTConfig,
        stage: GPTStageConfig,
        optimizer: Callable,  # param groups -> torch.optim.Optimizer (a Hydra partial)
        record: GPTRecord | None = None,  # what the checkpoints carry: tokenizer, VQGAN identity, training, sampling
        vqgan: VQModel | None = None,  # frozen: encodes image shards, decodes sample grids
        sample_prompts: list[str] | None = None,
        superres: SuperresGrid | None = None,  # a super-resolution GPT's windows (layout "superres")
    ):
        super().__init__()
        # what the config alone decides is checked by GPTStageConfig; here what needs the model too
        if (superres is not None) != (model.layout == "superres"):
            raise ValueError("a superres-layout GPT trains with stage.superres (its windows), and only it")
        if not model.tokens.captions and stage.caption_prob and model.tokens.predicts_text:
            raise ValueError(f"a {model.layout}-layout model has no captioning direction: set stage.caption_prob=0")
        if not model.tokens.predicts_text and (stage.txt_loss_scale or stage.caption_prob):
            raise ValueError(f"a {model.layout}-layout model has no text head: set stage.txt_loss_scale=0 and "
                             "stage.caption_prob=0 (experiment=paipainter_finetune does)")
        self.stage_config = stage
        self.gpt = GPT(model)
        self.gpt.checkpoint_activations = stage.activation_checkpointing
        # counted once, before any strategy shards the weights
        self.flops_per_sequence = self.gpt.flops_per_sequence(model.block_size - 1)
        self._compiled_step = None  # forward_loss through torch.compile (configure_model)
        self.optimizer = optimizer
        self.record = record
        # kept out of the module tree: never trained, never saved in the state dict, never wrapped by DDP
        self._frozen = {"vqgan": vqgan.requires_grad_(False).eval() if vqgan is not None else None}
        # sample grids: on_fit_start turns them off where rank 0 cannot draw them
        self.sample_prompts = list(sample_prompts or [])
        self.sample_every_n_steps = stage.sample_every_n_steps
        self.sampling = stage.sampling
        self._sample_step = stage.sample_step  # "auto" until the first grid resolves it, for the whole run
        self._sample_tokenizer = None  # the record's tokenizer, loaded at the first grid
        self._image_dir: Path | None = None  # <log dir>/images, set when fitting starts
        self.superres = superres

    @classmethod
    def from_config(cls, cfg: DictConfig, datamodule) -> "GPTStage":
        """Architecture from `model` and sizes from the data it will read, or everything from `init_ckpt`."""
        stage: GPTStageConfig = typed_stage_config(cfg.stage)
        init_ckpt = cfg.init_ckpt
        if stage.lora is not None and not init_ckpt:
            raise ValueError("stage.lora trains an adapter on a trained GPT, whose weights stay frozen: set "
                             "init_ckpt=BASE.ckpt")
        if stage.lora is not None:  # at once, not after the data and the base have loaded
            require("peft")
        init_gpt, init_record = load_gpt(init_ckpt) if init_ckpt else (None, None)
        if init_record is not None:  # fine-tune: the checkpoint's model, layout and tokenizer
            datamodule.use_tokenizer(init_record.tokenizer_model())
        manifest = datamodule.cfg.manifest()
        superres = _superres_grid(stage.superres, manifest, datamodule.cfg.root)
        if superres is not None and stage.sample_every_n_steps:
            warnings.warn("no sample grids while training a super-resolution GPT (they need low-resolution codes): "
                          "score it with python eval.py task=superres")
            stage = replace(stage, sample_every_n_steps=0)
        if manifest.get("kind") == "codes":  # fast path: the VQGAN is needed only to draw sample grids
            vqgan_record = VQGANRecord(config=VQGANConfig(**manifest["vqgan"]),
                                       checkpoint=manifest.get("vqgan_checkpoint"),
                                       sha256=manifest.get("vqgan_sha256"), grid=list(manifest["grid"]))
            vqgan = _vqgan_for_samples(vqgan_record) if stage.sample_every_n_steps else None
        else:
            vqgan, vqgan_record = _vqgan_for_images(cfg, datamodule, init_record)
        if superres is not None:  # the model writes the 2x grid's windows
            vqgan_record = replace(vqgan_record, grid=list(superres.high))
        if init_record is None:
            model = _model_config(cfg.model, datamodule.tokenizer, vqgan_record, superres)
            origin = "trained from scratch"
        else:
            _check_fine_tuning(init_ckpt, init_record, vqgan_record, superres)
            model = init_record.gpt
            how = "a LoRA adapter on" if stage.lora is not None else "fine-tuned from"
            origin = f"{how} {init_ckpt} ({init_record.training.origin or 'a t2i run'})"
        record = GPTRecord(
            gpt=model, tokenizer=TokenizerRecord.of(datamodule.tokenizer), vqgan=vqgan_record,
            training=TrainingRecord(caption_prob=stage.caption_prob, caption_end=stage.caption_end,
                                    txt_loss_scale=stage.txt_loss_scale, cond_drop=stage.cond_drop, origin=origin),
            sampling=asdict(stage.sampling),
            superres=None if superres is None else SuperresRecord.of(superres, manifest["image_size"],
                                                                     manifest["hr_image_size"]),
            adapter=None if stage.lora is None else adapter_record(stage.lora, init_gpt, init_ckpt))
        module = cls(model, stage, instantiate(cfg.optim), record=record, vqgan=vqgan,
                     sample_prompts=_sample_prompts(stage, datamodule), superres=superres)
        if init_gpt is not None:
            module.gpt.load_state_dict(init_gpt.state_dict())
        if stage.lora is not None:  # attached to the loaded weights (it renames the layers it wraps)
            add_lora(module.gpt, stage.lora)
        return module

    @property
    def vqgan(self) -> VQModel | None:
        return self._frozen["vqgan"]

    # -- sequences and loss --------------------------------------------------------------------

    def sequences(self, codes: torch.Tensor, text: torch.Tensor, train: bool,
                  hr_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input tokens, target tokens) [B, block_size - 1] for codes [B, N] and text ids [B, L]; a
        super-resolution GPT also takes the 2x grids hr_codes [B, H, W] (codes are then the low-resolution ones)."""
        layout = self.gpt.layout
        b = len(codes)
        low = window = None
        if self.superres is not None:
            if hr_codes is None:
                raise ValueError("a super-resolution GPT trains on code shards with two grids per image: pre-tokenize "
                                 "with python -m t2i.pretokenize ... --superres-size S")
            if train:
                window = torch.randint(self.superres.windows, (b,), device=codes.device)
            else:  # the same windows at every validation: sample i's is i % windows
                window = torch.arange(b, device=codes.device) % self.superres.windows
            low = self.superres.low_context(codes.view(b, *self.superres.low), window)
            codes = self.superres.crop(hr_codes, window)
        inputs_codes = codes
        options = self.stage_config
        if train and options.cond_drop:
            null = torch.rand(b, 1, device=codes.device) < options.cond_drop
            text = torch.where(null, layout.null_text(text), text)
        if train and options.pkeep < 1:
            random = torch.rand(codes.shape, device=codes.device) > options.pkeep
            inputs_codes = torch.where(random, torch.randint_like(codes, layout.n_image_codes), codes)
        captions = None  # validation scores text to image, except a captioner's (caption_prob 1): its captions
        if options.caption_prob >= 1:
            captions = torch.ones(b, dtype=torch.bool, device=codes.device)
        elif train and options.caption_prob:
            captions = torch.rand(b, device=codes.device) < options.caption_prob

        def sequence(image: torch.Tensor) -> torch.Tensor:
            t2i = layout.text_to_image(text, image, low, 0 if window is None else window)
            if captions is None:
                return t2i
            return torch.where(captions[:, None], layout.image_to_text(image, text), t2i)

        targets = sequence(codes)
        inputs = sequence(inputs_codes) if inputs_codes is not codes else targets
        return inputs[:, :-1], targets[:, 1:]

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """CogView's per-token weighting: sum(w * CE) / sum(w), w = 1 per image token and txt_loss_scale
        per text token (padding excluded); image and text CE are logged apart (their means).

        Every position's CE is computed over its id range and the positions that count are summed by
        mask, not picked out by boolean indexing: no data-dependent shapes, so no host synchronisation,
        and one graph with the model under stage.compile."""
        layout = self.gpt.layout

        def summed_ce(range_logits: torch.Tensor, where: torch.Tensor, ids: torch.Tensor):
            ce = F.cross_entropy(range_logits.float().flatten(0, 1), torch.where(where, ids, 0).flatten(),
                                 reduction="none").view_as(ids)
            weight = where.float()
            return (ce * weight).sum(), weight.sum()

        image_sum, n_image = summed_ce(layout.image_logits(logits), layout.image_targets(targets), targets)
        text_sum = n_text = logits.new_zeros((), dtype=torch.float32)
        if layout.predicts_text:
            text = layout.text_targets(targets)
            if self.stage_config.caption_end:  # the first padding of a caption is a target too: where captioning stops
                text = text | layout.caption_end_targets(targets)
            text_sum, n_text = summed_ce(layout.text_logits(logits), text, targets - layout.text_offset)
        w = self.stage_config.txt_loss_scale
        loss = (image_sum + w * text_sum) / (n_image + w * n_text)
        return loss, {"image_loss": (image_sum / n_image.clamp_min(1)).detach(),
                      "text_loss": (text_sum / n_text.clamp_min(1)).detach()}

    def _codes(self, batch: dict) -> torch.Tensor:
        if self.superres is not None and "codes" not in batch:
            raise ValueError("a super-resolution GPT trains on code shards (python -m t2i.pretokenize ... "
                             "--superres-size S), not on image shards")
        if "codes" in batch:
            return batch["codes"].flatten(1)
        # slow path (image shards): encode is exact fp32 whatever the trainer's precision, as pre-tokenization
        return self.vqgan.encode(batch["image"]).flatten(1)

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The training and validation step's model and loss (one compiled graph with stage.compile)."""
        if self._compiled_step is not None:
            return self._compiled_step(inputs, targets)
        return self.loss(self.gpt(inputs), targets)

    def configure_model(self) -> None:
        if self.stage_config.compile and self._compiled_step is None:
            # a compiled function, not a compiled module: the GPT's parameters, state dict and checkpoints stay
            # as they are (torch.compile of the module would rename every key to _orig_mod.*), sampling stays eager
            self._compiled_step = torch.compile(lambda inputs, targets: self.loss(self.gpt(inputs), targets),
                                                mode=self.stage_config.compile_mode)

    def on_fit_start(self) -> None:
        if self.vqgan is not None:
            self.vqgan.to(self.device)
        if self.sample_every_n_steps and isinstance(self.trainer.strategy, FSDPStrategy):
            # rank 0 alone cannot run a model whose weights are sharded over all ranks
            warnings.warn("no sample grids during training under FSDP: draw them from a checkpoint with "
                          "`python eval.py task=generate ckpt=...`")
            self.sample_every_n_steps = 0
        # under DDP trainer.log_dir is a collective call: ask on every rank, once, not on rank 0 alone later
        self._image_dir = Path(self.trainer.log_dir) / "images" if self.trainer.log_dir else None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs, targets = self.sequences(self._codes(batch), batch["text"], train=True, hr_codes=batch.get("hr_codes"))
        loss, logs = self.forward_loss(inputs, targets)
        # averaged over processes (one small all-reduce each): what is logged is the whole batch's loss
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, sync_dist=True)
        return loss

    def throughput_counts(self, batch: dict) -> tuple[int, int, int]:
        """(samples, input tokens, training FLOPs) of a batch on this device (t2i.callbacks.TrainingThroughput)."""
        samples = len(batch["text"])
        return samples, samples * (self.gpt.cfg.block_size - 1), samples * self.flops_per_sequence

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs, targets = self.sequences(self._codes(batch), batch["text"], train=False, hr_codes=batch.get("hr_codes"))
        loss, logs = self.forward_loss(inputs, targets)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(inputs))
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True, batch_size=len(inputs))

    # -- sample grids ------------------------------------------------------------------------------

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        every = self.sample_every_n_steps
        if not (every and self.vqgan is not None and self.sample_prompts and self.trainer.is_global_zero):
            return
        # the hook runs after every batch, global_step counts optimizer steps: with accumulate_grad_batches
        # > 1 only the batch that completed a step (every accumulate_grad_batches-th, or an epoch's last) draws
        stepped = ((batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
                   or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if stepped and self.global_step % every == 0:
            self.log_samples()

    @torch.no_grad()
    def log_samples(self) -> None:
        """Images for the fixed prompts: a PNG grid (a row per prompt) + captions, and the logger's image panel."""
        if self._sample_tokenizer is None:
            self._sample_tokenizer = self.record.tokenizer_model()
        was_training = self.gpt.training
        # task=generate's path (T2IPipeline.sample, seeded by prompt_seeds): the grid shows what generate would
        # draw; one sampling batch of every prompt's samples
        pipeline = T2IPipeline(self.gpt, self._sample_tokenizer, self.vqgan, self.record, step=self._sample_step)
        per_prompt = self.sampling.samples_per_prompt
        samples = pipeline.sample(self.sample_prompts, self.sampling, batch_size=len(self.sample_prompts) * per_prompt)
        self._sample_step = pipeline.step_mode
        if self._sample_step == "frozen":  # it holds these weights: the next grid compiles with the trained ones
            release_steps(self.gpt)
        self.gpt.train(was_training)
        images = samples.images
        if self._image_dir is not None:
            write_samples(samples, self._image_dir, grid_name=f"samples-step{self.global_step:07d}", each_sample=False)
        if hasattr(self.logger, "log_image"):  # W&B: one image per prompt, captioned
            rows = [torch.cat(list(images[i * per_prompt:(i + 1) * per_prompt]), dim=2)
                    for i in range(len(self.sample_prompts))]
            self.logger.log_image("val/samples", rows, step=self.global_step, caption=self.sample_prompts)

    # -- optimisation ------------------------------------------------------------------------

    def on_before_optimizer_step(self, optimizer) -> None:
        # before Lightning's clipping (trainer.gradient_clip_val), after fp16 unscaling; under FSDP the norm of
        # the whole gradient, not of this process's shard
        self.log("train/grad_norm", grad_norm(self.gpt.parameters(), self.trainer.model))

    def configure_optimizers(self):
        # weight decay on matrices only: not on biases, LayerNorms, embeddings or positions (by module type:
        # under FSDP this runs after wrapping, when every parameter is a flat 1-D shard)
        fused = self._fused_optimizer()
        optimizer = self.optimizer(weight_decay_groups(self.gpt, self.stage_config.weight_decay),
                                   **({"fused": True} if fused else {}))
        if self.logger is not None:  # what the switches resolved to on this machine
            self.logger.log_hyperparams({"run/compile": self.stage_config.compile, "run/fused_optimizer": fused,
                                         "run/activation_checkpointing": self.gpt.checkpoint_activations,
                                         "run/matmul_precision": torch.get_float32_matmul_precision(),
                                         "run/precision": str(self.trainer.precision)})
        options = self.stage_config
        apply_lr_scaling(self, [optimizer], options.lr_scaling, options.lr_reference_batch,
                         tokens_per_sample=self.gpt.cfg.block_size - 1)
        # linear warmup, then a cosine to min_lr_ratio over the run (no length needed when nothing decays)
        total = run_steps(self.trainer, constant="stage.min_lr_ratio=1") if options.min_lr_ratio != 1 else None
        warmup, min_ratio = options.warmup_steps, options.min_lr_ratio
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, min_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _fused_optimizer(self) -> bool:
        """Whether to build the optimizer fused: "auto" on CUDA when the optimizer class can be."""
        factory = self.optimizer
        cls = getattr(factory, "func", factory)  # a Hydra partial
        takes_fused = "fused" in inspect.signature(cls).parameters
        fused = self.stage_config.fused_optimizer
        if fused is True and not takes_fused:
            raise ValueError(f"stage.fused_optimizer=true but {getattr(cls, '__name__', cls)} has no fused "
                             "implementation: set stage.fused_optimizer=auto or false")
        if fused == "auto":
            return takes_fused and self.device.type == "cuda"
        return bool(fused)

    # -- checkpoints: everything sampling needs ------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.record is not None:  # a GPTStage built by hand, without one, trains but saves no record
            checkpoint["t2i"] = self.record.to_dict()
        if self.stage_config.lora is not None:  # the adapter's weights only: the base is init_ckpt, known by hash
            gpt_state = {k[len("gpt."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("gpt.")}
            checkpoint["state_dict"] = {f"gpt.{k}": v for k, v in adapter_weights(self.gpt, gpt_state).items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.stage_config.lora is None:
            return
        # resuming a LoRA run: its checkpoint holds the adapter only, on the base this run loaded from init_ckpt
        saved = (checkpoint.get("t2i") or {}).get("adapter") or {}
        if self.record is not None and saved.get("base_sha256") != self.record.adapter.base_sha256:
            raise ValueError(f"the checkpoint resumed holds an adapter of another base ({saved.get('base_checkpoint')}) "
                             f"than init_ckpt ({self.record.adapter.base_checkpoint}): resume with the same init_ckpt")
        adapter = {k[len("gpt."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("gpt.")}
        load_adapter_weights(self.gpt, adapter, "the checkpoint resumed")
        checkpoint["state_dict"] = self.state_dict()  # the base's and the adapter's weights, as Lightning loads them


def _superres_grid(options: SuperresOptions | None, manifest: dict, root) -> SuperresGrid | None:
    """stage.superres ({window, stride} in codes of the 2x grid) on code shards with two grids, or None."""
    if options is None:
        return None
    if manifest.get("kind") != "codes" or "hr_grid" not in manifest:
        raise ValueError(f"stage.superres needs code shards with a second, 2x grid per image; {root} has none: "
                         "python -m t2i.pretokenize --data IMAGE_SHARDS --out CODE_SHARDS --vqgan CKPT --superres-size S")
    high = manifest["hr_grid"]
    return SuperresGrid(low=manifest["grid"], high=high, window=options.window or high,
                        stride=options.stride or options.window or high, context=options.context or "whole")


def _model_config(model: DictConfig, tokenizer, vqgan: VQGANRecord, superres: SuperresGrid | None) -> GPTConfig:
    """The `model` architecture with the sizes of the data it reads: its tokenizer, its VQGAN's codes and grid."""
    h, w = vqgan.grid
    sizes = {"image_len": h * w}
    if superres is not None:  # the window's codes after the whole low-resolution grid
        sizes = {"image_len": superres.window_len, "layout": "superres", "low_len": superres.low_len,
                 "windows": superres.windows}
    return GPTConfig(**{**OmegaConf.to_container(model, resolve=True), **sizes}, n_image_codes=vqgan.config.n_embed,
                     n_text_tokens=tokenizer.vocab_size, text_len=tokenizer.text_len)


def _sample_prompts(stage: GPTStageConfig, datamodule) -> list[str]:
    """stage.sample_prompts, or the first num_sample_prompts validation captions when grids are drawn."""
    if not stage.sample_every_n_steps or stage.sample_prompts:
        return stage.sample_prompts
    if datamodule.cfg.splits.get("val") not in datamodule.cfg.manifest()["splits"]:
        raise ValueError("sample grids need prompts: set stage.sample_prompts=[...] (this data has no val "
                         "split to take them from) or stage.sample_every_n_steps=0")
    return list(itertools.islice(datamodule.cfg.captions("val"), stage.num_sample_prompts))


def _check_fine_tuning(init_ckpt: str, record: GPTRecord, data_vqgan: VQGANRecord,
                       superres: SuperresGrid | None) -> None:
    """Fine-tuning reads codes of the VQGAN the model was trained with, on the same grid and windows."""
    if record.superres_grid != superres:
        theirs = None if record.superres_grid is None else record.superres_grid.to_dict()
        raise ValueError(f"init_ckpt={init_ckpt} has super-resolution windows {theirs}, this run "
                         f"{None if superres is None else superres.to_dict()}: fine-tune with the same stage.superres")
    ours, theirs = record.vqgan.sha256, data_vqgan.sha256
    if ours and theirs and ours != theirs:
        raise ValueError(f"the data's codes come from another VQGAN ({theirs[:12]}...) than init_ckpt="
                         f"{init_ckpt}'s ({ours[:12]}...): pre-tokenize with its VQGAN, python -m t2i.pretokenize "
                         f"--vqgan {record.vqgan.checkpoint or 'ITS_VQGAN.ckpt'} ...")
    if list(record.grid) != list(data_vqgan.grid):
        raise ValueError(f"the data's code grid {data_vqgan.grid} is not init_ckpt={init_ckpt}'s "
                         f"{list(record.grid)}: set data.image_size to match")


def _vqgan_for_samples(identity: VQGANRecord) -> VQModel | None:
    """The VQGAN that made the code shards, to draw sample grids; None (with a warning) when it is gone."""
    path = identity.checkpoint
    if not path or not Path(path).is_file():
        warnings.warn(f"the VQGAN that made the code shards ({path}) is not there: no sample grids during training")
        return None
    vqgan = load_vqgan(path, identity.config)
    if identity.sha256 and weights_hash(vqgan) != identity.sha256:
        warnings.warn(f"{path} changed since the code shards were made: no sample grids during training")
        return None
    return vqgan


def _vqgan_for_images(cfg: DictConfig, datamodule, init: GPTRecord | None = None) -> tuple[VQModel, VQGANRecord]:
    """Slow path: a frozen VQGAN encodes the image shards at every step (vqgan_ckpt, or init_ckpt's)."""
    path = cfg.vqgan_ckpt
    if not path and init is not None:
        vqgan = load_record_vqgan(init, cfg.init_ckpt)
        path = init.vqgan.checkpoint
    elif not path:
        raise ValueError(f"stage=gpt on image shards ({datamodule.cfg.root}) needs the VQGAN that encodes them: "
                         "set vqgan_ckpt=PATH (a taming checkpoint also needs vqgan=f16_16384), or pre-tokenize "
                         "once and train on code shards, which is much faster: "
                         "python -m t2i.pretokenize --data IMAGE_SHARDS --out CODE_SHARDS --vqgan CKPT")
    else:  # our checkpoints carry their config; taming's get the `vqgan` config group's
        vqgan = load_vqgan(path, fallback=VQGANConfig(**OmegaConf.to_container(cfg.vqgan, resolve=True)))
    size = datamodule.cfg.image_size
    if size % vqgan.cfg.downsample:
        raise ValueError(f"data.image_size={size} is not a multiple of the VQGAN's downsampling {vqgan.cfg.downsample}")
    grid = size // vqgan.cfg.downsample
    return vqgan, vqgan_identity(vqgan, path, [grid, grid])
