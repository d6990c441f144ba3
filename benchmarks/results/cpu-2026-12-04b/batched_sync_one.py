"""One run of batched_sync.txt's A/B (run by batched_sync_ab.py with PYTHONPATH naming one tree). raw_durable is
copied from benchmarks/writer.py, not imported: importing that module puts the main tree on sys.path, and the
writer process, which inherits the path, would then run the main tree's code in both arms."""
import sys, time, os, shutil, json, torch, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/: synthetic.py, no engine
import engine
from engine import CaptureConfig, CaptureEngine
from synthetic import SyntheticModel
from engine.files import DIRECT_UNIT, page_aligned_empty
def raw_durable(root: Path, dims: list[int], n_chunks: int, chunk_tokens: int) -> float:
    """Seconds to write the same files each with O_DIRECT (buffered where the filesystem or the file's length
    refuses it) and an fsync, from page-aligned blocks: no checksums, statistics, records or renames."""
    blocks = [page_aligned_empty((chunk_tokens, dim), np.float16) for dim in dims]
    for block in blocks:
        block.fill(1.5)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    start = time.perf_counter()
    for k in range(n_chunks):
        for i, block in enumerate(blocks):
            path = root / f"p{i}_{k}.bin"
            direct = getattr(os, "O_DIRECT", 0) if block.nbytes % DIRECT_UNIT == 0 else 0
            try:
                fd = os.open(path, flags | direct, 0o644)
            except OSError:
                fd = os.open(path, flags, 0o644)
            try:
                os.write(fd, block.data)
                os.fsync(fd)
            finally:
                os.close(fd)
    os.sync()
    return time.perf_counter() - start



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
