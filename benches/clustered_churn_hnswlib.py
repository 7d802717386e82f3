#!/usr/bin/env python3
"""hnswlib under the clustered churn of `examples/churn.rs --data clustered --dim 128`:
the same generator (256 Gaussian clusters, centres N(0,1), spread 0.5; an update
redraws the vector from a random cluster), numpy's RNG, M 16, ef_construction 200.
Updates are `add_items` on existing labels (hnswlib's `updatePoint`), one thread.
Prints self-recall (k = 1, ef 64) before, after the updates, and for a fresh build
over the final vectors.

    python3 benches/clustered_churn_hnswlib.py [UPDATES]   # default 100000
"""
import sys
import time

import hnswlib
import numpy as np

n=100000; dim=128; U=int(sys.argv[1]) if len(sys.argv)>1 else 100000
rng=np.random.default_rng(1)
centres=rng.standard_normal((256,dim)).astype(np.float32)
def draw(m):
    c=rng.integers(0,256,m); return (centres[c]+0.5*rng.standard_normal((m,dim))).astype(np.float32), c
data,cl=draw(n)
def build(d):
    p=hnswlib.Index(space='l2',dim=dim); p.init_index(max_elements=n,M=16,ef_construction=200,random_seed=1); p.set_num_threads(2); p.add_items(d,np.arange(n)); return p
def selfrec(p,d):
    p.set_ef(64); p.set_num_threads(2); lab,_=p.knn_query(d,k=1); return (lab[:,0]==np.arange(n)).mean()
p=build(data); print("initial self", selfrec(p,data), flush=True)
t=time.time()
keys=rng.integers(0,n,U); newv,_=draw(U)
p.set_num_threads(1)
for i in range(0,U,1000):
    # replace: same labels re-added -> updatePoint; unique labels per batch
    k=keys[i:i+1000]; v=newv[i:i+1000]
    _,idx=np.unique(k[::-1],return_index=True); idx=len(k)-1-idx
    p.add_items(v[idx],k[idx]); data[k[idx]]=v[idx]
print("updates", U, "in", time.time()-t, flush=True)
print("churned self", selfrec(p,data), flush=True)
f=build(data); print("fresh self", selfrec(f,data), flush=True)
