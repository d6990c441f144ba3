"""Attaching an engine's hooks to a model: the root pre-hook, one hook per point, and early stop.

One engine per model at a time: a second engine on a model that has one fails before it opens its store
(``check_unclaimed``; its hooks would run inside the first one's forward passes, and two early stops would
fight over one forward). An engine inside another's ``detached()`` block is fine: the first one's hooks are
off until the block ends, and it takes the model back then (which fails if the second is still attached).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from engine.capture.hookpoints import HookPoint
from engine.errors import HookPointError

_OWNER_ATTR = "_actcap_engine"
_NO_INSTANCE_FORWARD = object()


def check_unclaimed(model: torch.nn.Module, owner: Any = None) -> None:
    """Raise HookPointError if an engine other than ``owner`` has its hooks on ``model``."""
    holder = model.__dict__.get(_OWNER_ATTR)
    if holder is not None and holder is not owner:
        raise HookPointError("this model already has a CaptureEngine attached (one engine per model): close "
                             "that engine first, also before leaving another engine's detached() block, or "
                             "capture every point with one engine; engine.detached() runs the model without "
                             "capture")


class StopForward(Exception):
    """Raised by the last hook of a forward pass when early stop is on; the wrapped root forward returns None.
    Never reaches the caller: only the engine that wrapped the forward raises it."""


class ModelHooks:
    """The hooks of one engine on one model.

    Args:
        model: the model the engine captures.
        points: resolved hook points.
        owner: the engine (recorded on the model while attached).
        on_forward: ``(module, args, kwargs)`` root pre-hook.
        on_forward_end: ``(module, args, kwargs, output)`` root hook, after a forward that returned.
        on_point: ``(point, tensor)`` for each hooked point.
        early_stop: wrap the root forward so that ``StopForward`` ends it (returning None).

    Thread safety: attach and remove from the thread that runs the model.
    """

    def __init__(self, model: torch.nn.Module, points: list[HookPoint], owner: Any,
                 on_forward: Callable, on_forward_end: Callable,
                 on_point: Callable[[HookPoint, torch.Tensor], None], early_stop: bool):
        self._model = model
        self._points = points
        self._owner = owner
        # torch.compile never traces the hooks (their slots and messages are not tensors): they run eagerly,
        # between graphs, and see exactly the tensors eager mode would.
        self._on_forward = torch.compiler.disable(on_forward)
        self._on_forward_end = torch.compiler.disable(on_forward_end)
        self._on_point = torch.compiler.disable(on_point)
        self._early_stop = early_stop
        self._handles: list = []
        self._wrapped_forward = None  # what the early-stop wrapper replaced, while it is installed

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        """Install every hook (raises HookPointError if another engine holds the model)."""
        check_unclaimed(self._model, self._owner)
        self._model.__dict__[_OWNER_ATTR] = self._owner
        if self._early_stop:
            self._wrap_forward()
        self._handles.append(self._model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self._handles.append(self._model.register_forward_hook(self._on_forward_end, with_kwargs=True))
        for point in self._points:
            self._handles.append(point.attach(functools.partial(self._on_point, point)))

    def remove(self) -> None:
        """Remove every hook and the early-stop wrapper, restoring exactly what was there. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._wrapped_forward is not None:
            previous, self._wrapped_forward = self._wrapped_forward, None
            if previous is _NO_INSTANCE_FORWARD:
                self._model.__dict__.pop("forward", None)
            else:
                self._model.forward = previous
        if self._model.__dict__.get(_OWNER_ATTR) is self._owner:
            del self._model.__dict__[_OWNER_ATTR]

    def _wrap_forward(self) -> None:
        """The root forward returns None once every point is captured; later layers never run. Wraps the
        forward in place (an instance-level one, e.g. accelerate's, included)."""
        self._wrapped_forward = self._model.__dict__.get("forward", _NO_INSTANCE_FORWARD)
        original = self._model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            except StopForward:
                return None

        self._model.forward = forward
