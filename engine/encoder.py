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
    absmax = values.abs().amax(dim=-1, keepdim=True)
    finite = torch.isfinite(absmax)
    scale = torch.where(finite, absmax / encoding.max_code, torch.full_like(absmax, float("nan")))
    divisor = torch.where(finite & (scale > 0), scale, torch.ones_like(scale))
    scaled = (values / divisor).clamp_(-encoding.max_code, encoding.max_code)
    scaled = torch.where(finite, scaled, torch.zeros_like(scaled))
    if encoding.name == "int8":
        codes = scaled.round_().to(torch.int8)
    else:
        codes = scaled.to(_CODE_DTYPES[encoding.name])
    decoded = codes.float() * torch.where(finite, scale, torch.zeros_like(scale))
    clean = torch.where(finite, values, torch.zeros_like(values))
    out = torch.empty((*values.shape[:-1], encoding.slot_row_bytes(dim)), dtype=torch.uint8,
                      device=values.device)
    header = out[..., :4 * SLOT_HEADER].view(torch.float32)
    header[..., 0:1] = scale
    header[..., 1] = (decoded - clean).square().sum(dim=-1)
    header[..., 2] = clean.square().sum(dim=-1)
    out[..., 4 * SLOT_HEADER:4 * SLOT_HEADER + dim] = codes.view(torch.uint8)
    return out
