"""What one socket call costs the forward thread when it comes between torch work, as in a hooked forward.

A child process answers every ("batch", ...) message with ("free", ...) over engine.channel, like the writer
process; the parent sends a batch and receives between two spells of work: a busy wait (nothing evicted), or
a 256 x 4096 matmul (torch work, as a forward does). Prints the median and p90 of each call, per kind of work.

    python benchmarks/results/cpu-2026-12-05/cold_syscalls.py
"""
import socket
import statistics
import subprocess
import sys
import time

import torch

from engine.channel import Channel, channel_pair

MATRIX = torch.randn(256, 4096)


def spin(_):
    end = time.perf_counter_ns() + 3_000_000
    while time.perf_counter_ns() < end:
        pass


def matmul(_):
    (MATRIX @ MATRIX.T).sum()


def answer(fd: int) -> None:
    channel = Channel(socket.socket(fileno=fd))
    while True:
        for message in channel.receive(None):
            if message[0] == "stop":
                return
            channel.send(("free", message[1]))


def p90(values) -> float:
    return sorted(values)[9 * len(values) // 10] / 1e3


def measure(channel: Channel, work, n: int = 1000) -> str:
    sends, receives = [], []
    for _ in range(n):
        start = time.perf_counter_ns()
        channel.receive(0.0)
        receives.append(time.perf_counter_ns() - start)
        work(None)
        start = time.perf_counter_ns()
        channel.send(("batch", 1, 2, 3, 4, 5, True, False))
        sends.append(time.perf_counter_ns() - start)
        work(None)
    return ", ".join(f"{name} median {statistics.median(v) / 1e3:.1f} us, p90 {p90(v):.1f}"
                     for name, v in (("send", sends), ("receive", receives)))


def main():
    torch.set_num_threads(1)
    ours, theirs = channel_pair()
    child = subprocess.Popen([sys.executable, __file__, str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    for _ in range(2):
        for work in (spin, matmul):
            print(f"{work.__name__:7s} {measure(ours, work)}")
    ours.send(("stop",))
    child.wait()


if __name__ == "__main__":
    answer(int(sys.argv[1])) if len(sys.argv) > 1 else main()
