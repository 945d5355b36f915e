"""``protocol_metrics`` with and without coalescing its cached rows to ~``ROWS_PER_TASK`` rows per task.

    .venv/bin/python bench/metrics_tasks.py --exp DIR --unit r0-rate1.0 --dataset DS --truth RAW/ground_truth \
        [--shuffle-partitions 200] [--repeat 1]

At ``spark.sql.shuffle.partitions: 200`` (conf/default.yaml) the pivot has 200 partitions and its five task filters
1,000; every DeLong pass is a Python ``mapInArrow`` over them, so a small unit pays for 1,000 tasks per pass. This
times both variants on one unit's predictions in one Spark session (local[2]), interleaved, and checks they give
the same metrics.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", required=True)
    p.add_argument("--unit", default="r0-rate1.0")
    p.add_argument("--truth", default=None)
    p.add_argument("--shuffle-partitions", type=int, default=200)
    p.add_argument("--repeat", type=int, default=1)
    a = p.parse_args()
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
    from pyspark.sql import SparkSession

    from esmm import metrics as M
    from esmm.evaluate import OWN_CTR_METHODS
    spark = (SparkSession.builder.master("local[2]").config("spark.driver.memory", "4g")
             .config("spark.sql.shuffle.partitions", str(a.shuffle_partitions))
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    pred = spark.read.parquet(os.path.join(a.exp, "predictions", a.unit))
    runs = {r["run_id"]: r["method"] for r in pred.select("run_id", "method").distinct().collect()}
    truth = spark.read.parquet(a.truth) if a.truth else None
    n = pred.count()
    original = M._fewer_tasks
    times = {"coalesced": [], "all partitions": []}
    results = {}
    for _ in range(a.repeat):
        for name in ("all partitions", "coalesced"):
            M._fewer_tasks = original if name == "coalesced" else (lambda df, rows: df)
            t0 = time.time()
            rows, _, _ = M.protocol_metrics(pred, truth, runs, own_ctr=OWN_CTR_METHODS)
            times[name].append(time.time() - t0)
            results[name] = sorted((r["run_id"], r["task"], r["auc"]) for r in rows)
            print(f"{name:16s} {times[name][-1]:7.1f}s", flush=True)
    M._fewer_tasks = original
    same = results["coalesced"] == results["all partitions"]
    a_, b_ = statistics.median(times["coalesced"]), statistics.median(times["all partitions"])
    print(f"\n{a.unit}: {n:,} prediction rows, {len(runs)} runs, shuffle partitions {a.shuffle_partitions}, "
          f"ROWS_PER_TASK {M.ROWS_PER_TASK:,}")
    print(f"coalesced / all partitions = {a_:.1f}s / {b_:.1f}s = {a_ / b_:.2f}x the time; same AUCs: {same}")


if __name__ == "__main__":
    sys.exit(main())
