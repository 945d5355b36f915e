"""Scoring and metrics in Spark: trained exports -> a predictions table -> the paper's AUCs.

Scoring (``score``): the model exports travel to the executors once, as a broadcast of their bytes; each Python
worker loads them once (cached by content hash) and scores Arrow record batches in ``mapInArrow`` under
``torch.inference_mode`` — nothing is collected to the driver. Output rows (schemas.dataset.PREDICTION_SCHEMA),
one per test impression and method:

- ESMM, ESMM-NS: p_ctr, p_cvr from their own towers, p_ctcvr = p_ctr * p_cvr;
- the reference CTR network itself: p_ctr, and NaN p_cvr/p_ctcvr (it takes part in the CTR task only);
- every other method (paper protocol): p_ctr from the one reference CTR network, p_cvr from the method, and
  p_ctcvr = p_ctr * p_cvr; DIVISION's p_cvr = its pCTCVR network / reference pCTR, clipped to [0, 1] (clips counted).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import schemas as S

log = logging.getLogger(__name__)
OWN_CTR_METHODS = ("esmm", "esmm_ns")
_MODEL_CACHE: dict = {}


class EvaluateError(RuntimeError):
    """Scoring cannot run as asked (missing export, method without the reference CTR network)."""


@dataclass(frozen=True)
class ScoredRun:
    """One trained model to score: its method, a label for the run, and the export path."""
    method: str
    run_id: str
    export: str


def _load_models(blobs: dict) -> dict:
    """{run_id: (method, model)} from export bytes, cached per Python worker by content hash."""
    import io

    import torch

    from esmm.train import load_export_blob
    out = {}
    for run_id, (method, data, digest) in blobs.items():
        if digest not in _MODEL_CACHE:
            _MODEL_CACHE[digest] = load_export_blob(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
        out[run_id] = (method, _MODEL_CACHE[digest])
    return out


def _list_to_numpy(arr: pa.Array, width: int, dtype) -> np.ndarray:
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(arr), width), dtype=dtype)


def _repeat(text: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(text, pa.string()), n)


def _score_fn(blobs_bc, ref_run: str | None, width: int, threads: int, clip_acc):
    def score_batches(batches):
        import torch

        from esmm.batch import Batch
        from esmm.methods import division_cvr, predict
        torch.set_num_threads(threads)
        models = _load_models(blobs_bc.value)
        for rb in batches:
            n = rb.num_rows
            if n == 0:
                continue
            cols = {name: rb.column(i) for i, name in enumerate(rb.schema.names)}
            batch = Batch.from_numpy(_list_to_numpy(cols[S.FEAT_IDS], width, np.int64),
                                     _list_to_numpy(cols[S.FEAT_WTS], width, np.float32),
                                     np.zeros(n, np.float32), np.zeros(n, np.float32))
            with torch.inference_mode():
                ref_ctr = predict("ctr", models[ref_run][1], batch)[S.P_CTR] if ref_run else None
                for run_id, (method, model) in models.items():
                    out = predict(method, model, batch)
                    if method == "ctr":  # the reference network itself: CTR only, no CVR (NaN)
                        p_ctr = out[S.P_CTR]
                        p_cvr = torch.full_like(p_ctr, float("nan"))
                    elif method in OWN_CTR_METHODS:
                        p_ctr, p_cvr = out[S.P_CTR], out[S.P_CVR]
                    elif method == "division":
                        p_ctr = ref_ctr
                        p_cvr, clipped = division_cvr(out[S.P_CTCVR], ref_ctr)
                        clip_acc.add(clipped)
                    else:
                        p_ctr, p_cvr = ref_ctr, out[S.P_CVR]
                    yield pa.RecordBatch.from_arrays(
                        [cols[S.SAMPLE_ID], cols[S.CLICK], cols[S.CONVERSION],
                         pa.array(p_ctr.numpy().astype(np.float32)), pa.array(p_cvr.numpy().astype(np.float32)),
                         pa.array((p_ctr * p_cvr).numpy().astype(np.float32)),
                         _repeat(method, n), _repeat(run_id, n)],
                        schema=_PRED_ARROW)
    return score_batches


_PRED_ARROW = pa.schema([(S.SAMPLE_ID, pa.int64()), (S.CLICK, pa.int32()), (S.CONVERSION, pa.int32()),
                         (S.P_CTR, pa.float32()), (S.P_CVR, pa.float32()), (S.P_CTCVR, pa.float32()),
                         (S.METHOD, pa.string()), (S.RUN_ID, pa.string())])


def score(spark: SparkSession, test: DataFrame, runs: list[ScoredRun], reference_ctr: ScoredRun | None,
          width: int, threads: int = 1) -> tuple[DataFrame, object]:
    """Lazy predictions DataFrame for ``runs`` over ``test``; returns (df, accumulator of DIVISION clips)."""
    needs_ref = [r.method for r in runs if r.method not in OWN_CTR_METHODS + ("ctr",)]
    if needs_ref and reference_ctr is None:
        raise EvaluateError(f"methods {needs_ref} need the reference CTR network's export (paper protocol)")
    blobs = {}
    for r in runs + ([reference_ctr] if reference_ctr else []):
        if not os.path.exists(r.export):
            raise EvaluateError(f"no model export for {r.run_id} at {r.export}: train it first")
        data = open(r.export, "rb").read()
        blobs[r.run_id] = (r.method, data, hashlib.sha1(data).hexdigest())
    bc = spark.sparkContext.broadcast(blobs)
    clips = spark.sparkContext.accumulator(0)
    fn = _score_fn(bc, reference_ctr.run_id if reference_ctr else None, width, threads, clips)
    cols = test.select(S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS)
    return cols.mapInArrow(fn, S.PREDICTION_SCHEMA), clips


def score_to_parquet(spark: SparkSession, dataset: str, runs: list[ScoredRun], reference_ctr: ScoredRun | None,
                     out: str, width: int, threads: int = 1) -> dict:
    """Score the test split and write predictions to ``out`` atomically; returns {rows, division_clipped}."""
    import shutil
    import uuid
    test = spark.read.parquet(os.path.join(dataset, S.TEST))
    df, clips = score(spark, test, runs, reference_ctr, width, threads)
    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    df.write.parquet(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return {"division_clipped": int(clips.value)}


def evaluate_runs(spark: SparkSession, dataset: str, run_dirs: list[str], ctr_dir: str | None, out: str,
                  truth_path: str | None = None, threads: int = 1) -> dict:
    """Score ``run_dirs`` (each holding a ``model.pt``) on the test split, write predictions under ``out`` and
    return {"metrics": rows per run/task, "division_clipped": n, "predictions": path}."""
    import json

    import torch

    from esmm.metrics import entire_space_cvr_metrics, task_metrics
    from esmm.train import EXPORT, read_manifest

    def spec(d: str) -> ScoredRun:
        path = os.path.join(d, EXPORT)
        if not os.path.exists(path):
            raise EvaluateError(f"no model export at {path}: train that run first")
        method = torch.load(path, map_location="cpu", weights_only=True)["method"]
        return ScoredRun(method, os.path.basename(os.path.normpath(d)), path)

    runs = [spec(d) for d in run_dirs]
    ref = spec(ctr_dir) if ctr_dir else next((r for r in runs if r.method == "ctr"), None)
    width = read_manifest(dataset)["layout"]["num_slots"]
    pred_path = os.path.join(out, "predictions")
    info = score_to_parquet(spark, dataset, runs, ref, pred_path, width, threads)
    pred = spark.read.parquet(pred_path)
    rows = task_metrics(pred, group_cols=(S.RUN_ID,), on_one_class="nan")
    if truth_path and os.path.exists(truth_path):
        rows += entire_space_cvr_metrics(pred, spark.read.parquet(truth_path), group_cols=(S.RUN_ID,),
                                         on_one_class="nan")
    result = {"metrics": rows, "division_clipped": info["division_clipped"], "predictions": pred_path}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    return result
