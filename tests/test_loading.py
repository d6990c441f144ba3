"""Loading by registry name or folder: local weights first, random weights only when allowed, offline."""

from __future__ import annotations

import warnings

import pytest
import torch

import engine
from engine.models import loading

from helpers import N_LAYERS, VOCAB, tiny_model


@pytest.fixture
def no_local_weights(monkeypatch, tmp_path):
    """Every place load_model looks is empty: env folders, the conversion cache, the Hugging Face cache."""
    import huggingface_hub.constants as hf_constants

    empty = tmp_path / "empty"
    empty.mkdir()
    for spec in engine.list_models():
        monkeypatch.delenv(spec.weights_env_var, raising=False)
    monkeypatch.setenv("ACTCAP_MODELS_DIR", str(empty / "models"))
    monkeypatch.setenv("ACTCAP_CACHE_DIR", str(empty / "actcap"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(empty / "hf"))
    # huggingface_hub reads these once at import: point the live values at the empty folder too.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(empty / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return empty


@pytest.fixture(scope="module")
def tiny_gpt2_folder(tmp_path_factory):
    """A saved tiny GPT-2 (2 layers) and its state dict."""
    model = tiny_model("gpt2", seed=3)
    folder = tmp_path_factory.mktemp("weights") / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def _random_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "RANDOM" in str(w.message) or "NO WEIGHTS" in str(w.message)]


def _assert_same_weights(model, state):
    loaded = model.state_dict()
    assert set(state) <= set(loaded)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, atol=0, rtol=0, msg=key)


def test_random_weights_full_gpt2(no_local_weights):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = engine.load_model("gpt2", weights="random")
    assert not _random_warnings(record)  # 'random' is explicit: no "NO WEIGHTS FOUND" warning
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert not model.training
    assert all(not module.training for module in model.modules())
    assert model.config.n_layer == 12 and len(model.transformer.h) == 12
    assert model.config.n_embd == 768
    assert model.config.name_or_path == "gpt2"
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"
    # Really initialised (not empty memory): GPT-2 init draws embeddings with std initializer_range (0.02).
    std = model.transformer.wte.weight.std().item()
    assert 0.015 < std < 0.025


def test_auto_without_weights_warns_random(no_local_weights):
    with pytest.warns(UserWarning, match="RANDOM") as record:
        model = engine.load_model("gpt2", weights="auto")
    message = " ".join(str(w.message) for w in record)
    assert "NO WEIGHTS FOUND for gpt2" in message
    assert str(no_local_weights / "models" / "gpt2") in message
    assert "openai-community/gpt2" in message
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.n_layer == 12
    assert not model.training


def test_required_without_weights_names_places(no_local_weights):
    spec = engine.get_model("pythia-1.4b")
    with pytest.raises(engine.WeightsNotFoundError) as info:
        engine.load_model("pythia-1.4b", weights="required")
    message = str(info.value)
    assert str(no_local_weights / "models" / "pythia-1.4b") in message
    assert "Hugging Face cache for EleutherAI/pythia-1.4b" in message
    assert spec.weights_env_var in message
    assert isinstance(info.value, FileNotFoundError)


def test_required_lists_env_folder_first(no_local_weights, monkeypatch):
    spec = engine.get_model("pythia-1.4b")
    mine = no_local_weights / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")  # a config without weight files is not weights
    monkeypatch.setenv(spec.weights_env_var, str(mine))
    with pytest.raises(engine.WeightsNotFoundError) as info:
        engine.load_model("pythia-1.4b", weights="required")
    message = str(info.value)
    assert message.index(str(mine)) < message.index(str(no_local_weights / "models" / "pythia-1.4b"))


def test_required_loads_folder_from_env_var(no_local_weights, tiny_gpt2_folder, monkeypatch):
    folder, state = tiny_gpt2_folder
    monkeypatch.setenv("ACTCAP_WEIGHTS_GPT2", str(folder))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = engine.load_model("gpt2", weights="required")
    assert not _random_warnings(record)  # weights were found
    assert model.config.n_layer == N_LAYERS
    assert model.config.name_or_path == "gpt2"
    assert not model.training
    _assert_same_weights(model, state)


def test_auto_loads_folder_from_models_dir(no_local_weights, tiny_gpt2_folder):
    import shutil

    folder, state = tiny_gpt2_folder
    shutil.copytree(folder, no_local_weights / "models" / "gpt2")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = engine.load_model("gpt2", weights="auto")
    assert not _random_warnings(record)  # weights were found: auto does not fall back to random
    assert model.config.n_layer == N_LAYERS
    assert model.config.name_or_path == "gpt2"
    _assert_same_weights(model, state)


def test_local_folder_path(tiny_gpt2_folder):
    folder, state = tiny_gpt2_folder
    model = engine.load_model(folder)
    assert model.config.name_or_path == str(folder)
    assert model.config.n_layer == N_LAYERS
    assert not model.training
    _assert_same_weights(model, state)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, VOCAB)
    # Also as a string path, with a dtype given by name.
    half = engine.load_model(str(folder), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_unknown_name():
    with pytest.raises(engine.UnknownModelError) as info:
        engine.load_model("not-a-model-or-folder")
    assert "gpt2" in str(info.value)


def test_file_is_not_a_model(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(engine.UnknownModelError, match="is a file"):
        engine.load_model(path)


def test_bad_weights_mode():
    with pytest.raises(engine.ConfigError, match="bogus"):
        engine.load_model("gpt2", weights="bogus")


def test_bad_dtype_name(tiny_gpt2_folder):
    with pytest.raises(engine.ConfigError, match="float33"):
        engine.load_model(tiny_gpt2_folder[0], dtype="float33")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ACTCAP_CACHE_DIR", str(tmp_path / "c"))
    assert loading.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ACTCAP_CACHE_DIR")
    assert loading.cache_dir().parts[-2:] == (".cache", "actcap")


@pytest.mark.slow
def test_smollm2_real_weights():
    from transformers import AutoTokenizer

    model = engine.load_model("smollm2-135m", weights="required")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.name_or_path == "smollm2-135m"
    tokenizer = AutoTokenizer.from_pretrained(loading.cache_dir() / "smollm2-135m")

    input_ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    hook_point = engine.resolve_hook_points(model, [15], ["residual"], {})[0]
    captured = []
    handle = hook_point.attach(lambda tensor: captured.append(tensor.clone()))
    try:
        with torch.no_grad():
            output = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        handle.remove()
    assert len(captured) == 1
    assert captured[0].shape == (1, input_ids.shape[1], 576)
    torch.testing.assert_close(captured[0], output.hidden_states[16], atol=1e-5, rtol=1e-5)

    # Trained, not random: the next token after the prompt is " Paris".
    next_token = tokenizer.decode(output.logits[0, -1].argmax())
    assert "Paris" in next_token

    # And natural English is far more likely than the same tokens shuffled.
    sentence = tokenizer("The cat sat on the mat because it was warm and sunny outside.",
                         return_tensors="pt").input_ids
    shuffled = sentence[:, torch.randperm(sentence.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        natural_loss = model(input_ids=sentence, labels=sentence).loss
        shuffled_loss = model(input_ids=shuffled, labels=shuffled).loss
    assert natural_loss < shuffled_loss - 2.0
