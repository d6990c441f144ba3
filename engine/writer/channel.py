"""The capturing process and its writer process talk over one Unix stream socket: the messages of
``engine.writer.protocol``, each behind a 4-byte length (packed with ``struct`` or pickled), and file
descriptors (the shared-memory slot buffers) passed beside them.

Every receive uses ``recvmsg`` so that no descriptor is dropped: descriptors queue in arrival order, and a
message that carries ``n`` of them takes the next ``n`` (the kernel delivers them with the first byte of the
message they were sent with, never later). Torch-free: the writer process imports it.
"""

from __future__ import annotations

import array
import collections
import os
import pickle
import select
import socket
import struct
import threading
import weakref

from engine.writer.protocol import PACKED, Packed

_HEADER = struct.Struct("<I")
_RECV_BYTES = 1 << 12
_MAX_FDS = 64
_ANCILLARY_BYTES = socket.CMSG_SPACE(_MAX_FDS * 4)


def _frame_packing(kind: type[Packed]) -> struct.Struct:
    """A packed message's whole frame: its length, its tag byte, its fields."""
    return struct.Struct(_HEADER.format + "B" + kind.PACKING.format.lstrip("<"))


# Messages sent once per batch or chunk (``PACKED``) are packed with struct, not pickled (a few microseconds
# less per forward), the whole frame in one ``pack``. Every other message is pickled (tag 0).
# Message class -> (frame packing, frame length, tag):
_FRAMES = {kind: (_frame_packing(kind), 1 + kind.PACKING.size, tag) for tag, kind in enumerate(PACKED, 1)}
# Tag -> (fields' packing, the message's builder):
_KINDS = {tag: (kind.PACKING, kind.from_fields) for kind, (_, _, tag) in _FRAMES.items()}
_PICKLED = b"\0"


_OPEN: weakref.WeakSet = weakref.WeakSet()


def _drop_inherited_channels() -> None:
    """In a forked child: close the channels' sockets (the child is no party to them; holding one open would
    hide the parent's death from its writer process)."""
    for channel in list(_OPEN):
        channel._sock.close()


os.register_at_fork(after_in_child=_drop_inherited_channels)


class ChannelClosed(EOFError):
    """The other end of the channel is gone (its process exited or closed the socket)."""


class Channel:
    """Messages over a connected ``AF_UNIX`` stream socket.

    Args:
        sock: one end of ``socket.socketpair()``.

    Thread safety: ``send`` from any thread (one lock); ``receive`` / ``take_fds`` from one thread at a time.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        # poll, not select: select.select refuses descriptors >= 1024, which a process with many files open
        # (datasets, shards, sockets) hands out
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        _OPEN.add(self)
        self._send_lock = threading.Lock()
        self._pending = bytearray()
        self._fds: collections.deque[int] = collections.deque()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, message: object, fds: tuple[int, ...] = ()) -> None:
        """Send one message (one of ``engine.writer.protocol``'s, or any object that pickles) and descriptors,
        which the receiver takes with ``take_fds``."""
        if isinstance(message, PACKED):
            packing, length, tag = _FRAMES[type(message)]
            frame = packing.pack(length, tag, *message.fields())
        else:
            payload = _PICKLED + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            frame = _HEADER.pack(len(payload)) + payload
        with self._send_lock:
            if fds:
                sent = socket.send_fds(self._sock, [frame], list(fds))
                self._sock.sendall(memoryview(frame)[sent:])
            else:  # every batch's message: no slice to make
                self._sock.sendall(frame)

    def receive(self, timeout: float | None = 0.0) -> list[object]:
        """Messages that have arrived, waiting up to ``timeout`` seconds (None: forever) for the first.

        Raises:
            ChannelClosed: the other end closed and every message it sent has been returned before.
        """
        if self._pending:
            messages = self._complete_messages()
            if messages:
                return messages
        if timeout != 0.0 and not self._poll.poll(None if timeout is None else timeout * 1000):
            return []
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(_RECV_BYTES, _ANCILLARY_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return self._complete_messages()
            except ConnectionResetError:
                data, ancillary = b"", []
            if not data:
                messages = self._complete_messages()
                if messages:
                    return messages  # the end comes at the next call, after what was sent before it
                raise ChannelClosed("the other process closed the channel")
            if ancillary:
                self._keep_fds(ancillary)
            self._pending += data
            if len(data) < _RECV_BYTES:  # all there was: spare the second call
                return self._complete_messages()

    def take_fds(self, count: int) -> list[int]:
        """The next ``count`` received descriptors (owned by the caller from now on)."""
        return [self._fds.popleft() for _ in range(count)]

    def close(self) -> None:
        while self._fds:
            socket.close(self._fds.popleft())
        self._sock.close()

    def _keep_fds(self, ancillary) -> None:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)

    def _complete_messages(self) -> list[object]:
        messages: list[object] = []
        start, pending = 0, self._pending
        while len(pending) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(pending, start)
            body, end = start + _HEADER.size, start + _HEADER.size + size
            if end > len(pending):
                break
            if pending[body] == 0:
                messages.append(pickle.loads(pending[body + 1:end]))
            else:
                packing, build = _KINDS[pending[body]]
                messages.append(build(packing.unpack_from(pending, body + 1)))
            start = end
        del pending[:start]
        return messages


def channel_pair() -> tuple[Channel, socket.socket]:
    """This process's channel and the other end's socket (to pass to a child process)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(ours), theirs
