"""The model registry: listed sizes match the architecture configs, lookups fail helpfully, the CLI lists
it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import engine
from engine.capture.hookpoints import ADAPTERS, layer_modules, resolve_hook_points
from engine.models.registry import find_model

SPECS = engine.list_models()
SPEC_IDS = [spec.name for spec in SPECS]


def _config_sizes(spec, config) -> tuple[int, int, int]:
    """(hidden size, layer count, MLP width) read from a transformers config, per family conventions."""
    if spec.architecture == "gpt2":
        mlp = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        return config.n_embd, config.n_layer, mlp
    return config.hidden_size, config.num_hidden_layers, config.intermediate_size


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_listed_sizes_match_architecture_config(spec):
    config = spec.hf_config()  # full-size config only: no weights are built
    assert config.model_type == spec.config["model_type"]
    hidden, layers, mlp = _config_sizes(spec, config)
    assert hidden == spec.hidden_dim
    assert layers == spec.num_layers
    assert mlp == spec.mlp_dim
    assert 0 <= spec.default_probe_layer < spec.num_layers
    assert spec.architecture in ADAPTERS
    assert spec.architecture in ADAPTERS
    assert config.model_type == spec.architecture  # hookpoints.family_of() dispatches on model_type


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_full_size_architecture_on_meta_device(spec):
    """Build the real-size module tree without memory: the hook points resolve, and the down projection's
    input width is the listed mlp_dim (what an SAE on mlp_hidden is sized by)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(spec.hf_config())
    assert len(layer_modules(model)) == spec.num_layers
    points = resolve_hook_points(model, [spec.default_probe_layer, spec.num_layers - 1], ["mlp_hidden"], {})
    assert [hp.layer for hp in points] == [spec.default_probe_layer, spec.num_layers - 1]
    down = points[0].module
    # nn.Linear weight is (out, in); GPT-2's Conv1D weight is (in, out).
    in_width, out_width = ((down.weight.shape[0], down.weight.shape[1]) if spec.architecture == "gpt2"
                           else (down.weight.shape[1], down.weight.shape[0]))
    assert in_width == spec.mlp_dim
    assert out_width == spec.hidden_dim


def test_gemma_2b_mlp_width():
    spec = engine.get_model("gemma-2b")
    assert spec.mlp_dim == 16384
    assert spec.hf_config().intermediate_size == 16384


def test_names_are_unique_and_found():
    assert len(set(SPEC_IDS)) == len(SPEC_IDS)
    assert SPEC_IDS[0] == "gpt2"  # baseline first
    for spec in SPECS:
        assert engine.get_model(spec.name) is spec
        assert find_model(spec.name) is spec
    assert find_model("nope") is None


def test_weights_env_var_names():
    assert engine.get_model("gpt2").weights_env_var == "ACTCAP_WEIGHTS_GPT2"
    assert engine.get_model("pythia-1.4b").weights_env_var == "ACTCAP_WEIGHTS_PYTHIA_1_4B"
    assert engine.get_model("smollm2-135m").weights_env_var == "ACTCAP_WEIGHTS_SMOLLM2_135M"


def test_weight_locations_order(monkeypatch, tmp_path):
    spec = engine.get_model("gpt2")
    monkeypatch.delenv(spec.weights_env_var, raising=False)
    monkeypatch.delenv("ACTCAP_MODELS_DIR", raising=False)
    assert spec.weight_locations() == []
    monkeypatch.setenv("ACTCAP_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv(spec.weights_env_var, str(tmp_path / "mine"))
    assert spec.weight_locations() == [tmp_path / "mine", tmp_path / "models" / "gpt2"]


def test_hf_config_overrides_shrink():
    config = engine.get_model("llama-3-8b").hf_config(hidden_size=64, num_hidden_layers=2)
    assert (config.hidden_size, config.num_hidden_layers) == (64, 2)
    assert config.intermediate_size == 14336  # untouched fields keep the registry value
    assert engine.get_model("llama-3-8b").hf_config().hidden_size == 4096  # the spec itself is unchanged


def test_unknown_model_lists_known_names():
    with pytest.raises(engine.UnknownModelError) as info:
        engine.get_model("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in SPEC_IDS:
        assert name in message
    assert isinstance(info.value, KeyError)  # callers catching KeyError still work


def test_cli_models_prints_the_registry():
    result = subprocess.run([sys.executable, "-m", "engine", "models"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "arch", "layers", "hidden", "mlp", "probe", "hf_repo_id"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(SPEC_IDS)
    for spec in SPECS:
        assert rows[spec.name] == [spec.name, spec.architecture, str(spec.num_layers), str(spec.hidden_dim),
                                   str(spec.mlp_dim), str(spec.default_probe_layer), spec.hf_repo_id]


def test_cli_needs_a_command(capsys):
    from engine.cli.main import main

    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code != 0
    assert "models" in capsys.readouterr().err
