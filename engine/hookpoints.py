"""Hook points: canonical per-layer names resolved to module paths by one small adapter table per family.

Canonical points (per layer i):
  residual    block output: the residual stream after attention + MLP (TransformerLens hook_resid_post)
  mlp_hidden  input of the MLP down projection, d_mlp wide (hook_post, the SAE-relevant MLP state)
  mlp_out     MLP module output, d_model wide (hook_mlp_out)
  attn_out    attention module output, d_model wide (hook_attn_out)
plus any module path of the model (its output is captured), stored under ``extra/<name>``.

Everything is resolved once, when hooks are attached: unknown names fail there, never mid-run.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import torch

from .errors import HookPointError
from .layout import array_key, extra_array_key


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """Module paths of one architecture family: ``layers`` relative to the base model, the rest to a block."""

    layers: str
    attn: str
    mlp: str
    down_proj: str
    final_norm: str


ADAPTERS: dict[str, FamilyAdapter] = {
    "gpt2": FamilyAdapter(layers="h", attn="attn", mlp="mlp", down_proj="mlp.c_proj", final_norm="ln_f"),
    "gpt_neox": FamilyAdapter(layers="layers", attn="attention", mlp="mlp", down_proj="mlp.dense_4h_to_h",
                              final_norm="final_layer_norm"),
    "llama": FamilyAdapter(layers="layers", attn="self_attn", mlp="mlp", down_proj="mlp.down_proj",
                           final_norm="norm"),
    "gemma": FamilyAdapter(layers="layers", attn="self_attn", mlp="mlp", down_proj="mlp.down_proj",
                           final_norm="norm"),
    "phi": FamilyAdapter(layers="layers", attn="self_attn", mlp="mlp", down_proj="mlp.fc2",
                         final_norm="final_layernorm"),
}

# Canonical point -> (where in the block, "output" or "input" of that module, TransformerLens suffix).
CANONICAL_POINTS: dict[str, tuple[str, str, str]] = {
    "residual": ("", "output", "hook_resid_post"),
    "mlp_hidden": ("down_proj", "input", "mlp.hook_post"),
    "mlp_out": ("mlp", "output", "hook_mlp_out"),
    "attn_out": ("attn", "output", "hook_attn_out"),
}


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """One resolved capture point.

    Args:
        key: array path in the store (``layer_6/residual``, ``extra/<name>``).
        module_path: dotted path of the hooked module from the model root (as in ``named_modules()``).
        module: the module object itself.
        capture: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook, first positional input).
        layer: layer index, or None for a user-named module.
        point: canonical name, or the user's name for an extra module.
        tl_name: TransformerLens-style name, or None for a user-named module.
    """

    key: str
    module_path: str
    module: torch.nn.Module = dataclasses.field(repr=False, compare=False)
    capture: str
    layer: int | None
    point: str
    tl_name: str | None


def family_of(model: torch.nn.Module) -> str | None:
    """Adapter family for a transformers model (by ``config.model_type``), or None if unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in ADAPTERS else None


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "base_model", model)


def layer_modules(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a supported model, in order."""
    family = _require_family(model)
    return _base_model(model).get_submodule(ADAPTERS[family].layers)


def _require_family(model: torch.nn.Module) -> str:
    family = family_of(model)
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise HookPointError(
            f"unsupported architecture {model_type!r}: canonical hook points exist for "
            f"{', '.join(ADAPTERS)}; capture other models through extra_modules={{name: module_path}}")
    return family


def resolve_hook_points(model: torch.nn.Module, layer_indices: Sequence[int], points: Sequence[str],
                        extra_modules: Mapping[str, str]) -> list[HookPoint]:
    """Resolve canonical points at the given layers plus user-named modules.

    Raises:
        HookPointError: unknown point, unsupported architecture, layer out of range, or unknown module path.
    """
    names = {id(module): name for name, module in model.named_modules()}
    resolved = []
    if points:
        for point in points:
            if point not in CANONICAL_POINTS:
                raise HookPointError(f"unknown hook point {point!r}: choose from {', '.join(CANONICAL_POINTS)} "
                                     "or name a module path in extra_modules")
        family = _require_family(model)
        adapter = ADAPTERS[family]
        blocks = layer_modules(model)
        for layer in layer_indices:
            if not 0 <= layer < len(blocks):
                raise HookPointError(f"layer {layer} is out of range: this model has {len(blocks)} layers, "
                                     f"valid indices are 0..{len(blocks) - 1}")
            for point in points:
                where, capture, tl_suffix = CANONICAL_POINTS[point]
                module = blocks[layer].get_submodule(getattr(adapter, where) if where else "")
                resolved.append(HookPoint(array_key(layer, point), names[id(module)], module, capture,
                                          layer, point, f"blocks.{layer}.{tl_suffix}"))
    for name, path in extra_modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise HookPointError(f"extra module {name!r}: no module at path {path!r}; module paths are the "
                                 "names printed by model.named_modules()") from None
        resolved.append(HookPoint(extra_array_key(name), path, module, "output", None, name, None))
    if not resolved:
        raise HookPointError("no hook point selected: enable capture_residual / capture_mlp_hidden / "
                             "capture_mlp_out / capture_attn_out or name extra_modules")
    return resolved


def captured_tensor(hook_point: HookPoint, args: tuple, output) -> torch.Tensor:
    """The activation tensor a hook sees: first input for pre-hooks, first tensor of the output otherwise."""
    value = args[0] if hook_point.capture == "input" else output
    if isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise HookPointError(f"{hook_point.module_path} produced {type(value).__name__}, not a tensor: "
                             "only modules that return (batch, seq, dim) tensors can be captured")
    return value
