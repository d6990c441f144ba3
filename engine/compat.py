"""The names of the engine's first design, kept so that code written against them still runs.

``ActivationCapture`` is ``CaptureEngine``; ``create_gpt2_capture`` builds one from keyword arguments.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from engine.capture.config import CaptureConfig
from engine.capture.engine import CaptureEngine
from engine.capture.hookpoints import family_of

ActivationCapture = CaptureEngine


def create_gpt2_capture(model: torch.nn.Module, output_dir: str | os.PathLike, layer_indices=(6,),
                        capture_residual: bool = True, capture_mlp_hidden: bool = True,
                        **config: Any) -> CaptureEngine:
    """A ``CaptureEngine`` on a GPT-2 style model (any supported family works), hooks live from construction.

    Args:
        model: the model to capture.
        output_dir: the store (a folder or an fsspec URL).
        layer_indices, capture_residual, capture_mlp_hidden: as in ``CaptureConfig``.
        **config: further ``CaptureConfig`` fields.

    Returns:
        The engine; ``close()`` it (or use it as a context manager) to finish the store.
    """
    if family_of(model) != "gpt2":
        warnings.warn("create_gpt2_capture on a non-GPT-2 model: hook points resolve by the model's own "
                      "family; prefer CaptureEngine", stacklevel=2)
    capture_config = CaptureConfig(output_dir=output_dir, layer_indices=tuple(layer_indices),
                                   capture_residual=capture_residual, capture_mlp_hidden=capture_mlp_hidden,
                                   **config)
    return CaptureEngine(model, capture_config)
