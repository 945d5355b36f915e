"""Evaluation benchmark: exact distributed AUC vs Spark ML (binned) vs scikit-learn on the driver, and Spark scoring.

    .venv/bin/python bench/evaluate.py                                          # 1M and 4M rows
    .venv/bin/python bench/evaluate.py --sizes 20000,80000 --workdir /tmp/esmm-bench-eval-small

One Python process, one SparkSession (local[2] by default, driver memory 4g), in one run, side by side:

1. AUC over a synthetic prediction table of each size, created in Spark and written to Parquet first (cached in
   ``<workdir>/pred-<n>-d<decimals>-seed<seed>``) so every engine does the same read:
   ``score = float(round(rand(seed), decimals))`` (ties: at most 10^decimals + 1 distinct scores) and
   ``label ~ Bernoulli(0.02 + 0.16 * score^2)`` (about 7% positives). Engines:

   - ``exact``:   ``esmm.metrics.global_auc`` (distributed, exact, tie-aware; only per-partition summaries reach the
                  driver);
   - ``spark_ml``: ``BinaryClassificationEvaluator(metricName="areaUnderROC")``, default ``numBins`` (approximate:
                  the ROC curve is down-sampled to about numBins points);
   - ``sklearn``: ``roc_auc_score`` after ``select(score, label).toPandas()`` (Arrow), time including the collect.

   Plus two Spark baselines for a time breakdown of ``exact``: ``scan`` (read the two columns, noop write) and
   ``agg`` (the (score) -> (pos, neg) aggregation that ``exact`` starts with, noop write).
2. Scoring throughput: an untrained ESMM (``esmm.methods.build_model`` on conf/demo.yaml's layout, saved with
   ``esmm.train.export_model``) scored by ``esmm.evaluate.score`` over a synthetic test table in the dataset layout
   (``<workdir>/ds-<n>-seed<seed>/test``: sample_id, click, conversion, feat_ids array<int> of num_slots global ids
   inside each field's id range, feat_wts array<float>); the output is written with the ``noop`` sink
   (``score_noop``) and, with ``--parquet``, by ``esmm.evaluate.score_to_parquet`` (``score_parquet``).

Memory per measurement (a background thread samples every ``--sample-interval`` s):
``py_rss+``   peak RSS of this Python driver during the measurement minus its RSS at the start (psutil samples);
``maxrss+``   growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` over the measurement (exact, but only shows
              growth beyond every earlier peak: the sklearn measurements therefore run last);
``to_driver`` bytes of task results sent to the driver (``resultSize`` of the measurement's stages, Spark UI REST
              API): the rows a collect brings back, or the per-partition summaries of the exact AUC;
``heap_pk``   peak driver JVM heap in use (MemoryMXBean, garbage included) minus the heap in use right after a
              ``System.gc()`` at the start; ``live_pk``: the largest heap left after any GC during the measurement
              (the live set) minus that baseline. Under ``local[N]`` the executors run inside the driver JVM, so both
              include the tasks' working memory (shuffle, sort, Parquet/Arrow buffers): a noisy upper bound.
Everything runs once on a tiny table first (JIT / Python worker warm-up, not reported). Results also go to
``<workdir>/results.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import sys
import threading
import time

from jvm_memory import live_heap_after_new_gcs  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

MB = 1024 * 1024
DEMO_CONF = os.path.join(ROOT, "conf", "demo.yaml")


# ============================================================================================ session and memory

def spark_session(master: str, shuffle_partitions: int, driver_memory: str, local_dir: str):
    from pyspark.sql import SparkSession
    os.makedirs(local_dir, exist_ok=True)
    spark = (SparkSession.builder.master(master).appName("bench-evaluate")
             .config("spark.driver.memory", driver_memory)
             .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
             .config("spark.default.parallelism", str(shuffle_partitions))
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")  # as esmm.spark.get_spark
             .config("spark.local.dir", local_dir)
             .config("spark.sql.warehouse.dir", os.path.join(local_dir, "wh"))
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.ui.enabled", "true")  # its REST API gives the bytes task results sent to the driver
             .config("spark.ui.port", "0")  # a free port: others may run Spark on this machine
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


class Sampler(threading.Thread):
    """Runs for the whole benchmark; ``begin()``/``end()`` bracket one measurement and return its memory peaks."""

    def __init__(self, spark, interval: float):
        super().__init__(daemon=True)
        import psutil
        self.proc = psutil.Process(os.getpid())
        self.interval = interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        jvm = spark._jvm
        mf = jvm.java.lang.management.ManagementFactory
        self.jvm = jvm
        self.mem = mf.getMemoryMXBean()
        self.gcs = list(mf.getGarbageCollectorMXBeans())
        self.heap_pools = {str(p.getName()) for p in mf.getMemoryPoolMXBeans() if str(p.getType()) == "Heap memory"}
        self.seen_gc: dict = {}
        self.peak = None

    def _tick(self) -> None:
        rss = self.proc.memory_info().rss
        used = int(self.mem.getHeapMemoryUsage().getUsed())
        live = live_heap_after_new_gcs(self.gcs, self.seen_gc, self.heap_pools)
        with self.lock:
            if self.peak is not None:
                pk = self.peak
                pk["rss"], pk["heap"] = max(pk["rss"], rss), max(pk["heap"], used)
                if live is not None:
                    pk["live"] = max(pk["live"], live)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._tick()
            except Exception:  # py4j hiccup while the main thread is busy: skip one sample
                pass
            self.stop_event.wait(self.interval)

    def begin(self) -> None:
        self.jvm.java.lang.System.gc()
        time.sleep(0.3)
        self._tick()  # consume the GC info of the forced collection
        base_heap = int(self.mem.getHeapMemoryUsage().getUsed())
        rss = self.proc.memory_info().rss
        with self.lock:
            self.peak = {"rss": rss, "heap": base_heap, "live": base_heap}
            self.base = {"rss": rss, "heap": base_heap, "maxrss": maxrss_mb()}

    def end(self) -> dict:
        try:
            self._tick()
        except Exception:
            pass
        with self.lock:
            pk, base, self.peak = self.peak, self.base, None
        return {"py_rss_mb": round(pk["rss"] / MB, 1), "py_rss_plus_mb": round((pk["rss"] - base["rss"]) / MB, 1),
                "maxrss_plus_mb": round(maxrss_mb() - base["maxrss"], 1),
                "heap_base_mb": round(base["heap"] / MB, 1),
                "heap_peak_plus_mb": round((pk["heap"] - base["heap"]) / MB, 1),
                "live_peak_plus_mb": round((pk["live"] - base["heap"]) / MB, 1)}

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


def measure(spark, sampler, name: str, fn) -> dict:
    """Run ``fn()`` once under a job group; wall seconds, Spark job count, memory, and fn's return value."""
    sc = spark.sparkContext
    group = f"bench-{name}-{time.time_ns()}"
    sc.setJobGroup(group, name)
    sampler.begin()
    t0 = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t0
    mem = sampler.end()
    job_ids = sc.statusTracker().getJobIdsForGroup(group)
    return {"seconds": seconds, "jobs": len(job_ids), "memory": mem, "value": value, **stage_totals(sc, job_ids)}


def stage_totals(sc, job_ids) -> dict:
    """Sum over the jobs' completed stages (Spark UI REST API): bytes of task results sent to the driver
    (``resultSize``: what a collect brings back), task seconds, shuffle bytes written."""
    import urllib.request
    base = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/stages/"
    stage_ids = sorted({s for j in job_ids if (info := sc.statusTracker().getJobInfo(j)) for s in info.stageIds})
    tot = {"result_bytes": 0, "task_s": 0.0, "shuffle_write_mb": 0.0, "stages": []}
    time.sleep(0.3)  # the status store is updated by an asynchronous listener
    try:
        for sid in stage_ids:
            with urllib.request.urlopen(base + str(sid), timeout=30) as r:
                for att in json.load(r):
                    if att.get("status") != "COMPLETE":
                        continue
                    tot["result_bytes"] += int(att["resultSize"])
                    tot["task_s"] += att["executorRunTime"] / 1000.0
                    tot["shuffle_write_mb"] += att["shuffleWriteBytes"] / MB
                    tot["stages"].append({"id": sid, "tasks": att["numTasks"], "task_s": att["executorRunTime"] / 1000.0,
                                          "in_mb": att["inputBytes"] / MB, "shuffle_read_mb": att["shuffleReadBytes"] / MB,
                                          "shuffle_write_mb": att["shuffleWriteBytes"] / MB,
                                          "result_kb": att["resultSize"] / 1024.0})
    except Exception as e:  # the UI is a convenience, not the measurement
        return {"stage_error": f"{type(e).__name__}: {e}"}
    return tot


# ============================================================================================ data

def _cached(path: str, spec: dict) -> bool:
    try:
        with open(os.path.join(path, "_BENCH_SPEC.json")) as f:
            return json.load(f) == spec
    except (OSError, ValueError):
        return False


def _mark(path: str, spec: dict) -> None:
    with open(os.path.join(path, "_BENCH_SPEC.json"), "w") as f:
        json.dump(spec, f)


def prediction_table(spark, workdir: str, n: int, decimals: int, seed: int, partitions: int) -> str:
    """Parquet (score float, label int) with ties; written once per (n, decimals, seed)."""
    from pyspark.sql import functions as F
    path = os.path.join(workdir, f"pred-{n}-d{decimals}-seed{seed}")
    spec = {"kind": "pred", "n": n, "decimals": decimals, "seed": seed, "partitions": partitions}
    if _cached(path, spec):
        return path
    shutil.rmtree(path, ignore_errors=True)
    score = F.round(F.rand(seed), decimals)
    label = (F.rand(seed + 1) < F.lit(0.02) + F.lit(0.16) * score * score).cast("int")
    (spark.range(0, n, 1, partitions).select(score.cast("float").alias("score"), label.alias("label"))
     .write.parquet(path))
    _mark(path, spec)
    return path


def test_table(spark, workdir: str, n: int, layout, seed: int, partitions: int) -> str:
    """A dataset directory whose ``test/`` split has the dataset layout (schemas.dataset), random ids per field."""
    from pyspark.sql import functions as F

    import schemas as S
    ds = os.path.join(workdir, f"ds-{n}-seed{seed}")
    spec = {"kind": "test", "n": n, "seed": seed, "layout": layout.to_dict(), "partitions": partitions}
    if _cached(ds, spec):
        return ds
    shutil.rmtree(ds, ignore_errors=True)
    ids, wts = [], []
    for f, (off, buckets, k) in enumerate(zip(layout.offsets, layout.buckets, layout.max_len)):
        for j in range(k):  # bucket 1..buckets-1 (0 = missing/padding), from a hash of (row, field, slot)
            h = F.pmod(F.xxhash64(F.col("id"), F.lit(f), F.lit(j), F.lit(seed)), F.lit(buckets - 1))
            ids.append((F.lit(off + 1) + h).cast("int"))
            wts.append(F.lit(1.0 / k).cast("float"))
    click = (F.rand(seed) < 0.05).cast("int")
    df = (spark.range(0, n, 1, partitions)
          .select(F.col("id").alias(S.SAMPLE_ID), click.alias(S.CLICK),
                  (click * (F.rand(seed + 1) < 0.06).cast("int")).alias(S.CONVERSION),
                  F.array(*ids).alias(S.FEAT_IDS), F.array(*wts).alias(S.FEAT_WTS)))
    df.write.parquet(os.path.join(ds, S.TEST))
    with open(os.path.join(ds, S.MANIFEST), "w") as f:
        json.dump({"layout": layout.to_dict(), "synthetic": True}, f)
    _mark(ds, spec)
    return ds


def model_export(workdir: str, seed: int) -> tuple:
    """An untrained ESMM on conf/demo.yaml's layout, saved as a scoring export; (path, FeatureLayout)."""
    import torch

    from esmm.config import load_config
    from esmm.features import FeatureLayout
    from esmm.methods import build_model
    from esmm.artifacts import EXPORT, export_model
    cfg = load_config(DEMO_CONF)
    layout = FeatureLayout.from_config(cfg.features)
    torch.manual_seed(seed)
    path = os.path.join(workdir, "model", EXPORT)
    export_model(build_model("esmm", layout, cfg.model), "esmm", cfg, layout, path)
    return path, layout


# ============================================================================================ measurements

def auc_measurements(spark, sampler, path: str, with_sklearn: bool, spark_side: bool) -> dict:
    from pyspark.ml.evaluation import BinaryClassificationEvaluator
    from pyspark.sql import functions as F

    from esmm.metrics import _score_label_counts, global_auc
    out = {}
    if spark_side:
        out["scan"] = measure(spark, sampler, "scan", lambda: spark.read.parquet(path).select("score", "label")
                              .write.format("noop").mode("overwrite").save())
        out["agg"] = measure(spark, sampler, "agg", lambda: _score_label_counts(
            spark.read.parquet(path), "score", "label", ()).write.format("noop").mode("overwrite").save())
        out["exact"] = measure(spark, sampler, "exact",
                               lambda: global_auc(spark.read.parquet(path), "score", "label"))

        def spark_ml():
            df = spark.read.parquet(path).select(F.col("score").cast("double").alias("score"),
                                                 F.col("label").cast("double").alias("label"))
            ev = BinaryClassificationEvaluator(rawPredictionCol="score", labelCol="label",
                                               metricName="areaUnderROC")
            return ev.evaluate(df)

        out["spark_ml"] = measure(spark, sampler, "spark_ml", spark_ml)
    if with_sklearn:
        def sk():
            from sklearn.metrics import roc_auc_score
            t0 = time.perf_counter()
            pdf = spark.read.parquet(path).select("score", "label").toPandas()
            t1 = time.perf_counter()
            v = float(roc_auc_score(pdf["label"].to_numpy(), pdf["score"].to_numpy()))
            return {"auc": v, "collect_s": t1 - t0, "compute_s": time.perf_counter() - t1, "rows": len(pdf)}

        out["sklearn"] = measure(spark, sampler, "sklearn", sk)
    return out


def score_measurements(spark, sampler, ds: str, export: str, width: int, workdir: str, parquet: bool) -> dict:
    import schemas as S
    from esmm.evaluate import ScoredRun, score, score_to_parquet
    run = ScoredRun("esmm", "esmm", export)
    out = {}

    def noop():
        df, _ = score(spark, spark.read.parquet(os.path.join(ds, S.TEST)), [run], None, width)
        df.write.format("noop").mode("overwrite").save()

    out["score_noop"] = measure(spark, sampler, "score_noop", noop)
    if parquet:
        dst = os.path.join(workdir, "scored")

        def to_parquet():
            shutil.rmtree(dst, ignore_errors=True)
            return score_to_parquet(spark, ds, [run], None, dst, width)

        out["score_parquet"] = measure(spark, sampler, "score_parquet", to_parquet)
        shutil.rmtree(dst, ignore_errors=True)
    return out


# ============================================================================================ report

def _fmt_table(headers: list, rows: list) -> str:
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(cells))
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in rows])


def _bytes(b) -> str:
    if b is None:
        return "?"
    return f"{b / MB:.1f} MB" if b >= MB else f"{b / 1024:.1f} KB"


def report(res: dict) -> str:
    sizes = res["sizes"]
    lines = []
    headers = ["rows", "engine", "seconds", "rows/s", "jobs", "task_s", "to_driver", "AUC", "|d| vs sklearn",
               "py_rss+", "maxrss+", "heap_pk+", "live_pk+"]
    rows = []
    for n in sizes:
        m = res["auc"][str(n)]
        ref = m["sklearn"]["value"]["auc"] if "sklearn" in m else None
        for eng in ("scan", "agg", "exact", "spark_ml", "sklearn", "score_noop", "score_parquet"):
            src = res["score"][str(n)] if eng.startswith("score") else m
            if eng not in src:
                continue
            r = src[eng]
            v = r["value"]
            a = v.get("auc") if isinstance(v, dict) else v if isinstance(v, float) else None
            d = "" if a is None or ref is None or eng == "sklearn" else f"{abs(a - ref):.1e}"
            mem = r["memory"]
            rows.append([f"{n:,}", eng, f"{r['seconds']:.2f}", f"{n / r['seconds']:,.0f}", r["jobs"],
                         f"{r['task_s']:.1f}" if "task_s" in r else "?", _bytes(r.get("result_bytes")),
                         "" if a is None else f"{a:.9f}", d, f"{mem['py_rss_plus_mb']:.0f}",
                         f"{mem['maxrss_plus_mb']:.0f}", f"{mem['heap_peak_plus_mb']:.0f}",
                         f"{mem['live_peak_plus_mb']:.0f}"])
    lines.append(_fmt_table(headers, rows))
    lines.append("(task_s: executor task seconds; to_driver: serialized task results sent to the driver; memory "
                 "columns in MB: py_rss+/maxrss+ Python driver, heap_pk+/live_pk+ driver JVM heap, which under "
                 "local[N] also holds the executors; see the module docstring)")
    lines.append("")
    for n in sizes:
        m = res["auc"][str(n)]
        parts = []
        if "sklearn" in m:
            sk = m["sklearn"]
            parts.append(f"sklearn collect {sk['value']['collect_s']:.2f}s + roc_auc_score "
                         f"{sk['value']['compute_s']:.2f}s")
            if "exact" in m:
                parts.append(f"exact/sklearn time {m['exact']['seconds'] / sk['seconds']:.2f}x")
        if "exact" in m and "spark_ml" in m:
            parts.append(f"exact/spark_ml time {m['exact']['seconds'] / m['spark_ml']['seconds']:.2f}x")
        if "exact" in m and "agg" in m:
            e, g, s = m["exact"]["seconds"], m["agg"]["seconds"], m["scan"]["seconds"]
            parts.append(f"exact = scan {s:.2f}s + aggregate {g - s:.2f}s + range/sort/summaries {e - g:.2f}s")
        lines.append(f"{n:,} rows: " + "; ".join(parts))
    big = res["auc"][str(sizes[-1])]
    for eng in ("exact", "spark_ml"):
        if big.get(eng, {}).get("stages"):
            lines.append(f"{eng} stages at {sizes[-1]:,} rows (task s; input/shuffle read/shuffle write MB; result KB): "
                         + " | ".join(f"{st['tasks']}t {st['task_s']:.1f}s in {st['in_mb']:.0f} "
                                      f"r {st['shuffle_read_mb']:.1f} w {st['shuffle_write_mb']:.1f} "
                                      f"res {st['result_kb']:.0f}" for st in big[eng]["stages"]))
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        k = b / a
        for eng in ("exact", "spark_ml", "sklearn"):
            if eng in res["auc"][str(a)] and eng in res["auc"][str(b)]:
                ta, tb = res["auc"][str(a)][eng]["seconds"], res["auc"][str(b)][eng]["seconds"]
                lines.append(f"{eng}: {b:,}/{a:,} rows ({k:.0f}x) -> time x{tb / ta:.2f}")
        for eng in ("score_noop", "score_parquet"):
            if eng in res["score"][str(a)]:
                ta, tb = res["score"][str(a)][eng]["seconds"], res["score"][str(b)][eng]["seconds"]
                ma, mb = (res["score"][str(x)][eng]["memory"] for x in (a, b))
                lines.append(f"{eng}: {b:,}/{a:,} rows ({k:.0f}x) -> time x{tb / ta:.2f}; driver py_rss+ "
                             f"{ma['py_rss_plus_mb']:.0f} -> {mb['py_rss_plus_mb']:.0f} MB, JVM heap_pk+ "
                             f"{ma['heap_peak_plus_mb']:.0f} -> {mb['heap_peak_plus_mb']:.0f} MB")
    return "\n".join(lines)


# ============================================================================================ main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,4000000", help="comma-separated row counts")
    ap.add_argument("--workdir", default="/tmp/esmm-bench-eval")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--shuffle-partitions", type=int, default=4)
    ap.add_argument("--driver-memory", default="4g")
    ap.add_argument("--decimals", type=int, default=6, help="score rounding (ties); <= 10^d + 1 distinct scores")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--warmup-rows", type=int, default=20000)
    ap.add_argument("--no-parquet", dest="parquet", action="store_false",
                    help="skip score_to_parquet (real Parquet output), time the noop sink only")
    ap.add_argument("--sample-interval", type=float, default=0.1)
    ap.add_argument("--report-only", action="store_true", help="print the report of <workdir>/results.json")
    a = ap.parse_args(argv)
    if a.report_only:
        with open(os.path.join(a.workdir, "results.json")) as f:
            res = json.load(f)
        print_report(res)
        return res
    sizes = sorted(int(s) for s in a.sizes.split(","))
    os.makedirs(a.workdir, exist_ok=True)
    parts = int(a.master[6:-1]) * 2 if a.master.startswith("local[") and a.master[6:-1].isdigit() else 4
    load0 = os.getloadavg()

    t_all = time.time()
    spark = spark_session(a.master, a.shuffle_partitions, a.driver_memory, os.path.join(a.workdir, "spark-local"))
    sampler = Sampler(spark, a.sample_interval)
    sampler.start()

    t0 = time.time()
    export, layout = model_export(a.workdir, a.seed)
    width = layout.num_slots
    pred = {n: prediction_table(spark, a.workdir, n, a.decimals, a.seed, parts) for n in [a.warmup_rows, *sizes]}
    ds = {n: test_table(spark, a.workdir, n, layout, a.seed, parts) for n in [a.warmup_rows, *sizes]}
    prep_s = time.time() - t0
    print(f"data ready in {prep_s:.1f}s (cached tables are reused)", flush=True)

    # warm-up: JIT, Python workers, model load; not reported
    auc_measurements(spark, sampler, pred[a.warmup_rows], True, True)
    score_measurements(spark, sampler, ds[a.warmup_rows], export, width, a.workdir, a.parquet)

    res = {"sizes": sizes, "auc": {}, "score": {}}
    for n in sizes:  # Spark-side measurements first: nothing here should grow the Python driver
        print(f"[{n:,}] exact / spark_ml / scoring ...", flush=True)
        res["auc"][str(n)] = auc_measurements(spark, sampler, pred[n], False, True)
        res["score"][str(n)] = score_measurements(spark, sampler, ds[n], export, width, a.workdir, a.parquet)
    for n in sizes:  # collects to the driver last, so ru_maxrss growth is attributable
        print(f"[{n:,}] sklearn ...", flush=True)
        res["auc"][str(n)].update(auc_measurements(spark, sampler, pred[n], True, False))
    sampler.stop()

    res["meta"] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                             else sys.executable, os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
        "master": a.master, "shuffle_partitions": a.shuffle_partitions, "driver_memory": a.driver_memory,
        "cpus": os.cpu_count(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "python": platform.python_version(), "spark": spark.version, "platform": platform.platform(),
        "decimals": a.decimals, "seed": a.seed, "score_width": width, "model": "esmm (untrained), conf/demo.yaml",
        "jvm_heap_max_mb": round(int(spark._jvm.java.lang.Runtime.getRuntime().maxMemory()) / MB, 1),
        "total_s": round(time.time() - t_all, 1), "prep_s": round(prep_s, 1),
    }
    spark.stop()
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(res, f, indent=2, default=str)
    print_report(res)
    return res


def print_report(res: dict) -> None:
    text = report(res)
    m = res["meta"]
    print()
    print(f"# {m['date']}  {m['command']}")
    print(f"# {m['master']}, {m['cpus']} cpus, shuffle partitions {m['shuffle_partitions']}, driver {m['driver_memory']}"
          f" (JVM heap max {m['jvm_heap_max_mb']:.0f} MB), Spark {m['spark']}, Python {m['python']}; load avg "
          f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end; total {m['total_s']:.0f}s")
    print(text)


if __name__ == "__main__":
    main()
