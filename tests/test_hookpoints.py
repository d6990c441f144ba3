"""Hook points resolve to the modules whose tensors mean what the names say, proved against the model
itself."""

from __future__ import annotations

import dataclasses
import inspect
import types

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

import engine
from engine import CaptureConfig, CaptureEngine, open_store
from engine.capture.hookpoints import ADAPTERS, CANONICAL_POINTS, HookPoint, family_of
from engine.cli.main import build_parser, main

from helpers import (
    D_MLP,
    D_MODEL,
    FAMILIES,
    N_LAYERS,
    VOCAB,
    expected_rows,
    hook_all,
    ragged_batch,
    reference_capture,
    tiny_model,
)

POINTS = ["residual", "mlp_hidden", "mlp_out", "attn_out"]
ALL_POINTS = list(CANONICAL_POINTS)
INPUT_POINTS = {"mlp_hidden", "resid_pre", "resid_mid", "mlp_in"}

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
             "attn_out": "hook_attn_out", "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid",
             "mlp_in": "ln2.hook_normalized"}

# Every family as the registry builds it, plus GPT-NeoX with sequential blocks (Pythia's are parallel).
VARIANTS = {family: (family, {}) for family in FAMILIES}
VARIANTS["gpt_neox_sequential"] = ("gpt_neox", {"use_parallel_residual": False})
# Read from each family's transformers source, independently of ADAPTERS: whether attention and MLP both read
# the block input, and the norm whose output the MLP receives.
PARALLEL = {"gpt2": False, "gpt_neox": True, "gpt_neox_sequential": False, "llama": False, "gemma": False,
            "phi": True}
MLP_NORM = {"gpt2": "ln_2", "phi": "input_layernorm"} | {
    variant: "post_attention_layernorm" for variant in ("gpt_neox", "gpt_neox_sequential", "llama", "gemma")}


def _input_ids(seed: int = 0, batch: int = 2, seq: int = 7) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def _variant_model(variant: str) -> torch.nn.Module:
    family, overrides = VARIANTS[variant]
    return tiny_model(family, **overrides)


def _points_of(variant: str) -> list[str]:
    """Every canonical point the variant has (parallel blocks have no resid_mid)."""
    return [p for p in ALL_POINTS if not (p == "resid_mid" and PARALLEL[variant])]


def _run_with_hooks(model, hook_points, input_ids):
    """Each point's own hook (HookPoint.attach): {key: tensor}, and the model output."""
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


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def captured(variant):
    """Every point the variant has, at every layer, from one forward pass."""
    model = _variant_model(variant)
    hook_points = engine.resolve_hook_points(model, list(range(N_LAYERS)), _points_of(variant), {})
    values, output = _run_with_hooks(model, hook_points, _input_ids())
    return types.SimpleNamespace(variant=variant, family=VARIANTS[variant][0], model=model,
                                 blocks=engine.capture.hookpoints.layer_modules(model), values=values,
                                 hidden_states=output.hidden_states)


def test_family_is_detected(family):
    assert family_of(tiny_model(family)) == family


def test_resolved_points_metadata(variant):
    model = _variant_model(variant)
    points = _points_of(variant)
    hook_points = engine.resolve_hook_points(model, [0, 1], points, {})
    assert [(hp.layer, hp.point) for hp in hook_points] == [(layer, p) for layer in (0, 1) for p in points]
    modules = dict(model.named_modules())
    for hp in hook_points:
        assert hp.key == f"layer_{hp.layer}/{hp.point}"
        assert hp.module_path in modules
        assert modules[hp.module_path] is hp.module
        assert hp.tl_name == f"blocks.{hp.layer}.{TL_SUFFIX[hp.point]}"
        assert hp.capture == ("input" if hp.point in INPUT_POINTS else "output")
    by_key = {hp.key: hp for hp in hook_points}
    assert by_key["layer_0/residual"].tl_name == "blocks.0.hook_resid_post"
    adapter = ADAPTERS[VARIANTS[variant][0]]
    prefix = f"{model.base_model_prefix}.{adapter.layers}"
    for layer in (0, 1):
        block = f"{prefix}.{layer}"
        assert by_key[f"layer_{layer}/residual"].module_path == block
        assert by_key[f"layer_{layer}/mlp_hidden"].module_path == f"{block}.{adapter.down_proj}"
        assert by_key[f"layer_{layer}/mlp_out"].module_path == f"{block}.{adapter.mlp}"
        assert by_key[f"layer_{layer}/attn_out"].module_path == f"{block}.{adapter.attn}"
        assert by_key[f"layer_{layer}/resid_pre"].module_path == block
        assert by_key[f"layer_{layer}/mlp_in"].module_path == f"{block}.mlp"
        if not PARALLEL[variant]:
            assert by_key[f"layer_{layer}/resid_mid"].module_path == f"{block}.{MLP_NORM[variant]}"
    # Layers are distinct modules: layer 1's residual is not layer 0's.
    assert by_key["layer_0/residual"].module is not by_key["layer_1/residual"].module


def test_residual_is_block_output_at_every_layer(captured):
    values, hidden_states = captured.values, captured.hidden_states
    assert len(hidden_states) == N_LAYERS + 1
    final_norm = captured.model.base_model.get_submodule(ADAPTERS[captured.family].final_norm)
    for layer in range(N_LAYERS):
        residual = values[f"layer_{layer}/residual"]
        assert residual.shape == (2, 7, D_MODEL)
        if layer < N_LAYERS - 1:
            torch.testing.assert_close(residual, hidden_states[layer + 1], atol=1e-5, rtol=1e-5)
        elif LAST_HIDDEN_STATE_AFTER_FINAL_NORM[captured.family]:
            assert not torch.allclose(residual, hidden_states[layer + 1], atol=1e-3)
            with torch.no_grad():
                torch.testing.assert_close(final_norm(residual), hidden_states[layer + 1], atol=1e-5,
                                           rtol=1e-5)
        else:
            torch.testing.assert_close(residual, hidden_states[layer + 1], atol=1e-5, rtol=1e-5)


def test_resid_pre_is_embeddings_then_previous_residual(captured):
    """resid_pre of layer 0 is the embedding output (hidden_states[0]); of layer i, residual of layer i-1."""
    values = captured.values
    assert values["layer_0/resid_pre"].shape == (2, 7, D_MODEL)
    torch.testing.assert_close(values["layer_0/resid_pre"], captured.hidden_states[0], atol=0, rtol=0)
    for layer in range(1, N_LAYERS):
        assert torch.equal(values[f"layer_{layer}/resid_pre"], values[f"layer_{layer - 1}/residual"])
    assert not torch.allclose(values["layer_1/resid_pre"], values["layer_1/residual"], atol=1e-3)


def test_residual_is_resid_pre_plus_attn_plus_mlp(captured):
    """Every supported block (sequential or parallel) adds attention and MLP outputs to its input, so attn_out
    and mlp_out are exactly the two contributions to the residual stream."""
    values = captured.values
    for layer in range(N_LAYERS):
        total = values[f"layer_{layer}/resid_pre"] + values[f"layer_{layer}/attn_out"] + \
            values[f"layer_{layer}/mlp_out"]
        torch.testing.assert_close(values[f"layer_{layer}/residual"], total, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values[f"layer_{layer}/resid_pre"], captured.hidden_states[layer],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not PARALLEL[v]])
def test_resid_mid_sits_between_attention_and_mlp(captured):
    """Sequential blocks: resid_mid = resid_pre + attn_out, and the MLP branch adds mlp_out to it."""
    values = captured.values
    for layer in range(N_LAYERS):
        resid_pre, attn_out, resid_mid, mlp_out, residual = (values[f"layer_{layer}/{point}"] for point in (
            "resid_pre", "attn_out", "resid_mid", "mlp_out", "residual"))
        assert resid_mid.shape == (2, 7, D_MODEL)
        torch.testing.assert_close(resid_mid, resid_pre + attn_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(resid_mid + mlp_out, residual, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(resid_mid, residual, atol=1e-3)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if PARALLEL[v]])
def test_parallel_blocks_refuse_resid_mid(variant):
    model = _variant_model(variant)
    with pytest.raises(engine.HookPointError) as info:
        engine.resolve_hook_points(model, [0], ["residual", "resid_mid"], {})
    message = str(info.value)
    assert "resid_mid does not exist" in message and "parallel" in message
    assert all(name in message for name in ("resid_pre", "attn_out", "mlp_out", "mlp_in"))
    if VARIANTS[variant][0] == "gpt_neox":
        assert "use_parallel_residual=True" in message


def test_mlp_in_is_the_normed_input_the_mlp_turns_into_mlp_out(captured):
    """mlp_in is what the MLP module receives: its norm applied to resid_mid (sequential) or resid_pre
    (parallel), and the MLP maps it to mlp_out."""
    values = captured.values
    for layer in range(N_LAYERS):
        block = captured.blocks[layer]
        mlp_in = values[f"layer_{layer}/mlp_in"]
        mlp_out = values[f"layer_{layer}/mlp_out"]
        assert mlp_in.shape == (2, 7, D_MODEL)
        normed_source = values[f"layer_{layer}/{'resid_pre' if PARALLEL[captured.variant] else 'resid_mid'}"]
        with torch.no_grad():
            torch.testing.assert_close(block.get_submodule(MLP_NORM[captured.variant])(normed_source), mlp_in,
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(block.mlp(mlp_in), mlp_out, atol=1e-5, rtol=1e-5)
            # Wrong layer's MLP does not reproduce it (the check can fail).
            assert not torch.allclose(captured.blocks[1 - layer].mlp(mlp_in), mlp_out, atol=1e-3)


def test_mlp_hidden_feeds_down_projection_to_mlp_out(captured):
    values, blocks = captured.values, captured.blocks
    down_projs = [block.get_submodule(ADAPTERS[captured.family].down_proj) for block in blocks]
    for layer in range(N_LAYERS):
        hidden = values[f"layer_{layer}/mlp_hidden"]
        mlp_out = values[f"layer_{layer}/mlp_out"]
        assert hidden.shape == (2, 7, D_MLP)
        assert mlp_out.shape == (2, 7, D_MODEL)
        with torch.no_grad():
            torch.testing.assert_close(down_projs[layer](hidden), mlp_out, atol=1e-5, rtol=1e-5)
            # Wrong layer's down projection does not reproduce it (the check can fail).
            assert not torch.allclose(down_projs[1 - layer](hidden), mlp_out, atol=1e-3)


def test_attn_out_width(captured):
    for layer in range(N_LAYERS):
        attn = captured.values[f"layer_{layer}/attn_out"]
        assert attn.shape == (2, 7, D_MODEL)
        assert torch.isfinite(attn).all()
        assert attn.abs().sum() > 0


def _as_keywords(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    """The same call with every argument passed by keyword."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    keywords = {}
    for name, value in bound.arguments.items():
        is_var_keyword = bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
        keywords.update(value if is_var_keyword else {name: value})
    return keywords


def test_input_points_see_their_tensor_passed_positionally_or_by_keyword(variant):
    """transformers passes block and MLP inputs positionally today; a keyword call must capture the same."""
    model = _variant_model(variant)
    input_points = [p for p in _points_of(variant) if p in INPUT_POINTS]
    hook_points = engine.resolve_hook_points(model, [1], input_points, {})
    calls = {}

    def record_call(module, args, kwargs):
        calls[module] = (args, kwargs)

    recorders = [hp.module.register_forward_pre_hook(record_call, with_kwargs=True) for hp in hook_points]
    with torch.no_grad():
        model(input_ids=_input_ids())
    for recorder in recorders:
        recorder.remove()
    for hp in hook_points:
        args, kwargs = calls[hp.module]
        assert args, f"{hp.key}: transformers now passes the input by keyword; the keyword path is real"
        seen = []
        handle = hp.attach(seen.append)
        try:
            with torch.no_grad():
                positional = hp.module(*args, **kwargs)
                by_keyword = hp.module(**_as_keywords(hp.module, args, kwargs))
        finally:
            handle.remove()
        assert len(seen) == 2 and torch.equal(seen[0], args[0]) and torch.equal(seen[1], args[0]), hp.key

        def first(out):
            return out[0] if isinstance(out, tuple) else out

        torch.testing.assert_close(first(by_keyword), first(positional), atol=0, rtol=0)


def test_callback_return_values_never_replace_inputs_or_outputs(variant):
    """A pre-hook that returns something replaces the module's inputs in PyTorch; attach() must not."""
    model = _variant_model(variant)
    with torch.no_grad():
        expected = model(input_ids=_input_ids()).logits
    hook_points = engine.resolve_hook_points(model, [0, 1], _points_of(variant), {})
    handles = [hp.attach(lambda tensor: (tensor * 0, {})) for hp in hook_points]
    try:
        with torch.no_grad():
            logits = model(input_ids=_input_ids()).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


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


class _Returns(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, hidden_states=None):
        return self.value


@pytest.mark.parametrize("capture, call, verb", [
    ("output", lambda module: module(torch.ones(1, 2, 3)), "returned str"),
    ("input", lambda module: module(), "received NoneType"),
])
def test_attach_rejects_what_is_not_a_tensor(capture, call, verb):
    hp = HookPoint("extra/x", "x", _Returns("text"), capture, None, "x", None)
    handle = hp.attach(lambda tensor: None)
    with pytest.raises(engine.HookPointError, match=f"x {verb}, not a tensor"):
        call(hp.module)
    handle.remove()


def test_attach_takes_the_first_element_of_a_tuple_output():
    tensor = torch.ones(1, 2, 3)
    hp = HookPoint("extra/x", "x", _Returns((tensor, "attn weights")), "output", None, "x", None)
    seen = []
    handle = hp.attach(seen.append)
    hp.module()
    handle.remove()
    assert seen == [tensor] and seen[0] is tensor


# ---- CaptureConfig.points ---------------------------------------------------------------------------


def _config(tmp_path, **kwargs) -> CaptureConfig:
    return CaptureConfig(tmp_path / "s.zarr", layer_indices=[0], **kwargs)


@pytest.mark.parametrize("kwargs, points", [
    (dict(), ("residual", "mlp_hidden")),  # the original defaults
    (dict(capture_mlp_hidden=False, capture_attn_out=True), ("residual", "attn_out")),
    (dict(points=["mlp_in", "resid_pre", "mlp_out"]), ("mlp_out", "resid_pre", "mlp_in")),  # canonical order
    (dict(points="resid_mid"), ("resid_mid",)),
    (dict(points=["mlp_in", "residual"], capture_residual=True, capture_mlp_out=False),
     ("residual", "mlp_in")),
    (dict(points=[], extra_modules={"x": "model.norm"}), ()),
    (dict(points=ALL_POINTS), tuple(ALL_POINTS)),
])
def test_points_select_canonical_points(kwargs, points, tmp_path):
    cfg = _config(tmp_path, **kwargs)
    assert cfg.points == points
    for point in ("residual", "mlp_hidden", "mlp_out", "attn_out"):
        assert getattr(cfg, f"capture_{point}") is (point in points)
    assert dataclasses.replace(cfg, first_sequence=5).points == points, "replace keeps the selection"
    assert dataclasses.replace(cfg) == cfg


@pytest.mark.parametrize("kwargs, match", [
    (dict(points=["mlp_in"], capture_residual=True),
     r"capture_residual=True contradicts points=\['mlp_in'\].*add 'residual'"),
    (dict(points=["residual"], capture_residual=False),
     "capture_residual=False contradicts.*remove 'residual'"),
    (dict(points=["resid_post"]),
     "unknown hook point 'resid_post' in points: choose from " + ", ".join(ALL_POINTS)),
    (dict(points=["mlp_in", "mlp_in"]), "duplicates"),
    (dict(points=7), "points must be a list"),
    (dict(points=[]), "no hook point selected"),
    (dict(capture_residual=False, capture_mlp_hidden=False), "no hook point selected"),
    (dict(capture_residual="yes"), "capture_residual must be True, False or None"),
])
def test_points_errors_say_what_to_change(kwargs, match, tmp_path):
    with pytest.raises(engine.ConfigError, match=match):
        _config(tmp_path, **kwargs)


def test_points_is_frozen(tmp_path):
    cfg = _config(tmp_path, points=["mlp_in"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.points = ("residual",)


def test_new_points_through_the_engine(variant, tmp_path):
    """Stored rows equal each point's own hook, and the manifest records the TransformerLens names."""
    model = _variant_model(variant)
    points = [p for p in _points_of(variant) if p not in POINTS]
    cfg = CaptureConfig(tmp_path / "s.zarr", layer_indices=[0, 1], points=points, chunk_tokens=5)
    batches = [ragged_batch(3, 6, seed=s) for s in range(2)]
    with reference_capture(model, [0, 1], points) as ref:
        with CaptureEngine(model, cfg), torch.no_grad():
            for batch in batches:
                model(**batch)
    store = open_store(cfg.output_dir)
    assert store.manifest.points == points
    for layer in (0, 1):
        for point in points:
            key = f"layer_{layer}/{point}"
            np.testing.assert_array_equal(store[key][:].astype(np.float32),
                                          expected_rows(ref[key], [b["attention_mask"] for b in batches]))
            assert store.manifest.arrays[key]["tl_name"] == f"blocks.{layer}.{TL_SUFFIX[point]}"


# ---- command line ------------------------------------------------------------------------------------


def _points_table(capsys, name) -> tuple[list[list[str]], str]:
    assert main(["models", "--points", str(name)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:] if line[0].isdigit()]
    return rows, "\n".join(lines)


def test_models_points_lists_every_point_of_a_full_size_model_without_weights(capsys):
    rows, printed = _points_table(capsys, "llama-3-8b")
    assert len(rows) == 32 * len(ALL_POINTS) and "not available" not in printed
    by_key = {(row[0], row[1]): row[2:] for row in rows}
    assert by_key[("16", "mlp_hidden")] == ["14336", "model.layers.16.mlp.down_proj", "(input)",
                                            "blocks.16.mlp.hook_post"]
    assert by_key[("16", "mlp_in")] == ["4096", "model.layers.16.mlp", "(input)",
                                        "blocks.16.ln2.hook_normalized"]
    assert by_key[("31", "resid_mid")] == ["4096", "model.layers.31.post_attention_layernorm", "(input)",
                                           "blocks.31.hook_resid_mid"]
    assert by_key[("0", "resid_pre")] == ["4096", "model.layers.0", "(input)", "blocks.0.hook_resid_pre"]


def test_models_points_says_why_parallel_blocks_lack_resid_mid(capsys):
    rows, printed = _points_table(capsys, "pythia-1.4b")
    assert len(rows) == 24 * (len(ALL_POINTS) - 1) and not any(row[1] == "resid_mid" for row in rows)
    assert "resid_mid: not available: resid_mid does not exist in gpt_neox blocks with " \
        "use_parallel_residual=True" in printed
    assert ["8192", "gpt_neox.layers.3.mlp.dense_4h_to_h", "(input)", "blocks.3.mlp.hook_post"] in \
        [row[2:] for row in rows]


def test_models_points_of_a_local_folder_and_unknown_names(model_dir, capsys):
    rows, _ = _points_table(capsys, model_dir)
    assert len(rows) == 3 * len(ALL_POINTS)  # the saved tiny llama has 3 layers
    assert {row[2] for row in rows if row[1] == "mlp_hidden"} == {"160"}
    assert main(["models", "--points", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_capture_hooks_take_every_canonical_point(model_dir, corpus, tmp_path):
    required = ["capture", "--model", "m", "--data", "d", "--out", "o"]
    assert build_parser().parse_args([*required, "--hooks", *ALL_POINTS]).hooks == ALL_POINTS
    with pytest.raises(SystemExit):
        build_parser().parse_args([*required, "--hooks", "resid_post"])
    out = tmp_path / "s.zarr"
    assert main(["capture", "--model", str(model_dir), "--data", str(corpus), "--out", str(out),
                 "--layers", "1", "--hooks", "mlp_in", "resid_pre", "--seq-len", "16", "--batch-size", "4",
                 "--chunk-tokens", "32", "--no-progress"]) == 0
    store = open_store(out)
    assert store.manifest.points == ["resid_pre", "mlp_in"]
    assert {"layer_1/resid_pre", "layer_1/mlp_in"} <= set(store.keys()) and store.num_tokens > 0
