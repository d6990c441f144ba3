"""Forward-thread CPU time per forward (time.thread_time), hooked vs unhooked, on the dispatch-bound proxy
(12 x d64 gpt2, batch 1 x 32, layer 6 residual + mlp_hidden, zarr sink, one intra-op thread). Thread CPU time
is what the hooks themselves cost the forward thread, and is far less disturbed by a noisy VM than wall time.
Prints quantiles of (hooked - unhooked) per forward, in microseconds.  Usage: python hookcpu.py TREE"""
import os, sys, tempfile, time, json
tree = sys.argv[1]
sys.path.insert(0, tree)
import numpy as np, torch
torch.set_num_threads(1)
from engine import CaptureConfig, CaptureEngine, get_model, random_model
model = random_model(get_model("gpt2"), n_layer=12, n_embd=64, n_head=4, n_positions=64).eval()
ids = torch.randint(0, 50000, (1, 32)); mask = torch.ones_like(ids)
def per_forward(n):
    out = []
    for _ in range(n):
        t = time.thread_time(); model(input_ids=ids, attention_mask=mask); out.append(time.thread_time() - t)
    return out
with tempfile.TemporaryDirectory() as d, torch.no_grad():
    cfg = CaptureConfig(os.path.join(d, "s.zarr"), layer_indices=[6], points=["residual", "mlp_hidden"])
    with CaptureEngine(model, cfg) as cap:
        base, hooked = [], []
        per_forward(50)
        for _ in range(10):
            with cap.detached():
                base += per_forward(200)
            hooked += per_forward(200)
q = lambda a, p: float(np.percentile(a, p)) * 1e6
r = {p: round(q(hooked, p) - q(base, p), 1) for p in (10, 25, 50)}
print(json.dumps({"tree": tree, "base_p10_us": round(q(base, 10), 1), "base_p50_us": round(q(base, 50), 1),
                  "hook_cpu_us_by_quantile": r}))
