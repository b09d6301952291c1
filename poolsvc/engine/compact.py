"""Compact output dtypes, chosen per request, and their exact formulas. Each output row is cast
on its own: nothing depends on which other inputs shared the batch.

- INT8 / UINT8: scalar quantization over a symmetric range [-r, r] on every dimension, the
  formula of sentence-transformers' `quantize_embeddings` with `ranges = [[-r]*D, [r]*D]`:
  q = clip(floor((x + r) / (2r / 255)), 0, 255); UINT8 is q, INT8 is q - 128. r is the model's
  `--pooler-config {"quantization_range": r}`, else, for L2-normalized outputs, 4 / sqrt(D) (four
  standard deviations of a unit vector's components in D dimensions).
- BINARY / UBINARY: one sign bit per dimension (x > 0), packed 8 to a byte, most significant bit
  first, the last byte padded with zeros; UBINARY is the bytes, BINARY the bytes minus 128 as
  int8: `quantize_embeddings(x, "ubinary" | "binary")` bit for bit. A row of D dimensions
  becomes ceil(D / 8) bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from poolsvc.engine.params import OutputDType

FLOATS = {OutputDType.FLOAT32: torch.float32, OutputDType.FLOAT16: torch.float16,
          OutputDType.BFLOAT16: torch.bfloat16}
INTEGERS = (OutputDType.INT8, OutputDType.UINT8)
PACKED = (OutputDType.BINARY, OutputDType.UBINARY)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def default_range(dimensions: int) -> float:
    """The int8 range of L2-normalized vectors of `dimensions` components."""
    return 4.0 / math.sqrt(dimensions)


def cast(rows: torch.Tensor, dtype: OutputDType, int8_range: float | None) -> torch.Tensor:
    """float32 rows [..., D] in the output dtype."""
    if dtype in FLOATS:
        return rows.to(FLOATS[dtype])
    if dtype in INTEGERS:
        step = 2 * int8_range / 255
        q = torch.clamp(torch.floor((rows + int8_range) / step), 0, 255)
        return (q - 128).to(torch.int8) if dtype is OutputDType.INT8 else q.to(torch.uint8)
    bits = (rows > 0).to(torch.uint8)
    pad = -bits.shape[-1] % 8
    if pad:
        bits = F.pad(bits, (0, pad))
    weights = _BIT_WEIGHTS.to(bits.device)
    packed = (bits.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.int32)  # [..., D/8]
    if dtype is OutputDType.UBINARY:
        return packed.to(torch.uint8)
    return (packed - 128).to(torch.int8)


def row_bytes(dtype: OutputDType, dimensions: int) -> int:
    """The bytes of one output row of `dimensions` values."""
    if dtype in PACKED:
        return (dimensions + 7) // 8
    if dtype in INTEGERS:
        return dimensions
    return dimensions * FLOATS[dtype].itemsize
