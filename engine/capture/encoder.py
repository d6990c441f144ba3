"""Encoding activations into 8-bit slot rows on the model's device (``engine.format.encoding`` has the
format).

Runs in the hook, on the tensor's own device and stream, before the copy to the host: on a GPU the copy and
the host then carry about a quarter of float32's bytes (half of float16's), and the encode is a handful of
elementwise kernels. On the CPU it costs more than a cast (benchmarks/results/cpu-2026-12-07-encodings/).
"""

from __future__ import annotations

import torch

from engine.format.encoding import SLOT_HEADER, Encoding

_CODE_DTYPES = {"int8": torch.int8, "float8_e4m3": getattr(torch, "float8_e4m3fn", None)}


def available(encoding: Encoding) -> bool:
    """Whether this torch can produce the encoding's codes (float8 needs torch 2.1 or newer)."""
    return _CODE_DTYPES[encoding.name] is not None


def encode_rows(tensor: torch.Tensor, encoding: Encoding) -> torch.Tensor:
    """Slot rows (..., ``encoding.slot_row_bytes(dim)``) uint8 of ``tensor`` (..., dim), on its device: per
    row the scale, the L2 norms of the decoded row's error and of the captured row in units of the scale
    (float32 each), then the codes (``engine.format.encoding``). A row with a non-finite value gets scale NaN
    and zero codes and norms."""
    values = tensor.detach().float()
    dim = values.shape[-1]
    low, high = torch.aminmax(values, dim=-1, keepdim=True)  # one pass, no full-size |values|
    absmax = torch.maximum(low.abs(), high.abs())  # abs: a zero row's scale is +0.0, not -0.0
    finite = torch.isfinite(absmax)
    scale = absmax / encoding.max_code  # inf or nan where the row is not finite: stored as nan
    # per-row divisors (small tensors): a zero row divides by 1, a non-finite one by inf (its codes become 0)
    divisor = torch.where(finite, torch.where(scale > 0, scale, torch.ones_like(scale)),
                          torch.full_like(scale, float("inf")))
    scaled = (values / divisor).nan_to_num_(0.0, 0.0, 0.0).clamp_(-encoding.max_code, encoding.max_code)
    del values  # from here on in units of the scale: fewer full-size temporaries on the device, no overflow
    norm = torch.linalg.vector_norm(scaled, dim=-1)
    if encoding.name == "int8":
        codes = scaled.round().to(torch.int8)
        error = torch.linalg.vector_norm(scaled.sub_(codes), dim=-1)  # int8 promotes inside the kernel
    else:
        codes = scaled.to(_CODE_DTYPES[encoding.name])
        error = torch.linalg.vector_norm(scaled.sub_(codes.to(torch.float16)), dim=-1)  # e4m3 fits float16
    del scaled
    out = torch.empty((*codes.shape[:-1], encoding.slot_row_bytes(dim)), dtype=torch.uint8,
                      device=codes.device)
    header = out[..., :4 * SLOT_HEADER].view(torch.float32)
    header[..., 0:1] = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    header[..., 1] = error
    header[..., 2] = norm
    out[..., 4 * SLOT_HEADER:4 * SLOT_HEADER + dim] = codes.view(torch.uint8)
    return out
