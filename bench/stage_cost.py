"""Wall time and peak memory per stage and per process of the pipeline at several log sizes (how cost grows).

    .venv/bin/python bench/stage_cost.py --sizes 1000000,4000000,20000000 [--conf conf/default.yaml]
        [--set experiment.methods=[base,esmm] ...] [--workdir /tmp/esmm-bench-stages]

Each stage is its own ``./spark-submit.sh`` job (generate, ETL, experiment = training + scoring + metrics), as a
scheduler would chain them, in ``local[2]``. While a stage runs, a sampler reads every process of its tree every
0.5 s (psutil) and keeps the peak RSS per kind of process: the driver JVM, the Python driver, Python workers
(Spark's pyspark.daemon / worker processes, which also score and train with one worker), Horovod worker processes,
and the sum over the tree. Prints one row per (size, stage) and, per stage, the growth factor of time and memory
from the smallest to the largest size. ``--set`` overrides are passed to every stage (e.g. trimmed grids:
``--set "experiment.aman_rates=[0.2]" --set "experiment.oversampling_ks=[3]" --set experiment.repeats=1``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kind(p) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 (the process ended)
        return "gone"
    if "java" in p.name() or "org.apache.spark" in cmd:
        return "jvm"
    if "pyspark.daemon" in cmd or "pyspark/worker" in cmd or "pyspark.worker" in cmd:
        return "py_worker"
    if "horovod" in cmd or "mpirun" in cmd or "gloo" in cmd:
        return "horovod"
    if "python" in p.name() or "python" in cmd:
        return "py_driver"
    return "other"


def run_stage(cmd: list[str], log_path: str) -> dict:
    import psutil
    peaks = {"jvm": 0, "py_driver": 0, "py_worker": 0, "horovod": 0, "tree": 0}
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    procs = [root] + root.children(recursive=True)
                except psutil.NoSuchProcess:
                    break
                total, by = 0, {}
                for p in procs:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    k = _kind(p)
                    total += rss
                    by[k] = by.get(k, 0) + rss if k == "py_worker" else max(by.get(k, 0), rss)
                for k, v in by.items():
                    if k in peaks:
                        peaks[k] = max(peaks[k], v)
                peaks["tree"] = max(peaks["tree"], total)
                done.wait(0.5)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        done.set()
        th.join()
    if rc != 0:
        raise SystemExit(f"stage failed ({rc}): {' '.join(cmd)}; see {log_path}")
    return {"seconds": time.time() - t0, **{f"{k}_mb": v / 2**20 for k, v in peaks.items()}}


def _experiment_split(exp_dir: str) -> dict:
    """Training / scoring / metrics seconds of the experiment stage, from the unit JSONs it wrote."""
    units = []
    for name in sorted(os.listdir(os.path.join(exp_dir, "metrics"))):
        if name.startswith("r") and name.endswith(".json"):
            with open(os.path.join(exp_dir, "metrics", name)) as f:
                units.append(json.load(f))
    # units measured together (experiment.units_per_evaluation) share one launch and one evaluation: each of their
    # records carries that group's seconds, counted once here
    groups = {tuple(u.get("evaluated_with") or [u["unit"]]): u.get("seconds", {}) for u in units}
    sec = {k: sum(g.get(k, 0.0) for g in groups.values()) for k in ("train", "score", "metrics")}
    per = [{"unit": u["unit"], "method": t["method"], "seconds": t["seconds"], "samples_per_s": t["samples_per_s"]}
           for u in units for t in u["train"]]
    samples = sum(t["samples_per_s"] * t["seconds"] for t in per)
    return {"train_s": sec["train"], "score_s": sec["score"], "metrics_s": sec["metrics"], "trainings": len(per),
            "train_samples_per_s": samples / max(sum(t["seconds"] for t in per), 1e-9), "per_training": per}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,4000000")
    p.add_argument("--conf", default="conf/default.yaml")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--workdir", default="/tmp/esmm-bench-stages")
    p.add_argument("--json", default="")
    p.add_argument("--stages", default="generate,etl,experiment",
                   help="stages to run (a finished generate/ETL output is reused, e.g. to re-run the experiment)")
    args = p.parse_args()
    results = []
    for size in [int(x) for x in args.sizes.split(",")]:
        base = os.path.join(args.workdir, f"n{size}")
        sets = [f"generate.impressions={size}", f"paths.raw={base}/raw", f"paths.dataset={base}/dataset",
                f"paths.runs={base}/runs", *args.sets]
        common = ["--conf", args.conf] + [x for s in sets for x in ("--set", s)]
        for stage, job in (("generate", "jobs/generate.py"), ("etl", "jobs/etl.py"),
                           ("experiment", "jobs/experiment.py")):
            if stage not in args.stages.split(","):
                continue
            cmd = ["./spark-submit.sh", "--master", "local[2]", job, *common]
            os.makedirs(base, exist_ok=True)
            r = run_stage(cmd, os.path.join(base, f"{stage}.log"))
            if stage == "experiment":
                r.update(_experiment_split(os.path.join(base, "runs", "experiment")))
            results.append({"impressions": size, "stage": stage, **r})
            print(f"{size:>12,} {stage:10s} {r['seconds']:8.1f}s  tree {r['tree_mb']:8.0f} MB  jvm {r['jvm_mb']:7.0f}  "
                  f"py driver {r['py_driver_mb']:6.0f}  py workers {r['py_worker_mb']:6.0f}  "
                  f"horovod {r['horovod_mb']:6.0f}", flush=True)
            if stage == "experiment":
                print(f"{'':12} {'':10} of which training {r['train_s']:.0f}s ({r['trainings']} trainings, "
                      f"{r['train_samples_per_s']:,.0f} samples/s), scoring {r['score_s']:.0f}s, "
                      f"metrics {r['metrics_s']:.0f}s", flush=True)
                for t in r["per_training"]:
                    print(f"{'':25} {t['method']:>14s} {t['seconds']:8.1f}s  {t['samples_per_s']:10,.0f} samples/s")
    sizes = sorted({r["impressions"] for r in results})
    if len(sizes) > 1 and len(results) == 3 * len(sizes):
        print(f"\ngrowth {sizes[0]:,} -> {sizes[-1]:,} impressions ({sizes[-1] / sizes[0]:.0f}x the log):")
        for stage in ("generate", "etl", "experiment"):
            a = next(r for r in results if r["impressions"] == sizes[0] and r["stage"] == stage)
            b = next(r for r in results if r["impressions"] == sizes[-1] and r["stage"] == stage)
            print(f"  {stage:10s} time {b['seconds'] / a['seconds']:5.1f}x   peak tree memory "
                  f"{b['tree_mb'] / a['tree_mb']:4.1f}x   JVM {b['jvm_mb'] / max(a['jvm_mb'], 1):4.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
