import os, sys, time, shutil, tempfile
root_code = sys.argv[1]
sys.path.insert(0, root_code); sys.path.insert(0, root_code + "/benchmarks")
import engine; assert engine.__file__.startswith(root_code)
from pathlib import Path
import torch, psutil
from engine import CaptureEngine, CaptureConfig
from synthetic import SyntheticModel
dims=[256,1024]; bs, sl = 32, 128
def run(sink, nb, pace):
    root=Path(tempfile.mkdtemp(dir="/root"))
    names={f"p{i}":d for i,d in enumerate(dims)}
    model=SyntheticModel(names, bs, sl, seconds_per_batch=pace)
    cfg=CaptureConfig(root/"w.zarr", points=[], extra_modules={n:f"points.{n}" for n in names}, sink=sink)
    ids=torch.zeros(bs,sl,dtype=torch.long)
    with CaptureEngine(model,cfg) as eng, torch.no_grad():
        kid=psutil.Process(eng.writer_pid)
        for _ in range(3): model(input_ids=ids)
        eng.flush()
        c0=sum(kid.cpu_times()[:2]); t0=time.perf_counter()
        for _ in range(nb): model(input_ids=ids)
        eng.flush()
        c1=sum(kid.cpu_times()[:2]); t1=time.perf_counter()
        time.sleep(2.0)
        c2=sum(kid.cpu_times()[:2])
    shutil.rmtree(root)
    return (c1-c0)/nb*1e3, (c2-c1)/2.0*1e3
out=[]
for sink in ("null","zarr"):
    for pace in (0.2, 1.0):
        per_batch, idle = run(sink, 8 if pace==1.0 else 20, pace)
        out.append(f"{sink} pace {pace}s: {per_batch:.1f} ms/batch")
    out.append(f"{sink} idle: {idle:.1f} ms CPU per s")
print(" | ".join(out))
