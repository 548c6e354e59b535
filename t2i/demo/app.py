"""The demo's command: its config (conf/demo.yaml), setup (model, scorer, engine, files, page) and launch.

    python -m t2i.demo ckpt=PATH [port=7860] [host=127.0.0.1] [device=auto] [key=value ...]
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from t2i.data.shapes import MIN_IMAGE_SIZE
from t2i.demo.card import example_completions, example_prompts, file_sha256, model_card
from t2i.demo.engine import Engine
from t2i.demo.files import Results
from t2i.demo.page import PAGE_CSS, build_page
from t2i.demo.settings import Controls, Limits, Settings, positive_integers
from t2i.extras import require
from t2i.grids import FONT_HINT, find_cjk_font
from t2i.sampling import T2IPipeline, resolve_sampling
from t2i.scorers import CaptionScorer

log = logging.getLogger("demo")

# the repository's conf/ (a path: Hydra reads a relative one from a module as a Python package)
CONF = Path(__file__).resolve().parents[2] / "conf"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but this machine has no CUDA GPU: use device=cpu (or auto)")
    return device


def setup(cfg: DictConfig, out_dir: Path):
    """The page, the engine and the limits from the demo's config (conf/demo.yaml); errors name what to fix."""
    if not cfg.ckpt:
        raise ValueError("t2i.demo needs ckpt=PATH (a GPT checkpoint from stage=gpt, or a pai-painter import)")
    limits = Limits.from_config(OmegaConf.to_container(cfg.limits, resolve=True))
    queue = positive_integers("queue", OmegaConf.to_container(cfg.queue, resolve=True))
    options = OmegaConf.to_container(cfg.sampling, resolve=True)
    pipeline = T2IPipeline.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=resolve_device(cfg.device),
                                            step=options.pop("step"), weights=options.pop("weights"))
    scorer, caption_source = CaptionScorer.for_pipeline(pipeline, cfg.caption_ckpt)
    if cfg.caption_ckpt:  # the page names the file, not where it lies
        caption_source = caption_source.replace(str(cfg.caption_ckpt), Path(cfg.caption_ckpt).name)
    rerank, batch_size, seed = cfg.rerank, options.pop("batch_size"), options.pop("seed")
    samples = options.pop("samples_per_prompt")
    sampling = resolve_sampling(options, pipeline.record.sampling)
    top_k = min(sampling.top_k, pipeline.gpt.cfg.n_image_codes)  # keeping more codes than there are keeps all
    defaults = Settings(samples, sampling.guidance_scale, sampling.temperature, top_k, sampling.top_p,
                        rerank if scorer is not None else 1)
    defaults.check(limits.max_samples, limits.max_rerank, True)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"sampling.batch_size must be an integer >= 1, got {batch_size!r}")
    # auto is resolved once, for one request at the page's starting values (not for the server's lifetime): a
    # frozen step compiles per batch size and keeps FROZEN_BATCH_SIZES of them, while a request's batch size
    # moves with its samples, its candidates and the requests batched with it (docs/demo.md)
    pipeline.resolve_step(defaults.samples * defaults.rerank, batch_size)
    font = find_cjk_font(cfg.font)
    if font is None:
        log.warning("no CJK font found: grids carry the prompt only when it is ASCII (%s)", FONT_HINT)
    card, facts = model_card(pipeline, cfg.ckpt, file_sha256(cfg.ckpt), caption_source, scorer is not None, font)
    engine = Engine(pipeline, scorer, batch_size, queue["max_batch"])
    results = Results(out_dir / "results", queue["keep_results"], font, facts)
    examples = example_prompts(cfg.examples_file, cfg.ckpt, cfg.examples_from_run)
    controls = Controls(limits, defaults, pipeline.gpt.cfg.n_image_codes, pipeline.tokenizer.text_len,
                        can_rerank=scorer is not None)
    # the Complete tab's examples: shapes test images drawn at the model's size (none below the renderer's smallest)
    completions = example_completions(pipeline.image_size) if pipeline.image_size >= MIN_IMAGE_SIZE else []
    page = build_page(engine, results, controls, seed, examples, card, caption_source,
                      concurrency=2 * queue["max_batch"],  # the next batch gathers while one samples
                      completions=completions)
    page.queue(max_size=queue["size"], default_concurrency_limit=1)
    return page, engine, limits


@hydra.main(config_path=str(CONF), config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    require("gradio")  # before the model loads
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    page, _, limits = setup(cfg, out_dir)
    log.info("serving %s on http://%s:%d (results in %s)", cfg.ckpt, cfg.host, cfg.port, out_dir)
    # no allowed_paths: the file route serves only what an event returned (copied into Gradio's cache), and the
    # run folder (config, log, every request's results) is blocked even if a later option allowed more; the
    # upload route refuses files larger than an upload may be (the Complete tab's image)
    page.launch(server_name=cfg.host, server_port=cfg.port, share=cfg.share, blocked_paths=[str(out_dir)],
                show_error=True, css=PAGE_CSS, max_file_size=limits.max_upload_bytes)
