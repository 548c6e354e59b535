"""The Gradio page: two tabs, Generate (the prompt box and examples) and Complete (an image to upload or pick,
the region drawn on it or typed as a box, a prompt), beside one set of sampling controls, the gallery with its
notes, the downloads and the model panel. The Generate button is the API endpoint /generate, the Complete
button /complete.

With adapters (conf/demo.yaml adapters) a Style menu above the tabs picks, per request, one of them or "base" (no
adapter), for both tabs: it is then the last input of /generate and /complete, a name the event checks against the
menu's (settings.read_style).

The events read the controls' values themselves (settings.Controls, and uploads.read_completion for the
image and region; Gradio's preprocessing off), hand the request to the engine, show its progress while it
waits and samples, and return only this request's files, copied into Gradio's cache: the run folder itself
is never served.
"""

from __future__ import annotations

import os

from t2i.adapters import BASE_STYLE
from t2i.demo.engine import Engine
from t2i.demo.files import Results
from t2i.demo.settings import Controls, prompt_notes
from t2i.demo.uploads import read_completion
from t2i.sampling.complete import BOX_UNITS

# small images enlarged in the gallery keep their pixels sharp
PAGE_CSS = "#gallery img { image-rendering: pixelated; }"


def progress_text(steps: int, total: int, image_len: int) -> str:
    """'step i of image_len' (and which sampling batch, when a request takes several)."""
    batches = total // image_len
    batch = min(steps // image_len, batches - 1)  # the batch sampling now
    text = f"sampling: step {steps - batch * image_len} of {image_len}"
    return text + (f", batch {batch + 1} of {batches}" if batches > 1 else "")


def build_page(engine: Engine, results: Results, controls: Controls, seed: int | None, examples: list[str],
               card: str, rerank_reason: str, concurrency: int, completions: list[tuple] = ()):
    """The Gradio page over the engine; `seed` the starting seed (None: random seed ticked); `completions` the
    Complete tab's examples (image, prompt, box, box units: card.example_completions)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    tokenizer = engine.pipeline.tokenizer
    image_len = engine.pipeline.gpt.cfg.image_len
    size, (grid_h, grid_w) = engine.pipeline.image_size, engine.pipeline.record.grid
    defaults, ends, can_rerank = controls.defaults, controls.ends, controls.can_rerank

    def generate(prompt, samples, guidance_scale, temperature, top_k, top_p, seed, random_seed, rerank,
                 style=BASE_STYLE, progress=gr.Progress()):
        try:
            prompt, settings, seed = controls.read(prompt, samples, guidance_scale, temperature, top_k, top_p, seed,
                                                   random_seed, rerank, style)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        notes = prompt_notes(tokenizer, prompt)
        return answer(engine.submit(prompt, seed, settings), notes, random_seed, progress)

    def complete(editor, box, box_units, prompt, samples, guidance_scale, temperature, top_k, top_p, seed,
                 random_seed, rerank, style=BASE_STYLE, progress=gr.Progress()):
        try:
            prompt, settings, seed = controls.read(prompt, samples, guidance_scale, temperature, top_k, top_p, seed,
                                                   random_seed, rerank, style)
            # the files of the editor's value: Gradio has checked that they came through its upload route (and
            # copied them into its cache); they are read only from there, bounded by the limits
            image, region = read_completion(editor, box, box_units, image_editor.GRADIO_CACHE, controls.limits,
                                            engine.pipeline)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        notes = prompt_notes(tokenizer, prompt)
        return answer(engine.submit(prompt, seed, settings, image, region), notes, random_seed, progress)

    def answer(job, notes, random_seed, progress):
        """Wait for the job, showing its progress; then its files (gallery, note, downloads)."""
        settings, seed = job.settings, job.seed
        while not job.done.wait(0.1):
            if job.total:
                progress((job.steps, job.total), desc=progress_text(job.steps, job.total, image_len), unit="steps")
            else:
                progress(None, desc=f"waiting for the model: {job.ahead} request(s) ahead")
        if job.error is not None:
            raise gr.Error(f"sampling failed: {job.error}")
        entries, downloads, name = results.save(job, notes, bool(random_seed))
        # this request's files, copied into Gradio's cache and served from there under a path only this answer
        # carries (a hash of the content and a secret); the run folder itself is never served (no allowed_paths)
        entries = [(gallery.move_resource_to_block_cache(path), caption) for path, caption in entries]
        downloads = [files.move_resource_to_block_cache(path) for path in downloads]
        done = "completion(s)" if job.kind == "complete" else "image(s)"
        summary = [f"{settings.samples} {done}, seed {seed}{' (random)' if random_seed else ''}, {settings.describe()}"
                   + f"; sampled in {job.seconds:.2f} s"
                   + (f", in a batch of {job.batched_with} requests" if job.batched_with > 1 else "")
                   + f". Result `{name}`."]
        return entries, "\n\n".join(notes + summary), downloads

    with gr.Blocks(title="t2i demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown("# t2i: text to image\nType a prompt (Chinese), choose the sampling options, press **Generate**; "
                    "or complete a region of an image with a prompt (**Complete**).")
        with gr.Row():
            with gr.Column(scale=2):
                style = None
                if controls.styles:  # the operator's adapters of this model, and the model without one
                    style = gr.Dropdown([BASE_STYLE, *controls.styles], value=BASE_STYLE, label="Style (LoRA adapter)",
                                        info="for Generate and Complete", elem_id="style")
                with gr.Tabs():
                    with gr.Tab("Generate", elem_id="generate-tab"):
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                            placeholder="画面左上角有一个红色的小圆形，背景是白色的 (empty: unconditional)")
                        button = gr.Button("Generate", variant="primary", elem_id="generate")
                        if examples:
                            gr.Examples([[p] for p in examples], inputs=[prompt], label="Examples")
                    with gr.Tab("Complete", elem_id="complete-tab"):
                        gr.Markdown(f"Upload an image (or pick an example; it is resized to the model's {size}x{size} "
                                    f"pixels) and paint over the region to sample with the brush, or type it as a "
                                    f"box; the rest of the image is kept as the model's codes of it.")
                        # PNG keeps an upload's pixels (the default WebP is lossy); a brush of a cell's width
                        brush = gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=max(1, size // grid_w // 2))
                        image_editor = gr.ImageEditor(label="Image (paint the region to complete)", sources=["upload"],
                                                      layers=False, transforms=[], format="png", brush=brush,
                                                      elem_id="complete-image")
                        with gr.Row():
                            box = gr.Textbox(label="or a box: x0,y0,x1,y1 (x1, y1 exclusive)", elem_id="box",
                                             placeholder=f"pixels 0-{size}, or code cells 0-{grid_w} across, "
                                                         f"0-{grid_h} down")
                            box_units = gr.Radio(list(BOX_UNITS), value="pixels", label="Box units",
                                                 elem_id="box-units")
                        complete_prompt = gr.Textbox(label="Prompt for the region", lines=2, elem_id="complete-prompt")
                        complete_button = gr.Button("Complete", variant="primary", elem_id="complete")
                        if completions:  # loaded by an event: gr.Examples would put the cache's path in the page
                            example = gr.Dropdown([f"{i + 1}. {prompt}" for i, (_, prompt, _, _) in enumerate(completions)],
                                                  value=None, type="index", label="Examples (shapes test images)",
                                                  elem_id="complete-examples")
                            example.input(lambda index: completions[index], example,
                                          [image_editor, complete_prompt, box, box_units], api_name=False)
                with gr.Accordion("Sampling", open=True):
                    samples = gr.Slider(*ends["samples"], value=defaults.samples, step=1,
                                        label="Samples per prompt", elem_id="samples")
                    guidance = gr.Slider(*ends["guidance_scale"], value=defaults.guidance_scale, step=0.5,
                                         label="Guidance scale (1: none)", elem_id="guidance")
                    temperature = gr.Slider(*ends["temperature"], value=defaults.temperature, step=0.05,
                                            label="Temperature", elem_id="temperature")
                    with gr.Row():
                        top_k = gr.Number(value=defaults.top_k, precision=0, minimum=ends["top_k"][0],
                                          maximum=ends["top_k"][1], label="Top-k (0: all codes)",
                                          elem_id="top-k")
                        top_p = gr.Slider(*ends["top_p"], value=defaults.top_p, step=0.01, label="Top-p (1: all)",
                                          elem_id="top-p")
                    with gr.Row():
                        seed_box = gr.Number(value=0 if seed is None else seed, precision=0, minimum=ends["seed"][0],
                                             maximum=ends["seed"][1],
                                             label="Seed", elem_id="seed")
                        random_seed = gr.Checkbox(value=seed is None, label="Random seed", elem_id="random-seed")
                    rerank = gr.Slider(*ends["rerank"], value=defaults.rerank if can_rerank else 1, step=1,
                                       label="Rerank: best of N by Caption Loss", interactive=can_rerank,
                                       info=None if can_rerank else f"unavailable: {rerank_reason}", elem_id="rerank")
            with gr.Column(scale=3):
                note = gr.Markdown(label="Notes", elem_id="note")
                gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", height="auto", elem_id="gallery")
                files = gr.File(label="Download: the captioned grid and a zip of the PNGs (with settings.json)",
                                file_count="multiple", elem_id="downloads")
        with gr.Accordion("Model", open=False):
            gr.Markdown(card, elem_id="model-card")
        inputs = [prompt, samples, guidance, temperature, top_k, top_p, seed_box, random_seed, rerank]
        if style is not None:
            inputs.append(style)
        button.click(generate, inputs, [gallery, note, files], api_name="generate", concurrency_limit=concurrency,
                     concurrency_id="generate", preprocess=False)
        prompt.submit(generate, inputs, [gallery, note, files], api_name=False, concurrency_limit=concurrency,
                      concurrency_id="generate", preprocess=False)
        # the same queue and concurrency as Generate (one model); the engine batches only completions together
        complete_button.click(complete, [image_editor, box, box_units, complete_prompt, *inputs[1:]],
                              [gallery, note, files], api_name="complete", concurrency_limit=concurrency,
                              concurrency_id="generate", preprocess=False)
    return page

