"""Evaluation against its bound: the Spark evaluation of trained exports vs a plain single-process reference, side by
side in one run, on the same test rows and the same exports.

    .venv/bin/python bench/eval_reference.py --dataset data/demo/dataset --exp data/demo/runs/experiment \
        --unit r0-rate1.0 [--truth data/demo/raw/ground_truth] [--rows N]

Spark (``local[2]``, the evaluate config of conf/demo.yaml): ``esmm.evaluate.score_to_parquet`` (scoring: the
test split's Parquet read, every model's forward pass in the Python workers, the predictions written), then
``esmm.metrics.protocol_metrics`` with its stages timed: the pivot to one row per impression and the task rows
(``pivot``: what the others leave), DeLong's exact AUCs and covariances (``delong``), log-loss and calibration
(``logloss``), GAUC (``gauc``) and the ECE against the true pCVR (``ece``).

Reference (this one Python process, torch on 2 threads, the machine's 2 cores): the test split read with pyarrow
into numpy (``read``), each export's forward pass with the same ``esmm.methods.predict``/``scores`` (``forward``),
then per protocol task: scikit-learn's ``roc_auc_score`` and DeLong's covariance by the midrank algorithm of Sun &
Xu (2014) in numpy/scipy (``delong``), log-loss and calibration (``logloss``), per-user AUC by pandas group ranks
(``gauc``) and the ECE over 20 exact equal-mass bins (``ece``). Everything in memory: the reference is a bound, not
a design (it holds every row and score on one machine).

Both sides' AUCs are compared (largest |difference|), the times printed side by side with their ratio, and the
results written to ``<workdir>/results.json``. ``--rows`` keeps the first N test rows (by sample_id) on both sides
(N well below the split: cost against rows).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

import numpy as np  # noqa: E402

TASKS = ("ctr", "cvr", "ctcvr", "cvr_entire", "cvr_entire_clicked")


def unit_runs(exp: str, unit: str):
    """The unit's runs as ScoredRun (run dir name as run id), and its reference CTR network."""
    from esmm.artifacts import EXPORT
    from esmm.evaluate import ScoredRun, _export_blob
    base = os.path.join(exp, "runs", unit)
    runs = []
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name, EXPORT)
        if os.path.isfile(path):
            runs.append(ScoredRun(_export_blob(path)["method"], name, path))
    ref = next(r for r in runs if r.method == "ctr")
    return runs, ref


# ============================================================================================== Spark side

def spark_side(spark, dataset: str, runs, ref, truth: str | None, workdir: str, rows: int | None) -> dict:
    import shutil

    from pyspark.sql import functions as F

    import schemas as S
    from esmm import metrics as M
    from esmm.artifacts import read_manifest
    from esmm.config import load_config
    from esmm.evaluate import OWN_CTR_METHODS, score_to_parquet
    cfg = load_config(os.path.join(ROOT, "conf", "demo.yaml"))
    width = read_manifest(dataset)["layout"]["num_slots"]
    ds = dataset
    if rows:  # the first N test rows as a dataset of their own (same manifest), so scoring reads only them
        ds = os.path.join(workdir, f"ds-{rows}")
        if not os.path.isdir(os.path.join(ds, S.TEST)):
            from esmm.outputs import recommit
            shutil.rmtree(ds, ignore_errors=True)
            os.makedirs(ds)
            for f in os.listdir(dataset):   # manifest, marker, commit record: the same dataset build, fewer rows
                if os.path.isfile(os.path.join(dataset, f)):
                    shutil.copy(os.path.join(dataset, f), ds)
            # the N-th sample_id from that column alone (ordering whole rows, 57-wide arrays, runs out of heap
            # at 2M), then a filter: sample_id is unique, so exactly N rows
            from pyspark.sql import functions as F
            test = spark.read.parquet(os.path.join(dataset, S.TEST))
            cut = test.select(S.SAMPLE_ID).orderBy(S.SAMPLE_ID).limit(rows).agg(F.max(S.SAMPLE_ID)).first()[0]
            test.where(F.col(S.SAMPLE_ID) <= cut).write.parquet(os.path.join(ds, S.TEST))
            recommit(ds)
    pred_path = os.path.join(workdir, "pred")
    shutil.rmtree(pred_path, ignore_errors=True)
    t = {}
    t0 = time.time()
    score_to_parquet(spark, ds, runs, ref, pred_path, width, cfg.evaluate.threads, cfg.evaluate)
    t["scoring"] = time.time() - t0
    timers = {}

    def timed(name, f):
        @functools.wraps(f)
        def g(*a, **k):
            s = time.time()
            try:
                return f(*a, **k)
            finally:
                timers[name] = timers.get(name, 0.0) + time.time() - s
        return g
    saved = {n: getattr(M, n) for n in ("delong_wide", "_wide_logloss", "_task_gauc", "calibration_error")}
    for n, key in (("delong_wide", "delong"), ("_wide_logloss", "logloss"), ("_task_gauc", "gauc"),
                   ("calibration_error", "ece")):
        setattr(M, n, timed(key, saved[n]))
    try:
        pred = spark.read.parquet(pred_path)
        tr = spark.read.parquet(truth) if truth else None
        if tr is not None and rows:
            tr = tr.join(pred.select(S.SAMPLE_ID).distinct(), S.SAMPLE_ID)
        t0 = time.time()
        res, dl, aliases = M.protocol_metrics(pred, tr, {r.run_id: r.method for r in runs}, own_ctr=OWN_CTR_METHODS)
        total = time.time() - t0
    finally:
        for n, f in saved.items():
            setattr(M, n, f)
    t.update(timers)
    t["pivot"] = total - sum(timers.values())
    n = pred.where(F.col(S.RUN_ID) == ref.run_id).count()
    aucs = {(r["run_id"], r["task"]): r["auc"] for r in res}
    return {"seconds": t, "rows": n, "auc": aucs, "gauc": {(r["run_id"], r["task"]): r.get("gauc") for r in res}}


# ============================================================================================== reference side

def _midrank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata
    return rankdata(x, method="average")


def fast_delong(scores: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs and DeLong covariance of the k models' scores (k x n) for labels y (Sun & Xu 2014, midranks)."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.stack([_midrank(p) for p in pos])
    ty = np.stack([_midrank(q) for q in neg])
    tz = np.stack([_midrank(z) for z in np.concatenate([pos, neg], axis=1)])
    auc = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / 2.0 / n
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
    return auc, cov


def _gauc(users: np.ndarray, score: np.ndarray, y: np.ndarray) -> float:
    """Impression-weighted mean per-user AUC over the users with both classes (unknown users left out)."""
    import pandas as pd
    import schemas as S
    keep = users != S.UNKNOWN_USER
    df = pd.DataFrame({"u": users[keep], "s": score[keep], "y": y[keep]})
    df["r"] = df.groupby("u")["s"].rank(method="average")
    g = df.assign(rp=df["r"] * df["y"]).groupby("u").agg(n=("y", "size"), p=("y", "sum"), rp=("rp", "sum"))
    g = g[(g.p > 0) & (g.p < g.n)]
    auc = (g.rp - g.p * (g.p + 1) / 2) / (g.p * (g.n - g.p))
    return float((auc * g.n).sum() / g.n.sum())


def _ece(score: np.ndarray, truth: np.ndarray, bins: int = 20) -> float:
    ok = ~np.isnan(score) & ~np.isnan(truth)
    s, t = score[ok], truth[ok]
    edges = np.quantile(s, [i / bins for i in range(1, bins)])
    b = np.searchsorted(edges, s, side="left")
    n = np.bincount(b, minlength=bins)
    ss, st = np.bincount(b, s, bins), np.bincount(b, t, bins)
    nz = n > 0
    return float((np.abs(ss[nz] - st[nz])).sum() / len(s))


def reference_side(dataset: str, runs, ref, truth: str | None, rows: int | None, threads: int) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import torch

    import schemas as S
    from esmm.artifacts import load_export
    from esmm.batch import Batch
    from esmm.evaluate import OWN_CTR_METHODS
    from esmm.methods import REFERENCE_CTR, predict, scores
    torch.set_num_threads(threads)
    t = {}
    t0 = time.time()
    path = os.path.join(dataset, S.TEST)
    filters = None
    if rows:   # read the first N rows only (the N-th sample_id from that column, then a filter), as Spark does
        ids_only = np.sort(pq.read_table(path, columns=[S.SAMPLE_ID]).column(S.SAMPLE_ID).to_numpy())
        filters = [(S.SAMPLE_ID, "<=", int(ids_only[min(rows, len(ids_only)) - 1]))] if len(ids_only) else None
    tab = pq.read_table(path, columns=[S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS, S.USER_KEY],
                        filters=filters)
    tab = tab.sort_by(S.SAMPLE_ID)
    n = tab.num_rows
    width = len(tab.column(S.FEAT_IDS).chunk(0)[0]) if n else 0
    ids = pc.list_flatten(tab.column(S.FEAT_IDS)).to_numpy().astype(np.int64).reshape(n, width)
    wts = pc.list_flatten(tab.column(S.FEAT_WTS)).to_numpy().astype(np.float32).reshape(n, width)
    sid = tab.column(S.SAMPLE_ID).to_numpy()
    click = tab.column(S.CLICK).to_numpy().astype(np.int64)
    conv = tab.column(S.CONVERSION).to_numpy().astype(np.int64)
    users = tab.column(S.USER_KEY).to_numpy()
    would = true_cvr = None
    if truth:
        tt = pq.read_table(truth, columns=[S.SAMPLE_ID, S.WOULD_CONVERT, S.TRUE_CVR]).sort_by(S.SAMPLE_ID)
        tsid = tt.column(S.SAMPLE_ID).to_numpy()
        pos = np.searchsorted(tsid, sid)
        assert np.array_equal(tsid[pos], sid), "ground truth misses test rows"
        would = tt.column(S.WOULD_CONVERT).to_numpy()[pos].astype(np.int64)
        true_cvr = tt.column(S.TRUE_CVR).to_numpy()[pos].astype(np.float64)
    t["read"] = time.time() - t0

    t0 = time.time()
    nets = {r.run_id: load_export(r.export)[0] for r in runs}
    out = {r.run_id: {k: np.empty(n, np.float32) for k in ("ctr", "cvr", "ctcvr")} for r in runs}
    step = 65536
    with torch.inference_mode():
        for a in range(0, n, step):
            b = min(a + step, n)
            batch = Batch.from_numpy(ids[a:b], wts[a:b], np.zeros(b - a, np.float32), np.zeros(b - a, np.float32))
            ref_ctr = predict(REFERENCE_CTR, nets[ref.run_id], batch)[S.P_CTR]
            for r in runs:
                p = scores(r.method, predict(r.method, nets[r.run_id], batch), ref_ctr)
                for k, v in zip(("ctr", "cvr", "ctcvr"), p[:3]):
                    out[r.run_id][k][a:b] = v.numpy()
    t["forward"] = time.time() - t0

    from sklearn.metrics import roc_auc_score
    cvr_runs = [r.run_id for r in runs if r.method != "ctr"]
    ctr_runs = [r.run_id for r in runs if r.method in OWN_CTR_METHODS]
    tasks = [("ctr", None, click, "ctr", ctr_runs), ("cvr", click == 1, conv, "cvr", cvr_runs),
             ("ctcvr", None, click * conv, "ctcvr", cvr_runs)]
    if truth:
        tasks += [("cvr_entire", None, would, "cvr", cvr_runs), ("cvr_entire_clicked", click == 1, would, "cvr",
                                                                 cvr_runs)]
    aucs, gaucs, check = {}, {}, 0.0
    for k in ("delong", "logloss", "gauc", "ece"):
        t[k] = 0.0
    for task, cond, y, o, members in tasks:
        sel = slice(None) if cond is None else cond
        yy = y[sel]
        s = np.stack([out[m][o][sel].astype(np.float64) for m in members])
        t0 = time.time()
        auc, _ = fast_delong(s, yy)
        t["delong"] += time.time() - t0
        t0 = time.time()
        for m, a in zip(members, auc):   # the check, not counted: fast_delong's AUCs are scikit-learn's
            aucs[(m, task)] = float(roc_auc_score(yy, out[m][o][sel]))
            assert abs(aucs[(m, task)] - a) < 1e-9, (m, task, a, aucs[(m, task)])
        check += time.time() - t0
        t0 = time.time()
        for row in s:
            p = np.clip(row, 1e-7, 1 - 1e-7)
            _ = -(yy * np.log(p) + (1 - yy) * np.log(1 - p)).mean(), row.mean() / max(yy.mean(), 1e-12)
        t["logloss"] += time.time() - t0
        if task in ("ctr", "cvr", "ctcvr"):
            t0 = time.time()
            for m, row in zip(members, s):
                gaucs[(m, task)] = _gauc(users[sel], row, yy)
            t["gauc"] += time.time() - t0
    if truth:
        t0 = time.time()
        for m in cvr_runs:
            _ece(out[m]["cvr"].astype(np.float64), true_cvr)
        t["ece"] = time.time() - t0
    return {"seconds": t, "rows": n, "auc": aucs, "gauc": gaucs, "sklearn_check_s": check}


# ============================================================================================== main

STAGES = ("read", "scoring", "forward", "pivot", "delong", "logloss", "gauc", "ece")


def _compare(sp: dict, rf: dict, started: str, models: int) -> dict:
    common = set(sp["auc"]) & set(rf["auc"])
    d_auc = max(abs(sp["auc"][k] - rf["auc"][k]) for k in common)
    d_gauc = max((abs(sp["gauc"][k] - rf["gauc"][k]) for k in set(sp["gauc"]) & set(rf["gauc"])
                  if sp["gauc"][k] is not None), default=float("nan"))
    st, rt = sp["seconds"], rf["seconds"]
    s_total, r_total = sum(st.values()), sum(rt.values())
    lines = [f"started {started}; {sp['rows']:,} test rows (reference {rf['rows']:,}), {models} models, "
             f"{len(common)} (run, task) AUCs compared: largest |AUC spark - sklearn| = {d_auc:.1e}, "
             f"|GAUC spark - pandas| = {d_gauc:.1e} (the sklearn check itself, not counted: "
             f"{rf['sklearn_check_s']:.1f} s)",
             f"{'stage':<10} {'spark s':>9} {'reference s':>12}"]
    for k in STAGES:
        a = f"{st[k]:>9.1f}" if k in st else f"{'':>9}"
        b = f"{rt[k]:>12.1f}" if k in rt else f"{'':>12}"
        lines.append(f"{k:<10} {a} {b}")
    lines.append(f"{'total':<10} {s_total:>9.1f} {r_total:>12.1f}")
    lines.append(f"spark / reference = {s_total / r_total:.2f}x (goal <= 1.5x); scoring / (read + forward) = "
                 f"{st['scoring'] / (rt['read'] + rt['forward']):.2f}x; metrics / metrics = "
                 f"{(s_total - st['scoring']) / (r_total - rt['read'] - rt['forward']):.2f}x")
    return {"started": started, "rows": sp["rows"], "spark": st, "reference": rt, "spark_total": s_total,
            "reference_total": r_total, "max_auc_diff": d_auc, "max_gauc_diff": d_gauc, "text": "\n".join(lines)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--exp", required=True, help="experiment directory holding runs/<unit>/<run>/model.pt")
    p.add_argument("--unit", default="r0-rate1.0")
    p.add_argument("--truth", default=None, help="generator ground truth (ECE and the entire-space tasks)")
    p.add_argument("--rows", default="0", help="comma-separated sizes: the first N test rows (by sample_id) of the "
                                               "split, 0 = all of it (default); e.g. 500000,1000000,0")
    p.add_argument("--workdir", default="/tmp/esmm-bench-eval-ref")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the reference (default: 2 cores)")
    args = p.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    from esmm.config import load_config
    from esmm.spark import get_spark
    runs, ref = unit_runs(args.exp, args.unit)
    print(f"{len(runs)} runs of {args.unit}: {', '.join(r.run_id for r in runs)}", flush=True)
    cfg = load_config(os.path.join(ROOT, "conf", "demo.yaml"))
    spark = get_spark(cfg.spark, "bench-eval-reference")
    spark.sparkContext.setLogLevel("ERROR")
    results = []
    for rows in [int(x) for x in args.rows.split(",")]:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        sp = spark_side(spark, args.dataset, runs, ref, args.truth, args.workdir, rows or None)
        print("spark done", {k: round(v, 1) for k, v in sp["seconds"].items()}, flush=True)
        rf = reference_side(args.dataset, runs, ref, args.truth, rows or None, args.threads)
        print("reference done", {k: round(v, 1) for k, v in rf["seconds"].items()}, flush=True)
        results.append(_compare(sp, rf, started, len(runs)))
        print(results[-1]["text"], flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        line = (f"{b['rows']:,} / {a['rows']:,} rows ({b['rows'] / a['rows']:.1f}x) -> spark time "
                f"x{b['spark_total'] / a['spark_total']:.2f}, reference time x{b['reference_total'] / a['reference_total']:.2f}")
        print(line)
        results.append({"scaling": line})
    res = {"args": vars(args), "models": len(runs), "sizes": results}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    spark.stop()
    return res


if __name__ == "__main__":
    main()
