"""Hook points: canonical per-layer names resolved to module paths by one small adapter table per family.

Canonical points (per layer i), in canonical order: the order of ``CaptureConfig.points`` and of the manifest.
The original four come first, so stores captured before the other three existed resume unchanged.

  point       what                                      width    hooked                 TransformerLens
  residual    block output (after attention and MLP)    d_model  block output           hook_resid_post
  mlp_hidden  input of the MLP down projection          d_mlp    down projection input  mlp.hook_post
  mlp_out     MLP module output                         d_model  MLP output             hook_mlp_out
  attn_out    attention module output                   d_model  attention output       hook_attn_out
  resid_pre   block input (the residual stream)         d_model  block input            hook_resid_pre
  resid_mid   residual after attention, before the MLP  d_model  MLP norm input         hook_resid_mid
  mlp_in      what the MLP receives (after its norm)    d_model  MLP input              ln2.hook_normalized
plus any module path of the model (its output is captured), stored under ``extra/<name>``.
Module paths per family are in ``ADAPTERS`` below; ``python -m engine models --points NAME`` prints them,
with widths, for every layer of a model.

TransformerLens names are ``blocks.{i}.{suffix}``. For ``mlp_in`` we record ``ln2.hook_normalized``, not TL's
``hook_mlp_in``: TL's ``hook_mlp_in`` is the input of ln2, *before* the norm (resid_mid in sequential blocks).
TL takes ``hook_normalized`` before the norm's elementwise weight and bias (which ``fold_ln`` moves into the
MLP's W_in), so our ``mlp_in`` equals TL's value times the weight plus the bias: the MLP input of the model
as transformers runs it, which is what a transcoder reads.

``resid_mid`` exists in sequential blocks only (gpt2, llama, gemma, gpt_neox with
``use_parallel_residual=False``): there ``residual == resid_mid + mlp_out``. Parallel blocks (phi, gpt_neox
with ``use_parallel_residual=True``, the default and Pythia's) feed the block input to attention and the MLP
alike and add both outputs at once (``residual == resid_pre + attn_out + mlp_out``); asking for ``resid_mid``
there raises HookPointError when the points are resolved.

Everything is resolved once, when hooks are attached: unknown names fail there, never mid-run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from engine.capture.points import CANONICAL_POINTS
from engine.errors import HookPointError
from engine.format.layout import array_key, extra_array_key


@dataclasses.dataclass(frozen=True)
class FamilyAdapter:
    """Module paths of one architecture family: ``layers`` relative to the base model, the rest to a block.

    Args:
        mlp_norm: the norm in front of the MLP, whose input is ``resid_mid`` in sequential blocks; None where
            the MLP shares the attention's norm.
        parallel: whether attention and MLP both read the block input: a bool, or the name of the config flag
            that decides.
    """

    layers: str
    attn: str
    mlp: str
    down_proj: str
    final_norm: str
    mlp_norm: str | None
    parallel: bool | str = False

    def is_parallel(self, config) -> bool:
        """Whether blocks built from ``config`` are parallel (no residual between attention and MLP)."""
        return self.parallel if isinstance(self.parallel, bool) else bool(getattr(config, self.parallel))


ADAPTERS: dict[str, FamilyAdapter] = {
    "gpt2": FamilyAdapter(layers="h", attn="attn", mlp="mlp", down_proj="mlp.c_proj", final_norm="ln_f",
                          mlp_norm="ln_2"),
    "gpt_neox": FamilyAdapter(layers="layers", attn="attention", mlp="mlp", down_proj="mlp.dense_4h_to_h",
                              final_norm="final_layer_norm", mlp_norm="post_attention_layernorm",
                              parallel="use_parallel_residual"),
    "llama": FamilyAdapter(layers="layers", attn="self_attn", mlp="mlp", down_proj="mlp.down_proj",
                           final_norm="norm", mlp_norm="post_attention_layernorm"),
    "gemma": FamilyAdapter(layers="layers", attn="self_attn", mlp="mlp", down_proj="mlp.down_proj",
                           final_norm="norm", mlp_norm="post_attention_layernorm"),
    "phi": FamilyAdapter(layers="layers", attn="self_attn", mlp="mlp", down_proj="mlp.fc2",
                         final_norm="final_layernorm", mlp_norm=None, parallel=True),
}


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """One resolved capture point.

    Args:
        key: array path in the store (``layer_6/residual``, ``extra/<name>``).
        module_path: dotted path of the hooked module from the model root (as in ``named_modules()``).
        module: the module object itself.
        capture: ``"output"`` (forward hook) or ``"input"`` (forward pre-hook: the first argument).
        layer: layer index, or None for a user-named module.
        point: canonical name, or the user's name for an extra module.
        tl_name: TransformerLens-style name, or None for a user-named module.

    Thread safety: immutable; ``attach`` from the thread that owns the model.
    """

    key: str
    module_path: str
    module: torch.nn.Module = dataclasses.field(repr=False, compare=False)
    capture: str
    layer: int | None
    point: str
    tl_name: str | None

    def attach(self, callback: Callable[[torch.Tensor], object]) -> RemovableHandle:
        """Hook ``module`` so that each of its forward calls runs ``callback(tensor)`` with this point's
        (batch, seq, dim) tensor, in the forward's thread, before (input) or after (output) the module runs.

        An input point takes the module's first argument whether it is passed positionally or by keyword; an
        output point takes the output, or its first element when the module returns a tuple. The callback's
        return value is ignored: the module's inputs and outputs are never replaced.

        Returns:
            The handle whose ``remove()`` detaches the hook.

        Raises (from the forward pass): HookPointError when the module receives or returns no tensor there;
        whatever the callback raises propagates out of the forward.
        """
        if self.capture == "input":
            name = _first_parameter(self.module)

            def on_input(module, args, kwargs) -> None:
                callback(self._activation(args[0] if args else kwargs.get(name), "received"))

            return self.module.register_forward_pre_hook(on_input, with_kwargs=True)

        def on_output(module, args, output) -> None:
            callback(self._activation(output, "returned"))

        return self.module.register_forward_hook(on_output)

    def _activation(self, value, verb: str) -> torch.Tensor:
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        if not isinstance(value, torch.Tensor):
            raise HookPointError(f"{self.module_path} {verb} {type(value).__name__}, not a tensor: only "
                                 "modules that receive or return (batch, seq, dim) tensors can be captured")
        return value


def _first_parameter(module: torch.nn.Module) -> str | None:
    """Name of ``module.forward``'s first parameter: the keyword its input comes by when not positional."""
    return next(iter(inspect.signature(module.forward).parameters), None)


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
    """Resolve canonical points at the given layers (layer by layer, points in the given order), then
    user-named modules.

    Raises:
        HookPointError: unknown point, unsupported architecture, layer out of range, ``resid_mid`` on a
            parallel block, or unknown module path.
    """
    resolved = _canonical_points(model, layer_indices, points) if points else []
    resolved += [_extra_point(model, name, path) for name, path in extra_modules.items()]
    if not resolved:
        raise HookPointError("no hook point selected: choose CaptureConfig.points (or the capture_* flags) "
                             "or name extra_modules")
    return resolved


def _canonical_points(model: torch.nn.Module, layer_indices: Sequence[int],
                      points: Sequence[str]) -> list[HookPoint]:
    for point in points:
        if point not in CANONICAL_POINTS:
            raise HookPointError(f"unknown hook point {point!r}: choose from {', '.join(CANONICAL_POINTS)} "
                                 "or name a module path in extra_modules")
    family = _require_family(model)
    adapter = ADAPTERS[family]
    if "resid_mid" in points and adapter.is_parallel(model.config):
        raise _no_resid_mid(family, adapter)
    blocks = layer_modules(model)
    for layer in layer_indices:
        if not 0 <= layer < len(blocks):
            raise HookPointError(f"layer {layer} is out of range: this model has {len(blocks)} layers, "
                                 f"valid indices are 0..{len(blocks) - 1}")
    names = {id(module): name for name, module in model.named_modules()}
    resolved = []
    for layer in layer_indices:
        for point in points:
            where, capture, tl_suffix = CANONICAL_POINTS[point]
            module = blocks[layer].get_submodule(getattr(adapter, where) if where else "")
            resolved.append(HookPoint(array_key(layer, point), names[id(module)], module, capture, layer,
                                      point, f"blocks.{layer}.{tl_suffix}"))
    return resolved


def _no_resid_mid(family: str, adapter: FamilyAdapter) -> HookPointError:
    flag = "" if isinstance(adapter.parallel, bool) else f" with {adapter.parallel}=True"
    return HookPointError(
        f"resid_mid does not exist in {family} blocks{flag}: they are parallel (attention and the MLP both "
        "read the block input, and both outputs are added to it at once), so no residual lies between them. "
        "Capture resid_pre (what both read), attn_out and mlp_out instead (residual = resid_pre + attn_out + "
        "mlp_out), or mlp_in for the MLP's input")


def _extra_point(model: torch.nn.Module, name: str, path: str) -> HookPoint:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise HookPointError(f"extra module {name!r}: no module at path {path!r}; module paths are the "
                             "names printed by model.named_modules()") from None
    return HookPoint(extra_array_key(name), path, module, "output", None, name, None)


def expected_widths(model: torch.nn.Module, hook_points: Sequence[HookPoint]) -> dict[str, int]:
    """The width each point must have, ``{key: width}``, by the model's config (canonical points: d_model,
    or d_mlp for ``mlp_hidden``) or its module (an extra module that is a linear, embedding or layer norm);
    points whose width neither tells are left out. Capture checks the first batch against it."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None)
    widths = {}
    for point in hook_points:
        if point.layer is None:
            width = _module_width(point.module)
        elif point.point == "mlp_hidden":
            width = _mlp_width(config, hidden)
        else:
            width = hidden
        if isinstance(width, int) and not isinstance(width, bool):
            widths[point.key] = width
    return widths


def _mlp_width(config, hidden: int | None) -> int | None:
    """d_mlp: ``intermediate_size``, or GPT-2's ``n_inner`` (None there means 4 x d_model)."""
    width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    if width is None and getattr(config, "model_type", None) == "gpt2" and isinstance(hidden, int):
        return 4 * hidden
    return width


def _module_width(module: torch.nn.Module) -> int | None:
    """The output width of a module that says it (linear: ``out_features``, GPT-2's Conv1D: ``nf``,
    embedding: ``embedding_dim``, layer norm: its normalized shape)."""
    for name in ("out_features", "nf", "embedding_dim"):
        if isinstance(getattr(module, name, None), int):
            return getattr(module, name)
    shape = getattr(module, "normalized_shape", None)
    return shape[-1] if isinstance(module, torch.nn.LayerNorm) and shape else None


@contextlib.contextmanager
def _no_pad_token(model: torch.nn.Module):
    """Hide the config's pad_token_id for one forward: transformers then looks in the ids for pad tokens
    (to warn about a missing mask), which needs the ids' values, and a meta tensor has none. Passing a mask
    instead does not help: the causal mask code reads the mask's values too."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        yield
        return
    config.pad_token_id = None
    try:
        yield
    finally:
        config.pad_token_id = pad


def measure_widths(model: torch.nn.Module, hook_points: Sequence[HookPoint]) -> dict[str, int]:
    """Width (last dimension) of each point's tensor, ``{key: width}``, measured by one forward pass of one
    token. On a model whose weights are on the ``meta`` device this computes shapes only (no memory, no time).
    """
    widths: dict[str, int] = {}

    def record(point: HookPoint, tensor: torch.Tensor) -> None:
        if tensor.dim() != 3:
            raise HookPointError(f"{point.module_path} produces shape {tuple(tensor.shape)} for a (1, 1) "
                                 "batch: only modules returning (batch, seq, dim) tensors can be captured")
        widths[point.key] = int(tensor.shape[-1])

    handles = [hp.attach(functools.partial(record, hp)) for hp in hook_points]
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), _no_pad_token(model):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return widths
