"""The writer process's main thread (``python -m engine.writer FD``): messages in, the pool, close.

It runs in its own interpreter, started by ``engine.capture.handoff``, so its work never takes the GIL of the
process that runs the model. It imports no torch (numpy and zarr only), so it starts in a fraction of a
second. The messages and the shutdown protocol: ``engine.writer.protocol``.
"""

from __future__ import annotations

import collections
import datetime
import importlib
import os
import signal
import socket
import sys
import time

from engine.errors import ConfigError
from engine.format import layout
from engine.store.sink import Sink
from engine.writer.channel import Channel, ChannelClosed
from engine.writer.pool import WriterPool
from engine.writer.protocol import (
    PARENT_CHECK_S,
    Batch,
    Buffer,
    Close,
    Closed,
    Dims,
    Flush,
    Free,
    WriterSpec,
    send_error,
)
from engine.writer.slots import SlotMemory

CHANNEL_POLL_MIN_S = 0.0002  # the writer process's channel poll: every 0.2 ms while batches come ...
CHANNEL_POLL_MAX_S = 0.02    # ... backing off to 20 ms when idle
EXIT_ORPHANED = 3
_SINK_METHODS = tuple(name for name in vars(Sink) if not name.startswith("_"))
_SINK_EXAMPLE = "engine.store.sink:ZarrSink"


def sink_class(path: str) -> type[Sink]:
    """The sink class that ``WriterSpec.sink`` names (``module:Class``).

    Raises:
        ConfigError: ``path`` is not ``module:Class``, its module cannot be imported, it names no class, or
            the class lacks a method of ``Sink``.
    """
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise ConfigError(f"sink {path!r} is not 'module:Class': name the sink's class, e.g. {_SINK_EXAMPLE}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"sink {path!r}: its module cannot be imported ({error}): name a module the "
                          "capturing process can import (the writer process gets its sys.path)") from error
    found = getattr(module, name, None)
    if not isinstance(found, type):
        raise ConfigError(f"sink {path!r}: {module_name} has no class {name}: name an existing sink class, "
                          f"e.g. {_SINK_EXAMPLE}")
    missing = [method for method in _SINK_METHODS if not callable(getattr(found, method, None))]
    if missing:
        raise ConfigError(f"sink {path!r} lacks {', '.join(missing)}: a sink implements every method of "
                          "engine.store.sink.Sink")
    return found


class Server:
    """The writer process's main thread: reads messages and runs the pool until close.

    Thread safety: runs on the main thread; sends go through the channel's lock.
    """

    def __init__(self, spec: WriterSpec, channel: Channel):
        self._spec = spec
        self._channel = channel
        self._memory = SlotMemory(spec)
        self._dims: dict[str, int] = {}
        self._sink: Sink = sink_class(spec.sink).open(spec)
        self._pool = WriterPool(spec, self._sink, self._memory, channel.send)

    def serve(self, messages: collections.deque) -> None:
        """Handle ``messages`` (already received), then every later one, until close. Each is taken off
        ``messages`` as it is handled, so after a failure the caller still has the ones not handled (the
        close among them: ``_wait_for_close``).

        While batches come the channel is polled, not waited on: a process blocked on the socket must be
        woken by each message, which costs the sender (the model's forward thread) an interprocessor wakeup
        per batch (part of what took the hooks' CPU per forward from ~330 to ~230 us:
        benchmarks/results/cpu-2026-12-03/hook_cpu.txt). Polling every CHANNEL_POLL_MIN_S, backing off to
        CHANNEL_POLL_MAX_S, costs this process instead; once a whole CHANNEL_POLL_MAX_S has passed without a
        message, it waits on the socket, so an idle writer process (batches far apart, or none) takes no CPU
        and the sender pays one wakeup per batch that comes after such a pause
        (benchmarks/results/cpu-2026-12-04/idle_writer.txt).
        """
        idle = 0.0
        while True:
            while messages:
                if self._handle(messages.popleft()):
                    return
            waiting = idle >= CHANNEL_POLL_MAX_S
            try:
                messages.extend(self._channel.receive(timeout=PARENT_CHECK_S if waiting else 0.0))
            except ChannelClosed:
                os._exit(EXIT_ORPHANED)  # protocol step 5
            if messages:
                idle = 0.0
                continue
            if not waiting:
                idle = min(max(2 * idle, CHANNEL_POLL_MIN_S), CHANNEL_POLL_MAX_S)
                time.sleep(idle)
            self._exit_if_orphaned()

    def _exit_if_orphaned(self) -> None:
        """Protocol step 5, also while a close drains: the capturing process is gone when this one has been
        re-parented."""
        if os.getppid() != self._spec.parent_pid:
            os._exit(EXIT_ORPHANED)

    def abort(self) -> None:
        """Stop the writer threads after a failure of this (the main) thread."""
        self._pool.abort()

    def _handle(self, message: object) -> bool:
        """Handle one message; True once it was the close."""
        match message:
            case Batch():  # once per forward: no capture pattern, whose lookups cost more than the attributes
                if self._pool.error is None:
                    self._pool.submit(message.slot, message.info, self._dims)
                else:
                    self._channel.send(Free(message.slot))
            case Buffer(slot, name, nbytes):
                self._memory.map(slot, name, nbytes, self._channel.take_fds(1)[0])
            case Dims(widths):
                self._dims = widths
            case Flush(batches, request):
                self._pool.request_flush(batches, request)
            case Close(failed, sequences):
                self._close(failed, sequences)
                return True
            case _:
                raise TypeError(f"the writer process cannot handle {message!r}: not a message to it")
        return False

    def _close(self, failed: bool, sequences: int) -> None:
        """Protocol step 4; always answers Closed (``finalized`` False: the manifest was not
        published)."""
        pool = self._pool
        status, finalized = layout.STATUS_FAILED, False
        try:
            rows = pool.close(commit_tail=not failed, while_draining=self._exit_if_orphaned)
            if not failed and pool.error is None:
                status = layout.STATUS_COMPLETE
            committed = pool.committed
            self._sink.finalize(committed.tokens, {
                "status": status, "committed_tokens": committed.tokens, "committed_chunks": committed.chunks,
                "sequences": sequences,
                "statistics": committed.statistics.to_json() if committed.statistics is not None else {},
                "error": repr(pool.error) if pool.error is not None else None,
                "closed": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }, trim=status == layout.STATUS_COMPLETE and rows == committed.tokens)
            finalized = True
        except BaseException as exc:
            status = layout.STATUS_FAILED
            if pool.error is None:
                send_error(self._channel.send, exc)
        self._channel.send(Closed(status, finalized))


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.writer FD``: serve the capturing process over the socket ``FD``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the capturing process's to handle (it closes us)
    channel = Channel(socket.socket(fileno=int((argv or sys.argv)[1])))
    server = None
    # Messages received and not yet handled. The spec's read may bring more (when the capturing process closes
    # at once, the close itself): they stay here, for the server or, if it fails, for _wait_for_close.
    messages: collections.deque = collections.deque()
    try:
        while not messages:
            messages.extend(channel.receive(timeout=None))
        spec = messages.popleft()
        if not isinstance(spec, WriterSpec):
            raise TypeError(f"the writer process's first message must be its WriterSpec, not {spec!r}")
        server = Server(spec, channel)
        server.serve(messages)
        return 0
    except ChannelClosed:
        return EXIT_ORPHANED
    except BaseException as exc:
        send_error(channel.send, exc)
        if server is not None:
            server.abort()  # nothing more is written once this process has failed
        _wait_for_close(channel, messages)
        return 1


def _wait_for_close(channel: Channel, messages: collections.deque) -> None:
    """After a failure: answer the close message (among ``messages``, received and not handled yet, or still
    to come) so the capturing process can finish its own way."""
    while True:
        while messages:
            match messages.popleft():
                case Buffer():
                    os.close(channel.take_fds(1)[0])
                case Batch(slot):
                    channel.send(Free(slot))
                case Close():
                    channel.send(Closed(layout.STATUS_FAILED, finalized=False))
                    return
        try:
            messages.extend(channel.receive(timeout=PARENT_CHECK_S))
        except ChannelClosed:
            return


def _exit_now(code: int) -> None:
    """End this process without the interpreter's teardown (its modules, zarr's event-loop thread, the I/O
    pool's join at exit). When ``main`` returns, the store is finalized and every reply sent, or the run
    failed and nothing more may be written; ``close()`` in the capturing process waits for this exit, and
    the teardown made it 45 ms slower (benchmarks/results/cpu-2026-12-04b/writer_exit.txt)."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: started with that descriptor closed
                stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
        pass
    finally:
        os._exit(code)


