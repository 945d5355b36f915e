"""Exact, distributed evaluation metrics: global ROC AUC, log-loss and calibration, and the paper's task protocol.

AUC (Mann-Whitney form)::

    AUC = sum over positive/negative pairs of [s_pos > s_neg] + 1/2 [s_pos == s_neg]  /  (P * N)
        = sum_s pos_s * (neg_below_s + neg_s / 2)  /  (P * N)

where ``pos_s``/``neg_s`` count the positives/negatives with score exactly ``s`` and ``neg_below_s`` counts negatives
with a strictly smaller score. Pairs tied on the score count 1/2, the same convention as sklearn's ``roc_auc_score``.

Distributed computation (no binning, no single-partition window, no rows collected):

1. aggregate to one row per distinct ``(group, score)`` with its ``(pos, neg)`` counts;
2. ``repartitionByRange`` on ``(group, score)`` + ``sortWithinPartitions``: every distinct key lives in exactly one
   partition, and within a group the partitions hold disjoint, ordered score ranges;
3. a ``mapInArrow`` pass (numpy cumulative sums, one Python step per group segment, none per row) emits, per
   (partition, group), the partition's first score, the *local* doubled numerator
   ``sum_s pos_s * (2 * neg_below_within_partition + neg_s)``, and the partition's P and N;
4. the driver orders a group's partitions by first score and adds ``2 * neg_before_partition * pos_in_partition``.

Step 4 restores exactly the negatives the local sums missed (all of them lie in earlier partitions, because the
score ranges are disjoint and keys are distinct), so the result equals the pairwise definition. Numerators are doubled
so every quantity is an integer: per-batch sums use int64 (object ints if int64 could overflow), partition totals
travel as ``decimal(38,0)`` and the driver combines Python ints, so the only rounding is the final division.

Log-loss clips probabilities to ``[1e-7, 1 - 1e-7]``; calibration is mean prediction / observed positive rate.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from decimal import Decimal

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DecimalType, DoubleType, LongType, StructField, StructType

from schemas.dataset import (CLICK, CONVERSION, METHOD, P_CTCVR, P_CTR, P_CVR, SAMPLE_ID, TRUE_CTR, TRUE_CVR,
                             WOULD_CONVERT)

log = logging.getLogger(__name__)

EPS = 1e-7
TASK = "task"
# Internal column names (prefixed so they do not collide with the caller's group columns).
_S, _Y, _POS, _NEG, _BAD = "__m_score", "__m_label", "__m_pos", "__m_neg", "__m_bad_label"
_FIRST, _NUM2, _BAD_S = "__m_first_score", "__m_twice_num", "__m_bad_score"
_SUMMARY_FIELDS = [StructField(_FIRST, DoubleType()), StructField(_NUM2, DecimalType(38, 0)),
                   StructField(_POS, LongType()), StructField(_NEG, LongType()),
                   StructField(_BAD, LongType()), StructField(_BAD_S, LongType())]


class MetricError(ValueError):
    """A metric is undefined for the given data (one class only, null scores, labels outside {0, 1})."""


# ---------------------------------------------------------------------------------------------------------------- AUC

def auc(df: DataFrame, score_col: str, label_col: str, group_cols=(), *, on_one_class: str = "raise",
        num_partitions: int | None = None) -> dict[tuple, float]:
    """Exact tie-aware ROC AUC of ``score_col`` (float or double) against ``label_col`` (0/1) for each group.

    Returns ``{group_values_tuple: auc}`` (the key is ``()`` without groups). A group with a single class raises
    ``MetricError``, or maps to NaN (reason logged) when ``on_one_class="nan"``. Null/NaN scores and labels outside
    {0, 1} always raise. ``num_partitions`` is the range-partition count (default: ``spark.sql.shuffle.partitions``).
    Scores are compared as doubles (float32 widens exactly, so its ties are kept). Groups are meant to be few
    (method, run, task): the executor pass does one Python step per group segment.
    """
    if on_one_class not in ("raise", "nan"):
        raise ValueError(f"on_one_class must be 'raise' or 'nan', got {on_one_class!r}")
    group_cols = tuple(group_cols)
    counts = _score_label_counts(df, score_col, label_col, group_cols)
    summaries = _partition_summaries(counts, group_cols, num_partitions)
    by_group = defaultdict(list)
    for row in summaries:
        by_group[tuple(row[g] for g in group_cols)].append(row)
    return {key: _combine_group(key, parts, group_cols, score_col, label_col, on_one_class)
            for key, parts in by_group.items()}


def global_auc(df: DataFrame, score_col: str, label_col: str, **kwargs) -> float:
    """One AUC over all rows of ``df`` (the paper's protocol); see ``auc`` for the keyword arguments."""
    result = auc(df, score_col, label_col, (), **kwargs)
    if not result:
        raise MetricError(f"AUC of {score_col} vs {label_col}: the DataFrame has no rows")
    return result[()]


def _score_label_counts(df: DataFrame, score_col: str, label_col: str, group_cols: tuple) -> DataFrame:
    """One row per distinct (group, score): positives, negatives and rows whose label is not 0/1 (null included)."""
    y = F.col(_Y)
    pos = F.sum(F.when(y == 1, 1).otherwise(0)).cast("long")
    neg = F.sum(F.when(y == 0, 1).otherwise(0)).cast("long")
    return (df.select(*[F.col(g) for g in group_cols], F.col(score_col).cast("double").alias(_S),
                      F.col(label_col).alias(_Y))
            .groupBy(*group_cols, _S)
            .agg(pos.alias(_POS), neg.alias(_NEG), (F.count(F.lit(1)) - pos - neg).alias(_BAD)))


def _partition_summaries(counts: DataFrame, group_cols: tuple, num_partitions: int | None) -> list:
    """Range-partition the (group, score) counts and collect one summary row per (partition, group)."""
    keys = [*group_cols, _S]
    n = num_partitions or int(counts.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    out_schema = StructType([counts.schema[g] for g in group_cols] + _SUMMARY_FIELDS)
    ranged = counts.repartitionByRange(n, *keys).sortWithinPartitions(*keys)
    return ranged.mapInArrow(_make_summarizer(list(group_cols)), out_schema).collect()


def _make_summarizer(group_cols: list):
    """The executor-side function for ``mapInArrow``; self-contained so executors need not import this package."""

    def segment_starts(batch):
        import numpy as np
        import pyarrow.compute as pc
        n = batch.num_rows
        new = np.zeros(n, dtype=bool)
        new[0] = True
        for g in group_cols:  # a row starts a segment when any group value differs from the previous row's
            a, b = batch.column(g).slice(1), batch.column(g).slice(0, n - 1)
            diff = pc.or_(pc.fill_null(pc.not_equal(a, b), False), pc.not_equal(pc.is_null(a), pc.is_null(b)))
            new[1:] |= diff.to_numpy(zero_copy_only=False)
        return np.flatnonzero(new)

    def batch_segments(batch):
        """Per segment of one sorted batch: (start, first valid score, local doubled numerator, P, N, bad, bad_s)."""
        import numpy as np
        starts = segment_starts(batch)
        score = batch.column(_S).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
        pos, neg, bad = (batch.column(c).to_numpy(zero_copy_only=False).astype(np.int64) for c in (_POS, _NEG, _BAD))
        valid = ~np.isnan(score)
        p, q = np.where(valid, pos, 0), np.where(valid, neg, 0)
        below = np.cumsum(q) - q  # negatives strictly below, within the batch
        below -= np.repeat(below[starts], np.diff(np.append(starts, len(q))))  # ... and within the segment
        safe = int(p.sum()) * (2 * int(q.sum()) + 1) < 2 ** 62
        terms = p.astype(np.int64 if safe else object) * (2 * below.astype(np.int64 if safe else object) + q)
        idx = np.where(valid, np.arange(len(q)), len(q))
        first = np.minimum.reduceat(idx, starts)
        sums = [np.add.reduceat(a, starts) for a in (terms, p, q, bad, np.where(valid, 0, pos + neg + bad))]
        firsts = [float(score[i]) if i < len(q) else None for i in first]
        return zip(starts.tolist(), firsts, *[s.tolist() for s in sums])

    def summarize(batches):
        import pyarrow as pa
        state, types = {}, None  # group tuple -> [first score, doubled numerator, P, N, bad labels, bad scores]
        for batch in batches:
            if batch.num_rows == 0:
                continue
            types = [batch.schema.field(g).type for g in group_cols]
            for start, first, num2, p, q, bad, bad_s in batch_segments(batch):
                key = tuple(batch.column(g)[start].as_py() for g in group_cols)
                st = state.setdefault(key, [None, 0, 0, 0, 0, 0])
                st[0] = st[0] if st[0] is not None else first
                st[1] += int(num2) + 2 * st[3] * int(p)  # negatives of earlier batches lie below this segment
                st[2] += p; st[3] += q; st[4] += bad; st[5] += bad_s
        if state:
            cols = [pa.array([k[i] for k in state], type=t) for i, t in enumerate(types)]
            vals = list(zip(*state.values()))
            cols += [pa.array(vals[0], pa.float64()), pa.array([Decimal(v) for v in vals[1]], pa.decimal128(38, 0))]
            cols += [pa.array(v, pa.int64()) for v in vals[2:]]
            yield pa.RecordBatch.from_arrays(cols, names=[*group_cols] + [f.name for f in _SUMMARY_FIELDS])

    return summarize


def _combine_group(key: tuple, parts: list, group_cols: tuple, score_col: str, label_col: str,
                   on_one_class: str) -> float:
    """Combine one group's partition summaries into its AUC (see the module docstring, step 4)."""
    where = f"group {dict(zip(group_cols, key))}" if group_cols else "all rows"
    bad_scores, bad_labels = sum(r[_BAD_S] for r in parts), sum(r[_BAD] for r in parts)
    if bad_scores:
        raise MetricError(f"AUC of {score_col} vs {label_col}, {where}: {bad_scores} rows have a null or NaN score")
    if bad_labels:
        raise MetricError(f"AUC of {score_col} vs {label_col}, {where}: {bad_labels} rows have a label "
                          f"that is null or not 0/1")
    twice_num, negs, poss = 0, 0, 0
    for r in sorted(parts, key=lambda r: r[_FIRST]):
        twice_num += int(r[_NUM2]) + 2 * negs * r[_POS]
        negs += r[_NEG]
        poss += r[_POS]
    if poss == 0 or negs == 0:
        msg = (f"AUC of {score_col} is undefined for {where}: label column {label_col!r} has one class only "
               f"(positives={poss}, negatives={negs})")
        if on_one_class == "raise":
            raise MetricError(msg)
        log.warning("%s; reporting NaN", msg)
        return math.nan
    return twice_num / (2 * poss * negs)


# ------------------------------------------------------------------------------------------- log-loss and calibration

def logloss_and_calibration(df: DataFrame, score_col: str, label_col: str, group_cols=()) -> dict[tuple, dict]:
    """Per group, in one aggregation pass: ``{group_tuple: {logloss, mean_pred, observed_rate, calibration, n,
    positives}}``. Log-loss is the mean cross-entropy with probabilities clipped to [1e-7, 1-1e-7]; calibration is
    mean_pred / observed_rate (NaN when there are no positives). Null scores or labels outside {0, 1} raise."""
    group_cols = tuple(group_cols)
    s, y = F.col(score_col).cast("double"), F.col(label_col)
    p = F.least(F.greatest(s, F.lit(EPS)), F.lit(1.0 - EPS))
    ok = (y == 0) | (y == 1)
    rows = (df.groupBy(*group_cols)
            .agg(F.avg(-(y * F.log(p) + (1 - y) * F.log(1 - p))).alias("logloss"), F.avg(s).alias("mean_pred"),
                 F.count(F.lit(1)).alias("n"), F.sum(F.when(y == 1, 1).otherwise(0)).alias("positives"),
                 F.sum(F.when(s.isNull() | F.isnan(s), 1).otherwise(0)).alias("bad_scores"),
                 F.sum(F.when(ok, 0).otherwise(1)).alias("bad_labels"))
            .collect())
    return {tuple(r[g] for g in group_cols): _calibration_row(r, group_cols, score_col, label_col) for r in rows}


def _calibration_row(r, group_cols: tuple, score_col: str, label_col: str) -> dict:
    """Validate one aggregated row and turn it into the plain result dict."""
    where = f"group {dict((g, r[g]) for g in group_cols)}" if group_cols else "all rows"
    if r["bad_scores"]:
        raise MetricError(f"log-loss of {score_col}, {where}: {r['bad_scores']} rows have a null or NaN score")
    if r["bad_labels"]:
        raise MetricError(f"log-loss vs {label_col}, {where}: {r['bad_labels']} labels are null or not 0/1")
    rate = r["positives"] / r["n"]
    return {"logloss": r["logloss"], "mean_pred": r["mean_pred"], "observed_rate": rate,
            "calibration": r["mean_pred"] / rate if rate > 0 else math.nan, "n": r["n"], "positives": r["positives"]}


# -------------------------------------------------------------------------------------------------- paper protocol

def task_metrics(pred_df: DataFrame, group_cols=(METHOD,), *, on_one_class: str = "raise") -> list[dict]:
    """The paper's protocol over a prediction table (``schemas.dataset.PREDICTION_SCHEMA`` columns).

    Tasks: ``ctr`` (p_ctr vs click, all rows), ``cvr`` (p_cvr vs conversion, **clicked rows only**), ``ctcvr``
    (p_ctcvr vs click*conversion, all rows). Returns plain dict rows ``{*group_cols, task, auc, logloss, calibration, n,
    positives}``, one per group and task. Rows whose p_cvr is NaN (the reference CTR network predicts no CVR) take part
    in the CTR task only.
    """
    y, z = F.col(CLICK), F.col(CONVERSION)
    has_cvr = ~F.isnan(F.col(P_CVR))
    return _stacked_metrics(pred_df, tuple(group_cols), [
        ("ctr", None, F.col(P_CTR), y),
        ("cvr", (y == 1) & has_cvr, F.col(P_CVR), z),
        ("ctcvr", has_cvr, F.col(P_CTCVR), y * z),
    ], on_one_class)


def entire_space_cvr_metrics(pred_df: DataFrame, truth_df: DataFrame, group_cols=(METHOD,), *,
                             on_one_class: str = "raise") -> list[dict]:
    """p_cvr against the generator's ``would_convert`` (joined on sample_id): task ``cvr_entire`` over ALL impressions
    and ``cvr_entire_clicked`` over clicked ones. A prediction without a ground-truth row raises (null label)."""
    truth = truth_df.select(SAMPLE_ID, WOULD_CONVERT)
    joined = pred_df.join(truth, on=SAMPLE_ID, how="left")
    w = F.col(WOULD_CONVERT)
    has_cvr = ~F.isnan(F.col(P_CVR))
    return _stacked_metrics(joined, tuple(group_cols), [
        ("cvr_entire", has_cvr, F.col(P_CVR), w),
        ("cvr_entire_clicked", (F.col(CLICK) == 1) & has_cvr, F.col(P_CVR), w),
    ], on_one_class)


def oracle_metrics(test_df_with_truth: DataFrame, group_cols=(), *, on_one_class: str = "raise") -> list[dict]:
    """The same tasks scored with the generator's true probabilities (needs click, conversion, true_ctr, true_cvr,
    would_convert, e.g. the ground-truth table itself); rows carry ``method="oracle"``."""
    y, z, ctr, cvr = F.col(CLICK), F.col(CONVERSION), F.col(TRUE_CTR), F.col(TRUE_CVR)
    df = test_df_with_truth.withColumn(METHOD, F.lit("oracle"))
    return _stacked_metrics(df, (METHOD, *group_cols), [
        ("ctr", None, ctr, y),
        ("cvr", y == 1, cvr, z),
        ("ctcvr", None, ctr.cast("double") * cvr.cast("double"), y * z),
        ("cvr_entire", None, cvr, F.col(WOULD_CONVERT)),
    ], on_one_class)


def _stacked_metrics(df: DataFrame, group_cols: tuple, tasks: list, on_one_class: str) -> list[dict]:
    """Stack the tasks as (group, task, score, label) rows so one AUC job and one aggregation cover them all.

    ``tasks``: ``(name, row_filter or None, score expression, label expression)``.
    """
    parts = []
    for name, row_filter, score, label in tasks:
        part = df if row_filter is None else df.where(row_filter)
        parts.append(part.select(*group_cols, F.lit(name).alias(TASK), score.cast("double").alias("score"),
                                 label.alias("label")))
    stacked = parts[0]
    for part in parts[1:]:
        stacked = stacked.unionByName(part)
    keys = (*group_cols, TASK)
    aucs = auc(stacked, "score", "label", keys, on_one_class=on_one_class)
    calib = logloss_and_calibration(stacked, "score", "label", keys)
    order = {name: i for i, (name, *_) in enumerate(tasks)}
    rows = []
    for key in sorted(calib, key=lambda k: (tuple((v is None, str(v)) for v in k[:-1]), order[k[-1]])):
        c = calib[key]
        rows.append({**dict(zip(keys, key)), "auc": aucs[key], "logloss": c["logloss"],
                     "calibration": c["calibration"], "n": c["n"], "positives": c["positives"]})
    return rows
