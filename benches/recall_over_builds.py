#!/usr/bin/env python3
"""Mean R@10 over many independent builds, nann and hnswlib side by side.

    python3 benches/recall_over_builds.py [--builds 40] [--threads 2] [--efs 10,12,14,16]

One build of either library moves siftsmall's R@10 by about +-0.005 at a
given ef (its 100 queries make one trapped query worth 0.01), so a deficit
read off 5 builds is mostly the draw. This script builds `--builds` times
with level seeds 100, 101, ... (M 16, ef_construction 200, the issue-2
settings) and prints, per ef, each library's mean recall with its standard
error, and the difference. Data: ../shared/data/siftsmall (never copied).
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_hnswlib import build_examples, ensure_packages, read_vecs  # noqa: E402

SIFT = os.path.join(ROOT, "..", "shared", "data", "siftsmall", "siftsmall")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--efs", default="10,12,14,16")
    args = parser.parse_args()
    ensure_packages()
    import hnswlib

    (exe,) = build_examples("ann_bench")
    efs = [int(e) for e in args.efs.split(",")]
    base = read_vecs(SIFT + "_base.fvecs", np.float32)
    queries = read_vecs(SIFT + "_query.fvecs", np.float32)
    gt = read_vecs(SIFT + "_groundtruth.ivecs", np.int32)[:, :10]
    nann = {e: [] for e in efs}
    peer = {e: [] for e in efs}
    for seed in range(100, 100 + args.builds):
        out = subprocess.run(
            [exe, "--base", SIFT + "_base.fvecs", "--query", SIFT + "_query.fvecs",
             "--gt", SIFT + "_groundtruth.ivecs", "--metric", "l2", "--k", "10", "--m", "16",
             "--ef-construction", "200", "--ef", ",".join(map(str, efs)),
             "--threads", str(args.threads), "--json", "--min-seconds", "0.01", "--seed", str(seed)],
            capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            row = json.loads(line)
            if "ef" in row:
                nann[row["ef"]].append(row["recall"])
        index = hnswlib.Index("l2", base.shape[1])
        index.init_index(len(base), M=16, ef_construction=200, random_seed=seed)
        index.add_items(base, num_threads=args.threads)
        for ef in efs:
            index.set_ef(ef)
            labels, _ = index.knn_query(queries, 10, num_threads=1)
            peer[ef].append(np.mean([len(set(labels[i]) & set(gt[i])) / 10 for i in range(len(queries))]))
    print(f"siftsmall, {args.builds} builds each ({args.threads} build threads); mean R@10 +- standard error")
    print(f"{'ef':>4} | {'hnswlib':>17} | {'nann':>17} | nann - hnswlib")
    for ef in efs:
        h, n = np.array(peer[ef]), np.array(nann[ef])
        se = lambda x: x.std(ddof=1) / np.sqrt(len(x))  # noqa: E731
        diff_se = np.hypot(se(h), se(n))
        print(f"{ef:>4} | {h.mean():.4f} +- {se(h):.4f} | {n.mean():.4f} +- {se(n):.4f} | "
              f"{n.mean() - h.mean():+.4f} +- {diff_se:.4f}")


if __name__ == "__main__":
    main()
