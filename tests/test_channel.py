"""The channel between the capturing and the writer process, on its own."""

from __future__ import annotations

import os
import resource
import socket
import threading

from engine.writer.channel import Channel, ChannelClosed


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
