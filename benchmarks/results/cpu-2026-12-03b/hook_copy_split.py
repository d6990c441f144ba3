"""Passive capture on the bare small GPT-2 (layer 2 residual + mlp_hidden, 32x128): plain hooks that only copy
the two arrays into float16 buffers (copy: ordinary memory; copyshm: a memfd like the slots) vs the engine
(null sink, zarr sink). 4 interleaved repeats of 10 hooked vs 10 unhooked batches; rate = unhooked time /
hooked time; CPU per batch of the capturing process, the writer process, and the rest of the machine."""
import os, sys, time, tempfile, statistics, mmap
import psutil, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
from engine import CaptureConfig, CaptureEngine, get_model, random_model

modes = sys.argv[1].split(",")
spec = get_model("gpt2")
model = random_model(spec, n_layer=4, n_embd=256, n_head=4, n_positions=128).base_model.eval()
ids = torch.randint(0, 50000, (32, 128)); mask = torch.ones_like(ids)
N = 10
def rounds(n):
    t = time.perf_counter()
    for _ in range(n):
        model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t
def shm_tensor(shape):
    n = 2 * shape[0] * shape[1] * shape[2]
    fd = os.memfd_create("x"); os.ftruncate(fd, n)
    m = mmap.mmap(fd, n)
    return torch.frombuffer(m, dtype=torch.float16).view(shape)
def copy_hooks(shm):
    make = shm_tensor if shm else (lambda s: torch.empty(s, dtype=torch.float16))
    bufs = [make((32, 128, 256)), make((32, 128, 1024))]
    h1 = model.h[2].register_forward_hook(lambda m, a, o: (bufs[0].copy_(o[0]), None)[1])
    h2 = model.h[2].mlp.act.register_forward_hook(lambda m, a, o: (bufs[1].copy_(o), None)[1])
    return [h1, h2]
results = {m: [] for m in modes}
with torch.no_grad():
    rounds(2)
    for rep in range(4):
        for mode in modes:
            base = rounds(N)
            me = psutil.Process(); mc0 = sum(me.cpu_times()[:2]); wcpu = 0.0
            def busy():
                c = psutil.cpu_times(); return c.user + c.system + c.irq + c.softirq + c.nice
            sys0 = busy()
            if mode.startswith("copy"):
                hs = copy_hooks(mode == "copyshm"); rounds(1)
                mc0 = sum(me.cpu_times()[:2])
                sys0 = busy(); hooked = rounds(N)
                for h in hs: h.remove()
            else:
                with tempfile.TemporaryDirectory() as d:
                    cfg = CaptureConfig(os.path.join(d, "s.zarr"), layer_indices=[2], points=["residual", "mlp_hidden"],
                                        statistics="nostats" not in mode, durable="scratch" not in mode, sink="null" if "null" in mode else "zarr")
                    with CaptureEngine(model, cfg) as cap:
                        rounds(1); cap.flush(); time.sleep(0.3)
                        w = psutil.Process(cap.writer_pid); wc0 = sum(w.cpu_times()[:2]); mc0 = sum(me.cpu_times()[:2]); sys0 = busy()
                        hooked = rounds(N); cap.flush()
                        wcpu = sum(w.cpu_times()[:2]) - wc0
            mc = sum(me.cpu_times()[:2]) - mc0; other = busy() - sys0 - mc - wcpu
            results[mode].append(dict(rate=base / hooked, writer_cpu_ms=1000 * wcpu / N, fwd_cpu_ms=1000 * mc / N, other_cpu_ms=1000 * other / N,
                                      base_ms=1000 * base / N, hooked_ms=1000 * hooked / N))
            print(mode, {k: round(v, 3) for k, v in results[mode][-1].items()}, flush=True)
for mode, rs in results.items():
    print(mode, "rate median", round(statistics.median(r["rate"] for r in rs), 3), "range",
          round(min(r["rate"] for r in rs), 3), round(max(r["rate"] for r in rs), 3),
          "writer cpu", round(statistics.median(r["writer_cpu_ms"] for r in rs), 1),
          "fwd cpu", round(statistics.median(r["fwd_cpu_ms"] for r in rs), 1), "other", round(statistics.median(r["other_cpu_ms"] for r in rs), 1))
