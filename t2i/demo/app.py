"""The demo's command: its config (conf/demo.yaml), setup (model, scorer, engine, files, page) and launch.

    python -m t2i.demo ckpt=PATH [adapters=[A.ckpt,B.ckpt]] [port=7860] [host=127.0.0.1] [device=auto] [key=value ...]
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from t2i.adapters import BASE_STYLE, attach_adapters
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


def style_adapters(adapters) -> dict[str, str]:
    """conf/demo.yaml adapters: a list of adapter files (each style named by its file name, without the suffix) or
    a mapping style name -> file (one file alone: a list of one); {} when none. A ValueError names what to fix."""
    if not adapters:
        return {}
    if isinstance(adapters, str):
        adapters = [adapters]
    if isinstance(adapters, dict):
        named = {str(name).strip(): str(path) for name, path in adapters.items()}
    elif isinstance(adapters, list):
        named = {}
        for path in map(str, adapters):
            name = Path(path).stem
            if name in named:
                raise ValueError(f"adapters: two files are named {name} ({named[name]}, {path}): name the styles "
                                 f"with a mapping, adapters={{name: PATH, ...}}")
            named[name] = path
    else:
        raise ValueError(f"adapters must be a list of adapter files or a mapping name -> file, got {adapters!r}")
    if "" in named or BASE_STYLE in named:
        raise ValueError(f"adapters: a style needs a name, and not {BASE_STYLE!r} (the model without an adapter); "
                         f"got {', '.join(map(repr, named))}")
    return named


# step modes that compile the step with the GPT's modules and weights in it (frozen folds the weights in as
# constants): a compilation would keep running the style it was made with, so the style menu refuses them
COMPILED_STEPS = ("compiled", "frozen")


def setup(cfg: DictConfig, out_dir: Path):
    """The page, the engine and the limits from the demo's config (conf/demo.yaml); errors name what to fix."""
    if not cfg.ckpt:
        raise ValueError("t2i.demo needs ckpt=PATH (a GPT checkpoint from stage=gpt, or a pai-painter import)")
    limits = Limits.from_config(OmegaConf.to_container(cfg.limits, resolve=True))
    queue = positive_integers("queue", OmegaConf.to_container(cfg.queue, resolve=True))
    options = OmegaConf.to_container(cfg.sampling, resolve=True)
    adapters = style_adapters(OmegaConf.to_container(cfg.adapters, resolve=True) if OmegaConf.is_config(cfg.adapters)
                              else cfg.adapters)
    if adapters and options["step"] in COMPILED_STEPS:
        raise ValueError(f"sampling.step={options['step']} compiles the GPT's step with one style's modules and "
                         f"weights in it, so a request's style would not reach it: with adapters= use "
                         f"sampling.step=eager or static (auto runs eager)")
    if adapters and options["weights"] != "unchanged":
        raise ValueError(f"sampling.weights={options['weights']} quantizes plain linear layers, and the styles' "
                         f"adapters stay beside them unmerged: with adapters= keep sampling.weights=unchanged")
    pipeline = T2IPipeline.from_checkpoint(cfg.ckpt, cfg.vqgan_ckpt, device=resolve_device(cfg.device),
                                            step=options.pop("step"), weights=options.pop("weights"))
    # every adapter checked against the base by hash, then attached to its GPT unmerged: one base, switched per batch
    styles = attach_adapters(pipeline.gpt, cfg.ckpt, adapters) if adapters else {}
    if styles and pipeline.step_mode == "auto":
        pipeline.step_mode = "eager"  # auto's other choices compile the step (COMPILED_STEPS)
    if styles:
        log.info("styles: %s, %s", BASE_STYLE, ", ".join(f"{name} ({path})" for name, path in adapters.items()))
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
    card, facts = model_card(pipeline, cfg.ckpt, file_sha256(cfg.ckpt), caption_source, scorer is not None, font,
                             {name: (adapters[name], record) for name, record in styles.items()})
    engine = Engine(pipeline, scorer, batch_size, queue["max_batch"])
    results = Results(out_dir / "results", queue["keep_results"], font, facts)
    examples = example_prompts(cfg.examples_file, cfg.ckpt, cfg.examples_from_run)
    controls = Controls(limits, defaults, pipeline.gpt.cfg.n_image_codes, pipeline.tokenizer.text_len,
                        can_rerank=scorer is not None, styles=tuple(styles))
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
