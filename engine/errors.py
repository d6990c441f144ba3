"""Error classes. Each subclasses the builtin a caller would naturally catch (zarr does the same)."""

from collections.abc import Iterable


class EngineError(Exception):
    """Base class for every error this package raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A CaptureConfig or argument is invalid; the message says what to change."""


class CorpusError(ConfigError):
    """A corpus cannot be read (missing, unreadable, not UTF-8, a bad record); the message names the file and
    line or record, and the fix."""


class UnknownModelError(EngineError, KeyError):
    """A model name is not in the registry and is not a local path."""

    def __str__(self) -> str:  # KeyError would repr() the message and hide its newlines
        return str(self.args[0]) if self.args else ""


class WeightsNotFoundError(EngineError, FileNotFoundError):
    """weights="required" and no local weights were found; the message lists where we looked."""


class HookPointError(EngineError, ValueError):
    """A hook point, layer index or module path cannot be resolved on this model."""


class StoreExistsError(EngineError, FileExistsError):
    """The output store exists and neither overwrite nor resume was asked for."""


class ResumeMismatchError(ConfigError):
    """resume=True on a store captured with a different model or configuration; the message lists each
    field."""


class StoreLockedError(EngineError, BlockingIOError):
    """Another process is writing this store (one writer per store); the message names the holder."""


class StorePathError(EngineError, OSError):
    """The output path cannot hold a store (a file, read-only, not writable); nothing was written."""


class BatchError(EngineError, ValueError):
    """A forward pass's input cannot be captured (e.g. longer than the model's positions); nothing was
    staged."""


class StoreFormatError(EngineError, ValueError):
    """A path is not a store written by this engine, or it is of an unsupported format version."""


class StoreCorruptError(EngineError, OSError):
    """A committed chunk is missing, of the wrong size, or fails its checksum: its rows are never returned.
    An OSError, as a failed read of damaged storage is (gzip's BadGzipFile is one too). The message names each
    bad chunk (array, part, chunk index, file) and the fix.

    Attributes:
        problems: one line per bad chunk.
    """

    def __init__(self, message: str, problems: Iterable[str] = ()):
        super().__init__(message)
        self.problems = tuple(problems)

    def __reduce__(self):  # crosses DataLoader worker processes whole
        return type(self), (str(self), self.problems)


class CaptureError(EngineError, RuntimeError):
    """The writer process failed or died; the original exception (when it could cross the process boundary)
    is chained as __cause__ and the writer's traceback is in the message."""


class CaptureFailedError(CaptureError):
    """A store read with ``follow=True`` was marked ``failed`` by its capture (committed rows stay valid)."""


class FollowTimeoutError(EngineError, TimeoutError):
    """``follow=True``: no chunk was committed for ``follow_timeout`` seconds (the capture may have died)."""


class CaptureClosedError(EngineError, RuntimeError):
    """The engine was used after close()."""
