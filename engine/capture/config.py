"""CaptureConfig: the one frozen, validated configuration of a capture run."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import os
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence

from engine.capture import encoder
from engine.capture.hookpoints import CANONICAL_POINTS
from engine.errors import ConfigError
from engine.format.encoding import encoding_of
from engine.format.layout import ANNOTATION_DTYPES, STORAGE_DTYPES, TOKEN_ARRAYS
from engine.format.location import Location

SINKS = ("zarr", "null")
COMPRESSORS = (None, "zstd", "blosc")
# Not "." or "..", nor any name starting with a dot: the name becomes the folder ``extra/<name>``.
_EXTRA_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
# The original per-point switches (capture_<point>) and what each means when neither it nor ``points`` is set.
FLAG_DEFAULTS = {"residual": True, "mlp_hidden": True, "mlp_out": False, "attn_out": False}


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """What to capture and how to store it. Validated on construction; errors say what to change.

    Args:
        output_dir: the zarr store to write: a local folder or an object-store URL such as
            ``s3://bucket/prefix`` (any fsspec protocol; see ``engine.format.location``).
        layer_indices: layers whose canonical points are captured.
        capture_residual / capture_mlp_hidden / capture_mlp_out / capture_attn_out: the original switches for
            four canonical points; unset (None) they mean True, True, False, False unless ``points`` is given.
        points: canonical points captured at every layer of ``layer_indices``, from
            ``engine.capture.hookpoints.CANONICAL_POINTS`` (residual, mlp_hidden, mlp_out, attn_out,
            resid_pre, resid_mid, mlp_in; one name may be a string). The rule: given (even empty), ``points``
            is the whole selection and a capture_* switch may only agree with it (``capture_residual=True``
            without ``"residual"`` in ``points``, or ``False`` with it, is a ConfigError); None, the switches
            choose. After construction ``points`` holds the selection in canonical order and every switch says
            whether its point is in it, so ``dataclasses.replace`` keeps the selection. (Replacing ``points``
            alone by one that adds or drops a switch's point contradicts that switch: pass it too, or build a
            new config.)
        extra_modules: ``{name: module_path}`` of further modules whose outputs are captured to
            ``extra/<name>``.
        dtype: storage dtype: ``float16`` (default), ``float32``, ``bfloat16`` (stored as uint16 bits), or an
            8-bit encoding with a float32 scale per row, encoded on the model's device before the copy:
            ``int8`` (absmax) or ``float8_e4m3`` (half of float16's bytes; what each costs in SAE quality:
            docs/format.md; readers decode them to floats).
        chunk_tokens: rows per zarr chunk and per commit (memory is bounded by slots and chunks, never by a
            count of batches, which would hold gigabytes for large batches).
        num_writers: writer threads (in the writer process).
        pinned_slots: host staging slots (each holds one batch of every captured point); when all are in
            use the forward pass waits (backpressure).
        max_batch_tokens: the most tokens one forward brings (batch size times sequence length, padding
            included), when known: every slot is sized for it at the first batch, so none is reallocated (and,
            on CUDA, registered again) during a later forward, and the host memory they need is checked at the
            first forward instead of when the first long batch comes. A larger batch still grows the slots
            (by 25% at least). None (default: slots grow with the largest batch seen).
        overwrite: replace an existing store.
        resume: continue an existing store with the same configuration.
        break_lock: take over a store whose object-storage lock is older than its lease (its writer was
            killed and a minute has passed; see ``engine.store.lock``). A lock within its lease is never
            broken; local folders need no breaking (the kernel frees their lock when the holder dies).
        sink: ``zarr`` writes the store; ``null`` runs the whole pipeline but discards rows (benchmarks).
        compressor: None (default: dense activations barely compress), ``zstd`` or ``blosc``.
        model_name: name recorded in the manifest (default: ``model.config.name_or_path``).
        early_stop: end each forward pass once every point is captured: later layers and the LM head never
            run and ``model(...)`` returns None. Off for passes whose outputs you need.
        annotations: ``{name: "int32"|"int64"}`` per-token values the driver passes with
            ``CaptureEngine.annotate(name=(batch, seq) tensor)`` before each forward; stored at
            ``tokens/<name>`` (e.g. document ids and character offsets).
        statistics: running statistics in the manifest (one extra pass over each chunk in the writers;
            turn off when host CPU is the bottleneck).
        storage_options: options of the fsspec filesystem of a URL ``output_dir`` (e.g. s3fs's
            ``endpoint_url``, ``key``, ``secret``); default: the usual environment variables.
        distributed: this process writes its own part of one store shared by every rank of the initialized
            ``torch.distributed`` process group (gloo or nccl); rank 0 prepares the store and, after a
            barrier in ``close()``, writes the top manifest. Every rank must construct and close its engine.
        first_sequence: global index of this process's first input sequence (``tokens/sequence`` counts
            from it): with ``distributed``, the start of this rank's share of the corpus, so sequence
            numbers are those of a single-process run.
        outlier_norm_ratio: rows whose L2 norm at some captured point exceeds this many times the median norm
            of their neighbours (the rows of their chunk in blocks of at most 4 MiB as float32) are flagged
            ``outlier`` ("massive activations": in SmolLM2-135M's layer 15 they sit at 130x the median,
            every other row within 2x); the manifest statistics and ``ActivationDataset`` leave them out by
            default, and they stay readable. None: no row is flagged. ``engine.format.statistics`` has the
            rule.
        durable: each chunk's files reach the disk (fsync, or syncfs where it is as strong: see
            ``engine.format.files``) before its commit record, and the record before the next; off for scratch
            stores, where a power loss may then lose committed chunks (a crash of the process never does).

    Thread safety: immutable.
    """

    output_dir: str | os.PathLike
    layer_indices: tuple[int, ...] = ()
    capture_residual: bool | None = None
    capture_mlp_hidden: bool | None = None
    capture_mlp_out: bool | None = None
    capture_attn_out: bool | None = None
    points: Sequence[str] | None = None
    extra_modules: Mapping[str, str] = dataclasses.field(default_factory=dict)
    dtype: str = "float16"
    chunk_tokens: int = 8192
    num_writers: int = 2
    pinned_slots: int = 4
    max_batch_tokens: int | None = None
    overwrite: bool = False
    resume: bool = False
    sink: str = "zarr"
    compressor: str | None = None
    model_name: str | None = None
    early_stop: bool = False
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)
    statistics: bool = True
    storage_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    distributed: bool = False
    first_sequence: int = 0
    durable: bool = True
    break_lock: bool = False
    outlier_norm_ratio: float | None = 10.0

    def __post_init__(self) -> None:
        self._normalize()
        check_field_types(self)
        self._select_points()
        for name, dtype in self.annotations.items():
            if not name.isidentifier() or f"tokens/{name}" in TOKEN_ARRAYS:
                raise ConfigError(f"annotation {name!r}: use an identifier other than "
                                  f"{', '.join(k.split('/')[1] for k in TOKEN_ARRAYS)}")
            if dtype not in ANNOTATION_DTYPES:
                raise ConfigError(f"annotation {name!r} dtype {dtype!r}: use one of "
                                  f"{', '.join(ANNOTATION_DTYPES)}")
        if not str(self.output_dir):
            raise ConfigError("output_dir must be a non-empty path to the zarr store to write")
        Location.of(self.output_dir)  # a URL must name a prefix inside its bucket
        for layer in self.layer_indices:
            if layer < 0:
                raise ConfigError(f"layer_indices must be non-negative ints, got {layer!r}")
        if len(set(self.layer_indices)) != len(self.layer_indices):
            raise ConfigError(f"layer_indices has duplicates: {list(self.layer_indices)}; list each layer "
                              "once")
        if self.points and not self.layer_indices:
            raise ConfigError("layer_indices is empty but canonical hook points are enabled: name the layers "
                              "to capture, e.g. layer_indices=[6]")
        if not self.points and not self.extra_modules:
            raise ConfigError("no hook point selected: name canonical points, e.g. points=['residual'], or "
                              "modules in extra_modules")
        for name, path in self.extra_modules.items():
            if not _EXTRA_NAME.match(name) or not path:
                raise ConfigError(f"extra_modules entry {name!r}: names use letters, digits, '_', '.', '-' "
                                  "and do not start with '.' (each is the folder extra/<name>), and map to a "
                                  "non-empty module path (a name from model.named_modules())")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported: use one of "
                              f"{', '.join(STORAGE_DTYPES)} (float32 or bfloat16 for models whose "
                              "activations overflow float16)")
        encoding = encoding_of(self.dtype)
        if encoding is not None and not encoder.available(encoding):
            raise ConfigError(f"dtype {self.dtype!r} needs torch.float8_e4m3fn, which this torch lacks: "
                              "upgrade torch (2.1 or newer) or use dtype='int8'")
        for name in ("chunk_tokens", "num_writers", "pinned_slots"):
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{name} must be a positive int, got {value!r}: it bounds "
                                  + {"chunk_tokens": "rows per chunk and per commit",
                                     "num_writers": "the writer threads",
                                     "pinned_slots": "staged batches (host memory)"}[name])
        if self.max_batch_tokens is not None and self.max_batch_tokens <= 0:
            raise ConfigError(f"max_batch_tokens must be a positive int (batch size x sequence length) or "
                              f"None, got {self.max_batch_tokens!r}")
        if self.overwrite and self.resume:
            raise ConfigError("overwrite=True and resume=True contradict each other: choose one")
        if self.sink not in SINKS:
            raise ConfigError(f"sink {self.sink!r}: use 'zarr' or 'null' (null discards rows; for "
                              "benchmarks)")
        if self.first_sequence < 0:
            raise ConfigError(f"first_sequence must be a non-negative int, got {self.first_sequence!r}")
        if self.distributed and self.sink != "zarr":
            raise ConfigError("distributed=True writes parts of one store: use sink='zarr'")
        ratio = self.outlier_norm_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not ratio > 1 or ratio == float("inf")):
            raise ConfigError(f"outlier_norm_ratio must be a finite number above 1 (how many times the "
                              "median norm a row must exceed to be flagged an outlier) or None, got "
                              f"{ratio!r}")
        if self.compressor not in COMPRESSORS:
            raise ConfigError(f"compressor {self.compressor!r}: use None, 'zstd' or 'blosc'")

    def _normalize(self) -> None:
        """The shorthands the fields accept, in their declared types: one layer as an int, a list of layers,
        any mapping for the dict fields (values of other types are left to ``check_field_types``)."""
        layers = self.layer_indices
        if isinstance(layers, int) and not isinstance(layers, bool):
            object.__setattr__(self, "layer_indices", (layers,))
        elif isinstance(layers, (list, tuple, range)):
            object.__setattr__(self, "layer_indices", tuple(layers))
        for name in ("extra_modules", "annotations", "storage_options"):
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, dict(getattr(self, name)))

    def _select_points(self) -> None:
        """Apply the ``points`` rule (see the class docstring): store the selection in canonical order and
        set every capture_* switch to whether its point is selected."""
        flags = {point: getattr(self, f"capture_{point}") for point in FLAG_DEFAULTS}
        if self.points is None:
            selected = {point for point, value in flags.items()
                        if (FLAG_DEFAULTS[point] if value is None else value)}
        else:
            names = self._named_points()
            selected = set(names)
            for point, value in flags.items():
                if value is not None and value != (point in selected):
                    raise ConfigError(
                        f"capture_{point}={value} contradicts points={names}: when points is given it is "
                        f"the whole selection; {'add' if value else 'remove'} {point!r} there, or leave "
                        f"capture_{point} unset")
        object.__setattr__(self, "points", tuple(point for point in CANONICAL_POINTS if point in selected))
        for point in FLAG_DEFAULTS:
            object.__setattr__(self, f"capture_{point}", point in selected)

    def _named_points(self) -> list[str]:
        """``points`` as given, checked: known names, each once."""
        names = [self.points] if isinstance(self.points, str) else list(self.points)
        for name in names:
            if name not in CANONICAL_POINTS:
                raise ConfigError(f"unknown hook point {name!r} in points: choose from "
                                  f"{', '.join(CANONICAL_POINTS)}; capture other modules with extra_modules")
        if len(set(names)) != len(names):
            raise ConfigError(f"points has duplicates: {names}; list each point once")
        return names

    @property
    def location(self) -> Location:
        """Where the store is (a local folder or a URL)."""
        return Location.of(self.output_dir, self.storage_options)


# ---- the type of every field, checked by its declaration ---------------------------------------------------
# One check over the dataclass's fields, by their declared types: a field added later is checked as soon as
# it is declared. Nothing is converted by guessing: overwrite="false" is a string, and a string is true.

_SEQUENCES = (tuple, list, collections.abc.Sequence)
_MAPPINGS = (dict, collections.abc.Mapping)


@functools.cache
def _declared_types() -> dict[str, Any]:
    return typing.get_type_hints(CaptureConfig)


def check_field_types(config: CaptureConfig) -> None:
    """ConfigError naming the first field whose value is not of its declared type."""
    for name, kind in _declared_types().items():
        value = getattr(config, name)
        if not _is_of(value, kind):
            words = _words(kind)
            guess = ": a string is not a boolean, nothing is converted" if "True" in words else ""
            raise ConfigError(f"{name} must be {words}, got {value!r} ({type(value).__name__}){guess}")


def _is_of(value: Any, kind: Any) -> bool:
    """Whether ``value`` is of the declared type ``kind`` (bool is not an int here; kinds this check does not
    know pass, and are left to the field's own checks)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return True
    if kind is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_is_of(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if origin in _SEQUENCES:
        if not isinstance(value, origin):
            return False
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):  # tuple[int, str]: per place
            return len(value) == len(args) and all(map(_is_of, value, args))
        return not args or all(_is_of(item, args[0]) for item in value)
    if origin in _MAPPINGS:
        key_kind, value_kind = args or (Any, Any)
        return isinstance(value, collections.abc.Mapping) and all(
            _is_of(key, key_kind) and _is_of(item, value_kind) for key, item in value.items())
    if isinstance(origin or kind, type):
        return isinstance(value, origin or kind)
    return True


def _alternatives(kind: Any) -> list[str]:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return [word for arg in args for word in _alternatives(arg)]
    if kind is type(None):
        return ["None"]
    if kind is bool:
        return ["True", "False"]
    if origin is Literal:
        return [repr(arg) for arg in args]
    if origin in _SEQUENCES:
        return [f"a list of {_name(args[0]) if args else 'values'}"]
    if origin in _MAPPINGS:
        return [f"a dict of {_name(args[0])} to {_name(args[1])}" if args else "a dict"]
    return [{str: "a string", int: "an int", float: "a number", os.PathLike: "a path"}.get(kind)
            or f"a {_name(kind)}"]


def _words(kind: Any) -> str:
    """A declared type in words: ``bool | None`` is "True, False or None"."""
    words = _alternatives(kind)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _name(kind: Any) -> str:
    return "anything" if kind is Any else getattr(kind, "__name__", str(kind))
