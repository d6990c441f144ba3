"""One run of batched_sync.txt's A/B (run by batched_sync_ab.py with PYTHONPATH naming one tree). It takes
raw_durable from benchmarks/writer.py and then restores sys.path: that module puts the main tree first, and the
writer process, which inherits the path, would then run the main tree's code in both arms."""
import sys, time, os, shutil, json, torch, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: synthetic.py, no engine
import engine
from engine import CaptureConfig, CaptureEngine
from synthetic import SyntheticModel
_path = list(sys.path)
import writer as writer_benchmark  # benchmarks/writer.py, for raw_durable (engine is already the tree's)
sys.path[:] = _path  # writer.py puts the main tree first, and the writer process would inherit it
raw_durable = writer_benchmark.raw_durable

dims=[768,3072]; B,S=8,512
names={f"p{i}":d for i,d in enumerate(dims)}
model=SyntheticModel(names,B,S)
ids=torch.zeros(B,S,dtype=torch.long)
nb=128
root=Path("/work/tmp_ab"); shutil.rmtree(root,ignore_errors=True); root.mkdir()
# warm the forkserver / imports
cfg=CaptureConfig(root/"warm.zarr",points=[],extra_modules={n:f"points.{n}" for n in names},chunk_tokens=8192,durable=True)
with CaptureEngine(model,cfg), torch.no_grad(): model(input_ids=ids)
os.sync()
(root/"raw").mkdir()
raw_s=raw_durable(root/"raw",dims,nb*B*S//8192,8192)
cfg=CaptureConfig(root/"w.zarr",points=[],extra_modules={n:f"points.{n}" for n in names},chunk_tokens=8192,num_writers=int(os.environ.get("NW","2")),pinned_slots=int(os.environ.get("PS","4")),durable=True)
os.sync()
t0=time.perf_counter()
eng=CaptureEngine(model,cfg)
t1=time.perf_counter()
with torch.no_grad():
    for _ in range(nb): model(input_ids=ids)
t2=time.perf_counter()
eng.close()
t3=time.perf_counter()
os.sync()
t=time.perf_counter()-t0
phases={"start":t1-t0,"loop":t2-t1,"close":t3-t2,"sync":time.perf_counter()-t3}
mb=nb*B*S*2*sum(dims)/1e6
import engine.writer as ew
print(json.dumps({"mbps":mb/t,"raw":mb/raw_s,"engine":engine.__file__,**phases}))
shutil.rmtree(root)
