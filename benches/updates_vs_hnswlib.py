#!/usr/bin/env python3
"""Side by side: in-place update throughput, nann (logged and unlogged) vs hnswlib.

    python3 benches/updates_vs_hnswlib.py [--n 20000] [--dim 64] [--threads 32] [--seconds 3] [--json OUT]

Same data shape, graph parameters and machine for both (uniform random
vectors in [0, 1)^dim, M 16, ef_construction 200: nann's defaults and
hnswlib's usual setting):
  * nann: `examples/durable_bench.rs` (its `update_group` phase: every update
    returns once its log record is fsynced, group commit every 1 ms;
    `update_per_op`, one fsync per operation (concurrent operations share
    one); and `update_unlogged`, the same updates on a plain in-memory
    `Index`), on
    --threads writer threads (enough in flight to hide the commit latency;
    the machine has 2 cores).
  * hnswlib: `add_items` with existing labels (its `updatePoint`), fresh
    vectors for every label in a random order, num_threads 2 (it cannot use
    more than the cores), in memory (hnswlib has no update log).
Both update each entry's vector and relink its neighbourhood. Prints each
rate and the ratios nann / hnswlib.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_hnswlib import ROOT, build_examples, ensure_packages  # noqa: E402


def hnswlib_updates(n, dim, rounds=3):
    import hnswlib
    import numpy as np

    rng = np.random.default_rng(1)
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=n, M=16, ef_construction=200, random_seed=100)
    index.add_items(rng.random((n, dim), dtype=np.float32), np.arange(n), num_threads=2)
    rates = []
    for _ in range(rounds):
        fresh = rng.random((n, dim), dtype=np.float32)
        labels = rng.permutation(n)
        start = time.perf_counter()
        index.add_items(fresh, labels, num_threads=2)
        rates.append(n / (time.perf_counter() - start))
    return sorted(rates)[len(rates) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    ensure_packages()
    (durable_bench,) = build_examples("durable_bench")
    # On the repository's disk (bench-data/ is ignored by git), not a tmpfs.
    run_dir = os.path.join(ROOT, "bench-data", "durable-run")
    out = subprocess.run([durable_bench, "--dir", run_dir, "--n", str(args.n), "--dim", str(args.dim), "--threads", str(args.threads),
                          "--seconds", str(args.seconds), "--group-ms", "1", "--json"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    nann = {row["phase"]: row["ops_per_s"] for row in map(json.loads, out)}
    peer = hnswlib_updates(args.n, args.dim)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; date {time.strftime('%Y-%m-%d')}; "
          f"n {args.n} x {args.dim}, M 16, ef_construction 200")
    for phase, rate in nann.items():
        print(f"nann {phase:<16} {rate:>9.0f} ops/s ({args.threads} threads)")
    print(f"hnswlib updates       {peer:>9.0f} ops/s (2 threads, in memory, median of 3 rounds)")
    ratios = {
        "logged_nann_vs_hnswlib": nann["update_group"] / peer,
        "unlogged_nann_vs_hnswlib": nann["update_unlogged"] / peer,
        "logged_vs_unlogged_nann": nann["update_group"] / nann["update_unlogged"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "dim": args.dim, "threads": args.threads, "nann": nann,
                       "hnswlib_updates_per_s": peer, "ratios": ratios}, f, indent=1)


if __name__ == "__main__":
    main()
