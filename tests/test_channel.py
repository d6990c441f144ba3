"""The channel between the capturing and the writer process, on its own."""

from __future__ import annotations

import os
import resource
import socket
import threading

from engine.writer.channel import Channel, ChannelClosed, channel_pair
from engine.writer.protocol import (
    Batch,
    BatchInfo,
    Buffer,
    Close,
    Closed,
    Dims,
    Failure,
    Flush,
    Flushed,
    Free,
    NonFinite,
    Totals,
)


def test_every_message_crosses_the_channel_as_it_was_sent():
    """The packed messages (Batch, Free, Totals: struct, not pickle) and the pickled ones come out equal, of
    their own class, in order, with a descriptor beside the Buffer that announces it."""
    info = BatchInfo(3, 2, 7, 10, has_ids=True, has_mask=False, continues=True, may_continue=True,
                     stall_seconds=0.25)
    messages = [Batch(1, info), Free(2), Totals(10, 2048, 3), Buffer(0, "point/x", 4096), Dims({"x": 8}),
                Flush(4, 2), Close(False, 5), Flushed(2), NonFinite("x", 3), Closed("complete", True),
                Failure(None, "Traceback ...")]
    sender, theirs = channel_pair()
    receiver = Channel(theirs)
    read, write = os.pipe()
    try:
        for message in messages:
            sender.send(message, fds=(write,) if isinstance(message, Buffer) else ())
        received: list[object] = []
        while len(received) < len(messages):
            received += receiver.receive(timeout=5.0)
        assert received == messages
        assert [type(message) for message in received] == [type(message) for message in messages]
        assert isinstance(received[0].info, BatchInfo)
        passed = receiver.take_fds(1)[0]
        os.write(passed, b"x")
        os.close(passed)
        assert os.read(read, 1) == b"x", "the Buffer's descriptor is the one sent"
    finally:
        sender.close()
        receiver.close()
        os.close(read)
        os.close(write)


def test_a_channel_on_a_descriptor_above_1023_waits_and_sees_the_close():
    """A capturing process with many files open hands the channel a descriptor that ``select.select``
    refuses; waiting for a message, and noticing the other end close, must work there too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 1500
    if soft <= high:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    os.dup2(ours.fileno(), high)
    ours.close()
    channel = Channel(socket.socket(fileno=high))
    sender = Channel(theirs)
    later = threading.Timer(0.2, lambda: (sender.send(("hello", 1)), sender.close()))
    later.start()
    try:
        assert channel.receive(timeout=5.0) == [("hello", 1)]
        try:
            messages = channel.receive(timeout=5.0)
        except ChannelClosed:
            messages = None
        assert messages is None, f"the close was not seen: {messages}"
    finally:
        later.join()
        channel.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
