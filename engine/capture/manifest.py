"""The manifest of a capture run (the root group's ``manifest`` attribute) and what a resume must share with
it."""

from __future__ import annotations

import datetime
from typing import Any, Iterator

import torch

from engine.capture.config import CaptureConfig
from engine.capture.hookpoints import HookPoint
from engine.format import layout
from engine.format.encoding import encoding_of
from engine.format.layout import Manifest


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def build_manifest(model: torch.nn.Module, config: CaptureConfig, points: list[HookPoint],
                   tokenizer: Any) -> Manifest:
    """The manifest a new store starts with (status ``open``; counts and statistics come at close)."""
    from engine import __version__
    from engine.models.registry import find_model

    model_config = getattr(model, "config", None)
    name = config.model_name or getattr(model_config, "name_or_path", None) or type(model).__name__
    spec = find_model(name)
    return Manifest(
        format_version=layout.format_version(config.dtype),
        engine_version=__version__,
        status=layout.STATUS_OPEN,
        created=now(),
        model={"name": name, "hf_repo_id": spec.hf_repo_id if spec else None,
               "architecture": getattr(model_config, "model_type", None), "class": type(model).__name__,
               "revision": getattr(model_config, "_commit_hash", None)},
        tokenizer=getattr(tokenizer, "name_or_path", None),
        layers=list(config.layer_indices),
        points=list(config.points),
        extra_modules=dict(config.extra_modules),
        arrays={p.key: {"module_path": p.module_path, "tl_name": p.tl_name, "capture": p.capture,
                        "layer": p.layer, "point": p.point, **_encoding_entry(p.key, config.dtype)}
                for p in points},
        token_arrays={key: str(dtype) for key, dtype in layout.token_arrays(config.annotations).items()},
        annotations=dict(config.annotations),
        flag_bits=dict(layout.FLAG_BITS),
        dtype=config.dtype,
        chunk_tokens=config.chunk_tokens,
        compressor=config.compressor,
        first_sequence=config.first_sequence,
        sequences=config.first_sequence,
        outlier_norm_ratio=config.outlier_norm_ratio,
    )


def point_attributes(points: list[HookPoint], dtype: str) -> dict[str, dict]:
    """Each activation array's zarr attributes."""
    attributes = {}
    for point in points:
        entry = {"module_path": point.module_path, "tl_name": point.tl_name, "layer": point.layer,
                 "point": point.point, "capture": point.capture, "dtype": dtype}
        if dtype == "bfloat16":
            entry["encoding"] = layout.BFLOAT16_ENCODING
        attributes[point.key] = {**entry, **_encoding_entry(point.key, dtype)}
    return attributes


def _encoding_entry(key: str, dtype: str) -> dict:
    """An 8-bit encoded array's words on how to decode it (manifest entry and zarr attributes); empty else."""
    encoding = encoding_of(dtype)
    return encoding.attributes(key) if encoding is not None else {}


def _resume_fields(stored: Manifest, new: Manifest) -> Iterator[tuple[str, Any, Any]]:
    yield "model", stored.model.get("name"), new.model.get("name")
    yield "architecture", stored.model.get("architecture"), new.model.get("architecture")
    for field in ("layers", "points", "extra_modules", "dtype", "chunk_tokens", "compressor", "annotations"):
        yield field, getattr(stored, field), getattr(new, field)
    if stored.outlier_norm_ratio is not None:  # a store without outlier flags goes on without (CaptureEngine)
        yield "outlier_norm_ratio", stored.outlier_norm_ratio, new.outlier_norm_ratio
    yield "first_sequence", stored.first_sequence, new.first_sequence
    # A multi-process store's root is resumed by rank 0 (parts.py); a single process must not take it over.
    yield "world_size (processes writing parts; resume with torchrun)", stored.world_size, None
    yield ("hooked modules", {k: v.get("module_path") for k, v in stored.arrays.items()},
           {k: v.get("module_path") for k, v in new.arrays.items()})


def resume_mismatches(stored: Manifest, new: Manifest) -> list[str]:
    """Every field a resumed store must share with this run and does not, as ``field: old vs new`` lines."""
    return [f"{field}: the store has {old!r}, this run has {value!r}"
            for field, old, value in _resume_fields(stored, new) if old != value]
