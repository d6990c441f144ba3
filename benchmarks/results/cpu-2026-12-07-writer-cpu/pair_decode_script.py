import numpy as np, time
from engine.format.statistics import _finite_half_to_float32, _HALF_SCALE, _HALF_SIGN_AND_MAGNITUDE as MASK
rng=np.random.default_rng(0)
h=(rng.standard_normal((1365,768))*3).astype(np.float16)
h[0,:10]=np.array([0,-0.0,6e-8,-6e-8,65504,-65504,1e-5,-1e-5,1,-1],dtype=np.float16)
out=np.empty(h.shape,np.float32)
half=h.shape[1]//2
E=np.empty((h.shape[0],half),np.float32); O=np.empty_like(E)
def pair():
    w=h.view(np.int32)
    eb=E.view(np.int32); ob=O.view(np.int32)
    np.left_shift(w,16,out=eb); np.right_shift(eb,3,out=eb); np.bitwise_and(eb,MASK,out=eb)
    np.right_shift(w,3,out=ob); np.bitwise_and(ob,MASK,out=ob)
    np.multiply(E,_HALF_SCALE,out=E); np.multiply(O,_HALF_SCALE,out=O)
pair()
ref=h.astype(np.float32)
assert np.array_equal(E, ref[:,0::2]) and np.array_equal(O, ref[:,1::2])
assert np.array_equal(np.signbit(E), np.signbit(ref[:,0::2]))
def t(f,n=300):
    best=1e9
    for _ in range(7):
        s=time.process_time()
        for _ in range(n): f()
        best=min(best,(time.process_time()-s)/n)
    return best/h.nbytes*1e9
print("current", t(lambda: _finite_half_to_float32(h,out)))
print("pair", t(pair))
