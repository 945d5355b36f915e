"""Batch prediction: score any data with a trained model, in Spark.

Input, one of:

- an ETL'd dataset (``dataset``): one split (``train``, ``test``) or ``all``, optionally only the nested subset of a
  sampling rate (``rate``, read by partition pruning);
- a raw Ali-CCP log (``raw``: a directory with ``sample_skeleton_{train,test}.csv`` and their
  ``common_features_*.csv``, either or both splits), parsed exactly as the ETL parses it (``etl.parser``,
  ``etl.max_line_bytes``) and encoded with the *model's* feature layout (the config stored in its export), so
  the ids index the buckets it was trained on. Bad lines are quarantined the ETL's way, with the same reasons,
  and the data-quality gate ``etl.max_quarantine_share`` applies (exit code 3).

Output directory ``out`` (written to ``<out>.tmp-XXXXXXXX`` and renamed into place, so it appears whole or not at all)::

    predictions/   Parquet: sample_id, split, p_ctr, p_cvr, p_ctcvr (one row per scored impression; ``split`` is the
                   dataset split or the raw file's, as sample ids of the real log's two files overlap)
    quarantine/    raw input only: schemas.dataset.QUARANTINE_SCHEMA rows (every rejected line, with why and where)
    predict.json   what was scored with what: model, inputs, rows read = scored + quarantined, seconds
    _ESMM_OUTPUT   ownership marker (kind "predict") with the identity of the model and the inputs
    _SUCCESS       written last

The probabilities follow the evaluation's combination rules (``esmm.methods.scores``): ESMM, ESMM-NS and the
successors (ESCM2, AITM, MMoE) give p_ctr and p_cvr themselves; a single-task CVR method (BASE, AMAN, OVERSAMPLING,
UNBIAS, DIVISION) takes p_ctr from the reference CTR network (``ctr``: required for them); p_ctcvr = p_ctr * p_cvr. Scoring is the evaluation's
own ``mapInArrow`` pass: each Python worker holds the model and the reference network (two models, whatever the
data size) and scores Arrow batches of ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows under
``torch.inference_mode``; nothing is collected to the driver.

Idempotent: a finished output of the same model and inputs is kept as it is (nothing recomputed); one of another
model or other inputs is refused unless ``overwrite`` (exit code 4); a foreign directory is always refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

import schemas as S
from esmm import storage
from esmm.config import Config, from_dict
from esmm.outputs import Output, OutputRefused, check_pinned

log = logging.getLogger(__name__)
KIND = "predict"
PREDICTIONS = "predictions"
SUMMARY = "predict.json"
SPLIT = "split"   # the dataset split (or the raw file's split) a row comes from: sample ids repeat across raw files
PREDICT_COLUMNS = (S.SAMPLE_ID, SPLIT, S.P_CTR, S.P_CVR, S.P_CTCVR)
SPLIT_CHOICES = (S.TRAIN, S.TEST, "all")


class PredictError(RuntimeError):
    """A prediction that cannot run as asked (missing model, layout mismatch, no input); exit code 1."""


class PredictOutputRefused(PredictError, OutputRefused):
    """The output exists and holds predictions of another model or other inputs; ``overwrite`` replaces it."""


@dataclasses.dataclass(frozen=True)
class Model:
    """A model export to score with: its run id (directory name), method, path and content hash."""
    run_id: str
    method: str
    path: str
    digest: str
    config: dict
    layout: dict

    @classmethod
    def load(cls, where: str) -> "Model":
        """``where``: a run directory holding ``model.pt``, or the export file itself."""
        from esmm.evaluate import _digest, _export_blob
        from esmm.artifacts import EXPORT
        path = storage.join(where, EXPORT) if storage.isdir(where) else storage.resolve(where)
        if not storage.isfile(path):
            raise PredictError(f"no model export at {storage.display(path)}: train that run first (jobs/train.py)")
        blob = _export_blob(path)
        run_dir = storage.parent(path)
        return cls(storage.basename(run_dir), blob["method"], path, _digest(path), blob["config"],
                   {k: list(blob["layout"][k]) for k in ("fields", "buckets", "max_len")})

    @property
    def scored(self):
        from esmm.evaluate import ScoredRun
        return ScoredRun(self.method, self.run_id, self.path)


def _needs_reference(method: str) -> bool:
    from esmm.methods import get_method
    return get_method(method).uses_reference_ctr


def _check_layouts(models: list[Model], layout: dict, what: str) -> None:
    for m in models:
        if m.layout != layout:
            diff = [k for k in layout if m.layout[k] != layout[k]]
            raise PredictError(f"model export {m.path} ({m.method}) was trained on another feature layout than {what}"
                               f" (differs in {', '.join(diff)}): its ids would index other buckets")


# ------------------------------------------------------------------------------------------------ inputs

def dataset_input(spark: SparkSession, dataset: str, split: str, rate: float | None) -> tuple[list, dict, dict]:
    """([(split, rows to score)], manifest, input identity) of an ETL'd dataset."""
    from esmm.data import tier_for_rate
    from esmm.outputs import dataset_fingerprint
    from esmm.artifacts import read_manifest
    if split not in SPLIT_CHOICES:
        raise PredictError(f"split must be one of {SPLIT_CHOICES}, got {split!r}")
    manifest = read_manifest(dataset)
    splits = S.SPLITS if split == "all" else (split,)
    frames = []
    for s in splits:
        path = storage.join(dataset, s)
        if not storage.exists(path):
            raise PredictError(f"the dataset {storage.display(dataset)} has no {s} split")
        df = spark.read.parquet(path)
        if rate is not None:
            df = df.where(F.col(S.SAMPLE_TIER) <= tier_for_rate(manifest, rate))
        frames.append((s, df.select(S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS)))
    identity = {"kind": "dataset", "dataset": dataset_fingerprint(manifest), "split": split, "rate": rate,
                "dataset_run_id": manifest["run_id"]}
    return frames, manifest, identity


# ------------------------------------------------------------------------------------------------ the job

def predict(spark: SparkSession, cfg: Config, model: str, out: str, *, ctr: str | None = None,
            dataset: str | None = None, split: str = S.TEST, rate: float | None = None, raw: str | None = None,
            overwrite: bool = False) -> dict:
    """Score ``dataset`` (or the raw log ``raw``) with the export of ``model`` (a run directory or ``model.pt``) and
    write ``out`` (module docstring); returns the summary (``predict.json``)."""
    from esmm.etl import QuarantineGateError
    if (dataset is None) == (raw is None):
        raise PredictError("give exactly one input: an ETL'd dataset or a raw Ali-CCP log directory")
    t0 = time.time()
    out = storage.resolve(out)
    storage.check_shared(spark, storage.parent(out))  # executors write the predictions
    dataset = storage.resolve(dataset) if dataset is not None else None
    raw = storage.resolve(raw) if raw is not None else None
    net = Model.load(model)
    ref = Model.load(ctr) if ctr else None
    if _needs_reference(net.method) and ref is None:
        raise PredictError(f"{net.method} predicts pCVR only: its pCTR comes from the reference CTR network "
                           f"(evaluation's rule); pass the reference CTR run (--ctr)")
    from esmm.methods import REFERENCE_CTR
    if ref is not None and ref.method != REFERENCE_CTR:
        raise PredictError(f"--ctr must be a reference CTR network's run, got a {ref.method!r} model ({ref.path})")
    models = [net] + ([ref] if ref and _needs_reference(net.method) else [])
    ref = models[1] if len(models) > 1 else None
    plan = None
    if dataset is not None:
        rows, manifest, source = dataset_input(spark, dataset, split, rate)
        _check_layouts(models, {k: list(manifest["layout"][k]) for k in ("fields", "buckets", "max_len")},
                       f"the dataset {storage.display(dataset)}")
    else:
        from esmm.features import FeatureLayout
        from esmm.etl import find_inputs
        inputs = find_inputs(spark, raw, need_train=False)
        # the model's features (so the encoding is the one it was trained on), this job's parser settings
        pcfg = dataclasses.replace(cfg, features=from_dict(net.config).features)
        lay = FeatureLayout.from_config(pcfg.features).to_dict()
        _check_layouts(models, {k: list(lay[k]) for k in ("fields", "buckets", "max_len")},
                       "its own stored config gives (the export is inconsistent)")
        source = {"kind": "raw", "path": raw, "inputs": inputs.fingerprint(spark), "parser": cfg.etl.parser,
                  "max_line_bytes": cfg.etl.max_line_bytes}
    identity = {"model": {"digest": net.digest}, "ctr": {"digest": ref.digest} if ref else None, "input": source}
    with Output(out, KIND, identity, "predict", overwrite, PredictOutputRefused) as o:
        if o.reusable:
            log.info("predictions %s are up to date (same model and inputs): nothing to do", storage.display(out))
            return storage.read_json(storage.join(out, SUMMARY))
        o.refuse_other_inputs("predictions")
        tmp = o.stage()
        try:
            if raw is not None:
                from esmm.etl import build_plan
                plan = build_plan(spark, pcfg, inputs)
                from esmm.etl import RAW_SPLIT
                rows = [(s, plan.dataset.where(F.col(RAW_SPLIT) == s)) for s in sorted(inputs.skeleton)]
            summary = _score_and_write(spark, cfg, rows, net, ref, tmp, int(sum(net.layout["max_len"])))
            summary.update({"model": {"run_id": net.run_id, "method": net.method, "path": net.path},
                            "ctr": {"run_id": ref.run_id, "path": ref.path} if ref else None, "input": source})
            if plan is not None:
                plan.quarantine.write.parquet(f"{tmp}/{S.QUARANTINE}")
                summary["rows"].update(_raw_accounting(spark, plan, summary["rows"]["scored"]))
            else:
                check_pinned(dataset, source["dataset_run_id"], "prediction")
            summary["seconds"] = round(time.time() - t0, 2)
            storage.write_json(storage.join(tmp, SUMMARY), summary)
            if plan is not None:
                _quarantine_gate(cfg, summary, tmp)
        except QuarantineGateError:
            o.keep_staging = True  # for inspection (the message names it); removed by the next run on this output
            raise
        finally:
            if plan is not None:
                plan.release()
        o.commit()
    log.info("predictions of %s (%s) -> %s: %s", net.run_id, net.method, storage.display(out),
             json.dumps(summary["rows"]))
    return summary


def _score_and_write(spark: SparkSession, cfg: Config, rows: list, net: Model, ref: Model | None, tmp: str,
                     width: int) -> dict:
    """Score ``rows`` ([(split, DataFrame)]) with one scoring pass each, written as one Parquet output."""
    from esmm.evaluate import _export_mode, _resolve, _score_pass, clip_counter
    cfg.evaluate.validate("evaluate")
    scored, refs = _resolve([net.scored], ref.scored if ref else None)
    group = [e for e in scored if e.run.run_id == net.run_id and e.digest == net.digest]
    clips = clip_counter(spark)
    out, broadcasts = None, []
    try:
        for split, df in rows:
            pred, bcs = _score_pass(spark, df, group, refs, width, cfg.evaluate.threads,
                                    _export_mode(spark, cfg.evaluate.exports), clips)
            broadcasts += bcs
            pred = pred.where(F.col(S.RUN_ID) == net.run_id).select(
                S.SAMPLE_ID, F.lit(split).alias(SPLIT), S.P_CTR, S.P_CVR, S.P_CTCVR)
            out = pred if out is None else out.unionByName(pred)
        out.write.parquet(f"{tmp}/{PREDICTIONS}")
    finally:
        for bc in broadcasts:
            bc.destroy()
    scored_rows = spark.read.parquet(f"{tmp}/{PREDICTIONS}").count()
    return {"rows": {"scored": int(scored_rows)}, "division_clipped": sum(clips.value.values())}


def _raw_accounting(spark: SparkSession, plan, scored: int) -> dict:
    """Rows read = rows scored + rows quarantined, for the skeleton lines (checked: nothing is lost)."""
    read = plan.rows.count()
    quarantined = plan.rows.where(F.col("reason").isNotNull()).count()
    common_read = plan.common.count()
    common_q = plan.common.where(F.col("reason").isNotNull()).count()
    if read != scored + quarantined:
        raise PredictError(f"rows read {read:,} != scored {scored:,} + quarantined {quarantined:,}: rows were lost")
    return {"skeleton_read": int(read), "skeleton_quarantined": int(quarantined), "common_read": int(common_read),
            "common_quarantined": int(common_q), "quarantined_share": quarantined / max(read, 1)}


def _quarantine_gate(cfg: Config, summary: dict, tmp: str) -> None:
    from esmm.etl import QuarantineGateError
    share = summary["rows"]["quarantined_share"]
    if share > cfg.etl.max_quarantine_share:
        raise QuarantineGateError(f"{share:.2%} of skeleton lines were quarantined (> etl.max_quarantine_share="
                                  f"{cfg.etl.max_quarantine_share:.2%}): inspect {tmp}/{S.QUARANTINE} "
                                  f"(predictions not committed)")


def summary_text(summary: dict) -> str:
    r = summary["rows"]
    line = f"{summary['model']['method']} ({summary['model']['run_id']}): scored {r['scored']:,} rows"
    if "skeleton_read" in r:
        line += (f" | rows read {r['skeleton_read']:,} = scored {r['scored']:,} + quarantined "
                 f"{r['skeleton_quarantined']:,}")
    return line + f" in {summary['seconds']:.1f}s"
