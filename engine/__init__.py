"""Activation-capture engine: hooks on HuggingFace models -> shared host slots -> writer process -> zarr.

Public names are imported on first use (PEP 562), so that ``import engine.<module>`` of the torch-free modules
(the writer process, the store format, the reader) does not import torch.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "ActivationCapture": "compat", "create_gpt2_capture": "compat",
    "CaptureEngine": "capture.engine", "CaptureStats": "capture.engine",
    "CaptureConfig": "capture.config",
    "ActivationDataset": "read.dataset",
    "BatchError": "errors", "CaptureClosedError": "errors", "CaptureError": "errors",
    "CaptureFailedError": "errors", "ConfigError": "errors", "CorpusError": "errors", "EngineError": "errors",
    "FollowTimeoutError": "errors", "HookPointError": "errors", "ResumeMismatchError": "errors",
    "StoreCorruptError": "errors", "StoreExistsError": "errors", "StoreFormatError": "errors",
    "StoreLockedError": "errors", "StorePathError": "errors", "UnknownModelError": "errors",
    "WeightsNotFoundError": "errors",
    "ADAPTERS": "capture.hookpoints", "CANONICAL_POINTS": "capture.hookpoints",
    "HookPoint": "capture.hookpoints", "resolve_hook_points": "capture.hookpoints",
    "load_model": "models.loading", "load_tokenizer": "models.loading", "random_model": "models.loading",
    "ModelSpec": "models.registry", "get_model": "models.registry", "list_models": "models.registry",
    "CaptureStore": "read.reader", "CommittedArray": "read.reader", "DecodedArray": "read.reader",
    "open_store": "read.reader",
    "Report": "report.document", "write_report": "report.document",
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
