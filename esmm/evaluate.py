"""Scoring and metrics in Spark: trained exports -> a predictions table -> the paper's AUCs.

Scoring (``score_to_parquet``) runs in *passes*: the runs to score are split into groups of at most
``evaluate.models_per_pass`` models, and each pass is one ``mapInArrow`` job over the test split that scores its
group under ``torch.inference_mode`` and appends its rows to one staging directory, renamed into place once every
pass has finished (nothing is collected to the driver). Output rows (schemas.dataset.PREDICTION_SCHEMA), one per
test impression and run:

- ESMM, ESMM-NS: p_ctr, p_cvr from their own towers, p_ctcvr = p_ctr * p_cvr;
- the reference CTR network itself: p_ctr, and NaN p_cvr/p_ctcvr (it takes part in the CTR task only);
- every other method (paper protocol): p_ctr from the one reference CTR network, p_cvr from the method, and
  p_ctcvr = p_ctr * p_cvr; DIVISION's p_cvr = its pCTCVR network / reference pCTR, clipped to [0, 1] (clips counted).

Every row also carries the test row's ``user_key`` (for GAUC, ``esmm.metrics.gauc_wide``); a dataset written before
that column existed gives null keys, and the metrics then omit GAUC with a note.

Memory bound. Each Python worker keeps a cache of loaded models keyed by the export's content hash; at the start of
every task it evicts every model that is not part of the current pass, so a worker holds at most
``models_per_pass + 1`` models: the pass's group and the reference CTR network, which every pass keeps loaded for
the methods that need its pCTR (runs of several experiment units scored together: each unit's reference network
among the pass's runs, ``experiment.units_per_evaluation``). An executor runs one Python worker per task slot. How the exports reach the workers
(``evaluate.exports``):

- ``path``: each worker reads the export file itself (the driver passes its absolute path and content hash; a file
  that changed since the driver hashed it is an error). Nothing is shipped, the driver never holds model bytes.
  Needs the export paths to be readable by the executors under the same name: always true on a ``local[...]``
  master, and on a cluster whose run directories live on a shared filesystem.
- ``broadcast``: each pass broadcasts only its own exports (one broadcast per export, destroyed when the pass ends);
  a worker drops the bytes of an export as soon as the model is built. Works wherever the driver can read the exports.
- ``auto`` (default): ``path`` on a local master, else ``broadcast``.

At conf/default.yaml's bucket sizes an export is about 130 MB (ESMM-NS, with two embedding tables, about 260 MB), so
the default ``models_per_pass: 2`` bounds a worker at 3 models (~0.4-0.5 GB) instead of a whole unit's 14 (~1.9 GB:
CTR, BASE, 4 AMAN rates, 4 OVERSAMPLING factors, UNBIAS, DIVISION, ESMM-NS, ESMM).
The price of a smaller bound is more passes: each reads the test split and runs the reference network once more.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pyspark.accumulators import AccumulatorParam
from pyspark.sql import DataFrame, SparkSession

import schemas as S
from esmm import storage
from esmm.methods import METHODS, REFERENCE_CTR, get_method

log = logging.getLogger(__name__)
# the methods whose pCTR is their own (the reference CTR network included); the others' is the reference network's
OWN_CTR_METHODS = tuple(n for n, m in METHODS.items() if not m.uses_reference_ctr)
_MODEL_CACHE: dict = {}   # per Python worker: export content hash -> model; only the current pass's models are kept


class EvaluateError(RuntimeError):
    """Scoring cannot run as asked (missing export, method without the reference CTR network)."""


@dataclass(frozen=True)
class ScoredRun:
    """One trained model to score: its method, a label for the run, and the export path."""
    method: str
    run_id: str
    export: str


# ------------------------------------------------------------------------------------------------ worker side

def _fetch(digest: str, where) -> bytes:
    """The bytes of the export with content hash ``digest``: ``where`` is its path (read here, on the worker) or a
    broadcast of its bytes."""
    if isinstance(where, str):
        from esmm import storage
        data = storage.read_bytes(where)
        if hashlib.sha1(data).hexdigest() != digest:
            raise EvaluateError(f"model export {where} changed while it was being scored")
        return data
    data = where.value
    if getattr(where, "_path", None) is not None:
        # the worker's broadcast registry would keep the bytes until the pass ends; .value re-reads them if needed
        where.__dict__.pop("_value", None)
    return data


def _retain_models(keep) -> None:
    """Evict every cached model whose content hash is not in ``keep`` (the current pass's models). The cache holds
    the only reference and no network holds a reference cycle, so an evicted model's tensors are freed here, by
    reference counting (tests/test_evaluate.py checks this with the collector off, for every method). A full
    ``gc.collect()`` would cost about 0.1 s per task in a worker that imported torch, for nothing to collect."""
    for d in [d for d in _MODEL_CACHE if d not in keep]:
        del _MODEL_CACHE[d]


def _load_models(sources: dict) -> dict:
    """{digest: model} for ``sources`` ({digest: path or broadcast}). The worker's cache first drops every other
    model, so it never holds more than ``len(sources)`` of them, then loads the missing ones, one at a time."""
    import io

    import torch

    from esmm.artifacts import load_export_blob
    _retain_models(sources)
    for digest, where in sources.items():
        if digest not in _MODEL_CACHE:
            blob = torch.load(io.BytesIO(_fetch(digest, where)), map_location="cpu", weights_only=True)
            _MODEL_CACHE[digest] = load_export_blob(blob)
            del blob
    return {d: _MODEL_CACHE[d] for d in sources}


def _list_to_numpy(arr: pa.Array, width: int, dtype) -> np.ndarray:
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(values.reshape(len(arr), width), dtype=dtype)


def _repeat(text: str, n: int) -> pa.Array:
    return pa.repeat(pa.scalar(text, pa.string()), n)


def _score_fn(group: dict, sources: dict, width: int, threads: int, clip_acc):
    """mapInArrow function of one pass: rows for every run of ``group`` ({run_id: (method, digest, digest of the
    run's reference CTR network or None)}); ``sources`` ({digest: path or broadcast}) covers the group and the
    references it names. Each reference network runs once per batch, whatever the number of runs reading it."""

    def score_batches(batches):
        import torch

        from esmm.batch import Batch
        from esmm.methods import predict, scores
        torch.set_num_threads(threads)
        nets = _load_models(sources)
        for rb in batches:
            n = rb.num_rows
            if n == 0:
                continue
            cols = {name: rb.column(i) for i, name in enumerate(rb.schema.names)}
            batch = Batch.from_numpy(_list_to_numpy(cols[S.FEAT_IDS], width, np.int64),
                                     _list_to_numpy(cols[S.FEAT_WTS], width, np.float32),
                                     np.zeros(n, np.float32), np.zeros(n, np.float32))
            with torch.inference_mode():
                ref_ctr: dict = {}
                for run_id, (method, digest, ref_digest) in group.items():
                    if get_method(method).uses_reference_ctr and ref_digest not in ref_ctr:
                        ref_ctr[ref_digest] = predict(REFERENCE_CTR, nets[ref_digest], batch)[S.P_CTR]
                    p_ctr, p_cvr, p_ctcvr, clipped = scores(method, predict(method, nets[digest], batch),
                                                            ref_ctr.get(ref_digest))
                    if clipped and get_method(method).uses_reference_ctr:  # DIVISION's (AITM clips its own)
                        clip_acc.add({run_id: clipped})
                    yield pa.RecordBatch.from_arrays(
                        [cols[S.SAMPLE_ID], cols[S.CLICK], cols[S.CONVERSION],
                         pa.array(p_ctr.numpy().astype(np.float32)), pa.array(p_cvr.numpy().astype(np.float32)),
                         pa.array(p_ctcvr.numpy().astype(np.float32)),
                         _repeat(method, n), _repeat(run_id, n), cols[S.USER_KEY].cast(pa.int64())],
                        schema=_PRED_ARROW)
    return score_batches


class _CountsByRun(AccumulatorParam):
    """Accumulator of {run_id: count} (DIVISION's clipped pCVRs per run)."""

    def zero(self, value):
        return {}

    def addInPlace(self, a, b):
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


def clip_counter(spark: SparkSession):
    """The accumulator ``_score_pass`` counts DIVISION's clipped pCVRs into, per run id."""
    return spark.sparkContext.accumulator({}, _CountsByRun())


_PRED_ARROW = pa.schema([(S.SAMPLE_ID, pa.int64()), (S.CLICK, pa.int32()), (S.CONVERSION, pa.int32()),
                         (S.P_CTR, pa.float32()), (S.P_CVR, pa.float32()), (S.P_CTCVR, pa.float32()),
                         (S.METHOD, pa.string()), (S.RUN_ID, pa.string()), (S.USER_KEY, pa.int64())])


# ------------------------------------------------------------------------------------------------ driver side

def _digest(path: str) -> str:
    return hashlib.sha1(storage.read_bytes(path)).hexdigest()


def _export_blob(path: str) -> dict:
    """An export's dict without reading its tensors into memory where the file is local (memory-mapped)."""
    import torch
    local = storage.local_path(path)
    if local is not None:
        return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    return storage.load_torch(path)


@dataclass(frozen=True)
class _Export:
    run: ScoredRun
    path: str      # absolute
    digest: str


def _resolve(runs: list[ScoredRun], reference_ctr) -> tuple[list[_Export], dict]:
    """Check the exports and hash them; returns (every run to write rows for, {run_id: its reference's _Export} for
    the runs that score CTR with one). ``reference_ctr``: one ``ScoredRun`` for every run, or ``{run_id:
    ScoredRun}`` (the runs of several experiment units, each unit with its own reference network), or None. The
    reference CTR networks get rows too (once each, also when not among ``runs``); a run_id names one export."""
    refs_of = dict(reference_ctr) if isinstance(reference_ctr, dict) else \
        {r.run_id: reference_ctr for r in runs if reference_ctr is not None}
    needs_ref = [r.run_id for r in runs if get_method(r.method).uses_reference_ctr and refs_of.get(r.run_id) is None]
    if needs_ref:
        raise EvaluateError(f"runs {needs_ref} need the reference CTR network's export (paper protocol)")
    out: dict[str, _Export] = {}
    for r in runs + list(dict.fromkeys(x for x in refs_of.values() if x is not None)):
        if not storage.isfile(r.export):
            raise EvaluateError(f"no model export for {r.run_id} at {storage.display(r.export)}: train it first")
        e = _Export(r, storage.resolve(r.export), _digest(r.export))
        if r.run_id in out and out[r.run_id].digest != e.digest:
            raise EvaluateError(f"run id {r.run_id!r} names two different exports: {out[r.run_id].path}, {e.path}")
        out.setdefault(r.run_id, e)
    refs = {run_id: out[ref.run_id] for run_id, ref in refs_of.items()
            if ref is not None and run_id in out and get_method(out[run_id].run.method).uses_reference_ctr}
    return list(out.values()), refs


def plan_passes(n: int, models_per_pass: int) -> list[range]:
    """Index ranges of the ``n`` runs scored together: groups of at most ``models_per_pass``, in order."""
    if models_per_pass < 1:
        raise EvaluateError(f"models_per_pass must be >= 1, got {models_per_pass}")
    return [range(i, min(i + models_per_pass, n)) for i in range(0, n, models_per_pass)]


def _export_mode(spark: SparkSession, exports: str) -> str:
    from esmm.config import EXPORT_MODES
    if exports not in EXPORT_MODES:
        raise EvaluateError(f"evaluate.exports must be one of {EXPORT_MODES}, got {exports!r}")
    if exports == "auto":
        return "path" if spark.sparkContext.master.startswith("local") else "broadcast"
    return exports


def _score_pass(spark: SparkSession, test: DataFrame, group: list[_Export], refs: dict, width: int,
                threads: int, mode: str, clips) -> tuple[DataFrame, list]:
    """Lazy predictions of one pass and the broadcasts it uses (to destroy once it is written); ``refs``: {run_id:
    reference _Export} of the runs that need one."""
    wanted = {e.digest: e for e in group + [refs[e.run.run_id] for e in group if e.run.run_id in refs]}
    broadcasts = []
    if mode == "path":
        sources = {d: e.path for d, e in wanted.items()}
    else:
        sources = {}
        try:
            for d, e in wanted.items():
                data = storage.read_bytes(e.path)
                if hashlib.sha1(data).hexdigest() != d:
                    raise EvaluateError(f"model export {e.path} changed while it was being scored")
                sources[d] = spark.sparkContext.broadcast(data)
                broadcasts.append(sources[d])
                del data
        except BaseException:
            for bc in broadcasts:
                bc.destroy()
            raise
    fn = _score_fn({e.run.run_id: (e.run.method, e.digest, refs[e.run.run_id].digest if e.run.run_id in refs
                                   else None) for e in group}, sources, width, threads, clips)
    cols = test.select(S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS, _user_key(test))
    return cols.mapInArrow(fn, S.PREDICTION_SCHEMA), broadcasts


def _user_key(test: DataFrame):
    """The test rows' user_key column, or nulls for a dataset written before it existed (no GAUC then)."""
    from pyspark.sql import functions as F
    if S.USER_KEY in test.columns:
        return F.col(S.USER_KEY)
    return F.lit(None).cast("long").alias(S.USER_KEY)


def score(spark: SparkSession, test: DataFrame, runs: list[ScoredRun], reference_ctr: ScoredRun | dict | None,
          width: int, threads: int = 1, exports: str = "auto") -> tuple[DataFrame, object]:
    """Lazy predictions DataFrame for ``runs`` over ``test`` in ONE pass (every model at once: no memory bound; use
    ``score_to_parquet`` for that); returns (df, accumulator of DIVISION clips per run id). With ``exports="broadcast"`` the
    broadcasts live as long as the session."""
    scored, refs = _resolve(runs, reference_ctr)
    clips = clip_counter(spark)
    df, _ = _score_pass(spark, test, scored, refs, width, threads, _export_mode(spark, exports), clips)
    return df, clips


def score_to_parquet(spark: SparkSession, dataset: str, runs: list[ScoredRun], reference_ctr: ScoredRun | dict | None,
                     out: str, width: int, threads: int = 1, evaluate=None) -> dict:
    """Score the test split and commit the predictions at ``out`` (a sub-output whose parent's lock the caller
    holds); returns {division_clipped, clipped_by_run, passes, trained_on_other_dataset, dataset_run_id}.

    The runs (and the reference CTR network's own rows) are scored ``evaluate.models_per_pass`` at a time
    (``evaluate``: an ``EvaluateConfig``; None = its defaults); every pass appends to one staging directory, which
    replaces ``out`` only when all passes have succeeded (``esmm.outputs.Output``)."""
    from esmm.config import EvaluateConfig
    ev = evaluate if evaluate is not None else EvaluateConfig()
    ev.validate("evaluate")
    from esmm.artifacts import read_manifest
    from esmm.outputs import Output, check_pinned
    scored, refs = _resolve(runs, reference_ctr)
    if not scored:
        raise EvaluateError("no runs to score")
    manifest = read_manifest(dataset)
    other = check_exports(scored, manifest)   # the references are among the scored exports
    mode = _export_mode(spark, ev.exports)
    passes = plan_passes(len(scored), ev.models_per_pass)
    test = spark.read.parquet(storage.join(dataset, S.TEST))
    if S.USER_KEY not in test.columns:
        log.warning("GAUC will be omitted: %s has no %s column (written before user keys; re-run the ETL with "
                    "--overwrite to get them)", storage.display(dataset), S.USER_KEY)
    clips = clip_counter(spark)
    inputs = {"runs": {e.run.run_id: e.digest for e in scored}, "dataset_run_id": manifest["run_id"]}
    with Output(out, "predictions", inputs, "predictions", overwrite=True, lock=False) as o:
        tmp = o.stage()
        for i, idx in enumerate(passes):
            group = [scored[j] for j in idx]
            log.info("scoring pass %d/%d (%s exports): %s", i + 1, len(passes), mode,
                     ", ".join(e.run.run_id for e in group))
            df, broadcasts = _score_pass(spark, test, group, refs, width, threads, mode, clips)
            try:
                df.write.mode("append").parquet(tmp)
            finally:
                for bc in broadcasts:
                    bc.destroy()
        check_pinned(dataset, manifest["run_id"], "scoring")
        o.commit()
    return {"division_clipped": sum(clips.value.values()), "clipped_by_run": dict(clips.value), "passes": len(passes),
            "trained_on_other_dataset": list(other), "dataset_run_id": manifest["run_id"]}


def check_exports(exports: list, manifest: dict) -> dict:
    """Refuse exports whose feature layout is not the dataset's (their ids would index other hash buckets);
    returns {run_id: True} for exports trained on another build of the dataset (same layout: scoring is valid,
    but the caller should know). Reads only the exports' metadata (memory-mapped load)."""
    from esmm.outputs import dataset_fingerprint
    lay = manifest["layout"]
    want = {k: list(lay[k]) for k in ("fields", "buckets", "max_len")}
    other = {}
    for e in exports:
        blob = _export_blob(e.path)
        got = {k: list(blob["layout"][k]) for k in ("fields", "buckets", "max_len")}
        if got != want:
            diff = [k for k in want if got[k] != want[k]]
            raise EvaluateError(f"model export {e.path} ({e.run.run_id}) was trained on another feature layout than "
                                f"the dataset's (differs in {', '.join(diff)}): its ids would index other buckets; "
                                f"retrain it on this dataset or score it on the dataset it was trained on")
        fp = blob.get("dataset_fingerprint")
        if fp is not None and fp != dataset_fingerprint(manifest):
            other[e.run.run_id] = True
            log.warning("%s (%s) was trained on another build of this dataset (same layout)", e.run.run_id, e.path)
    return other


def evaluate_runs(spark: SparkSession, dataset: str, run_dirs: list[str], ctr_dir: str | None, out: str,
                  truth_path: str | None = None, threads: int = 1, evaluate=None, overwrite: bool = False) -> dict:
    """Score ``run_dirs`` (each holding a ``model.pt``) on the test split, commit predictions and ``metrics.json``
    under ``out`` and return {"metrics": rows per run/task, "delong": {task: DeLong record}, "division_clipped": n,
    "predictions": path} (``metrics.protocol_metrics``). ``evaluate``: an ``EvaluateConfig`` (models per pass, how
    exports reach the executors); None = its defaults.

    ``out`` is an evaluation output (``esmm.outputs.Output``): staged and committed; a committed evaluation of the
    same exports, dataset, ground truth and evaluate config is returned as it is; one of other inputs is replaced
    (an evaluation is derived data: it follows its runs), a foreign directory refused. Run ids are the run
    directories' names, lengthened by parent names where two would collide (``unique_run_ids``)."""
    from esmm.artifacts import EXPORT, read_manifest
    from esmm.config import to_dict
    from esmm.outputs import Output, read_commit

    ids = unique_run_ids(run_dirs + ([ctr_dir] if ctr_dir else []))
    storage.check_shared(spark, storage.parent(out))  # executors write the predictions

    def spec(d: str) -> ScoredRun:
        path = storage.join(d, EXPORT)
        if not storage.isfile(path):
            raise EvaluateError(f"no model export at {storage.display(path)}: train that run first")
        return ScoredRun(_export_blob(path)["method"], ids[storage.resolve(d)], path)

    runs = [spec(d) for d in run_dirs]
    ref = spec(ctr_dir) if ctr_dir else next((r for r in runs if r.method == REFERENCE_CTR), None)
    manifest = read_manifest(dataset)
    truth = storage.resolve(truth_path) if truth_path and storage.exists(truth_path) else None
    inputs = {"exports": {r.run_id: _digest(r.export) for r in runs + ([ref] if ref else [])},
              "dataset_run_id": manifest["run_id"], "evaluate": to_dict(evaluate) if evaluate is not None else None,
              "truth": (read_commit(storage.parent(truth), verify=False) or {}).get("run_id", truth) if truth else None}
    with Output(out, "evaluation", inputs, "evaluate", overwrite=overwrite) as o:
        if o.reusable:  # other inputs are not refused: an evaluation is derived data, replaced by the new one
            log.info("%s holds the evaluation of the same exports and dataset: reusing it", storage.display(out))
            return storage.read_json(storage.join(out, "metrics.json"))
        tmp = o.stage()
        result = _evaluate_into(spark, dataset, runs, ref, tmp, manifest["layout"]["num_slots"], truth, threads,
                                evaluate)
        result["predictions"] = storage.join(out, "predictions")
        storage.write_json(storage.join(tmp, "metrics.json"), result)
        o.commit()
    return result


def unique_run_ids(run_dirs: list[str]) -> dict:
    """{absolute run dir: run id}: the directory's name, lengthened by parent names (``r0-rate1.0/esmm``) until no
    two different directories share one, so runs of different units never collide in one predictions table."""
    dirs = list(dict.fromkeys(storage.resolve(d) for d in run_dirs))
    parts = {d: d.split("://", 1)[1].strip("/").split("/") for d in dirs}
    depth = {d: 1 for d in dirs}
    while True:
        ids = {d: "/".join(parts[d][-depth[d]:]) for d in dirs}
        seen: dict = {}
        for d, i in ids.items():
            seen.setdefault(i, []).append(d)
        clashes = [ds for ds in seen.values() if len(ds) > 1]
        if not clashes:
            return ids
        for ds in clashes:
            for d in ds:
                depth[d] += 1


def _evaluate_into(spark, dataset, runs, ref, tmp, width, truth_path, threads, evaluate) -> dict:
    from esmm.metrics import protocol_metrics
    from esmm.report import delong_record
    pred_path = storage.join(tmp, "predictions")
    info = score_to_parquet(spark, dataset, runs, ref, pred_path, width, threads, evaluate)
    pred = spark.read.parquet(pred_path)
    truth = spark.read.parquet(truth_path) if truth_path else None
    rows, dl, aliases = protocol_metrics(pred, truth, {r.run_id: r.method for r in runs + ([ref] if ref else [])},
                                         own_ctr=OWN_CTR_METHODS)
    return {"metrics": rows, "delong": {t: delong_record(r, aliases.get(t)) for t, r in dl.items()},
            "division_clipped": info["division_clipped"], "dataset_run_id": info["dataset_run_id"],
            "trained_on_other_dataset": sorted(info["trained_on_other_dataset"])}
