"""Hook points resolve to the modules whose tensors mean what the names say, proved against the model itself."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import engine
from engine.hookpoints import ADAPTERS, CANONICAL_POINTS, captured_tensor, family_of

from conftest import D_MLP, D_MODEL, N_LAYERS, VOCAB, tiny_model
from helpers import hook_all

POINTS = ["residual", "mlp_hidden", "mlp_out", "attn_out"]

# Whether output_hidden_states[-1] is taken AFTER the final norm (so it differs from the last block's output).
# Found by running transformers 5.x: every supported family appends norm(last block output) as the last
# hidden state, so the last layer's `residual` (hook_resid_post, pre-norm) equals final_norm^-1 of it.
# Hard-coded per family so a transformers change in this convention fails here.
LAST_HIDDEN_STATE_AFTER_FINAL_NORM = {
    "gpt2": True,
    "gpt_neox": True,
    "llama": True,
    "gemma": True,
    "phi": True,
}

TL_SUFFIX = {"residual": "hook_resid_post", "mlp_hidden": "mlp.hook_post", "mlp_out": "hook_mlp_out",
             "attn_out": "hook_attn_out"}


def _input_ids(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def _run_with_hooks(model, hook_points, input_ids):
    """Plain forward hooks / pre-hooks of our own: {key: tensor}, and the model output."""
    captured: dict[str, torch.Tensor] = {}

    def keep(key, tensor):
        assert key not in captured, f"{key} fired twice in one forward"
        captured[key] = tensor.detach().clone()

    handles = hook_all(hook_points, keep)
    try:
        with torch.no_grad():
            output = model(input_ids=input_ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    assert set(captured) == {hp.key for hp in hook_points}
    return captured, output


@pytest.fixture
def captured(family):
    model = tiny_model(family)
    hook_points = engine.resolve_hook_points(model, list(range(N_LAYERS)), POINTS, {})
    values, output = _run_with_hooks(model, hook_points, _input_ids())
    return model, hook_points, values, output.hidden_states


def test_family_is_detected(family):
    assert family_of(tiny_model(family)) == family


def test_resolved_points_metadata(family):
    model = tiny_model(family)
    hook_points = engine.resolve_hook_points(model, [0, 1], POINTS, {})
    assert [(hp.layer, hp.point) for hp in hook_points] == [(layer, p) for layer in (0, 1) for p in POINTS]
    modules = dict(model.named_modules())
    for hp in hook_points:
        assert hp.key == f"layer_{hp.layer}/{hp.point}"
        assert hp.module_path in modules
        assert modules[hp.module_path] is hp.module
        assert hp.tl_name == f"blocks.{hp.layer}.{TL_SUFFIX[hp.point]}"
        assert hp.capture == ("input" if hp.point == "mlp_hidden" else "output")
    by_key = {hp.key: hp for hp in hook_points}
    assert by_key["layer_0/residual"].tl_name == "blocks.0.hook_resid_post"
    adapter = ADAPTERS[family]
    prefix = f"{model.base_model_prefix}.{adapter.layers}"
    for layer in (0, 1):
        block = f"{prefix}.{layer}"
        assert by_key[f"layer_{layer}/residual"].module_path == block
        assert by_key[f"layer_{layer}/mlp_hidden"].module_path == f"{block}.{adapter.down_proj}"
        assert by_key[f"layer_{layer}/mlp_out"].module_path == f"{block}.{adapter.mlp}"
        assert by_key[f"layer_{layer}/attn_out"].module_path == f"{block}.{adapter.attn}"
    # Layers are distinct modules: layer 1's residual is not layer 0's.
    assert by_key["layer_0/residual"].module is not by_key["layer_1/residual"].module


def test_residual_is_block_output_at_every_layer(family, captured):
    model, _, values, hidden_states = captured
    assert len(hidden_states) == N_LAYERS + 1
    final_norm = model.base_model.get_submodule(ADAPTERS[family].final_norm)
    for layer in range(N_LAYERS):
        residual = values[f"layer_{layer}/residual"]
        assert residual.shape == (2, 7, D_MODEL)
        if layer < N_LAYERS - 1:
            torch.testing.assert_close(residual, hidden_states[layer + 1], atol=1e-5, rtol=1e-5)
        elif LAST_HIDDEN_STATE_AFTER_FINAL_NORM[family]:
            assert not torch.allclose(residual, hidden_states[layer + 1], atol=1e-3)
            with torch.no_grad():
                torch.testing.assert_close(final_norm(residual), hidden_states[layer + 1], atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(residual, hidden_states[layer + 1], atol=1e-5, rtol=1e-5)


def test_residual_is_input_plus_attn_plus_mlp(family, captured):
    """Every supported family (sequential or parallel) adds attention and MLP outputs to the block input,
    so attn_out and mlp_out are exactly the two contributions to the residual stream."""
    _, _, values, hidden_states = captured
    for layer in range(N_LAYERS):
        block_input = hidden_states[layer]
        total = block_input + values[f"layer_{layer}/attn_out"] + values[f"layer_{layer}/mlp_out"]
        torch.testing.assert_close(values[f"layer_{layer}/residual"], total, atol=1e-5, rtol=1e-5)


def test_mlp_hidden_feeds_down_projection_to_mlp_out(family, captured):
    model, hook_points, values, _ = captured
    blocks = engine.hookpoints.layer_modules(model)
    for layer in range(N_LAYERS):
        hidden = values[f"layer_{layer}/mlp_hidden"]
        mlp_out = values[f"layer_{layer}/mlp_out"]
        assert hidden.shape == (2, 7, D_MLP)
        assert mlp_out.shape == (2, 7, D_MODEL)
        down_proj = blocks[layer].get_submodule(ADAPTERS[family].down_proj)
        with torch.no_grad():
            torch.testing.assert_close(down_proj(hidden), mlp_out, atol=1e-5, rtol=1e-5)
        # Wrong layer's down projection does not reproduce it (the check can fail).
        other = blocks[1 - layer].get_submodule(ADAPTERS[family].down_proj)
        with torch.no_grad():
            assert not torch.allclose(other(hidden), mlp_out, atol=1e-3)


def test_attn_out_width(family, captured):
    _, _, values, _ = captured
    for layer in range(N_LAYERS):
        attn = values[f"layer_{layer}/attn_out"]
        assert attn.shape == (2, 7, D_MODEL)
        assert torch.isfinite(attn).all()
        assert attn.abs().sum() > 0


def test_extra_module_beside_canonical_points(family):
    """A user-named module (here the final norm) is captured from its output, under extra/<name>."""
    model = tiny_model(family)
    path = f"{model.base_model_prefix}.{ADAPTERS[family].final_norm}"
    hook_points = engine.resolve_hook_points(model, [1], ["residual"], {"final": path})
    assert [hp.key for hp in hook_points] == ["layer_1/residual", "extra/final"]
    extra = hook_points[1]
    assert (extra.module_path, extra.capture, extra.layer, extra.point, extra.tl_name) == \
        (path, "output", None, "final", None)
    values, output = _run_with_hooks(model, hook_points, _input_ids(seed=1))
    assert LAST_HIDDEN_STATE_AFTER_FINAL_NORM[family]
    torch.testing.assert_close(values["extra/final"], output.hidden_states[-1], atol=1e-5, rtol=1e-5)


def test_unknown_point_lists_canonical_points():
    model = tiny_model("gpt2")
    with pytest.raises(engine.HookPointError) as info:
        engine.resolve_hook_points(model, [0], ["residual", "resid_post"], {})
    message = str(info.value)
    assert "'resid_post'" in message
    for point in CANONICAL_POINTS:
        assert point in message


@pytest.mark.parametrize("layer", [2, -1, 100])
def test_layer_out_of_range(layer):
    model = tiny_model("llama")
    with pytest.raises(engine.HookPointError) as info:
        engine.resolve_hook_points(model, [0, layer], ["residual"], {})
    assert "0..1" in str(info.value)
    assert str(layer) in str(info.value)


def _tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64)
    return BertModel(config).eval()


def test_unsupported_architecture_lists_families_but_extras_work():
    model = _tiny_bert()
    assert family_of(model) is None
    with pytest.raises(engine.HookPointError) as info:
        engine.resolve_hook_points(model, [0], ["residual"], {})
    message = str(info.value)
    assert "'bert'" in message
    for family in ADAPTERS:
        assert family in message
    assert "extra_modules" in message

    path = "encoder.layer.1"
    assert path in dict(model.named_modules())
    hook_points = engine.resolve_hook_points(model, [0], [], {"last_block": path})
    assert len(hook_points) == 1
    hp = hook_points[0]
    assert (hp.key, hp.module_path, hp.capture, hp.layer, hp.tl_name) == \
        ("extra/last_block", path, "output", None, None)
    assert hp.module is model.get_submodule(path)
    values, output = _run_with_hooks(model, hook_points, _input_ids(seed=2, seq=5))
    assert values["extra/last_block"].shape == (2, 5, 32)
    torch.testing.assert_close(values["extra/last_block"], output.last_hidden_state, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("path", ["transformer.h.7", "transformer.nope", "h.0"])
def test_bad_extra_module_path(path):
    model = tiny_model("gpt2")
    with pytest.raises(engine.HookPointError) as info:
        engine.resolve_hook_points(model, [0], ["residual"], {"mine": path})
    assert "'mine'" in str(info.value)
    assert repr(path) in str(info.value)


def test_nothing_selected():
    model = tiny_model("gpt2")
    with pytest.raises(engine.HookPointError, match="no hook point selected"):
        engine.resolve_hook_points(model, [0, 1], [], {})


def test_captured_tensor_rejects_non_tensor():
    model = tiny_model("gpt2")
    hp = engine.resolve_hook_points(model, [0], ["residual"], {})[0]
    with pytest.raises(engine.HookPointError, match="not a tensor"):
        captured_tensor(hp, (), None)
    tensor = torch.ones(1, 2, 3)
    assert captured_tensor(hp, (), (tensor, "attn weights")) is tensor
