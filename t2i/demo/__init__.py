"""A web page over a GPT checkpoint: python -m t2i.demo ckpt=PATH [port=7860] [key=value ...] (conf/demo.yaml).

Type a prompt, set the sampling options, press Generate: the images appear in a gallery with the
prompt and the settings under each, beside a captioned grid and a zip of the PNGs to download. The
Complete tab completes a region of an image (uploaded or an example; the region painted or typed as a
box) with a prompt, through T2IPipeline.complete (eval.py task=complete).
Built with Gradio; `t2i.sampling.T2IPipeline` does the work. One job a module:

- `settings`: what a request asks for (`Settings`), and reading what the page or an API client sent
  (`Controls`, `clean_prompt`, `read_number`, `prompt_notes`): bad input is refused naming the control.
- `uploads`: reading the Complete tab's image and region (`read_completion`), bounded by `Limits` and only
  from Gradio's cache.
- `engine`: the model's thread (`Engine`): the queue, batching requests of one kind and equal settings, sampling,
  reranking by Caption Loss (t2i.scorers), the progress of each request (`Job`) as the sampler reports it.
- `files`: a request's files (`Results`): PNGs, the captioned grid, settings.json and a zip, in a
  folder of its own with a random token in its name; the oldest pruned.
- `card`: the model panel (`model_card`, `file_sha256`), the example prompts and completions.
- `page`: the Gradio layout and its events (`build_page`); the Generate button is the API endpoint /generate,
  the Complete button /complete.
- `app`: the config, setup and launch (`setup`, `main`); `__main__` runs it.

How requests are served: Gradio's queue holds at most `queue.size` requests. The model runs in one
thread of its own (the `Engine`): when it is free it takes the oldest waiting request together with
the others that ask for the same settings (up to `queue.max_batch`) and samples them as one batch,
each prompt from its own seed, so a request gets the same images whether it was batched or not,
and the same images `eval.py task=generate` gives for its prompt and seed. `sampling.batch_size`
bounds the sequences sampled at once (a request's images x rerank candidates split over sampling
batches, the images unchanged), so a request's peak memory does not grow with the page's limits
(docs/demo.md: the formula, a measurement). A visitor gets only the files of the request they made:
the run folder is never served (docs/demo.md).
"""
