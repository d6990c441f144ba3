"""Encoding activations into 8-bit slot rows on the model's device (``engine.encoding`` has the format).

Runs in the hook, on the tensor's own device and stream, before the copy to the host: on a GPU the copy and
the host then carry about a quarter of float32's bytes (half of float16's), and the encode is a handful of
elementwise kernels. On the CPU it costs more than a cast (benchmarks/results/cpu-2026-12-07-encodings/).
"""

from __future__ import annotations

import torch

from .encoding import SLOT_HEADER, Encoding

_CODE_DTYPES = {"int8": torch.int8, "float8_e4m3": getattr(torch, "float8_e4m3fn", None)}


def available(encoding: Encoding) -> bool:
    """Whether this torch can produce the encoding's codes (float8 needs torch 2.1 or newer)."""
    return _CODE_DTYPES[encoding.name] is not None


def encode_rows(tensor: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """Slot rows (..., ``encoding.slot_row_bytes(dim)``) uint8 of ``tensor`` (..., dim), on its device: per
    row the scale, the squared error of the decoded row against the captured one, the captured row's squared
    norm (float32 each), then the codes. A row with a non-finite value gets scale NaN, zero codes and sums."""
    values = tensor.detach().float()
    dim = values.shape[-1]
    low, high = torch.aminmax(values, dim=-1, keepdim=True)  # one pass, no full-size |values|
    absmax = torch.maximum(-low, high)
    finite = torch.isfinite(absmax)
    scale = absmax / encoding.max_code  # inf or nan where the row is not finite: stored so
    # per-row divisors (small tensors): a zero row divides by 1, a non-finite one by inf (its codes become 0)
    divisor = torch.where(finite, torch.where(scale > 0, scale, torch.ones_like(scale)),
                          torch.full_like(scale, float("inf")))
    scaled = (values / divisor).nan_to_num_(0.0, 0.0, 0.0).clamp_(-encoding.max_code, encoding.max_code)
    if encoding.name == "int8":
        codes = scaled.round_().to(torch.int8)
    else:
        codes = scaled.to(_CODE_DTYPES[encoding.name])
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    error = torch.linalg.vector_norm(codes.float().mul_(scale).sub_(values), dim=-1).square_()
    norm = torch.linalg.vector_norm(values, dim=-1).square_()
    zero = torch.zeros_like(norm)
    out = torch.empty((*values.shape[:-1], encoding.slot_row_bytes(dim)), dtype=torch.uint8,
                      device=values.device)
    header = out[..., :4 * SLOT_HEADER].view(torch.float32)
    header[..., 0:1] = scale
    header[..., 1] = torch.where(finite[..., 0], error, zero)
    header[..., 2] = torch.where(finite[..., 0], norm, zero)
    out[..., 4 * SLOT_HEADER:4 * SLOT_HEADER + dim] = codes.view(torch.uint8)
    return out
