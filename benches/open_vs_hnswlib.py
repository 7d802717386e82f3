#!/usr/bin/env python3
"""Side by side: how long opening a saved 1M x 64 index takes in nann and in hnswlib.

    python3 benches/open_vs_hnswlib.py [--n 1000000] [--repeats 5] [--json OUT]

What it does, in one run on one machine:
  1. Generates (once, cached under bench-data/) a Gaussian-mixture set of
     n x 64 float32 vectors (256 centres ~ N(0, I), spread 0.5), 100 queries
     and their exact top-10 ground truth.
  2. Builds the same graph parameters in both libraries (M 16,
     ef_construction 100, 2 threads; open time does not depend on
     ef_construction, build time does, so the build is kept short) and saves
     each: nann with `ann_bench --save`, hnswlib with `save_index`. Both files
     are then in the page cache, so both opens read from memory, not disk.
  3. Times, alternating and --repeats times each:
       hnswlib  `Index.load_index(path)` (a fresh Index object each time);
       nann     `Index::open` (mapped, validated), `unsafe open_unchecked`,
                `open_untrusted` (copy + full validation incl. checksums and
                finite vectors), and the two content checks `open` leaves
                out, `verify_checksums()` and `check_vectors()`, on the
                opened index, through
                `examples/open_bench.rs`, which also reports the peak extra
                heap of each open (a counting global allocator).
     Then, for both, the first pass of 100 searches right after an open
     (k 10, ef 64), which pays for pages a mapped open has not touched yet.
  4. Prints medians and the ratio nann / hnswlib for each nann mode.

The two libraries never run at the same time.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "bench-data")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_hnswlib import build_examples, ensure_packages, mixture, read_vecs, write_vecs  # noqa: E402

DIM, M, EF_C, THREADS, K, EF = 64, 16, 100, 2, 10, 64


def exact_gt(base, queries, k):
    import numpy as np

    bn = (base.astype(np.float64) ** 2).sum(1)
    out = np.empty((len(queries), k), dtype=np.int32)
    for s in range(0, len(queries), 10):
        q = queries[s : s + 10].astype(np.float64)
        score = bn[None, :] - 2 * (q @ base.astype(np.float64).T)
        idx = np.argpartition(score, k, axis=1)[:, :k]
        order = np.take_along_axis(score, idx, 1).argsort(1)
        out[s : s + 10] = np.take_along_axis(idx, order, 1)
    return out


def prepare(n):
    import numpy as np

    os.makedirs(DATA, exist_ok=True)
    tag = f"open{n // 1000}k"
    paths = [os.path.join(DATA, f"{tag}_{p}") for p in ("base.fvecs", "query.fvecs", "gt.ivecs")]
    if not all(os.path.exists(p) for p in paths):
        rng = np.random.default_rng(20261125)
        centres = rng.standard_normal((256, DIM)).astype(np.float32)
        base = mixture(rng, n, DIM, centres, 0.5)
        queries = mixture(rng, 100, DIM, centres, 0.5)
        write_vecs(paths[0], base, np.float32)
        write_vecs(paths[1], queries, np.float32)
        write_vecs(paths[2], exact_gt(base, queries, K), np.int32)
    return tag, paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    ensure_packages()
    import hnswlib
    import numpy as np

    tag, (base_p, query_p, gt_p) = prepare(args.n)
    nann_path = os.path.join(DATA, f"{tag}.nann")
    hnsw_path = os.path.join(DATA, f"{tag}.hnsw")
    ann_bench, open_bench = build_examples("ann_bench", "open_bench")

    builds = {}
    if not os.path.exists(nann_path):
        out = subprocess.run([ann_bench, "--base", base_p, "--query", query_p, "--gt", gt_p,
                              "--metric", "l2", "--k", str(K), "--m", str(M), "--ef-construction", str(EF_C),
                              "--ef", str(EF), "--threads", str(THREADS), "--json", "--save", nann_path],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        builds["nann"] = [json.loads(line) for line in out]
    base = read_vecs(base_p, np.float32)
    queries = read_vecs(query_p, np.float32)
    gt = read_vecs(gt_p, np.int32)
    if not os.path.exists(hnsw_path):
        index = hnswlib.Index(space="l2", dim=DIM)
        index.init_index(max_elements=len(base), M=M, ef_construction=EF_C, random_seed=100)
        t = time.perf_counter()
        index.add_items(base, np.arange(len(base)), num_threads=THREADS)
        builds["hnswlib_build_s"] = time.perf_counter() - t
        index.save_index(hnsw_path)
        del index
    del base

    h_open, h_first, n_runs = [], [], []
    recall_h = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        index = hnswlib.Index(space="l2", dim=DIM)
        index.load_index(hnsw_path)
        h_open.append(time.perf_counter() - t)
        index.set_ef(EF)
        t = time.perf_counter()
        labels, _ = index.knn_query(queries, k=K, num_threads=1)
        h_first.append(time.perf_counter() - t)
        recall_h = float(np.mean([len(set(labels[i]) & set(gt[i][:K])) / K for i in range(len(queries))]))
        del index
        out = subprocess.run([open_bench, nann_path, "--query", query_p, "--gt", gt_p, "--json"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        n_runs.append([json.loads(line) for line in out])

    med = statistics.median
    h_open_ms, h_first_ms = med(h_open) * 1e3, med(h_first) * 1e3
    size = lambda p: os.path.getsize(p) / 2**20  # noqa: E731
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"hnswlib {hnswlib.__version__ if hasattr(hnswlib, '__version__') else '0.8'}; "
          f"date {time.strftime('%Y-%m-%d')}; n {args.n} x {DIM}; medians of {args.repeats}")
    print(f"files: nann {size(nann_path):.0f} MiB, hnswlib {size(hnsw_path):.0f} MiB (both in the page cache)")
    print(f"hnswlib load_index: {h_open_ms:.1f} ms; first 100 searches after it: {h_first_ms:.2f} ms "
          f"(R@10 {recall_h:.3f})")
    summary = {"n": args.n, "dim": DIM, "repeats": args.repeats, "hnswlib_load_ms": h_open_ms,
               "hnswlib_first_searches_ms": h_first_ms, "hnswlib_recall": recall_h, "builds": builds, "nann": {}}
    modes = [row["mode"] for row in n_runs[0]]
    for mode in modes:
        rows = [next(r for r in run if r["mode"] == mode) for run in n_runs]
        ms = med([r["ms"] for r in rows])
        entry = {"ms": ms, "ratio_to_hnswlib_load": ms / h_open_ms,
                 "peak_extra_heap_mib": max(r["peak_extra_heap_bytes"] for r in rows) / 2**20}
        line = (f"nann {mode:<16} {ms:8.2f} ms  = {ms / h_open_ms:.3f}x hnswlib load   "
                f"peak extra heap {entry['peak_extra_heap_mib']:.1f} MiB")
        if "first_searches_ms" in rows[0]:
            entry["first_searches_ms"] = med([r["first_searches_ms"] for r in rows])
            entry["recall"] = rows[0]["recall"]
            line += f"   first 100 searches {entry['first_searches_ms']:.2f} ms (R@10 {entry['recall']:.3f})"
        summary["nann"][mode] = entry
        print(line)
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
