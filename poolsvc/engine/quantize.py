"""int8 dynamic quantization of a built model's linear layers (CPU), as a transform.

Weights are quantized once, per output channel; activations per token (row) at every call, so
one outlier token does not flatten everyone else's precision (per-tensor scales, as in
torch.ao's quantize_dynamic, lose a BERT's embeddings: cosine 0.83 to float32 on the benchmark
passages, against >= 0.99 here). The matrix product runs in int8 with int32 accumulation
(`torch._int_mm`, oneDNN VNNI kernels on x86).
"""

from __future__ import annotations

import torch
from torch import nn

# Task heads stay in floating point: they are tiny and their outputs are the answers.
_KEEP = ("classifier", "score", "pooler")


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        qweight = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.register_buffer("qweight_t", qweight.t().contiguous())  # [in, out]
        self.register_buffer("weight_scale", scale)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # [tokens, in]
        # max |x| per row; amax and amin are each one fast pass, unlike abs() then amax()
        amax = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_())
        amax.clamp_(min=1e-8)
        q = torch.mul(rows, 127.0 / amax).round_().to(torch.int8)
        out = torch._int_mm(q, self.qweight_t).to(torch.float32)  # [tokens, out]
        out.mul_(amax / 127.0).mul_(self.weight_scale).add_(self.bias)  # in place: memory-bound
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def quantize_int8(module: nn.Module) -> int:
    """Replaces the linear layers of `module`'s body in place; returns how many."""
    count = 0
    for name, child in module.named_children():
        if name in _KEEP:
            continue
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear(child))
            count += 1
        else:
            count += quantize_int8(child)
    return count
