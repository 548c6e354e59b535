"""t2i: Chinese text-to-image generation with a VQGAN image tokenizer and an autoregressive GPT."""

__version__ = "0.1.0"
