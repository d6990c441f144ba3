"""Where the forward thread's time goes in a hooked forward of the dispatch-bound proxy (the issue's model:
gpt2, 12 layers of width 64, batch 1 x 32, layer 6 residual + mlp_hidden, one intra-op thread).

Wraps the engine's per-forward functions with timers (about 0.5 us each of its own), then runs 40 rounds of
50 unhooked forwards (inside ``engine.detached()``) and 50 hooked ones, and prints the hooked forward's extra
wall and thread-CPU time at three quantiles, the two socket calls' spread, and microseconds per forward in
each wrapped function (nested: ``_on_forward`` includes ``poll``, which includes ``Channel.receive``).

    python benchmarks/results/cpu-2026-12-05/hook_breakdown.py null   # or zarr
"""
import functools
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import engine.capture  # noqa: E402
import engine.channel  # noqa: E402
import engine.handoff  # noqa: E402
import engine.staging  # noqa: E402
from engine import CaptureConfig, CaptureEngine  # noqa: E402

WRAPPED = {engine.capture.CaptureEngine: ["_on_forward", "_on_point", "_on_forward_end", "_submit"],
           engine.handoff.WriterProcess: ["poll", "acquire", "submit"],
           engine.channel.Channel: ["receive", "send"],
           engine.staging.Stager: ["stage_tokens", "stage_point", "finish"],
           engine.staging.Slot: ["reserve"]}
samples: dict[str, list[int]] = {}


def timed(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return function(*args, **kwargs)
        finally:
            samples.setdefault(name, []).append(time.perf_counter_ns() - start)
    return wrapper


def forwards(model, ids, n):
    """(wall us, thread CPU us) of each of ``n`` forwards."""
    times = []
    with torch.no_grad():
        for _ in range(n):
            cpu, wall = time.thread_time_ns(), time.perf_counter_ns()
            model(input_ids=ids)
            times.append(((time.perf_counter_ns() - wall) / 1e3, (time.thread_time_ns() - cpu) / 1e3))
    return times


def quantile(values, q):
    values = sorted(values)
    return values[int(q * (len(values) - 1))]


def main():
    sink = sys.argv[1] if len(sys.argv) > 1 else "null"
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=64, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 50257, (1, 32))
    forwards(model, ids, 50)
    for cls, names in WRAPPED.items():
        for name in names:
            setattr(cls, name, timed(f"{cls.__name__}.{name}", getattr(cls, name)))
    cfg = CaptureConfig(tempfile.mkdtemp() + "/s.zarr", layer_indices=[6], points=["residual", "mlp_hidden"],
                        sink=sink)
    base, hooked = [], []
    with CaptureEngine(model, cfg) as cap:
        for _ in range(40):
            with cap.detached():
                base += forwards(model, ids, 50)
            hooked += forwards(model, ids, 50)
    print(f"sink {sink}")
    for q in (0.1, 0.25, 0.5):
        extra = [quantile([h[i] for h in hooked], q) - quantile([b[i] for b in base], q) for i in (0, 1)]
        print(f"p{int(q * 100):<2d} unhooked {quantile([b[0] for b in base], q):5.0f} us, "
              f"hooked +{extra[0]:.0f} us wall, +{extra[1]:.0f} us thread CPU")
    for name in ("Channel.receive", "Channel.send"):
        spread = ", ".join(f"p{int(q * 100)} {quantile(samples[name], q) / 1e3:.1f}" for q in (0.1, 0.5, 0.9))
        print(f"{name:30s} us per call: {spread}")
    for name, values in samples.items():
        print(f"{name:30s} {sum(values) / 1e3 / len(hooked):6.1f} us per forward")


if __name__ == "__main__":
    main()
