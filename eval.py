"""Evaluate: python eval.py [task=<t2i|generate|complete|reconstruct|oracle|caption|superres>] [data=<name>] [ckpt=PATH] [key=value ...]

Devices come from lightning.Fabric (trainer.accelerator / devices / num_nodes): task=t2i also runs
on several, one process each (Fabric starts them, as for training), and the main one writes.
"""

import hashlib
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning import Fabric
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from t2i.data.datamodule import ShardDataModule
from t2i.data.shapes import oracle_accuracy
from t2i.command_line import check_command_line
from t2i.devices import check_devices
from t2i.extras import require, require_logger
from t2i.eval.fidelity import (
    IS_LAYER,
    FidelityAccumulator,
    InceptionFeatures,
    check_image_counts,
)
from t2i.eval.captioning import markdown_table as caption_table
from t2i.eval.captioning import run_captioning
from t2i.eval.clip import ChineseClip, ClipMetrics, draw_distractors
from t2i.eval.reconstruction import LPIPS_INPUT, reconstruction_metrics
from t2i.eval.reconstruction import markdown_table as reconstruction_table
from t2i.eval.text_to_image import (
    EvalConfig,
    PromptSet,
    evaluate,
    markdown_table,
    prompt_loader,
    select_prompts,
    warn_unavailable,
)
from t2i.checkpoints import load_vqgan
from t2i.models.losses import build_lpips
from t2i.precision import set_matmul_precision
from t2i.models.vqgan import VQGANConfig
from t2i.eval.superres import evaluate_superres, write_generated_2x
from t2i.eval.superres import markdown_table as superres_table
from t2i.sampling import (CaptionConfig, SamplingConfig, SuperResPipeline, T2IPipeline, read_image, resolve_sampling,
                          write_samples)
from t2i.scorers import CaptionScorer

log = logging.getLogger("eval")


def eval_data(cfg: DictConfig, **changes) -> ShardDataModule:
    """The data of an evaluation: images (or codes) and captions, no token ids. The model under evaluation
    tokenizes captions with its own tokenizer, so the data needs no tokenizer model of its own (a pai-painter
    import carries WordPiece; a folder converted for it has no tokenizer.model)."""
    dm = ShardDataModule({**OmegaConf.to_container(cfg.data, resolve=True), **changes})
    dm.use_tokenizer(None)
    return dm


def oracle_on_real_images(cfg: DictConfig, fabric: Fabric) -> dict:
    """How often the shapes oracle reads the true attributes off the dataset's own images."""
    dm = eval_data(cfg)
    images, attributes = [], []
    for batch in tqdm(dm.loader(cfg.split), desc=f"oracle on {cfg.split}"):
        if any("attributes" not in meta for meta in batch["meta"]):
            raise ValueError(f"task=oracle needs samples with true attributes (data=shapes), not data={cfg.data.name}")
        images += list(batch["image"].permute(0, 2, 3, 1).numpy())
        attributes += [meta["attributes"] for meta in batch["meta"]]
    return {"task": "oracle", "data": cfg.data.name, "split": cfg.split, "images": len(images),
            "accuracy": oracle_accuracy(images, attributes)}


def reconstruct(cfg: DictConfig, fabric: Fabric) -> dict:
    """A VQGAN checkpoint's reconstructions of a split: PSNR, SSIM, codebook usage (+ oracle on shapes),
    rFID (eval.rfid) and LPIPS (eval.lpips); writes results.md beside results.json."""
    if not cfg.ckpt:
        raise ValueError("task=reconstruct needs ckpt=PATH (a VQGAN checkpoint; a taming one also needs vqgan=<config>)")
    options = cfg.eval
    vqgan = OmegaConf.to_container(cfg.vqgan, resolve=True) if cfg.get("vqgan") else None
    model = load_vqgan(cfg.ckpt, VQGANConfig(**vqgan) if vqgan else None)
    dm = eval_data(cfg)
    if dm.cfg.kind() == "codes":
        raise ValueError(f"task=reconstruct needs the split's images: evaluate on image shards (e.g. data=shapes, not "
                         f"data={dm.cfg.name})")
    fidelity = _rfid_accumulator(cfg, dm, fabric) if options.rfid else None
    lpips = build_lpips(options.lpips_vgg_path, setting="eval.lpips_vgg_path", off="skip LPIPS: eval.lpips=false") \
        if options.lpips else None
    metrics = reconstruction_metrics(model, dm.loader(cfg.split), dm.on_after_batch_transfer, device=fabric.device,
                                     oracle=cfg.data.name == "shapes", fidelity=fidelity, lpips=lpips)
    results = {"task": "reconstruct", "ckpt": str(cfg.ckpt), "data": cfg.data.name, "split": cfg.split, **metrics}
    if lpips is not None:
        results["lpips_protocol"] = {"net": "lpips 0.1 vgg (linear heads from the lpips package)",
                                     "backbone": options.lpips_vgg_path or "torchvision VGG16_Weights.IMAGENET1K_V1",
                                     "input": LPIPS_INPUT, "reduction": "mean over images"}
    off = {"rfid": "eval.rfid=false (torch-fidelity's InceptionV3 weights: eval.inception_weights=PATH or a download)",
           "lpips": "eval.lpips=false (torchvision's VGG16 weights: eval.lpips_vgg_path=PATH or a download)"}
    results["not_computed"] = {key: reason for key, reason in off.items() if not options[key]}
    (Path(HydraConfig.get().runtime.output_dir) / "results.md").write_text(reconstruction_table(results),
                                                                          encoding="utf-8")
    return results


def _real_images_key(cfg: DictConfig, dm: ShardDataModule, images: str) -> str:
    """What FID's real statistics depend on, for their cache: the shards, the split, the size, which images."""
    manifest = hashlib.sha256(json.dumps(dm.cfg.manifest(), sort_keys=True, default=str).encode()).hexdigest()
    return f"manifest={manifest}|split={cfg.split}|size={dm.cfg.image_size}|images={images}"


def _rfid_accumulator(cfg: DictConfig, dm: ShardDataModule, fabric: Fabric) -> FidelityAccumulator:
    """FID of the reconstructions against every image of the split, as task=t2i's FID (no IS)."""
    options = cfg.eval
    layer = str(options.fid_layer)
    images = sum(shard.samples for shard in dm.cfg.shards(cfg.split))
    check_image_counts(images, images, layer, None, fix="evaluate a larger split= or skip rFID with eval.rfid=false")
    inception = InceptionFeatures([layer], options.inception_weights, fabric.device)
    protocol = {"real_images_choice": "every sample of the split, as the loader reads it (data.image_size)",
                "generated": "the VQGAN's reconstruction of each real image"}
    return FidelityAccumulator(inception, options.stats_cache, _real_images_key(cfg, dm, "every-sample"), layer,
                               isc_splits=None, generated_per_real=1, protocol=protocol)


def caption(cfg: DictConfig, fabric: Fabric) -> dict:
    """Captions for a split's images (or the files of images=DIR) from a GPT's image-to-text direction:
    captions.jsonl, BLEU-4 and CIDEr-D over characters, on shapes the attributes the captions name."""
    if not cfg.ckpt:
        raise ValueError("task=caption needs ckpt=PATH (a GPT checkpoint trained with stage.caption_prob > 0)")
    options = OmegaConf.to_container(cfg.caption, resolve=True)
    num_images, batch_size = options.pop("num_images"), options.pop("batch_size")
    out = Path(HydraConfig.get().runtime.output_dir)
    data = None if cfg.images else OmegaConf.to_container(cfg.data, resolve=True)
    results = run_captioning(cfg.ckpt, CaptionConfig(**options), out, data=data, split=cfg.split, images=cfg.images,
                             num_images=num_images, batch_size=batch_size, vqgan_ckpt=cfg.vqgan_ckpt,
                             device=fabric.device, adapter=cfg.adapter)
    (out / "results.md").write_text(caption_table(results), encoding="utf-8")
    return results


def sampling_options(cfg: DictConfig, pipeline: T2IPipeline) -> tuple[SamplingConfig, int]:
    """(the sampling options, the sequences per sampling batch): those given on the command line, then
    the checkpoint's (what its training grids used), then SamplingConfig's defaults."""
    options = OmegaConf.to_container(cfg.sampling, resolve=True)
    batch_size = options.pop("batch_size", None)
    for pipeline_option in ("step", "weights"):  # how steps run, not what they sample: the pipeline's
        options.pop(pipeline_option, None)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sampling.batch_size must be an integer >= 1 (sequences per sampling batch), "
                         f"got {batch_size}")
    return resolve_sampling(options, pipeline.record.sampling), batch_size


def generate(cfg: DictConfig, fabric: Fabric) -> dict:
    """Images for prompts (cfg.prompts, or one per line of cfg.prompts_file): PNGs, a grid, captions."""
    if not cfg.ckpt:
        raise ValueError("task=generate needs ckpt=PATH (a GPT checkpoint from stage=gpt)")
    prompts = read_prompts(cfg)
    pipeline = T2IPipeline.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=fabric.device, step=cfg.sampling.step,
                                            weights=cfg.sampling.weights, adapter=cfg.adapter)
    sampling, batch_size = sampling_options(cfg, pipeline)
    text_ids = pipeline.tokenizer(prompts)  # what the model receives, recorded for inspection
    with fabric.autocast():  # trainer.precision (fp32 unless asked)
        samples = pipeline.sample(prompts, sampling, batch_size=batch_size)
    out = Path(HydraConfig.get().runtime.output_dir) / "samples"
    written = write_samples(samples, out)
    prefix_ids = pipeline.gpt.layout.prefix(text_ids)  # the positions before the first code, as the model reads them
    results = {"task": "generate", "ckpt": str(cfg.ckpt), "adapter": cfg.adapter, "prompts": prompts,
               "text_ids": text_ids.tolist(), "prefix_ids": prefix_ids.tolist(),
               "codes": written["codes"], "files": written["files"], "grid": written["grid"], "sampling": asdict(sampling),
               "sampling_step": pipeline.step_record()}
    if cfg.superres_ckpt:  # CogView's second stage: every sample again at twice the resolution
        resolver = SuperResPipeline.from_checkpoint(cfg.superres_ckpt, cfg.superres_vqgan_ckpt, device=fabric.device,
                                                    step=cfg.sampling.step, weights=cfg.sampling.weights)
        resolver.resolve_step(len(samples.codes), batch_size)
        with fabric.autocast():
            results.update(write_generated_2x(resolver, pipeline, samples,
                                              superres_sampling(cfg, resolver), batch_size, out))
        results["superres_sampling_step"] = resolver.step_record()
    return results


def read_prompts(cfg: DictConfig) -> list[str]:
    """The prompts of task=generate / complete: prompts=[...], then one per line of prompts_file."""
    prompts = list(cfg.prompts or [])
    if cfg.prompts_file:
        prompts += [line.strip() for line in Path(cfg.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"task={cfg.task} needs prompts=[...] or prompts_file=PATH")
    return prompts


def complete(cfg: DictConfig, fabric: Fabric) -> dict:
    """Text-guided completion of image= in the region of mask= (white = to be sampled) or box= (box_units=codes or
    pixels), once per prompt (t2i.sampling.complete): PNGs, a grid, the codes, as task=generate writes them."""
    if not cfg.ckpt:
        raise ValueError("task=complete needs ckpt=PATH (a GPT checkpoint from stage=gpt)")
    if not cfg.image:
        raise ValueError("task=complete needs image=PATH (the image to complete) and mask=PATH or box=[x0,y0,x1,y1]")
    prompts = read_prompts(cfg)
    pipeline = T2IPipeline.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=fabric.device, step=cfg.sampling.step,
                                            weights=cfg.sampling.weights, adapter=cfg.adapter)
    sampling, batch_size = sampling_options(cfg, pipeline)
    image = read_image(cfg.image)
    region = pipeline.region(mask=read_image(cfg.mask, "mask") if cfg.mask else None,
                             box=None if cfg.box is None else list(cfg.box), box_units=cfg.box_units)
    options = cfg.complete
    scorer = None
    if options.rerank > 1:
        scorer, caption_model = CaptionScorer.for_pipeline(pipeline, cfg.caption_ckpt)
        if scorer is None:
            raise ValueError(f"complete.rerank={options.rerank} needs a captioning model: {caption_model}")
    with fabric.autocast():  # trainer.precision (fp32 unless asked)
        samples = pipeline.complete(prompts, [image] * len(prompts), [region] * len(prompts), sampling, batch_size,
                                    scorer=scorer, rerank=options.rerank,
                                    region_candidates=options.region_candidates)
    written = write_samples(samples, Path(HydraConfig.get().runtime.output_dir) / "samples")
    return {"task": "complete", "ckpt": str(cfg.ckpt), "adapter": cfg.adapter, "image": str(cfg.image),
            "prompts": prompts, "region": region.int().tolist(), "region_candidates": options.region_candidates,
            "rerank": options.rerank, "codes": written["codes"], "files": written["files"], "grid": written["grid"],
            "sampling": asdict(sampling), "sampling_step": pipeline.step_record()}


def superres_sampling(cfg: DictConfig, resolver: SuperResPipeline) -> SamplingConfig:
    """The super-resolution model's sampling: superres.sampling given, then its checkpoint's; sampling.seed."""
    options = OmegaConf.to_container(cfg.superres.sampling, resolve=True)
    return resolve_sampling({**options, "seed": cfg.sampling.seed, "samples_per_prompt": 1}, resolver.record.sampling)


def superres(cfg: DictConfig, fabric: Fabric) -> dict:
    """A super-resolution GPT (superres_ckpt) on a split's real images: PSNR / SSIM of its 2x images from the real
    low-resolution codes against the real 2x images, beside bicubic upsampling, and the shapes oracle; with
    ckpt= (a text-to-image GPT) also the oracle on generated images and their 2x (t2i.eval.superres)."""
    if not cfg.superres_ckpt:
        raise ValueError("task=superres needs superres_ckpt=PATH (a GPT from experiment=superres_shapes / stage.superres)")
    resolver = SuperResPipeline.from_checkpoint(cfg.superres_ckpt, cfg.superres_vqgan_ckpt, device=fabric.device,
                                                step=cfg.sampling.step, weights=cfg.sampling.weights)
    sizes = resolver.record.superres
    loaders = [eval_data(cfg, image_size=size) for size in (sizes.low_size, sizes.high_size)]
    if loaders[0].cfg.kind() != "image":
        raise ValueError(f"task=superres compares with the split's real images: use image shards (e.g. data=shapes, "
                         f"not data={cfg.data.name})")
    pipeline, pipeline_sampling = None, None
    if cfg.ckpt:
        pipeline = T2IPipeline.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=fabric.device, step=cfg.sampling.step,
                                                weights=cfg.sampling.weights)
        pipeline_sampling, _ = sampling_options(cfg, pipeline)
        pipeline.resolve_step(cfg.superres.num_images * pipeline_sampling.samples_per_prompt, cfg.sampling.batch_size)
    resolver.resolve_step(cfg.superres.num_images, cfg.sampling.batch_size)
    out = Path(HydraConfig.get().runtime.output_dir)
    with fabric.autocast():
        results = evaluate_superres(resolver, loaders[0].loader(cfg.split), loaders[1].loader(cfg.split),
                                    superres_sampling(cfg, resolver), cfg.superres.num_images,
                                    cfg.sampling.batch_size, out, pipeline, pipeline_sampling)
    results = {"task": "superres", "superres_ckpt": str(cfg.superres_ckpt), "ckpt": cfg.ckpt, "data": cfg.data.name,
               "split": cfg.split, **results, "superres_sampling_step": resolver.step_record()}
    if pipeline is not None:
        results["sampling_step"] = pipeline.step_record()
    (out / "results.md").write_text(superres_table(results), encoding="utf-8")
    return results


def text_to_image(cfg: DictConfig, fabric: Fabric) -> dict | None:
    """A GPT checkpoint on a split's captions: FID, IS, Caption Loss, Chinese-CLIP score and R-precision (with/without
    reranking), shapes attributes.
    Every process evaluates its share of the prompts; the main one returns the results, the others None."""
    if not cfg.ckpt:
        raise ValueError("eval.py needs ckpt=PATH (a GPT checkpoint from stage=gpt)")
    options = OmegaConf.to_container(cfg.eval, resolve=True)
    eval_cfg = EvalConfig(**{k: options[k] for k in EvalConfig.__dataclass_fields__})
    if options["clip"]:  # at once, not after the data and the model have loaded
        require("transformers", instead="eval.clip=false")
    dm = eval_data(cfg)
    # The data is checked before other processes start, models load and sampling begins.
    prompts = select_prompts(dm, cfg.split, options["num_prompts"], options["caption_seed"])
    per_prompt = cfg.sampling.samples_per_prompt
    if per_prompt is None:
        raise ValueError("sampling.samples_per_prompt=null: evaluation needs a number of images per prompt")
    if options["fid"]:
        if dm.cfg.kind() == "codes":
            raise ValueError(f"FID needs the split's real images: evaluate on image shards (e.g. data=shapes, not "
                             f"data={dm.cfg.name}), or set eval.fid=false")
        check_image_counts(prompts.images, prompts.images * per_prompt, str(options["fid_layer"]),
                           options["isc_splits"])
    if eval_cfg.rerank_by == "clip_score" and not options["clip"]:
        raise ValueError("eval.rerank_by=clip_score needs the CLIP metrics: set eval.clip=true (and eval.clip_model)")
    distractors = draw_distractors(prompts.captions_by_image, {p.key: (p.image, p.caption) for p in prompts.picks},
                                   options["rprecision_distractors"], options["rprecision_seed"],
                                   f"split={cfg.split}") if options["clip"] else None
    fabric.launch()  # with several devices: starts the other processes, each running this script
    pipeline = T2IPipeline.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=fabric.device, step=cfg.sampling.step,
                                            weights=cfg.sampling.weights, adapter=cfg.adapter)
    sampling, batch_size = sampling_options(cfg, pipeline)
    # a loader batch is one sampling batch: its prompts' candidates, samples_per_prompt x rerank each
    prompts_per_batch = max(1, batch_size // (sampling.samples_per_prompt * eval_cfg.rerank))
    loader = prompt_loader(dm, prompts, prompts_per_batch, fabric.global_rank, fabric.world_size)
    scorer, caption_model = CaptionScorer.for_pipeline(pipeline, cfg.caption_ckpt)
    if scorer is None:
        warn_unavailable(caption_model)
        if eval_cfg.rerank > 1 and eval_cfg.rerank_by == "caption_loss":
            log.warning("eval.rerank=%d ignored: no captioning model", eval_cfg.rerank)
            eval_cfg.rerank = 1
    share = -(-prompts.images // fabric.world_size)  # this process's prompts (at most)
    pipeline.resolve_step(share * sampling.samples_per_prompt * eval_cfg.rerank, batch_size)
    clip = None
    if options["clip"]:  # a Hub id downloads once; offline, a local folder (the error says how)
        clip = ClipMetrics(ChineseClip.load(options["clip_model"], fabric.device, options["clip_batch_size"]),
                           {p.key: p.caption for p in prompts.picks}, distractors, options["rprecision_seed"])
    out = Path(HydraConfig.get().runtime.output_dir)
    fidelity = _fidelity_factory(cfg, dm, prompts, sampling.samples_per_prompt, fabric) if options["fid"] else None
    logger = None
    if fabric.is_global_zero and cfg.get("logger"):
        logger = instantiate(cfg.logger)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the resolved config (W&B: the run config)
    with fabric.autocast():  # trainer.precision (fp32 unless asked)
        results = evaluate(pipeline, loader, sampling, eval_cfg, out, scorer, fidelity, logger,
                           seeds=prompts.seeds(sampling.seed), batch_size=batch_size, clip=clip)
    if results is None:  # not the main process
        return None
    results = {"task": "t2i", "name": cfg.name or Path(cfg.adapter or cfg.ckpt).resolve().parent.parent.name,
               "ckpt": str(cfg.ckpt), "adapter": cfg.adapter,
               "data": cfg.data.name, "split": cfg.split, "prompt_set": prompts.protocol(), **results,
               "sampling_step": pipeline.step_record(), "precision": precision_record(cfg)}
    if scorer is None:
        results["caption_loss_unavailable"] = caption_model
    else:
        results["caption_model"] = caption_model
    (out / "results.md").write_text(markdown_table(results), encoding="utf-8")
    if isinstance(logger, WandbLogger):  # the next job of a multirun (same process) must start its own run
        logger.experiment.finish()
    return results


def _fidelity_factory(cfg: DictConfig, dm: ShardDataModule, prompts: PromptSet, samples_per_prompt: int,
                      fabric: Fabric):
    """FID/IS accumulators; the real statistics are cached per (shards, split, size, which images, layer, weights)."""
    options = cfg.eval
    layer = str(options.fid_layer)  # eval.fid_layer=64 arrives as an int
    inception = InceptionFeatures([layer, IS_LAYER], options.inception_weights, fabric.device)
    # the real images: each distinct image of the prompts once (earlier versions counted every caption
    # row's image, or mixed in samples from further on)
    key = _real_images_key(cfg, dm, prompts.real_set())
    counts = {"captions_available": prompts.captions_available, "caption_choice": prompts.protocol()["caption_choice"]}
    return lambda: FidelityAccumulator(inception, options.stats_cache, key, layer, options.isc_splits,
                                       generated_per_real=samples_per_prompt, protocol=counts)


def precision_record(cfg: DictConfig) -> dict:
    """What the numbers were computed in: the autocast precision and the float32 matmul precision."""
    return {"trainer": str(cfg.trainer.precision), "matmul": cfg.matmul_precision}


# the tasks that run the GPT of ckpt=, which is where a LoRA adapter (adapter=) goes
ADAPTER_TASKS = ("t2i", "generate", "complete", "caption")
TASKS = {"t2i": text_to_image, "generate": generate, "complete": complete, "reconstruct": reconstruct,
         "oracle": oracle_on_real_images, "caption": caption, "superres": superres}


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig):
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task} is not one of: {', '.join(TASKS)}")
    if cfg.adapter and cfg.task == "superres":  # two GPTs there: which one the adapter is of would be a guess
        raise ValueError("adapter= is not read by task=superres: for an adapter's samples at twice the resolution, "
                         "run task=generate ckpt=BASE adapter=ADAPTER superres_ckpt=SR")
    if cfg.adapter and cfg.task not in ADAPTER_TASKS:
        raise ValueError(f"adapter= is read by the tasks that run ckpt's GPT ({', '.join(ADAPTER_TASKS)}), not by "
                         f"task={cfg.task}")
    if cfg.adapter:  # at once, not after the data and the model have loaded
        require("peft")
    check_devices(cfg.trainer.accelerator, cfg.trainer.devices)
    require_logger(cfg.get("logger"))
    set_matmul_precision(cfg.matmul_precision)
    fabric = Fabric(**OmegaConf.to_container(cfg.trainer, resolve=True))
    if fabric.world_size > 1 and cfg.task != "t2i":
        raise ValueError(f"task={cfg.task} runs in one process: set trainer.devices=1 trainer.num_nodes=1 "
                         "(several devices are for task=t2i)")
    results = TASKS[cfg.task](cfg, fabric)
    if not fabric.is_global_zero:
        return None
    results.setdefault("precision", precision_record(cfg))
    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, ensure_ascii=False, indent=1))
    log.info("%s\nwritten to %s", json.dumps(results, ensure_ascii=False, indent=1), out)
    return results


if __name__ == "__main__":
    check_command_line("eval", sys.argv[1:])  # renamed settings, before Hydra composes
    main()
