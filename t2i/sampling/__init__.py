"""Generation: text prompts -> image codes -> images, and image codes -> captions. One concern a module:

- options.py: SamplingConfig, CaptionConfig, their checks, the accepted names, sampling.step=auto's rule; SamplingStats
- seeds.py: the one seed rule (prompt_seeds), uniforms and per-row generators drawn from seeds
- guidance.py: classifier-free guidance scales (schedules) and the guided mix
- draws.py: top-k / top-p filtering and the inverse-CDF draw
- steps.py: how a step runs (eager / static / compiled / frozen, or recomputed): prefill, then one position
- ar.py: generate_codes (the entry, by method) and token-by-token sampling; sjd.py: speculative Jacobi decoding
- captions.py: generate_text (greedy, sampled, beam); superres.py: superres_codes (CogView's windows)
- complete.py: text-guided completion's regions (a mask image or a box -> the code grid), known codes, and the
  choice among region candidates by the codes after them (T2IPipeline.complete runs it)
- progress.py: progress(done, total) reported by the sampler
- pipeline.py: T2IPipeline / SuperResPipeline (a loaded model: prompts -> codes -> images, reranked when asked),
  Samples; files.py: write_samples (Samples -> PNGs, codes.npy, the captioned grid)
"""

from t2i.sampling.ar import generate_codes
from t2i.sampling.captions import generate_text
from t2i.sampling.complete import BOX_UNITS, read_image, region_mask
from t2i.sampling.draws import draw, filter_logits
from t2i.sampling.guidance import guidance_scales
from t2i.sampling.options import (CAPTION_STRATEGIES, GUIDANCE_SCHEDULES, METHODS, SJD_COUPLINGS, STEP_MODES,
                                  CaptionConfig, SamplingConfig, SamplingStats, check_filtering, resolve_sampling)
from t2i.sampling.files import write_samples
from t2i.sampling.pipeline import Samples, SuperResPipeline, T2IPipeline, decode_to_uint8, sampling_batches
from t2i.sampling.progress import Progress
from t2i.sampling.seeds import derived_seed, prompt_seeds, prompt_uniforms
from t2i.sampling.steps import compiled_step, frozen_step, sampling_steps
from t2i.sampling.superres import superres_codes

__all__ = ["BOX_UNITS", "CAPTION_STRATEGIES", "GUIDANCE_SCHEDULES", "METHODS", "SJD_COUPLINGS", "STEP_MODES",
           "CaptionConfig", "Progress", "SamplingConfig", "SamplingStats", "Samples", "SuperResPipeline", "T2IPipeline",
           "check_filtering", "compiled_step", "decode_to_uint8", "derived_seed", "draw", "filter_logits",
           "frozen_step", "generate_codes", "generate_text", "guidance_scales", "prompt_seeds", "prompt_uniforms",
           "read_image", "region_mask", "resolve_sampling", "sampling_batches", "sampling_steps", "superres_codes", "write_samples"]
