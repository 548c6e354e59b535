"""Weight-only int8 for generation: every linear weight of a GPT as int8, one scale per output channel.

`quantize_weights(gpt)` returns a copy whose linear layers are `Int8Linear` and whose other weights
and activations are bf16. An Int8Linear computes `F.linear(x, weight.to(x.dtype)) * scales`: the form
torch.compile's inductor replaces by torch's weight-only int8 matrix product (`_weight_int8pack_mm`,
and on CPUs its own C++ GEMM picked by autotuning) when x is bf16 and the weight an int8 constant,
i.e. under sampling.step=frozen. There a batch-1 step reads a quarter of the fp32 weights' bytes.
Run any other way it turns each weight back into bf16 at every call: the same numbers, slowly.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from t2i.models.gpt import GPT, SwiGLU

WEIGHTS = ("unchanged", "int8")  # sampling.weights
ACTIVATIONS = torch.bfloat16  # the dtype inductor's weight-only int8 kernels take


class Int8Linear(nn.Module):
    """A linear layer whose weight is int8 with a scale per output row (symmetric: the row's largest
    magnitude -> 127, each weight rounded to the nearest step)."""

    reads_rows = True  # as the GPT's head, it computes only the rows asked for (GPT.head_logits)

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = ACTIVATIONS):
        super().__init__()
        weight = linear.weight.detach().float()
        # the scales are rounded to `dtype` first, so the int8 values are those of the scales used
        scales = (weight.abs().amax(1).clamp(min=1e-12) / 127).to(dtype)
        self.register_buffer("weight", (weight / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """`rows`: only those output rows (the GPT's head over the image codes)."""
        y = F.linear(x, self.weight[rows].to(x.dtype)) * self.scales[rows]
        return y if self.bias is None else y + self.bias[rows]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8SwiGLU(nn.Module):
    """SwiGLU with int8 weights, its gate and up projections stacked into one product.

    Why stacked: inductor (torch 2.14) fails to compile two weight-only int8 products of one input
    whose output width differs from the input's (a shape error in its lowering); one product of twice
    the width is also one kernel call instead of two."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        stacked = nn.Linear(mlp.gate.in_features, 2 * mlp.gate.out_features, bias=mlp.gate.bias is not None)
        stacked.weight.data = torch.cat([mlp.gate.weight, mlp.up.weight]).detach()
        if stacked.bias is not None:
            stacked.bias.data = torch.cat([mlp.gate.bias, mlp.up.bias]).detach()
        self.gate_up, self.down = Int8Linear(stacked), Int8Linear(mlp.down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@torch.no_grad()
def quantize_weights(gpt: GPT, weights: str = "int8") -> GPT:
    """A copy of `gpt` for generation with its linear weights as `weights` ("unchanged": `gpt` itself).

    The copy is in eval mode, bf16 outside the int8 weights; the head stays one weight for both the
    image and the text rows (a tied head is quantized on its own: the embedding keeps its bf16 rows)."""
    if weights not in WEIGHTS:
        raise ValueError(f"sampling.weights must be one of {WEIGHTS}, got {weights!r}")
    if weights == "unchanged":
        return gpt
    quantized = copy.deepcopy(gpt).eval().to(ACTIVATIONS)
    for kind, make in ((SwiGLU, Int8SwiGLU), (nn.Linear, Int8Linear)):
        for name, module in list(quantized.named_modules()):
            if isinstance(module, kind):  # quantized from the original weights, not from their bf16 copies
                parent, _, attribute = name.rpartition(".")
                setattr(quantized.get_submodule(parent), attribute, make(gpt.get_submodule(name)))
    return quantized
