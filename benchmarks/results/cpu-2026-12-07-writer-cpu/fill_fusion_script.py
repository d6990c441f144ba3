import numpy as np, time, crc32c
from engine.format.statistics import chunk_summary, _finite_half_to_float32, row_squared_norms
rng=np.random.default_rng(0)
dims=(768,3072); rows=8192
slots=[rng.standard_normal((rows,d)).astype(np.float16) for d in dims]  # stand-in for the shared slot rows
chunks=[np.empty_like(s) for s in slots]
flags=np.zeros(rows,np.uint8)
big=np.ones(300_000_000//8)
GB=sum(s.nbytes for s in slots)/1e9
def current():
    for s,c in zip(slots,chunks):
        c[:]=s
    for c in chunks:
        chunk_summary(c,"float16",flags,True,10.0); crc32c.crc32c(c)
def fused(block_bytes):
    for s,c in zip(slots,chunks):
        dim=s.shape[1]; step=max(1,block_bytes//(2*dim))
        buf=np.empty((step,dim),np.float32); ones=np.ones(step,np.float32)
        norms=np.empty(rows,np.float32); total=np.zeros(dim); crc=0; lo=np.inf; hi=-np.inf
        for i in range(0,rows,step):
            c[i:i+step]=s[i:i+step]
            blk=c[i:i+step]; out=buf[:len(blk)]
            _finite_half_to_float32(blk,out)
            lo=min(lo,float(out.min())); hi=max(hi,float(out.max()))
            norms[i:i+len(blk)]=row_squared_norms(out)
            total+=ones[:len(blk)]@out
            crc=crc32c.crc32c(blk,crc)
        np.median(norms)
def fused_nocrc(block_bytes):
    for s,c in zip(slots,chunks):
        dim=s.shape[1]; step=max(1,block_bytes//(2*dim))
        buf=np.empty((step,dim),np.float32); ones=np.ones(step,np.float32)
        norms=np.empty(rows,np.float32); total=np.zeros(dim); lo=np.inf; hi=-np.inf
        for i in range(0,rows,step):
            c[i:i+step]=s[i:i+step]
            blk=c[i:i+step]; out=buf[:len(blk)]
            _finite_half_to_float32(blk,out)
            lo=min(lo,float(out.min())); hi=max(hi,float(out.max()))
            norms[i:i+len(blk)]=row_squared_norms(out)
            total+=ones[:len(blk)]@out
        np.median(norms)
    for c in chunks: crc32c.crc32c(c)
res={}
for i in range(12):
    for name,f in (("current",current),("fused 2MiB, CRC fused",lambda: fused(2<<20)),("fused 2MiB, CRC after",lambda: fused_nocrc(2<<20)),("fused 1MiB, CRC after",lambda: fused_nocrc(1<<20))):
        big+=1
        s=time.process_time(); f(); res.setdefault(name,[]).append((time.process_time()-s)/GB)
print("--- second set")
for k,v in res.items(): print(f"{k:24s}", " ".join(f"{x:.3f}" for x in sorted(v)))
