"""Forwards with a KV cache: which stored sequences a forward continues, or why it cannot be placed.

``model.generate()`` and hand-written decode loops feed a prompt, then one (or a few) new tokens per forward
with the cache of the forwards before. The new tokens continue the prompt's sequences: they keep its
sequence numbers, and their positions count on from the tokens stored so far (the writer process counts them
from the attention masks it has, so left padding is respected as the model's own position ids respect it).

The rule (one cache at a time, the one the newest captured forward used or returned):
  - A forward without a cache, or with an empty one, begins new sequences; the sequences before end.
  - A forward with the newest forward's cache, unchanged since, continues its sequences row for row.
  - Any other forward with a non-empty cache cannot be placed: it is refused (``BatchError``) before anything
    of it is stored, and nothing is ever stored at a wrong position. That is a cache the engine did not see
    begin (created before the engine, or filled by forwards it did not capture), a cache changed in between
    (beam search reorders it, assisted decoding crops it: the rows already stored no longer match its
    rows), a cache whose sequences the engine ended (``flush()``, a ``detached()`` block, another forward or
    a failed one came in between), or another batch size.

A changed cache is noticed by wrapping its ``reorder_cache``, ``crop``, ``batch_select_indices``,
``batch_repeat_interleave`` and ``reset`` methods on the instance when the engine first sees it (each call
counts a change on the cache itself; the wrappers hold the cache weakly, so no reference cycle keeps its
device memory past the caller's last reference), and, for caches whose length is a host value (every cache
but the static ones: ``is_compileable``), by comparing ``get_seq_length()`` with the tokens fed. A reset cache
(its length back to 0) begins new sequences.

Torch-only here: nothing touches device data (a static cache's length is read once, when it is first seen).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

from engine.errors import BatchError

# transformers 5 names the keyword ``cache``, earlier releases ``past_key_values``.
CACHE_KEYWORDS = ("cache", "past_key_values")
_CHANGING_METHODS = ("reorder_cache", "crop", "batch_select_indices", "batch_repeat_interleave", "reset")
_CHANGES = "_actcap_changes"  # (count, last method) of the calls that changed a watched cache
_FIX = ("capture the generation from its first forward with this engine (generate() or your loop's first "
        "forward inside the engine's lifetime), with greedy or sampled decoding")


def cache_of(kwargs: dict) -> Any:
    """The KV cache a forward was called with, or None."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_length(cache: Any) -> int:
    """Tokens a cache holds."""
    if isinstance(cache, (tuple, list)):
        if not cache:
            return 0
        raise BatchError("the forward's KV cache is a legacy tuple of tensors: a new tuple every forward, so "
                         "the engine cannot tell which sequences it continues. Pass a transformers Cache "
                         "(past_key_values=DynamicCache() on the first forward, as generate() does)")
    if not hasattr(cache, "get_seq_length"):
        raise BatchError(f"the forward's KV cache is a {type(cache).__name__}, which has no "
                         "get_seq_length(): capture needs a transformers Cache")
    return int(cache.get_seq_length())


def _changes(cache: Any) -> tuple[int, str | None]:
    return getattr(cache, _CHANGES, (0, None))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a forward's rows go.

    Attributes:
        continues: its rows continue the newest forward's sequences, row for row.
        first_sequence: the sequence number of its row 0 when it continues (None: new sequences).
        past: tokens (pads included) the cache held before it: the attention mask may cover them too.
    """

    continues: bool = False
    first_sequence: int | None = None
    past: int = 0


@dataclasses.dataclass
class _Sequences:
    """The newest captured forward's sequences: their cache (None until it is known), batch size, first
    sequence number, tokens fed (pads included) and what changed the cache since, if anything."""

    cache: weakref.ref | None
    batch_size: int
    first_sequence: int
    fed: int
    changes: int = 0  # the cache's change count when its newest forward was captured


class CacheTracker:
    """Places each forward with respect to the KV cache of the one before (the rule in the module docstring).

    Call order, on the forward thread: ``place`` in the root pre-hook (may raise BatchError); ``begin`` once
    the forward's batch is reserved; ``returned`` in the root forward hook (a cache the model made); ``end``
    when the sequences can no longer continue (flush, detached, a forward that failed).

    Thread safety: the forward thread only.
    """

    def __init__(self) -> None:
        self._newest: _Sequences | None = None
        self._ended: tuple[weakref.ref, str] | None = None  # the cache of sequences ended, and by what

    def place(self, kwargs: dict, batch_size: int) -> Placement:
        """Where a forward called with ``kwargs`` goes (its sequences are not recorded until ``begin``).

        Raises:
            BatchError: the forward continues a cache whose sequences cannot be placed; ``end`` has been
                called (the sequences before end), nothing is recorded.
        """
        cache = cache_of(kwargs)
        newest = self._newest
        if cache is None:
            return Placement()
        if newest is not None and newest.cache is not None and newest.cache() is cache:
            problem = _continuation_problem(newest, cache, batch_size)
            if problem is None:
                return Placement(True, newest.first_sequence, newest.fed)
            if problem == "reset":
                return Placement()
            self.end(problem)
            raise BatchError(f"this forward continues a KV cache {problem}: nothing of it is stored. The "
                             f"fix: {_FIX}")
        length = cache_length(cache)
        if length:
            why = (self._ended[1] if self._ended is not None and self._ended[0]() is cache
                   else "whose earlier forwards this engine did not capture")
            self.end(why)
            raise BatchError(f"this forward continues a KV cache of {length} tokens {why}: its rows cannot "
                             f"be placed in their sequences, so nothing of it is stored. The fix: {_FIX}")
        return Placement()

    def begin(self, placement: Placement, kwargs: dict, batch_size: int, first_sequence: int,
              seq_len: int) -> None:
        """Record the forward being captured: its sequences are now the newest."""
        if placement.continues:
            self._newest.fed += seq_len
            self._newest.changes = _changes(self._newest.cache())[0]
            return
        self.end("whose sequences ended when a later forward began new ones")
        cache = cache_of(kwargs)
        self._newest = _Sequences(None, batch_size, first_sequence, seq_len)
        if cache is not None:
            self._watch(cache)

    def returned(self, output: Any) -> None:
        """After a forward: a cache the model made and returned (a loop's first forward without one) is the
        newest sequences' cache."""
        newest = self._newest
        if newest is None or newest.cache is not None:
            return
        cache = next((getattr(output, name, None) for name in CACHE_KEYWORDS
                      if getattr(output, name, None) is not None), None)
        if cache is not None:
            self._watch(cache)

    def end(self, why: str) -> None:
        """The newest sequences can no longer continue (``why`` completes "a KV cache ..." in the refusal of
        a later forward that tries)."""
        newest, self._newest = self._newest, None
        if newest is not None and newest.cache is not None and newest.cache() is not None:
            self._ended = (newest.cache, why)

    def _watch(self, cache: Any) -> None:
        newest = self._newest
        try:
            newest.cache = weakref.ref(cache)
        except TypeError:  # a cache that cannot be followed: cache_length refuses it at its next forward
            return
        newest.changes = _changes(cache)[0]
        for name in _CHANGING_METHODS:
            function = getattr(type(cache), name, None)
            # a method the instance holds itself is already watched (or not ours to wrap)
            if callable(function) and name not in vars(cache):
                setattr(cache, name, _watched(function, name, newest.cache))


def _continuation_problem(newest: _Sequences, cache: Any, batch_size: int) -> str | None:
    """Why the newest sequences' own cache cannot continue them ("reset": it was emptied, so this forward
    begins new ones), or None."""
    count, changed_by = _changes(cache)
    if count != newest.changes or not getattr(cache, "is_compileable", False):
        length = cache_length(cache)
        if length == 0:
            return "reset"
        if count != newest.changes:
            return (f"that {changed_by}() changed since the forward before (beam search reorders a cache, "
                    "assisted decoding crops it): the rows stored no longer match its rows")
        if length != newest.fed:
            return (f"holding {length} tokens where the captured forwards fed {newest.fed} (a forward this "
                    "engine did not capture used it)")
    if batch_size != newest.batch_size:
        return f"of {newest.batch_size} sequences with a batch of {batch_size}"
    return None


def _watched(function, name: str, cache: weakref.ref):
    """The class's ``function`` as a method of the watched cache that first counts the change on it."""

    def call(*args, **kwargs):
        watched = cache()
        count, _ = _changes(watched)
        setattr(watched, _CHANGES, (count + 1, name))
        return function(watched, *args, **kwargs)

    return call
