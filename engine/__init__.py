"""Activation-capture engine: hooks on HuggingFace models -> shared host slots -> writer process -> zarr.

Public names are imported on first use (PEP 562), so that ``import engine.<module>`` of the torch-free modules
(the writer process, the store format, the reader) does not import torch.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "ActivationCapture": "compat", "create_gpt2_capture": "compat",
    "CaptureEngine": "capture", "CaptureStats": "capture",
    "CaptureConfig": "config",
    "ActivationDataset": "dataset",
    "BatchError": "errors", "CaptureClosedError": "errors", "CaptureError": "errors",
    "CaptureFailedError": "errors", "ConfigError": "errors", "CorpusError": "errors", "EngineError": "errors",
    "FollowTimeoutError": "errors", "HookPointError": "errors", "ResumeMismatchError": "errors",
    "StoreCorruptError": "errors", "StoreExistsError": "errors", "StoreFormatError": "errors",
    "StoreLockedError": "errors", "StorePathError": "errors", "UnknownModelError": "errors",
    "WeightsNotFoundError": "errors",
    "ADAPTERS": "hookpoints", "CANONICAL_POINTS": "hookpoints", "HookPoint": "hookpoints",
    "resolve_hook_points": "hookpoints",
    "load_model": "loading", "load_tokenizer": "loading", "random_model": "loading",
    "CaptureStore": "reader", "CommittedArray": "reader", "DecodedArray": "reader", "open_store": "reader",
    "ModelSpec": "registry", "get_model": "registry", "list_models": "registry",
    "Report": "report", "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
