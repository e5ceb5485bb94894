"""pyarrow side of `elbo bench data`: read an elbo Parquet file's `x` column into one float32
numpy array in [0, 1] (what a PyTorch pipeline does before batching), best of N runs.

Usage: python scripts/bench_pyarrow_read.py FILE [REPEATS]   (needs pyarrow and numpy)
"""
import json
import resource
import sys
import time

import numpy as np
import pyarrow.parquet as pq

path = sys.argv[1]
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
best = float("inf")
rows = dim = 0
for _ in range(repeats):
    start = time.perf_counter()
    column = pq.read_table(path, columns=["x"]).column("x").combine_chunks()
    dim = column.type.list_size
    flat = column.flatten().to_numpy()
    x = flat.astype(np.float32).reshape(-1, dim)
    x *= np.float32(1 / 255)
    rows = x.shape[0]
    best = min(best, time.perf_counter() - start)
    del column, flat, x
print(json.dumps({
    "file": path,
    "rows": rows,
    "dim": dim,
    "seconds": best,
    "rows_per_s": rows / best,
    "mb_per_s": rows * dim / best / 1e6,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "threads": "pyarrow default (all cores)",
}, indent=2))
