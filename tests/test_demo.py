"""The web demo (t2i/demo/): its parts in process, then the real command on a free local port,
used as a person does through headless Chromium (Debian's `chromium`, driven by Playwright) and as
a program does through gradio_client.

The browser needs /usr/bin/chromium (or `chromium` on PATH) and the playwright package: `make test`
installs both (chromium through apt as root). Without them the browser test is skipped with what is
missing, and fails under CI=true, where `make test` must have installed them.
Env: T2I_DEMO_CKPT=PATH serves another checkpoint (e.g. the quickstart's) instead of the tests' tiny one;
T2I_DEMO_SCREENSHOT=PATH.png saves a screenshot of the page after its first generation (the README's).
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from t2i.adapters import LoraConfig, adapter_record, add_lora, save_adapter
from t2i.checkpoints import CheckpointError, load_gpt, save_vqgan
from t2i.demo.app import setup
from t2i.demo.card import example_completions, example_prompts, file_sha256
from t2i.demo.engine import Engine, Job
from t2i.demo.page import progress_text
from t2i.demo.settings import EMPTY_NOTE, Limits, Settings, clean_prompt, prompt_notes
from t2i.demo.uploads import read_completion
from t2i.grids import captioned_grid, find_cjk_font
from t2i.models.gpt import GPT
from t2i.models.vqgan import VQModel
from t2i.sampling import SamplingConfig, T2IPipeline, prompt_seeds
from t2i.scorers import CaptionScorer
from lora_factors import move_from_zero

REPO = Path(__file__).parents[1]
PROMPT = "画面左上角有一个红色的小圆形"


@pytest.fixture(scope="module")
def ckpt(request):
    if os.environ.get("T2I_DEMO_CKPT"):
        return os.environ["T2I_DEMO_CKPT"]
    return str(request.getfixturevalue("gpt_run") / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def pipeline(ckpt):
    return T2IPipeline.from_checkpoint(ckpt)


def test_prompts_any_unicode_empty_and_too_long(pipeline):
    tokenizer = pipeline.tokenizer
    assert clean_prompt(None) == "" and clean_prompt(" \n\t ") == "" and clean_prompt(" 红色 \n") == "红色"
    assert clean_prompt("a\ud83d") == "a\ufffd"  # a lone surrogate (JSON can carry one) becomes U+FFFD
    assert clean_prompt("\ud83d\ude00") == "😀"  # a surrogate pair, the character it stands for
    assert prompt_notes(tokenizer, "") == [EMPTY_NOTE]
    for text in ["红色的圆 😀", "עברית و عربي", "e\u0301\u0303 \u200b\x00 ＡＢＣ１２３", "𠀀𪚥 \U0010fffd"]:
        ids = tokenizer.encode(clean_prompt(text))
        notes = prompt_notes(tokenizer, clean_prompt(text))
        assert ids and (notes == [] if len(ids) <= tokenizer.text_len else "Prompt cut" in notes[0])
    long = PROMPT * 6
    n = len(tokenizer.encode(long))
    assert n > tokenizer.text_len
    (note,) = prompt_notes(tokenizer, long)
    assert f"it is {n} tokens long and the model reads {tokenizer.text_len}" in note
    assert f"the last {n - tokenizer.text_len} token(s) were cut" in note
    assert tokenizer.decode(tokenizer.encode(long)[: tokenizer.text_len]) in note


def test_settings_refused_with_the_setting_named():
    Settings(4, 3.0, 1.0, 10, 0.9, 2).check(16, 8, can_rerank=True)
    for settings, message in [(Settings(samples=17), "samples per prompt"), (Settings(rerank=9), "rerank"),
                              (Settings(top_p=0.0), "top_p"), (Settings(temperature=0.0), "temperature")]:
        with pytest.raises(ValueError, match=message):
            settings.check(16, 8, can_rerank=True)
    with pytest.raises(ValueError, match="reranking needs a captioning model"):
        Settings(rerank=2).check(16, 8, can_rerank=False)


def test_progress_text():
    assert progress_text(13, 256, 256) == "sampling: step 13 of 256"
    assert progress_text(256, 256, 256) == "sampling: step 256 of 256"
    assert progress_text(70, 128, 64) == "sampling: step 6 of 64, batch 2 of 2"
    assert progress_text(128, 128, 64) == "sampling: step 64 of 64, batch 2 of 2"


def test_engine_batches_equal_settings_in_order():
    engine = Engine(pipeline=None, scorer=None, max_batch=3, start=False)
    a, b = Settings(samples=2), Settings(samples=2, temperature=0.5)
    jobs = [engine.submit(p, 0, s) for p, s in [("1", a), ("2", b), ("3", a), ("4", a), ("5", a)]]
    assert [job.ahead for job in jobs] == [0, 1, 2, 3, 4]
    assert engine._take() == [jobs[0], jobs[2], jobs[3]]  # the oldest and the next equal ones, max_batch in all
    assert jobs[1].ahead == 0 and jobs[4].ahead == 1
    assert engine._take() == [jobs[1]]
    assert engine._take() == [jobs[4]]
    styled = Settings(samples=2, style="ink")  # the style is a setting: a batch runs one
    jobs = [engine.submit(p, 0, s) for p, s in [("1", a), ("2", styled), ("3", a), ("4", styled)]]
    assert engine._take() == [jobs[0], jobs[2]] and engine._take() == [jobs[1], jobs[3]]


def test_a_batch_gives_each_request_its_own_images(pipeline, monkeypatch):
    """Batched requests get the images each would get alone, which are task=generate's for the prompt and seed;
    while they sample, every request shows the sampler's progress: one more position after each model call."""
    settings = Settings(samples=2, guidance_scale=3.0, top_k=10)
    engine = Engine(pipeline, scorer=None, batch_size=4, start=False)  # 2 prompts per sampling batch: 2 batches
    jobs = [Job(PROMPT, 5, settings), Job("", 5, settings), Job("蓝色的大方块", 9, settings)]
    shown, sample_codes = [], pipeline.sample_codes  # what each job shows after each of the sampler's reports

    def watched(*args, progress, **kwargs):
        def report(done, total):
            progress(done, total)
            shown.append({(job.steps, job.total) for job in jobs})

        return sample_codes(*args, progress=report, **kwargs)

    monkeypatch.setattr(pipeline, "sample_codes", watched)
    engine.sample(jobs)
    image_len = pipeline.gpt.cfg.image_len
    assert shown == [{(done, 2 * image_len)} for done in range(1, 2 * image_len + 1)]
    monkeypatch.undo()
    for job in jobs:
        assert job.total == 2 * image_len and job.steps == job.total and job.batched_with == 3
        # alone, as task=generate samples the prompt: the same images
        cfg = settings.sampling()
        alone = pipeline.decode(pipeline.sample_codes([job.prompt], cfg, seeds=prompt_seeds(job.seed, [job.prompt])))
        assert torch.equal(job.images, alone)
    assert not torch.equal(jobs[0].images, jobs[2].images)


def test_reranking_keeps_the_lowest_caption_loss(pipeline):
    scorer, source = CaptionScorer.for_pipeline(pipeline, None)
    if scorer is None:
        pytest.skip(f"the checkpoint cannot rerank: {source}")
    engine = Engine(pipeline, scorer, start=False)
    plain, reranked = Job(PROMPT, 3, Settings(samples=2)), Job(PROMPT, 3, Settings(samples=2, rerank=3))
    engine.sample([plain])
    engine.sample([reranked])
    # candidate 0 of each image is the plain sample: the best of 3 is never worse
    assert (reranked.losses <= plain.losses + 1e-6).all()
    assert reranked.images.shape == plain.images.shape
    # the demo reranks through task=generate's path: T2IPipeline.sample with the scorer
    samples = pipeline.sample([PROMPT], Settings(samples=2).sampling(), seeds=prompt_seeds(3, [PROMPT]), scorer=scorer,
                              rerank=3)
    assert torch.equal(samples.images, reranked.images) and torch.equal(samples.scores, reranked.losses)
    with pytest.raises(ValueError, match="needs a scorer"):
        pipeline.sample([PROMPT], Settings().sampling(), rerank=2)


def test_engine_batches_completions_only_with_completions():
    engine = Engine(pipeline=None, scorer=None, max_batch=3, start=False)
    image, region = np.zeros((32, 32, 3), np.uint8), torch.ones(4, 4, dtype=torch.bool)
    settings = Settings(samples=2)
    jobs = [engine.submit("1", 0, settings), engine.submit("2", 0, settings, image, region),
            engine.submit("3", 0, settings), engine.submit("4", 0, settings, image, region)]
    assert [job.kind for job in jobs] == ["generate", "complete", "generate", "complete"]
    assert engine._take() == [jobs[0], jobs[2]]  # equal settings, but a completion is another kind of job
    assert engine._take() == [jobs[1], jobs[3]]
    with pytest.raises(ValueError, match="needs both the image and the region"):
        engine.submit("5", 0, settings, image)


def test_the_engine_completes_an_image_keeping_its_known_codes(pipeline):
    """Batched completions get what each would get alone from T2IPipeline.complete (task=complete) for its prompt
    and seed, reranked by the scorer; the codes outside the region are the image's own."""
    scorer, source = CaptionScorer.for_pipeline(pipeline, None)
    assert scorer is not None, source
    size = pipeline.image_size
    (image, prompt, box, units), (other, _, other_box, _) = example_completions(size, 2)
    region = pipeline.region(box=[float(x) for x in box.split(",")], box_units=units)
    other_region = pipeline.region(box=[float(x) for x in other_box.split(",")], box_units=units)
    settings = Settings(samples=2, guidance_scale=3.0, top_k=10, rerank=2)
    jobs = [Job(prompt, 5, settings, image, region), Job(PROMPT, 8, settings, other, other_region)]
    Engine(pipeline, scorer, batch_size=4, start=False).sample(jobs)
    known = pipeline.vqgan.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    for job in jobs:
        alone = pipeline.complete([job.prompt], [job.image], [job.region], settings.sampling(), seeds=prompt_seeds(
            job.seed, [job.prompt]), scorer=scorer, rerank=2)
        assert job.batched_with == 2 and torch.equal(job.images, alone.images) and torch.equal(job.losses, alone.scores)
        if job is jobs[0]:
            assert (alone.codes[:, ~region] == known[~region]).all()  # the known codes, unchanged
            assert region.any() and not (alone.codes[:, region] == known[region]).all()  # the region, sampled


def test_uploads_are_bounded_and_read_only_from_the_cache(pipeline, tmp_path):
    """The Complete tab's reading of the editor's value: the image resized to the model's size, the drawn region
    mapped to the code grid, and every bad upload, box or region refused with what to fix."""
    size, (h, w) = pipeline.image_size, pipeline.record.grid
    cache, limits = tmp_path / "cache", Limits(16, 8, 1000, max_upload_bytes=50_000, max_upload_pixels=300 * 300)
    cache.mkdir()

    def upload(name, image):
        Image.fromarray(image).save(cache / name)
        return {"path": str(cache / name), "meta": {"_type": "gradio.FileData"}}

    big = np.zeros((4 * size, 4 * size, 3), np.uint8)
    big[:, : 2 * size] = 255  # white left half
    layer = np.zeros((4 * size, 4 * size, 4), np.uint8)
    layer[0, -1, 3] = 255  # one painted pixel, in the top-right cell
    editor = {"background": upload("big.png", big), "layers": [upload("layer.png", layer)], "composite": None}
    image, region = read_completion(editor, "", "pixels", cache, limits, pipeline)
    assert image.shape == (size, size, 3)  # resized: white left half, black right half (Lanczos rings by a level)
    assert (image[:, : size // 2 - 1] >= 250).all() and (image[:, size // 2 + 1:] <= 5).all()
    assert region.sum() == 1 and region[0, w - 1]
    _, region = read_completion({**editor, "layers": []}, " 0, 0, 2,1 ", "codes", cache, limits, pipeline)
    assert region.sum() == 2 and region[0, :2].all()
    blank = {**editor, "layers": [upload("blank.png", np.zeros((size, size, 4), np.uint8))]}
    (tmp_path / "outside.png").write_bytes((cache / "big.png").read_bytes())
    (cache / "text.png").write_text("not an image")
    wide = upload("wide.png", np.zeros((10, 10_000, 3), np.uint8))  # 100,000 pixels in 4 KB: within the bytes
    for value, box, units, message in [
        (None, "", "pixels", "no image to complete: upload one or pick an example"),
        (blank, "", "pixels", "no region to complete: paint over it with the brush, or type a box"),
        (editor, "1,1,2,2", "codes", "the region is both drawn and typed as a box"),
        (blank, "5,5,2,2", "pixels", r"box=\[5.0, 5.0, 2.0, 2.0\] is not a box inside the image"),
        (blank, "0,0,1.5,1", "codes", "in codes must be whole cells"),
        (blank, "1,2,3", "pixels", "the box must be four numbers x0,y0,x1,y1"),
        (blank, "1,2,3,nan", "pixels", "the box must be four numbers"), (blank, "0,0,1,1", "inches", "units must be one of"),
        ({**blank, "background": {"path": str(tmp_path / "outside.png")}}, "", "pixels", "was not uploaded to this page"),
        ({**blank, "background": {"path": f"{cache}/../outside.png"}}, "", "pixels", "was not uploaded to this page"),
        ({**blank, "background": "/etc/passwd"}, "", "pixels", "must be an uploaded image file"),
        ({**blank, "background": {"path": str(cache / "text.png")}}, "", "pixels", "is not an image this page reads"),
        ({**blank, "background": wide}, "", "pixels", "is 10000x10 = 100000 pixels; this page takes at most 90000"),
        ({**blank, "layers": [wide]}, "", "pixels", "the drawn layer is 10000x10"),
        ({**blank, "background": upload("noise.png", np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8))},
         "", "pixels", r"the image is \d+ bytes; this page takes files of at most 50000 bytes")]:
        with pytest.raises(ValueError, match=message):
            read_completion(value, box, units, cache, limits, pipeline)


def test_grid_draws_chinese_captions_with_a_font_and_falls_back_without(tmp_path):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    font = find_cjk_font()
    if font is not None:
        grid, drawn = captioned_grid(images, [PROMPT, "ascii"], 3, font)
        assert drawn and grid.width == 3 * 128 + 4 * 4
        caption_band = np.asarray(grid)[4:20]  # the first caption's line, above the first row of images
        assert (caption_band < 128).any()  # dark text pixels
    grid, drawn = captioned_grid(images, [PROMPT, "ascii"], 3, None)
    assert not drawn  # no font for Chinese: that caption is left off, the ASCII one drawn
    assert (np.asarray(grid)[4:20] == 255).all()
    with pytest.raises(FileNotFoundError, match="install a CJK font package"):
        find_cjk_font(str(tmp_path / "missing.ttc"))


def test_examples_from_the_file_and_the_checkpoints_run(ckpt):
    lines = (REPO / "experiments" / "prompts" / "shapes.txt").read_text(encoding="utf-8").split()
    examples = example_prompts(str(REPO / "experiments" / "prompts" / "shapes.txt"), ckpt, 5)
    assert examples[: len(lines)] == lines
    if not os.environ.get("T2I_DEMO_CKPT"):  # the tests' run: its val split is there, 16 captions
        assert len(examples) == len(lines) + 5
    assert example_prompts(None, ckpt, 0) == []


def _demo_cfg(overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("demo", overrides=overrides)


def test_missing_or_mismatched_checkpoint_stops_with_a_clear_error(ckpt, tmp_path):
    with pytest.raises(ValueError, match="needs ckpt=PATH"):
        setup(_demo_cfg([]), tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.ckpt not found"):
        setup(_demo_cfg([f"ckpt={tmp_path / 'missing.ckpt'}"]), tmp_path)
    config = T2IPipeline.from_checkpoint(ckpt).record.vqgan.config
    torch.manual_seed(1)
    other = tmp_path / "other_vqgan.ckpt"
    save_vqgan(other, VQModel(config))
    with pytest.raises(ValueError, match="is not the one .* was trained with"):
        setup(_demo_cfg([f"ckpt={ckpt}", f"vqgan_ckpt={other}"]), tmp_path)
    with pytest.raises(ValueError, match="queue.max_batch must be an integer >= 1"):
        setup(_demo_cfg([f"ckpt={ckpt}", "queue.max_batch=0"]), tmp_path)
    with pytest.raises(ValueError, match="sampling.step must be one of auto, eager, static, compiled, frozen"):
        setup(_demo_cfg([f"ckpt={ckpt}", "sampling.step=graph"]), tmp_path)


def test_the_command_exits_with_the_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "t2i.demo", f"ckpt={tmp_path / 'missing.ckpt'}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "missing.ckpt not found" in result.stderr


# ---------------------------------------------------------------------------------------------
# The style menu: LoRA adapters of the checkpoint, attached to its one GPT and switched per request


def _make_adapter(ckpt: str, path: Path, targets: list[str], seed: int, base_sha256_of=None) -> Path:
    """An adapter file of the checkpoint's GPT (as a stage.lora run saves one) with random nonzero updates;
    `base_sha256_of`: record another GPT as its base."""
    gpt, record = load_gpt(ckpt)
    config = LoraConfig(rank=2, targets=targets)
    entry = adapter_record(config, base_sha256_of or gpt, ckpt)
    move_from_zero(add_lora(gpt, config), std=0.5, seed=seed)
    save_adapter(path, gpt, dataclasses.replace(record, adapter=entry))
    return path


@pytest.fixture(scope="module")
def styles(ckpt, tmp_path_factory) -> dict[str, str]:
    """Two adapters of the checkpoint's GPT, adapting different layers: style name (the file's) -> file."""
    folder = tmp_path_factory.mktemp("styles")
    return {"ink": str(_make_adapter(ckpt, folder / "ink.ckpt", ["attention", "mlp"], 1)),
            "pastel": str(_make_adapter(ckpt, folder / "pastel.ckpt", ["attention"], 2))}


def test_a_style_samples_as_its_adapter_and_switching_leaves_no_trace(ckpt, styles, pipeline, tmp_path):
    """Requests of each style get exactly the images T2IPipeline.from_checkpoint(BASE, adapter=X, merge=False) gives
    for the prompt and seed (task=generate's path; with the adapter merged, as eval.py runs it, the same greedy codes);
    "base" gets the base's after styled requests, and a style its own again after others ran."""
    page, engine, _ = setup(_demo_cfg([f"ckpt={ckpt}", f"adapters=[{styles['ink']},{styles['pastel']}]",
                                       "device=cpu"]), tmp_path)
    assert engine.pipeline.step_mode == "eager"  # auto, with styles
    settings = {name: Settings(samples=2, guidance_scale=3.0, top_k=10, style=name) for name in ("base", *styles)}
    done = {}
    for name in ["ink", "base", "pastel", "ink", "base"]:
        job = Job(PROMPT, 5, settings[name])
        engine.sample([job])
        done.setdefault(name, []).append(job.images)
    seeds, cfg = prompt_seeds(5, [PROMPT]), settings["ink"].sampling()
    assert torch.equal(done["base"][0], pipeline.sample([PROMPT], cfg, seeds=seeds).images)
    for name, path in styles.items():
        unmerged = T2IPipeline.from_checkpoint(ckpt, adapter=path, merge=False)
        assert torch.equal(done[name][0], unmerged.sample([PROMPT], cfg, seeds=seeds).images), name
        assert not torch.equal(done[name][0], done["base"][0]), f"the adapter {name} changed no image"
    assert torch.equal(done["ink"][0], done["ink"][1]) and torch.equal(done["base"][0], done["base"][1])
    # the fixed-shape step (sampling.step=static) runs the style too
    engine.pipeline.step_mode = "static"
    job = Job(PROMPT, 5, settings["pastel"])
    engine.sample([job])
    assert torch.equal(job.images, done["pastel"][0])
    # merged into the weights (eval.py adapter=): the same greedy codes
    greedy = SamplingConfig(greedy=True, guidance_scale=3.0)
    merged = T2IPipeline.from_checkpoint(ckpt, adapter=styles["ink"]).sample_codes([PROMPT, ""], greedy)
    engine.use_style("ink")
    assert torch.equal(engine.pipeline.sample_codes([PROMPT, ""], greedy), merged)
    # the page: the menu, and the styles in the model panel
    config = json.dumps(page.config, ensure_ascii=False)
    assert '"choices": [["base", "base"], ["ink", "ink"], ["pastel", "pastel"]]' in config
    assert "| Styles | base (no adapter); ink: LoRA `ink.ckpt`" in config and "pastel: LoRA `pastel.ckpt`" in config
    assert str(Path(styles["ink"]).parent) not in config  # files by name only


def test_a_style_is_only_one_of_the_menus_names_and_nothing_loads(ckpt, styles, tmp_path, monkeypatch):
    """Raw /generate and /complete payloads naming an unknown style, a path or not a name at all: refused with the
    menu's names, no file read and nothing sampled; a listed style is served."""
    page, engine, _ = setup(_demo_cfg([f"ckpt={ckpt}", f"adapters={{ink: {styles['ink']}}}", "device=cpu"]),
                            tmp_path)
    page.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        url = page.local_url
        assert _call(url, [*ARGS[:-1], 1, "ink"])[0] == "complete"
        batches = engine.batches

        def no_loading(*args, **kwargs):
            raise AssertionError("a file was loaded")

        monkeypatch.setattr(torch, "load", no_loading)
        for style in ["pastel", "Ink", "", styles["ink"], styles["pastel"], "../ink.ckpt", "/etc/passwd", None, 1,
                      ["ink"], {"path": styles["ink"]}]:
            kind, answer = _call(url, [*ARGS[:-1], 1, style])
            assert kind == "error" and "style must be one of base, ink, got" in answer, (style, kind, answer)
            kind, answer = _call(url, [{"background": None}, "0,0,1,1", "codes", PROMPT, *ARGS[1:-1], 1, style],
                                 endpoint="complete")
            assert kind == "error" and "style must be one of base, ink, got" in answer, (style, kind, answer)
        assert engine.batches == batches  # nothing sampled
    finally:
        page.close()


def test_styles_are_checked_at_start(ckpt, styles, pipeline, tmp_path):
    """An adapter of another base stops the demo with the message; so do compiled steps and quantized weights (the
    styles run beside the base's weights, unmerged), two styles of one name, and a style named base."""
    wrong = _make_adapter(ckpt, tmp_path / "wrong.ckpt", ["attention"], 3, base_sha256_of=GPT(pipeline.gpt.cfg))
    with pytest.raises(CheckpointError, match=r"adapter .*wrong\.ckpt was trained on another base than .*last\.ckpt"):
        setup(_demo_cfg([f"ckpt={ckpt}", f"adapters=[{styles['ink']},{wrong}]"]), tmp_path)
    for option in ["sampling.step=compiled", "sampling.step=frozen"]:
        with pytest.raises(ValueError, match=f"{option} compiles .* with adapters= use sampling.step=eager or static"):
            setup(_demo_cfg([f"ckpt={ckpt}", f"adapters=[{styles['ink']}]", option]), tmp_path)
    with pytest.raises(ValueError, match="sampling.weights=int8 .* with adapters= keep sampling.weights=unchanged"):
        setup(_demo_cfg([f"ckpt={ckpt}", f"adapters=[{styles['ink']}]", "sampling.weights=int8"]), tmp_path)
    copy = tmp_path / "other" / "ink.ckpt"
    copy.parent.mkdir()
    shutil.copy(styles["ink"], copy)
    with pytest.raises(ValueError, match="two files are named ink .* adapters={name: PATH"):
        setup(_demo_cfg([f"ckpt={ckpt}", f"adapters=[{styles['ink']},{copy}]"]), tmp_path)
    with pytest.raises(ValueError, match="not 'base'"):
        setup(_demo_cfg([f"ckpt={ckpt}", f"adapters={{base: {styles['ink']}}}"]), tmp_path)


# ---------------------------------------------------------------------------------------------
# The real command on a local port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QUEUE_SIZE, MAX_BATCH = 4, 2  # the server's queue.size and queue.max_batch: 2 * MAX_BATCH requests run at once
UPLOAD_BYTES, UPLOAD_PIXELS = 200_000, 1_000_000  # the server's limits.max_upload_bytes and max_upload_pixels


@contextlib.contextmanager
def start_demo(ckpt: str, run_dir: Path, *options: str):
    """`python -m t2i.demo ckpt=... [options]` on a free port of 127.0.0.1: its URL, run folder and process, once it
    answers; stopped after. Its Gradio cache is a folder of its own (GRADIO_TEMP_DIR); one torch thread (a shared
    2-core machine runs the tiny model ~10x faster so than with two)."""
    port = _free_port()
    log = open(run_dir.parent / f"{run_dir.name}.server.log", "w")
    cache = run_dir.parent / f"{run_dir.name}.gradio_cache"
    cache.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "t2i.demo", f"ckpt={ckpt}", f"port={port}", "device=cpu",
                                f"hydra.run.dir={run_dir}", *options],
                               cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
                                    "GRADIO_TEMP_DIR": str(cache)})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the demo did not start:\n" + Path(log.name).read_text()[-3000:])
                time.sleep(0.5)
        yield url, run_dir, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    with start_demo(ckpt, tmp_path_factory.mktemp("demo_run"), f"queue.max_batch={MAX_BATCH}",
                    f"queue.size={QUEUE_SIZE}", "sampling.samples_per_prompt=2", f"limits.max_upload_bytes={UPLOAD_BYTES}",
                    f"limits.max_upload_pixels={UPLOAD_PIXELS}") as started:
        yield started


def _chromium() -> str:
    """Debian's chromium and the playwright package, or a skip (a failure under CI) naming what is missing."""
    missing = []
    browser = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if browser is None:
        missing.append("Debian's chromium (apt-get install chromium; `make test` does it as root)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if missing:
        message = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return browser


def _open_page(playwright, browser_path: str, url: str, seed: int, samples: int):
    """(browser, page): chromium on the demo's page, its seed and samples per prompt filled in."""
    browser = playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.wait_for_selector("#prompt textarea")
    page.fill("#seed input", str(seed))
    page.fill("#samples input[type=number]", str(samples))
    page.press("#samples input[type=number]", "Enter")
    return browser, page


def _gallery_pngs(page) -> list[bytes]:
    sources = page.eval_on_selector_all("#gallery img", "els => els.map(e => e.src)")
    return [page.request.get(src).body() for src in sources]


def _generate(page, prompt: str, count: int) -> list[str]:
    """Type the prompt, press Generate, wait for a new result (its name in the note) with `count` images;
    the progress texts the page showed meanwhile."""
    page.fill("#prompt textarea", prompt)
    page.evaluate("""() => {
        window.progressSeen = [];
        window.progressObserver?.disconnect();
        window.progressObserver = new MutationObserver(() => {
            const found = document.body.innerText.match(/sampling: step \\d+ of \\d+/);
            if (found) window.progressSeen.push(found[0]);
        });
        window.progressObserver.observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    before = page.inner_text("#note")
    page.click("#generate")
    _wait_for_result(page, count, before)
    return page.evaluate("window.progressSeen")


def _wait_for_result(page, count: int, before: str) -> None:
    """Wait for a new result (its name in the note, unlike `before`) with `count` images shown."""
    page.wait_for_function(
        """([count, before]) => {
            const name = text => (text.match(/Result (\\S+)\\./) || [])[1];
            const note = document.querySelector('#note').innerText;
            const imgs = [...document.querySelectorAll('#gallery img')];
            return name(note) && name(note) !== name(before) && !note.includes('sampling:')
                && imgs.length === count && imgs.every(e => e.complete && e.naturalWidth > 0);
        }""", arg=[count, before], timeout=120_000)


@pytest.mark.slow  # the server starts in ~20 s
def test_page_in_a_browser(server, ckpt, pipeline):
    browser_path = _chromium()
    from playwright.sync_api import expect, sync_playwright

    url, _, _ = server
    image_len = pipeline.gpt.cfg.image_len
    with sync_playwright() as p:
        browser, page = _open_page(p, browser_path, url, seed=11, samples=3)
        progress = _generate(page, PROMPT, 3)
        note = page.inner_text("#note")
        seconds = float(re.search(r"sampled in ([\d.]+) s", note).group(1))
        if seconds >= 0.5:  # the page polls every 0.1 s: a sampling this long shows its steps (the count is tested above)
            assert progress and progress[-1].endswith(f"of {image_len}")  # steps done of image_len
        assert "3 image(s), seed 11" in note and "Empty prompt" not in note
        first = _gallery_pngs(page)
        assert len(first) == 3 and all(png.startswith(b"\x89PNG") for png in first)
        assert PROMPT in page.inner_text("#gallery")  # the prompt and settings under each image
        page.wait_for_function("""() => [...document.querySelectorAll('#downloads a')]
            .map(a => a.href.split('/').pop()).sort().join() === 'grid.png,images.zip'""")
        if os.environ.get("T2I_DEMO_SCREENSHOT"):  # the README's picture, as 256-colour PNG (a small file)
            shot = os.environ["T2I_DEMO_SCREENSHOT"]
            page.screenshot(path=shot, full_page=True)
            Image.open(shot).convert("RGB").quantize(256).save(shot, optimize=True)
        # the same seed: the same images
        _generate(page, PROMPT + " ", 3)  # spaces around it are dropped: the same prompt
        assert _gallery_pngs(page) == first
        # an empty prompt: unconditional images, and the page says so
        _generate(page, "", 3)
        assert "Empty prompt" in page.inner_text("#note")
        # the model panel: size, layout, VQGAN, training origin, checkpoint hash, device, the step mode auto chose
        page.get_by_role("button", name="Model").click()
        expect(page.locator("#model-card")).to_contain_text("Checkpoint")
        card = page.inner_text("#model-card")
        for fact in ["parameters", "layers", "t2i", "VQGAN", "trained from scratch", file_sha256(ckpt)[:16], "cpu",
                     "eager (sampling.step=auto)"]:
            assert fact in card, fact
        # the Complete tab: pick an example (its image), type a box and a prompt, press Complete: the completions
        page.get_by_role("tab", name="Complete").click()
        page.click("#complete-examples input")
        page.get_by_role("option").first.click()
        expect(page.locator("#box textarea")).not_to_have_value("")  # the example is in: its image, box and prompt
        page.fill("#box textarea", "0,0,2,2")
        page.check("#box-units input[value=codes]")
        page.fill("#complete-prompt textarea", "蓝色的大方块")
        before = page.inner_text("#note")
        page.click("#complete")
        _wait_for_result(page, 3, before)
        assert "3 completion(s), seed 11" in page.inner_text("#note")
        assert f"completed 4 of {image_len} codes" in page.inner_text("#gallery")  # the 2x2 cells of the box
        completed = _gallery_pngs(page)
        assert len(completed) == 3 and all(png.startswith(b"\x89PNG") for png in completed)
        browser.close()


def _gallery_sampling(page) -> SamplingConfig:
    """The sampling options the gallery's captions say its images were drawn with (Settings.describe)."""
    text = page.inner_text("#gallery")
    number = lambda name: re.search(rf"{name} ([\d.]+)", text).group(1)
    return SamplingConfig(guidance_scale=float(number("guidance")), temperature=float(number("temperature")),
                          top_k=int(number("top-k")), top_p=float(number("top-p")))


@pytest.mark.slow
def test_a_style_picked_in_the_browser_samples_as_its_adapter(ckpt, styles, tmp_path_factory):
    """The Style menu in a real browser: "ink" gives the images of the base with ink's adapter for the prompt, seed
    and settings the page shows (task=generate's path, T2IPipeline.from_checkpoint(adapter=..., merge=False)),
    the caption names the style, and "base" afterwards gives the base's images again."""
    browser_path = _chromium()
    from playwright.sync_api import sync_playwright

    run = tmp_path_factory.mktemp("styled_demo")
    with start_demo(ckpt, run, f"adapters=[{styles['ink']},{styles['pastel']}]") as (url, _, _), \
            sync_playwright() as p:
        browser, page = _open_page(p, browser_path, url, seed=7, samples=2)
        shown = {}
        for style in ("base", "ink", "base"):
            page.click("#style input")
            page.get_by_role("option", name=style, exact=True).click()
            _generate(page, PROMPT, 2)
            shown.setdefault(style, []).append(_gallery_pngs(page))
            assert ("style ink" in page.inner_text("#gallery")) == (style == "ink")
        sampling = dataclasses.replace(_gallery_sampling(page), samples_per_prompt=2)
        browser.close()
    assert shown["base"][0] == shown["base"][1]  # the style left no trace
    assert shown["ink"][0] != shown["base"][0]
    styled = T2IPipeline.from_checkpoint(ckpt, adapter=styles["ink"], merge=False)
    expected = styled.sample([PROMPT], sampling, seeds=prompt_seeds(7, [PROMPT])).images
    assert len(shown["ink"][0]) == len(expected) == 2
    for png, image in zip(shown["ink"][0], expected):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image.permute(1, 2, 0).numpy())


@pytest.mark.slow
def test_gradio_client_calls_the_same_endpoint(server, pipeline):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, run_dir, _ = server
    client = Client(url, verbose=False)
    gallery, note, files = client.predict(PROMPT, 2, 3.0, 1.0, 10, 1.0, 4, False, 1, api_name="/generate")
    assert len(gallery) == 2 and "seed 4" in note and PROMPT in gallery[0]["caption"]
    assert sorted(Path(f).name for f in files) == ["grid.png", "images.zip"]
    # the images task=generate gives this prompt and seed
    cfg = Settings(2, 3.0, 1.0, 10, 1.0).sampling()
    expected = pipeline.decode(pipeline.sample_codes([PROMPT], cfg, seeds=prompt_seeds(4, [PROMPT])))
    for entry, image in zip(gallery, expected):
        assert np.array_equal(np.asarray(Image.open(entry["image"])), image.permute(1, 2, 0).numpy())
    # refused requests are answered with the reason (Gradio's checks of the controls' ranges, then the
    # demo's), and the server goes on
    with pytest.raises(AppError, match="temperature must be from 0.1 to 2.0, got 0.0"):
        client.predict(PROMPT, 2, 3.0, 0.0, 10, 1.0, 4, False, 1, api_name="/generate")
    with pytest.raises(AppError, match="the prompt has 1200 characters; this page takes at most 1000"):
        client.predict("红" * 1200, 2, 3.0, 1.0, 10, 1.0, 4, False, 1, api_name="/generate")
    # several at once: all answered with their own images
    answers = {}

    def ask(seed):
        answers[seed] = Client(url, verbose=False).predict(PROMPT, 2, 3.0, 1.0, 10, 1.0, seed, False, 1,
                                                           api_name="/generate")

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(answers) == [0, 1, 2, 3] and all(len(answer[0]) == 2 for answer in answers.values())
    hashes = {hashlib.sha256(Path(answer[0][0]["image"]).read_bytes()).hexdigest() for answer in answers.values()}
    assert len(hashes) == 4
    assert len(list((run_dir / "results").iterdir())) >= 5  # this test's 5 answered requests: PNGs, grid, zip


def _editor(background, layers=()) -> dict:
    """The editor's value as an API client sends it (gradio_client uploads the files)."""
    from gradio_client import handle_file

    return {"background": None if background is None else handle_file(str(background)),
            "layers": [handle_file(str(layer)) for layer in layers], "composite": None}


@pytest.mark.slow
def test_gradio_client_completes_an_image(server, pipeline, tmp_path):
    """/complete: the images T2IPipeline.complete (task=complete) gives for the image, region, prompt and seed,
    whose codes outside the region are the image's own; a drawn region; every bad region and upload refused with
    what to fix."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _, _ = server
    client = Client(url, verbose=False)
    size, (h, w) = pipeline.image_size, pipeline.record.grid
    image, prompt, box, units = example_completions(size)[0]
    Image.fromarray(image).save(tmp_path / "image.png")
    gallery, note, files = client.predict(_editor(tmp_path / "image.png"), box, units, prompt, 2, 3.0, 1.0, 10, 1.0, 4,
                                          False, 1, api_name="/complete")
    assert len(gallery) == 2 and "2 completion(s), seed 4" in note
    region = pipeline.region(box=[float(x) for x in box.split(",")], box_units=units)
    expected = pipeline.complete([prompt], [image], [region], Settings(2, 3.0, 1.0, 10, 1.0).sampling(),
                                 seeds=prompt_seeds(4, [prompt]))
    for entry, completed in zip(gallery, expected.images):
        assert np.array_equal(np.asarray(Image.open(entry["image"])), completed.permute(1, 2, 0).numpy())
    known = pipeline.vqgan.encode(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
    assert (expected.codes[:, ~region] == known[~region]).all()  # the region's outside: the image's own codes
    archive = next(f for f in files if f.endswith("images.zip"))
    with zipfile.ZipFile(archive) as zf:
        record = json.loads(zf.read("settings.json"))
        assert np.array_equal(np.asarray(Image.open(zf.open("input.png"))), image)
    assert record["task"] == "complete" and record["region"] == region.int().tolist()
    # a drawn region: one painted pixel in the last cell of the first row
    layer = np.zeros((size, size, 4), np.uint8)
    layer[0, -1] = 255
    Image.fromarray(layer).save(tmp_path / "layer.png")
    gallery, _, _ = client.predict(_editor(tmp_path / "image.png", [tmp_path / "layer.png"]), "", units, prompt, 1,
                                   1.0, 1.0, 0, 1.0, 4, False, 1, api_name="/complete")
    assert f"completed 1 of {h * w} codes" in gallery[0]["caption"]
    # refused, naming what to fix: bad boxes, no region, no image, too many pixels (in a small file)
    Image.fromarray(np.zeros((size, size, 4), np.uint8)).save(tmp_path / "blank.png")
    Image.new("RGB", (2000, 1000), "white").save(tmp_path / "wide.png")
    assert (tmp_path / "wide.png").stat().st_size < UPLOAD_BYTES
    for editor, box, units, message in [
            (_editor(tmp_path / "image.png"), f"0,0,{size + 1},4", "pixels", "is not a box inside the image"),
            (_editor(tmp_path / "image.png"), "3,3,1,1", "codes", "is not a box inside the image"),
            (_editor(tmp_path / "image.png"), "1,2", "codes", "the box must be four numbers"),
            (_editor(tmp_path / "image.png", [tmp_path / "blank.png"]), "", "pixels", "no region to complete"),
            (_editor(tmp_path / "image.png", [tmp_path / "layer.png"]), "0,0,1,1", "codes", "both drawn and typed"),
            (_editor(None), "0,0,1,1", "codes", "no image to complete: upload one or pick an example"),
            (_editor(tmp_path / "wide.png"), "0,0,1,1", "codes",
             f"the image is 2000x1000 = 2000000 pixels; this page takes at most {UPLOAD_PIXELS} pixels")]:
        with pytest.raises(AppError, match=message):
            client.predict(editor, box, units, prompt, 1, 1.0, 1.0, 0, 1.0, 4, False, 1, api_name="/complete")


# ---------------------------------------------------------------------------------------------
# Memory: sampling.batch_size bounds the sequences sampled at once


def _rows_allocated(monkeypatch) -> list[int]:
    """The batch of every KV cache the GPT allocates from now on (every sampling path asks GPT.new_cache)."""
    from t2i.models.gpt import GPT

    rows, new_cache = [], GPT.new_cache
    monkeypatch.setattr(GPT, "new_cache", lambda model, batch, *rest: rows.append(batch) or new_cache(model, batch, *rest))
    return rows


@pytest.mark.parametrize("method", ["ar", "sjd"])
def test_a_prompts_samples_split_over_sampling_batches_keep_their_codes(pipeline, monkeypatch, method):
    """More samples than sampling.batch_size: a prompt's samples go over several batches, each sample
    drawing from its own stream, so every code is the one the unsplit batch gives; the cache never holds
    more than batch_size sequences (x2: guidance's unconditional half)."""
    from t2i.sampling import SamplingConfig

    prompts, seeds = [PROMPT, "蓝色的大方块"], prompt_seeds(3, [PROMPT, "蓝色的大方块"])
    cfg = SamplingConfig(samples_per_prompt=3, guidance_scale=3.0, top_k=10, method=method, sjd_window=8)
    whole = pipeline.sample_codes(prompts, cfg, batch_size=6, seeds=seeds)  # one batch: both prompts
    rows = _rows_allocated(monkeypatch)
    split = pipeline.sample_codes(prompts, cfg, batch_size=2, seeds=seeds)  # samples 0-1, then 2, of each prompt
    assert torch.equal(split, whole)
    assert rows == [4, 2, 4, 2]


def test_a_request_at_the_page_limits_stays_within_the_sampling_batch(pipeline, monkeypatch):
    """The most a page request may ask for (conf/demo.yaml's limits, guidance on, reranking): no KV cache and no
    forward pass (sampling, Caption Loss) holds more than sampling.batch_size x 2 sequences."""
    cfg = _demo_cfg([])
    batch_size, limits = cfg.sampling.batch_size, cfg.limits
    scorer, source = CaptionScorer.for_pipeline(pipeline, None)
    assert scorer is not None, source  # the tests' checkpoint learned captioning: rerank is on the page
    settings = Settings(limits.max_samples, 3.0, 1.0, 10, 1.0, limits.max_rerank)
    rows, batches = _rows_allocated(monkeypatch), []
    hook = pipeline.gpt.register_forward_pre_hook(lambda _, args: batches.append(len(args[0])))
    try:
        job = Job(PROMPT, 0, settings)
        Engine(pipeline, scorer, batch_size=batch_size, start=False).sample([job])
    finally:
        hook.remove()
    sequences = limits.max_samples * limits.max_rerank  # 128: 8 sampling batches of 16
    assert job.images.shape[0] == limits.max_samples and job.total == sequences // batch_size * pipeline.gpt.cfg.image_len
    assert rows == [2 * batch_size] * (sequences // batch_size)
    assert max(batches) == 2 * batch_size


# ---------------------------------------------------------------------------------------------
# The served command under hostile use: raw HTTP on loopback (the Gradio API's own routes)

ARGS = [PROMPT, 2, 3.0, 1.0, 10, 1.0, 4, False, 1]  # prompt, samples, guidance, temperature, top-k, top-p, seed, random, rerank


def _http(url: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _join(url: str, body: bytes, endpoint: str = "generate") -> tuple[int, str]:
    """POST an endpoint's data to the queue: (status, event id or the refusal's text)."""
    status, answer = _http(url + f"gradio_api/call/{endpoint}", body)
    return status, json.loads(answer)["event_id"] if status == 200 else answer.decode()


def _result(url: str, event: str, endpoint: str = "generate") -> tuple[str, object]:
    """The event's end, read from its stream: ("complete", outputs) or ("error", message)."""
    status, stream = _http(url + f"gradio_api/call/{endpoint}/{event}", timeout=120)
    kind, data = re.findall(r"^event: (\w+)\ndata: (.*)$", stream.decode(), re.M)[-1]
    payload = json.loads(data)
    return kind, payload["error"] if kind == "error" and isinstance(payload, dict) else payload


def _call(url: str, args: list | None = None, body: bytes | None = None, endpoint: str = "generate") -> tuple[str, object]:
    status, event = _join(url, body if body is not None else json.dumps({"data": args}).encode(), endpoint)
    return _result(url, event, endpoint) if status == 200 else ("refused", f"{status}: {event}")


def _fetch(url: str, path: str) -> int:
    return _http(url + "gradio_api/file=" + path)[0]


@pytest.mark.slow
def test_visitors_get_only_their_own_files(server, ckpt):
    """Two requests; then every file of the run folder (config, log, both requests' results) through the file
    route, as is and through `..`, a symlink and URL-encoding: all refused, while a request's own returned
    files are served. The page names no absolute path."""
    url, run_dir, _ = server
    mine, other = (_call(url, [PROMPT, 2, 1.0, 1.0, 0, 1.0, seed, False, 1]) for seed in (1, 2))
    assert mine[0] == other[0] == "complete", (mine, other)
    (gallery, note, downloads), (_, other_note, _) = mine[1], other[1]
    own = [entry["image"]["path"] for entry in gallery] + [entry["path"] for entry in downloads]
    for path in own:  # the route works: what the request was handed comes back
        assert _fetch(url, path) == 200, path
    assert _http(url + "gradio_api/file=" + own[0])[1] == Path(own[0]).read_bytes()
    on_disk = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(run_dir).as_posix() for p in on_disk}
    assert {".hydra/config.yaml", "demo.log"} <= names and len(list((run_dir / "results").iterdir())) >= 2
    cache = Path(own[0]).parent
    link = cache / "config.yaml"  # a symlink inside Gradio's cache, to a file of the run folder
    link.symlink_to(run_dir / ".hydra" / "config.yaml")
    try:
        tries = []
        for path in on_disk:
            text = str(path)
            tries += [text, f"{cache}/../{os.path.relpath(path, cache.parent)}",
                      urllib.parse.quote(text, safe=""), text.replace("/", "%2F").replace(".", "%2e")]
        tries += [str(link), str(run_dir), str(run_dir / "results"), str(cache.parent), "/etc/passwd", "../" * 8 + "etc/passwd"]
        served = [path for path in tries if _fetch(url, path) != 403]
        assert served == [], served
    finally:
        link.unlink()
    # result names carry a random token: seeing one's own does not give the other's
    name, other_name = (re.search(r"Result `(\S+)`", text).group(1) for text in (note, other_note))
    assert len(name.rsplit("-", 1)[1]) == 16 and name.rsplit("-", 1)[1] != other_name.rsplit("-", 1)[1]
    # no absolute path on the page: the checkpoint, the run folder and the cache are nowhere in its config
    page = _http(url + "config")[1].decode()
    for path in [str(Path(ckpt).resolve().parent), str(run_dir), str(REPO)]:
        assert path not in page, path
    assert Path(ckpt).name in page


@pytest.mark.slow
def test_completion_reads_no_file_a_visitor_names(server):
    """/complete's image: a file over the upload limit is refused by the upload route, unkept; a path a visitor
    names (outside the upload folder, another request's stored result, the run folder's config, through `..`, a
    URL of the server itself) is refused by Gradio before the event runs, with or without the file's meta, and
    nothing of the file comes back or lands in the cache."""
    import httpx

    url, run_dir, _ = server
    cache = run_dir.parent / f"{run_dir.name}.gradio_cache"
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, format="PNG")
    assert len(big.getvalue()) > UPLOAD_BYTES
    answer = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big.getvalue(), "image/png")})
    assert answer.status_code == 413 and "maximum allowed size" in answer.text
    assert not list(cache.rglob("big.png"))
    assert _call(url, [PROMPT, 1, 1.0, 1.0, 0, 1.0, 3, False, 1])[0] == "complete"  # another visitor's result
    stored = sorted((run_dir / "results").glob("*/00.png"))[-1]
    results = len(list((run_dir / "results").iterdir()))
    config = run_dir / ".hydra" / "config.yaml"
    tries = ["/etc/passwd", str(stored), str(config), f"{cache}/../../../../../../etc/passwd", f"{url}config",
             "http://localhost:1/x.png"]
    for path in tries:
        for background in [{"path": path, "meta": {"_type": "gradio.FileData"}}, {"path": path}, path]:
            kind, answer = _call(url, [{"background": background, "layers": [], "composite": None}, "0,0,1,1",
                                       "codes", PROMPT, 1, 1.0, 1.0, 0, 1.0, 0, False, 1], endpoint="complete")
            assert kind == "error" and ("not uploaded by a user" in answer or "blocked_paths" in answer
                                        or "'meta' field must be explicitly provided" in answer
                                        or "failed validation" in answer), (path, kind, answer)
            assert "root:" not in str(answer)
    assert len(list((run_dir / "results").iterdir())) == results  # nothing was completed
    cached = [p.read_bytes() for p in cache.rglob("*") if p.is_file()]
    assert not any(b"root:" in data or data == config.read_bytes() for data in cached)  # nothing was copied in


@pytest.mark.slow
def test_hostile_api_input_is_refused_and_the_server_stays_up(server):
    """Values no control can send, through gradio_client and raw HTTP: each refused with a message naming
    what to fix; prompts that look like paths or markup are only prompts; the server answers after all."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    url, _, _ = server
    client = Client(url, verbose=False)
    for index, value, message in [(1, "2", "samples per prompt must be a number, got '2'"),
                                  (1, 1.5, "samples per prompt must be a whole number, got 1.5"),
                                  (1, None, "samples per prompt must be a number, got None"),
                                  (1, 10 ** 40, "samples per prompt must be from 1 to 16, got 1000000"),
                                  (2, -3.0, "guidance scale must be from 1.0 to 10.0, got -3.0"),
                                  (3, 1e308, "temperature must be from 0.1 to 2.0, got 1e\\+308"),
                                  (4, -5, "top-k must be from 0 to"), (5, [0.5], "top-p must be a number"),
                                  (6, -1, "seed must be from 0 to 9007199254740991, got -1"),
                                  (7, "yes", "random seed must be true or false, got 'yes'"),
                                  (8, 9, "rerank must be from 1 to 8, got 9"),
                                  (0, {"path": "/etc/passwd"}, "the prompt must be text, got dict"),
                                  (0, "红" * 1_000_000, "the prompt has 1000000 characters; this page takes at most 1000")]:
        args = list(ARGS)
        args[index] = value
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/generate")
    # JSON's NaN and infinities (which gradio_client will not send), and bodies that are not the endpoint's
    for body, message in [(b'["x", NaN, 3.0, 1.0, 10, 1.0, 4, false, 1]', "samples per prompt must be a number, got nan"),
                          (b'["x", 2, 3.0, Infinity, 10, 1.0, 4, false, 1]', "temperature must be from 0.1 to 2.0, got inf"),
                          (b'["x", 2, 3.0, 1.0, 10, -Infinity, 4, false, 1]', "top-p must be from 0.05 to 1.0, got -inf"),
                          (b'["x", 2, 3.0, 1.0, 10, 1.0, NaN, false, 1]', "seed must be a number, got nan"),
                          (b'["x", 2, 3.0, 1.0, 10, 1.0, 1e999, false, 1]', "seed must be from 0 to 9007199254740991, got inf"),
                          (b'["x", 2]', r"didn't receive enough input values \(needed: 9, got: 2\)"), (b'"x"', "422"), (b"[", "422")]:
        kind, answer = _call(url, body=b'{"data": ' + body + b"}")
        assert kind in ("error", "refused") and re.search(message, str(answer)), (body, kind, answer)
    # prompts that look like paths or markup: images for them, the markup shown as text
    markup = "<img src=x onerror=alert(1)>![x](/gradio_api/file=/etc/passwd)" * 4  # longer than text_len: the note quotes it
    for prompt in ["../../.hydra/config.yaml", "/etc/passwd", "%2e%2e%2f", markup]:
        kind, answer = _call(url, [prompt, 1, 1.0, 1.0, 0, 1.0, 0, False, 1])
        assert kind == "complete" and len(answer[0]) == 1, (prompt, answer)
        assert not re.search(r"(?<!\\)[<!\[]", answer[1]), answer[1]  # markup characters only escaped
    assert "the model read “\\<img src\\=x" in answer[1]
    assert _call(url, ARGS)[0] == "complete"


@pytest.mark.slow
def test_more_clients_than_the_queue_holds_are_told_it_is_full(server):
    """A burst of requests beyond what runs (2 x queue.max_batch) plus queue.size: the rest are refused
    at once with 503 "Queue is full"; every accepted one gets its images, and the server goes on."""
    url, _, _ = server
    body = json.dumps({"data": [PROMPT, 16, 3.0, 1.0, 10, 1.0, 7, False, 1]}).encode()  # ~0.2 s a request
    joins = [_join(url, body) for _ in range(2 * MAX_BATCH + QUEUE_SIZE + 8)]
    refused = [text for status, text in joins if status != 200]
    assert refused and all(text == f'{{"detail":"Queue is full. Max size is {QUEUE_SIZE} and size is {QUEUE_SIZE}."}}'
                           for text in refused), refused
    for status, event in joins:
        if status == 200:
            kind, answer = _result(url, event)
            assert kind == "complete" and len(answer[0]) == 16
    assert _call(url, ARGS)[0] == "complete"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.mark.slow
def test_load_of_200_requests_keeps_memory_flat(server):
    """200 requests of varying settings and prompt sizes, as many at once as run (2 x queue.max_batch), bounded
    in time: all answered with their images, and the server's RSS at the end within 10% of its RSS after
    the first 20."""
    url, _, process = server
    prompts = ["", PROMPT, "蓝色的大方块，背景是白色的", PROMPT * 8, "x" * 900]
    requests = [[prompts[i % 5], 1 + i % 3, (1.0, 3.0)[i % 2], (0.7, 1.0, 1.3)[i % 3], (0, 10)[i % 2 == 0],
                 (1.0, 0.9)[i % 4 == 0], i, False, 1 + (i % 7 == 0)] for i in range(200)]
    answers, lock = {}, threading.Lock()
    deadline = time.monotonic() + 300

    def work(indices):
        for i in indices:
            if time.monotonic() > deadline:
                return
            kind, answer = _call(url, requests[i])
            with lock:
                answers[i] = (kind, len(answer[0]) if kind == "complete" else answer)

    def run(indices):
        threads = [threading.Thread(target=work, args=(indices[k::2 * MAX_BATCH],)) for k in range(2 * MAX_BATCH)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    run(list(range(20)))
    after_20 = _rss_mb(process.pid)
    run(list(range(20, 200)))
    after_all = _rss_mb(process.pid)
    assert len(answers) == 200, "not every request was answered within 5 minutes"
    wrong = {i: answer for i, answer in answers.items() if answer != ("complete", requests[i][1])}
    assert not wrong, wrong
    assert after_all <= 1.1 * after_20, f"RSS {after_20:.0f} MB after 20 requests, {after_all:.0f} MB after 200"
