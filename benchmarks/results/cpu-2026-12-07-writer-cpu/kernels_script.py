import numpy as np, time
from engine.format.statistics import _finite_half_to_float32, row_squared_norms, chunk_summary
import engine.format.statistics as S
rng=np.random.default_rng(0)
dim=768
chunk=(rng.standard_normal((8192,dim))).astype(np.float16)
flags=np.zeros(8192,np.uint8)
GB=chunk.nbytes/1e9
def t(f,n=10):
    best=1e9
    for _ in range(7):
        s=time.process_time()
        for _ in range(n): f()
        best=min(best,(time.process_time()-s)/n)
    return best/GB
rows_per=S.BLOCK_BYTES//(4*dim)
blk=chunk[:rows_per]; out=np.empty(blk.shape,np.float32)
nb=len(chunk)/rows_per
def over_blocks(g): 
    for i in range(0,len(chunk),rows_per): g(chunk[i:i+rows_per])
print("chunk_summary total", t(lambda: chunk_summary(chunk,"float16",flags,True,10.0)))
print("decode 4MiB blocks", t(lambda: over_blocks(lambda b: _finite_half_to_float32(b, out[:len(b)]))))
_finite_half_to_float32(blk,out)
print("min+max", t(lambda: over_blocks(lambda b: (out.min(), out.max()))))
print("vecdot", t(lambda: over_blocks(lambda b: row_squared_norms(out))))
ones=np.ones(len(out),np.float32)
print("sgemv", t(lambda: over_blocks(lambda b: ones@out)))
bits=out.view(np.int32)
print(" copyto i16->i32", t(lambda: over_blocks(lambda b: np.copyto(bits[:len(b)], b.view(np.int16)))))
print(" shift", t(lambda: over_blocks(lambda b: np.left_shift(bits,13,out=bits))))
print(" and", t(lambda: over_blocks(lambda b: np.bitwise_and(bits,S._HALF_SIGN_AND_MAGNITUDE,out=bits))))
print(" mul", t(lambda: over_blocks(lambda b: np.multiply(out,S._HALF_SCALE,out=out))))
print(" shift from int16 (dtype=int32)", t(lambda: over_blocks(lambda b: np.left_shift(b.view(np.int16),13,out=bits[:len(b)],dtype=np.int32))))
# small sub-blocks 64K elements
sub=65536//dim*dim
def decode_small(b):
    o=out[:len(b)]
    flat_in=b.reshape(-1).view(np.int16); flat=o.reshape(-1).view(np.int32); fo=o.reshape(-1)
    for i in range(0,flat.size,65536):
        s=slice(i,i+65536)
        np.copyto(flat[s],flat_in[s]); np.left_shift(flat[s],13,out=flat[s]); np.bitwise_and(flat[s],S._HALF_SIGN_AND_MAGNITUDE,out=flat[s]); np.multiply(fo[s],S._HALF_SCALE,out=fo[s])
print("decode in 256KB pieces", t(lambda: over_blocks(decode_small)))
import crc32c
print("crc", t(lambda: crc32c.crc32c(chunk.data)))
dst=np.empty_like(chunk)
print("copy", t(lambda: np.copyto(dst,chunk)))
