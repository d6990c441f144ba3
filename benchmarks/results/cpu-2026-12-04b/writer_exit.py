"""close() latency of an engine that captured one 63 MB chunk (synthetic model, 768 + 3072 wide float16, batch
8 x 512, chunk 8192, durable), 8 engines per process, the first left out. Run with PYTHONPATH naming the tree
under test (the writer process inherits it)."""
import sys, time, torch, shutil, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: synthetic.py, no engine
from engine import CaptureConfig, CaptureEngine
from synthetic import SyntheticModel
names={"p0":768,"p1":3072}
model=SyntheticModel(names,8,512); ids=torch.zeros(8,512,dtype=torch.long)
closes=[];firsts=[]
for r in range(8):
    root=Path(f"/work/tmp_st{r}"); shutil.rmtree(root,ignore_errors=True); root.mkdir()
    cfg=CaptureConfig(root/"w.zarr",points=[],extra_modules={n:f"points.{n}" for n in names},chunk_tokens=8192,durable=True)
    eng=CaptureEngine(model,cfg)
    with torch.no_grad():
        t=time.perf_counter(); model(input_ids=ids); firsts.append(time.perf_counter()-t); model(input_ids=ids)
    eng.flush()
    t=time.perf_counter(); eng.close(); closes.append(time.perf_counter()-t)
    shutil.rmtree(root)
print("close ms", [round(1e3*c) for c in closes[1:]], "median", round(1e3*statistics.median(closes[1:])), "first fwd ms", [round(1e3*c) for c in firsts[1:]])
