"""Activation-capture engine: hooks on HuggingFace models -> pinned host slots -> writer pool -> zarr."""

from .capture import ActivationCapture, CaptureEngine, CaptureStats, create_gpt2_capture
from .config import CaptureConfig
from .dataset import ActivationDataset
from .errors import (BatchError, CaptureClosedError, CaptureError, CaptureFailedError, ConfigError, EngineError,
                     FollowTimeoutError, HookPointError, ResumeMismatchError, StoreExistsError, StorePathError, StoreFormatError, UnknownModelError, WeightsNotFoundError)
from .hookpoints import ADAPTERS, CANONICAL_POINTS, HookPoint, resolve_hook_points
from .loading import load_model, random_model
from .reader import CaptureStore, CommittedArray, open_store
from .registry import ModelSpec, get_model, list_models

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS", "ActivationCapture", "ActivationDataset", "BatchError", "CANONICAL_POINTS", "CaptureClosedError", "CaptureConfig", "CaptureEngine",
    "CaptureError", "CaptureFailedError", "CaptureStats", "CaptureStore", "CommittedArray", "ConfigError", "EngineError", "FollowTimeoutError",
    "HookPoint", "HookPointError", "ModelSpec", "ResumeMismatchError", "StorePathError", "StoreExistsError", "StoreFormatError", "UnknownModelError",
    "WeightsNotFoundError", "create_gpt2_capture", "get_model", "list_models", "load_model", "open_store",
    "random_model", "resolve_hook_points",
]
