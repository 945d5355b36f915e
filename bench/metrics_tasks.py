"""``protocol_metrics``'s task counts: two pairs of variants timed on one prediction table in one Spark session.

    .venv/bin/python bench/metrics_tasks.py --exp DIR [--unit r0-rate1.0] [--truth RAW/ground_truth] \
        [--compare coalesce|sizing|split|persist] [--oracle] [--shuffle-partitions 200] [--repeat 1] [--bound N]

At ``spark.sql.shuffle.partitions: 200`` (conf/default.yaml) the pivot has 200 partitions and its five task filters
1,000; every DeLong pass is a Python ``mapInArrow`` over them, so a small unit pays for 1,000 tasks per pass.

- ``--compare coalesce``: with and without coalescing the cached rows to ~``ROWS_PER_TASK`` rows per task.
- ``--compare sizing``: the pivot and every shuffle at the configured ``spark.sql.shuffle.partitions`` (an explicit
  ``num_partitions``, the behaviour before ``_sized_shuffles``) against the default, sized to the table.
- ``--compare split``: DeLong with every task sorted once the minority scores of all tasks together exceed
  ``DELONG_BROADCAST_SCORES`` (the behaviour before the split) against the default, where the tasks that fit keep
  the broadcast path. ``--oracle`` adds the true probabilities as a model (``protocol_metrics(oracle=True)``, as an
  experiment's first evaluation does; needs ``--truth``).

- ``--compare persist``: DeLong's minority-score aggregate persisted while the placements are computed (the default)
  against computed again by each of its three reads. Only the path over the bound reads it more than once; ``--bound``
  lowers ``DELONG_BROADCAST_SCORES`` for the run so a small table takes that path.

``--unit`` names a table under ``DIR/predictions`` (units scored together are joined by ``+``; their runs are
``unit/name`` and each names its unit's reference CTR network). Both variants run interleaved, ``--repeat`` times,
on the same rows (local[2]); the script checks they give the same AUCs.
"""
from __future__ import annotations

import argparse
import math
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
    p.add_argument("--compare", choices=("coalesce", "sizing", "split", "persist"), default="coalesce")
    p.add_argument("--bound", type=int, default=None, help="DELONG_BROADCAST_SCORES for this run")
    p.add_argument("--oracle", action="store_true")
    a = p.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("esmm.metrics").setLevel(logging.INFO)   # which DeLong path each call takes
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
    # units scored together: each run's reference is the CTR network of its own unit
    unit_ref = {r.split("/")[0]: r for r, m in runs.items() if m == "ctr" and "/" in r}
    refs = {r: unit_ref[r.split("/")[0]] for r in runs if "/" in r} or None
    truth = spark.read.parquet(a.truth) if a.truth else None
    n = pred.count()
    original, groups = M._fewer_tasks, M._broadcast_groups
    if a.bound is not None:
        M.DELONG_BROADCAST_SCORES = a.bound
    persist = {}
    if a.compare == "coalesce":
        new, old = "coalesced", "all partitions"
        setups = {new: (original, None, groups), old: ((lambda df, rows: df), None, groups)}
    elif a.compare == "sizing":
        new, old = "sized", f"{a.shuffle_partitions} partitions"
        setups = {new: (original, None, groups), old: (original, a.shuffle_partitions, groups)}
    elif a.compare == "split":
        new, old = "split", "all sorted"
        setups = {new: (original, None, groups), old: (original, None, lambda sizes, bound: [])}
    else:
        new, old = "persisted", "recomputed"
        setups = {new: (original, None, groups), old: (original, None, groups)}
        persist = {new: True, old: False}
    times = {new: [], old: []}
    results = {}
    for _ in range(a.repeat):
        for name in (old, new):
            M._fewer_tasks, parts, M._broadcast_groups = setups[name]
            M._PERSIST_SCORES = persist.get(name, True)
            t0 = time.time()
            rows, _, _ = M.protocol_metrics(pred, truth, runs, own_ctr=OWN_CTR_METHODS, refs=refs,
                                            num_partitions=parts, oracle=a.oracle)
            times[name].append(time.time() - t0)
            results[name] = sorted((r["run_id"], r["task"], r["auc"]) for r in rows)
            print(f"{name:16s} {times[name][-1]:7.1f}s", flush=True)
    M._fewer_tasks, M._broadcast_groups, M._PERSIST_SCORES = original, groups, True
    diff = max((abs(x[2] - y[2]) for x, y in zip(results[new], results[old])
                if not (math.isnan(x[2]) or math.isnan(y[2]))), default=0.0)
    same = [x[:2] for x in results[new]] == [y[:2] for y in results[old]] and diff < 1e-12
    a_, b_ = statistics.median(times[new]), statistics.median(times[old])
    print(f"\n{a.unit}: {n:,} prediction rows, {len(runs)} runs, shuffle partitions {a.shuffle_partitions}, "
          f"ROWS_PER_TASK {M.ROWS_PER_TASK:,}, DELONG_BROADCAST_SCORES {M.DELONG_BROADCAST_SCORES:,}")
    print(f"{new} / {old} = {a_:.1f}s / {b_:.1f}s = {a_ / b_:.2f}x the time (medians of {a.repeat}); "
          f"same AUCs: {same} (largest difference {diff:.1e})")


if __name__ == "__main__":
    sys.exit(main())
