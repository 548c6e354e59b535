"""Tests' LoRA adapters that change something: a new adapter's factor that starts at zero (B of a linear layer,
A of an embedding) drawn away from zero."""

import torch


def move_from_zero(gpt, std: float, seed: int):
    """Draw every adapter's zero factor in `gpt` from N(0, std^2) (seeded): the adapted model differs from its base."""
    generator = torch.Generator().manual_seed(seed)
    for name, weight in gpt.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:
            weight.data.normal_(0, std, generator=generator)
    return gpt
