"""Evaluation of one experiment unit: the range-pass AUC jobs vs ``metrics.protocol_metrics`` (AUC + DeLong +
log-loss + calibration from one pivot), and scoring with 1 vs 2 torch threads per Spark task.

    .venv/bin/python bench/protocol.py [--exp data/demo/runs/experiment] [--unit r0-rate0.1] [--repeat 2]

Needs a finished experiment unit (``make demo`` leaves four). Interleaves the variants ``--repeat`` times in one
Spark session (local[2]) and prints seconds per run and the ratios of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="data/demo/runs/experiment")
    p.add_argument("--dataset", default="data/demo/dataset")
    p.add_argument("--truth", default="data/demo/raw/ground_truth")
    p.add_argument("--unit", default="r0-rate0.1")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/esmm-bench-protocol")
    args = p.parse_args()
    import schemas as S
    from esmm.cli import setup_logging
    from esmm.config import load_config
    from esmm.evaluate import ScoredRun, score_to_parquet
    from esmm.metrics import entire_space_cvr_metrics, protocol_metrics, task_metrics
    from esmm.spark import get_spark
    from esmm.artifacts import read_manifest
    setup_logging("WARNING")
    cfg = load_config(os.path.join(ROOT, "conf", "demo.yaml"))
    spark = get_spark(cfg.spark, "bench-protocol")
    unit = json.load(open(os.path.join(args.exp, "metrics", f"{args.unit}.json")))
    runs = {r["run_id"] for r in unit["metrics"]}
    rundir = os.path.join(args.exp, "runs", args.unit)
    scored = [ScoredRun(r.split("[")[0], r, os.path.join(rundir, r.replace("[", "-").replace("]", "").replace("=", ""),
                                                         "model.pt")) for r in sorted(runs)]
    ref = next(s for s in scored if s.method == "ctr")
    width = read_manifest(args.dataset)["layout"]["num_slots"]
    pred = spark.read.parquet(os.path.join(args.exp, "predictions", args.unit))
    truth = spark.read.parquet(args.truth)
    n = pred.count()

    def range_pass():
        task_metrics(pred, group_cols=(S.RUN_ID,), on_one_class="nan")
        entire_space_cvr_metrics(pred, truth, group_cols=(S.RUN_ID,), on_one_class="nan")

    def protocol():
        protocol_metrics(pred, truth, {s.run_id: s.method for s in scored})

    def scoring(threads):
        def run():
            out = os.path.join(args.workdir, f"pred-{threads}")
            shutil.rmtree(out, ignore_errors=True)
            score_to_parquet(spark, args.dataset, scored, ref, out, width, threads, cfg.evaluate)
        return run

    variants = {"AUC range passes (no DeLong)": range_pass, "protocol_metrics (AUC + DeLong)": protocol,
                "scoring, 2 threads/task": scoring(2), "scoring, 1 thread/task": scoring(1)}
    times = {k: [] for k in variants}
    for _ in range(args.repeat):
        for k, fn in variants.items():
            t = time.time()
            fn()
            times[k].append(time.time() - t)
    print(f"\nunit {args.unit}: {len(scored)} runs, {n:,} prediction rows, local[2], load {os.getloadavg()[0]:.1f}")
    for k, ts in times.items():
        print(f"  {k:34s} " + "  ".join(f"{t:6.1f}s" for t in ts) + f"   median {statistics.median(ts):6.1f}s")
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  protocol_metrics / AUC range passes = {med['protocol_metrics (AUC + DeLong)'] / med['AUC range passes (no DeLong)']:.2f}x the time, "
          f"with DeLong's covariance and the entire-space tasks included")
    print(f"  scoring 1 thread / 2 threads per task = {med['scoring, 1 thread/task'] / med['scoring, 2 threads/task']:.2f}x the time")


if __name__ == "__main__":
    main()
