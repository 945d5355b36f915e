"""Exact, distributed evaluation metrics: global ROC AUC, DeLong's test, log-loss and calibration, the task protocol.

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

DeLong's test for correlated AUCs (DeLong, DeLong & Clarke-Pearson 1988, in the placement form of Sun & Xu 2014).
K models score the same P positives and N negatives (a prediction table stacked by model, one row per model and
sample key). For model k the *placement* of positive i and of negative j are::

    V10_k(i) = (#neg with score < s_i + 1/2 #neg with score == s_i) / N      (= (2 neg_below + neg_s) / 2N)
    V01_k(j) = (#pos with score > s_j + 1/2 #pos with score == s_j) / P      (= (2 pos_above + pos_s) / 2P)

and AUC_k = mean_i V10_k(i) = mean_j V01_k(j). With S10 (S01) the K x K sample covariance (divisor P-1, N-1) of the
placement vectors over the positives (negatives), ``Cov(AUC) = S10 / P + S01 / N``; a difference of two AUCs has
variance ``c_aa + c_bb - 2 c_ab`` and is tested against the normal distribution.

The covariance pairs placements of *different* models on the same key, so the rows are laid out *wide*: one row per
key with a score column per model (``delong_wide``; ``delong`` pivots long rows to that, one shuffle, and checks that
every model scores every key once with the same label). A placement depends only on the model, the class and the
score, and the class that matters is the smaller one (in CVR/CTCVR/CTR the positives, a few percent of the rows):
a group whose positives outnumber its negatives is *flipped* (labels swapped, scores negated: AUC, placements and
covariance are unchanged), so below "minority" is always the positive class and M its size. Passes over the
(persisted) wide rows, all ``mapInArrow`` with numpy, none with a per-row Python step or a shuffle of rows:

1. group counts (P, N, bad labels, NaN scores, which models take part: a column that is non-null in the group);
2. per (group, model), the distinct minority scores T with their counts c (aggregated, collected: O(distinct
   minority scores) values, the only data that reaches the driver besides sums);
3. with T broadcast, every majority row counts itself against T with two ``searchsorted``: ``b[j]`` majority rows
   strictly below ``T[j]``, ``e[j]`` tied with it (per-partition histograms, summed by an aggregation). Then a
   minority row at ``T[j]`` has placement ``(2 b[j] + e[j]) / 2N``, and the exact AUC is the integer numerator
   ``sum_j c[j] (2 b[j] + e[j])`` over ``2 P N`` (bit-identical to ``auc``, a test checks it);
4. with those tables broadcast, every row gets its K placements (minority: looked up at its score; majority:
   ``(2 #minority above + #minority tied) / 2M`` from the cumulative counts of c), centered on the exact AUCs, and
   each partition sums them and their K x K cross products per class. The driver adds the partitions' sums and forms
   ``S = (sum c c^T - s s^T / n) / (n - 1)``; centering on the known means keeps the sums free of cancellation, and
   centered sums that do not vanish (the input changed between passes) raise instead of giving a wrong answer.

Cost: four reads of the persisted rows and two small aggregations, against the exact AUC's one range-partitioned
pass per call; memory on the driver and in each executor is O(K x distinct minority scores) (at Ali-CCP scale the
CTR task's clicks dominate: ~1.7M per model). That is bounded: beyond ``DELONG_BROADCAST_SCORES`` distinct minority
scores (all groups and models; pass 2 collects at most one more than that) the placements come from a distributed
sort instead (``_delong_sorted``): the rows exploded to one per (row, model), their distinct (group, model, score)
class counts range-partitioned and sorted as for ``auc`` (which also gives the exact AUC), a pass over the sorted
counts that writes every score's two placements from the counts before its partition (a broadcast of
O(partitions x groups x K) numbers), a join back to the exploded rows and a pivot to one row per key for the cross
products. Three shuffles of K x rows instead of none, and nothing that grows with the rows on the driver or in a
broadcast (a test records both). ``protocol_metrics`` applies it to a prediction table: one pivot, every
task a filter of the wide rows, AUC + DeLong + log-loss + calibration in those passes.

GAUC (``gauc_wide``): the impression-weighted mean of per-user AUCs over the users with both classes, exact, in one
shuffle that gathers each user's rows and a numpy pass of doubled mid-ranks per user (no per-user Python step);
``protocol_metrics`` adds it for the CTR, CVR and CTCVR tasks when the predictions carry ``user_key``.

Log-loss clips probabilities to ``[1e-7, 1 - 1e-7]``; calibration is mean prediction / observed positive rate.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from statistics import NormalDist

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark import StorageLevel

# The row sets the metrics read several times are kept on local disk, not in the heap: at conf/default.yaml's 20M
# impressions a unit's pivoted predictions (10M impressions x 9 runs x 3 outputs) and their five task filters are
# ~5 GB, and MEMORY_AND_DISK caching of them ran the 4g local driver out of heap (java.lang.OutOfMemoryError in
# MemoryStore.putIteratorAsBytes; bench/RESULTS.md, "A paper-scale run"). On disk, each pass holds one batch per task.
CACHE = StorageLevel.DISK_ONLY
# Rows per task of those passes. Every pass is a Python mapInArrow over the cached rows, and a task costs ~0.1 s
# whatever its size: the five task filters of a 200-partition pivot made 1,000 tasks per pass, so the metrics of a
# 1M-impression unit took as long as a 20M one (412 s vs 537 s, bench/RESULTS.md). After caching, the rows are
# coalesced (no shuffle) to about this many per task, but never below two tasks per core.
ROWS_PER_TASK = 2_000_000
# DeLong's minority scores broadcast at most (all groups and models; ~16 bytes each, so ~64 MB per copy). Beyond it
# the placements come from a distributed sort and join instead (``_delong_sorted``), and nothing that grows with the
# rows reaches the driver or a broadcast.
DELONG_BROADCAST_SCORES = 4_000_000
# The minority scores' aggregate is persisted (CACHE) while the placements are computed: over the bound it is read
# three times. ``bench/metrics_tasks.py --compare persist`` turns this off for its comparison.
_PERSIST_SCORES = True


@contextmanager
def _sized_shuffles(spark, rows: int):
    """``spark.sql.shuffle.partitions`` lowered, while the block runs, to ~ROWS_PER_TASK of ``rows`` per partition
    (never fewer than two per task slot, never more than configured). The setting is sized for the cluster's largest
    jobs (conf/default.yaml: 200); a metrics pass over a small prediction table would otherwise run every one of its
    shuffles, and each scan of the pivoted rows, as that many tiny tasks. Restored afterwards, also on errors."""
    key = "spark.sql.shuffle.partitions"
    saved = spark.conf.get(key)
    k = min(int(saved), max(2 * spark.sparkContext.defaultParallelism, math.ceil(rows / ROWS_PER_TASK)))
    spark.conf.set(key, str(k))
    try:
        yield k
    finally:
        spark.conf.set(key, saved)


def _fewer_tasks(df: DataFrame, rows: int) -> DataFrame:
    """A persisted ``df`` of ``rows`` rows, coalesced to ~ROWS_PER_TASK rows per partition (never fewer than two
    partitions per task slot, never more than it has)."""
    k = max(2 * df.sparkSession.sparkContext.defaultParallelism, math.ceil(rows / ROWS_PER_TASK))
    return df.coalesce(k) if df.rdd.getNumPartitions() > k else df
from pyspark.sql.types import (ArrayType, DecimalType, DoubleType, IntegerType, LongType, StructField,
                               StructType)

from schemas.dataset import (CLICK, CONVERSION, METHOD, P_CTCVR, P_CTR, P_CVR, RUN_ID, SAMPLE_ID, TRUE_CTR,
                             TRUE_CVR, UNKNOWN_USER, USER_KEY, WOULD_CONVERT)

log = logging.getLogger(__name__)

EPS = 1e-7
TASK = "task"
# Internal column names (prefixed so they do not collide with the caller's group columns).
_S, _Y, _POS, _NEG, _BAD = "__m_score", "__m_label", "__m_pos", "__m_neg", "__m_bad_label"
_FIRST, _NUM2, _BAD_S = "__m_first_score", "__m_twice_num", "__m_bad_score"
_MODEL, _KEY, _GID, _BUCKET, _MIDX, _NROWS = ("__m_model", "__m_key", "__m_gid", "__m_bucket", "__m_midx",
                                              "__m_nrows")
_YMIN = "__m_label_min"
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
    where = _where(key, group_cols)
    _check_summaries(parts, where, score_col, label_col)
    _, twice_num, poss, negs = _ordered_totals(parts)
    if poss == 0 or negs == 0:
        msg = (f"AUC of {score_col} is undefined for {where}: label column {label_col!r} has one class only "
               f"(positives={poss}, negatives={negs})")
        if on_one_class == "raise":
            raise MetricError(msg)
        log.warning("%s; reporting NaN", msg)
        return math.nan
    return twice_num / (2 * poss * negs)


def _where(key: tuple, group_cols: tuple) -> str:
    """How error messages name a group."""
    return f"group {dict(zip(group_cols, key))}" if group_cols else "all rows"


def _check_summaries(parts: list, where: str, score_col: str, label_col: str, what: str = "AUC") -> None:
    """Raise ``MetricError`` when a group's partition summaries count null/NaN scores or labels outside {0, 1}."""
    bad_scores, bad_labels = sum(r[_BAD_S] for r in parts), sum(r[_BAD] for r in parts)
    if bad_scores:
        raise MetricError(f"{what} of {score_col} vs {label_col}, {where}: {bad_scores} rows have a null or NaN score")
    if bad_labels:
        raise MetricError(f"{what} of {score_col} vs {label_col}, {where}: {bad_labels} rows have a label "
                          f"that is null or not 0/1")


def _ordered_totals(parts: list) -> tuple[list, int, int, int]:
    """A validated group's partition summaries in score order, its exact doubled AUC numerator, P and N."""
    ordered = sorted(parts, key=lambda r: r[_FIRST])
    twice_num, negs, poss = 0, 0, 0
    for r in ordered:
        twice_num += int(r[_NUM2]) + 2 * negs * r[_POS]
        negs += r[_NEG]
        poss += r[_POS]
    return ordered, twice_num, poss, negs


# -------------------------------------------------------------------------------------------------------- DeLong's test

@dataclass(frozen=True, eq=False)
class DeLongResult:
    """One group's DeLong estimates: ``auc[k]`` and ``cov[k, l]`` follow ``models`` (sorted model ids).

    ``auc`` is the exact AUC (bit-identical to ``auc``'s), ``cov`` the DeLong covariance ``S10 / P + S01 / N``.
    Both are NaN when the group has one class only (``on_one_class="nan"``); ``cov`` is NaN when P or N is 1 (a
    sample covariance needs two keys of each class). The arrays are read-only; equality is identity.
    """
    models: tuple[str, ...]
    auc: np.ndarray
    cov: np.ndarray
    positives: int
    negatives: int

    def index(self, model) -> int:
        """Position of ``model`` in ``models``; ``KeyError`` for an unknown id."""
        try:
            return self.models.index(model)
        except ValueError:
            raise KeyError(f"model {model!r} is not one of {self.models}") from None

    def take(self, models, rename=None) -> "DeLongResult":
        """The estimates of ``models`` alone (in the order given, each renamed by ``rename`` if given): the rows and
        columns of ``cov`` they index. The same numbers a DeLong pass over those models alone gives, since each
        entry depends on its two models' scores only."""
        idx = [self.index(m) for m in models]
        names = tuple(rename(m) if rename else m for m in models)
        return _delong_result(names, self.auc[idx].copy(), self.cov[np.ix_(idx, idx)].copy(), self.positives,
                              self.negatives)

    def se(self, model) -> float:
        """Standard error of ``model``'s AUC."""
        i = self.index(model)
        var = float(self.cov[i, i])
        return math.nan if math.isnan(var) else math.sqrt(max(var, 0.0))

    def compare(self, a, b, level: float = 0.95) -> dict:
        """Two-sided DeLong test of AUC_a - AUC_b against the normal distribution.

        Returns ``{diff, se, ci_low, ci_high, z, p_value}``; ``ci_*`` is the ``level`` normal interval of the
        difference. A difference with zero standard error (e.g. identical models) gives ``z = 0, p_value = 1`` when
        the difference is 0 and ``z = +-inf, p_value = 0`` otherwise; NaN covariances give NaN statistics.
        """
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level!r}")
        i, j = self.index(a), self.index(b)
        diff = float(self.auc[i] - self.auc[j])
        var = float(self.cov[i, i] + self.cov[j, j] - 2 * self.cov[i, j])
        if math.isnan(var) or math.isnan(diff):
            return {"diff": diff, "se": math.nan, "ci_low": math.nan, "ci_high": math.nan, "z": math.nan,
                    "p_value": math.nan}
        se = math.sqrt(max(var, 0.0))  # rounding can leave -1e-18 where the true variance is 0
        if se > 0:
            z = diff / se
        else:
            z = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        half = NormalDist().inv_cdf(0.5 + level / 2) * se
        return {"diff": diff, "se": se, "ci_low": diff - half, "ci_high": diff + half, "z": z,
                "p_value": math.erfc(abs(z) / math.sqrt(2))}


def _check_on_one_class(on_one_class: str) -> None:
    if on_one_class not in ("raise", "nan"):
        raise ValueError(f"on_one_class must be 'raise' or 'nan', got {on_one_class!r}")


def delong(df: DataFrame, score_col: str, label_col: str, model_col: str, key_col: str, group_cols=(), *,
           on_one_class: str = "raise", num_partitions: int | None = None) -> dict[tuple, DeLongResult]:
    """DeLong covariance of the AUCs of several models scored on the same keys, per group (long format).

    ``df`` holds one row per ``(group..., model, key)`` with a numeric score and a 0/1 label, e.g. a prediction table
    stacked by model with the sample id as ``key_col``. Model ids are compared as strings. Within a group every model
    must score the same keys with the same labels, exactly once, else ``MetricError`` names the group and models.
    Null/NaN scores, labels outside {0, 1} and null model ids raise; a group with one class raises or, with
    ``on_one_class="nan"``, gets NaN ``auc``/``cov``. The rows are pivoted to one row per (group, key) (one shuffle)
    and handed to ``delong_wide``; ``num_partitions`` sets the pivot's partition count (default
    ``spark.sql.shuffle.partitions``). Returns ``{group_values_tuple: DeLongResult}`` (key ``()`` without groups).
    """
    _check_on_one_class(on_one_class)
    group_cols = tuple(group_cols)
    y, s, m = F.col(label_col), F.col(score_col).cast("double"), F.col(model_col).cast("string")
    stats = (df.groupBy(*group_cols, m.alias(_MODEL))
             .agg(F.sum(F.when(y == 1, 1).otherwise(0)).cast("long").alias(_POS),
                  F.sum(F.when(y == 0, 1).otherwise(0)).cast("long").alias(_NEG),
                  F.sum(F.when((y == 0) | (y == 1), 0).otherwise(1)).cast("long").alias(_BAD),
                  F.sum(F.when(s.isNull() | F.isnan(s), 1).otherwise(0)).cast("long").alias(_BAD_S))
             .collect())
    by_group = defaultdict(dict)
    for r in stats:
        key = tuple(r[g] for g in group_cols)
        where = f"{_where(key, group_cols)}, model {r[_MODEL]!r}"
        if r[_BAD_S]:
            raise MetricError(f"DeLong AUC of {score_col} vs {label_col}, {where}: {r[_BAD_S]} rows have a null or "
                              f"NaN score")
        if r[_BAD]:
            raise MetricError(f"DeLong AUC of {score_col} vs {label_col}, {where}: {r[_BAD]} rows have a label that "
                              f"is null or not 0/1")
        if r[_MODEL] is None:
            raise MetricError(f"DeLong test, {_where(key, group_cols)}: {r[_POS] + r[_NEG]} rows have a null "
                              f"{model_col}")
        by_group[key][r[_MODEL]] = (r[_POS], r[_NEG])
    for key, sizes in by_group.items():
        if len(set(sizes.values())) > 1:
            raise MetricError(f"DeLong test, {_where(key, group_cols)}: models must score the same keys with the same "
                              f"labels, but their (positives, negatives) differ: {dict(sorted(sizes.items()))}")
    models = sorted({mod for sizes in by_group.values() for mod in sizes})
    cols = {mod: f"__m_v{i}" for i, mod in enumerate(models)}
    n_parts = num_partitions or int(df.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    wide = (df.select(*group_cols, m.alias(_MODEL), F.col(key_col).alias(_KEY), s.alias(_S), y.alias(_Y))
            .repartition(n_parts, *group_cols, _KEY)
            .groupBy(*group_cols, _KEY)
            .agg(F.count(F.lit(1)).alias(_NROWS), F.min(_Y).alias(_YMIN), F.max(_Y).alias(_Y),
                 *[F.max(F.when(F.col(_MODEL) == mod, F.col(_S))).alias(c) for mod, c in cols.items()]))
    return delong_wide(wide, cols, _Y, group_cols, on_one_class=on_one_class,
                       _key_check=(model_col, {k: len(v) for k, v in by_group.items()}))


def delong_wide(df: DataFrame, models, label_col: str, group_cols=(), *, on_one_class: str = "raise",
                _key_check=None, cache: bool = True) -> dict[tuple, DeLongResult]:
    """DeLong covariance per group from *wide* rows: one row per key, one score column per model.

    ``models``: ``{model id: score column}`` (or a list of columns, which are then the ids). A model takes part in a
    group when its column is non-null in that group; it must then be non-null on every row of the group (a model that
    scores only some keys raises ``MetricError``), so groups may hold different models (e.g. the CTR task of the
    methods with a CTR tower of their own). NaN scores and labels outside {0, 1} raise. Four passes over ``df``
    (persisted here): group counts, the minority class's distinct scores, the majority class counted against them,
    and the placement sums (module docstring); nothing row-level reaches the driver, only distinct scores of the
    smaller class of each group. ``cache=False``: the caller holds ``df``'s rows already (e.g. a coalesced view of a
    persisted frame), do not persist it again.
    """
    _check_on_one_class(on_one_class)
    group_cols = tuple(group_cols)
    if not isinstance(models, dict):
        models = {c: c for c in models}
    names = sorted(models, key=str)
    cols = [models[n] for n in names]
    y = F.col(label_col)
    aggs = [F.count(F.lit(1)).alias("n"), F.sum(F.when(y == 1, 1).otherwise(0)).cast("long").alias("p"),
            F.sum(F.when((y == 0) | (y == 1), 0).otherwise(1)).cast("long").alias("bad")]
    for i, c in enumerate(cols):
        aggs += [F.count(F.col(c)).alias(f"c{i}"), F.sum(F.when(F.isnan(F.col(c)), 1).otherwise(0)).alias(f"nan{i}")]
    if _key_check:
        aggs += [F.sum(_NROWS).alias("rows"), F.sum(F.when(F.col(_YMIN) != y, 1).otherwise(0)).alias("mixed")]
    owned = cache and df.storageLevel == StorageLevel.NONE  # five passes: keep the input unless the caller does
    if owned:
        df = df.persist(CACHE)
    try:
        return _delong_wide(df, names, cols, aggs, label_col, group_cols, on_one_class, _key_check)
    finally:
        if owned:
            df.unpersist()


def _delong_wide(df, names, cols, aggs, label_col, group_cols, on_one_class, _key_check):
    stats = df.groupBy(*group_cols).agg(*aggs).collect()
    groups, results = [], {}
    for r in sorted(stats, key=lambda r: tuple((r[g] is None, str(r[g])) for g in group_cols)):
        key = tuple(r[g] for g in group_cols)
        where = _where(key, group_cols)
        present = [i for i in range(len(cols)) if r[f"c{i}"] > 0]
        for i in present:
            if r[f"nan{i}"]:
                raise MetricError(f"DeLong AUC, {where}, model {names[i]!r}: {r[f'nan{i}']} rows have a null or NaN "
                                  f"score")
        if r["bad"]:
            raise MetricError(f"DeLong AUC vs {label_col}, {where}: {r['bad']} rows have a label that is null or "
                              f"not 0/1")
        n, poss = r["n"], r["p"]
        gm = [names[i] for i in present]
        if _key_check:
            model_col, k_of = _key_check
            scored = {names[i]: r[f"c{i}"] for i in present}
            if r["rows"] != n * k_of[key] or r["mixed"] or set(scored.values()) != {n} or len(gm) != k_of[key]:
                raise MetricError(
                    f"DeLong test, {where}: the models {gm} (column {model_col!r}) do not score the same keys with "
                    f"the same labels: {n} distinct keys, {r['rows']} rows, {r['mixed']} keys with differing labels, "
                    f"keys scored per model {scored}; expected every key scored exactly once by every model")
        else:
            short = {names[i]: r[f"c{i}"] for i in present if r[f"c{i}"] != n}
            if short:
                raise MetricError(f"DeLong test, {where}: models {sorted(short)} score only {short} of the group's "
                                  f"{n} keys (a model must score every key of a group it takes part in)")
        negs = n - poss
        if poss == 0 or negs == 0:
            msg = (f"DeLong test vs {label_col} is undefined for {where}: one class only "
                   f"(positives={poss}, negatives={negs})")
            if on_one_class == "raise":
                raise MetricError(msg)
            log.warning("%s; reporting NaN", msg)
            k = len(gm)
            results[key] = _delong_result(tuple(gm), np.full(k, math.nan), np.full((k, k), math.nan), poss, negs)
            continue
        groups.append((key, present, poss, negs))
    if groups:
        results.update(_delong_passes(df, cols, names, label_col, group_cols, groups))
    return {key: results[key] for key in sorted(results, key=lambda k: tuple((v is None, str(v)) for v in k))}


def _delong_passes(df: DataFrame, cols: list, names: list, label_col: str, group_cols: tuple,
                   groups: list) -> dict[tuple, DeLongResult]:
    """The three data passes of ``delong_wide`` for the groups with both classes (module docstring)."""
    # gid: the group's index; the minority class (the smaller one) is "1" after flipping: label == minority,
    # and a flipped group negates its scores (AUC, placements and covariance are invariant under the flip).
    cond = None
    for gid, (key, *_rest) in enumerate(groups):
        match = F.lit(True)
        for g, v in zip(group_cols, key):
            match = match & F.col(g).eqNullSafe(F.lit(v))
        cond = F.when(match, gid) if cond is None else cond.when(match, gid)
    minority = [1 if poss <= negs else 0 for _, _, poss, negs in groups]
    present = [p for _, p, _, _ in groups]
    vcols = [f"__m_v{i}" for i in range(len(cols))]
    data = (df.select(cond.alias(_GID), F.col(label_col).cast("int").alias(_Y),
                      *[F.col(c).cast("double").alias(v) for c, v in zip(cols, vcols)])
            .where(F.col(_GID).isNotNull()))
    plan = {"minority": minority, "present": present, "vcols": vcols}
    # pass A: distinct scores of the minority class, per (group, model); at most DELONG_BROADCAST_SCORES of them
    # reach the driver, the groups whose scores do not fit go the sorted way (memory flat in the rows)
    scores = (data.mapInArrow(_make_minority_scores(plan), _GKT_SCHEMA)
              .groupBy(_GID, _MIDX, _S).agg(F.sum(_POS).alias(_POS)))
    if _PERSIST_SCORES:  # over the bound they are read three times (bound check, sizes, the broadcast groups' scores)
        scores = scores.persist(CACHE)
    try:
        aucs, acc = _delong_placements(data, scores, plan, groups, cols, group_cols)
    finally:
        if _PERSIST_SCORES:
            scores.unpersist()
    out = {}
    for gid, (key, idx, poss, negs) in enumerate(groups):
        k = len(idx)
        auc_values = np.array([aucs[(gid, i)] for i in idx], dtype=np.float64)
        cov = np.zeros((k, k))
        for cls, size in ((1, min(poss, negs)), (0, max(poss, negs))):
            n, s, q = acc.get((gid, cls), (0, np.zeros(k), np.zeros(k * k)))
            if n != size:
                raise RuntimeError(f"DeLong test, {_where(key, group_cols)}: the placement pass saw {n} rows of a "
                                   f"class of {size}: the input changed between passes (persist it)")
            if np.any(np.abs(s) > 1e-9 * n):
                raise RuntimeError(f"DeLong test, {_where(key, group_cols)}: placements do not average to the exact "
                                   f"AUCs (mean deviations {(s / n).tolist()}): the input changed between passes")
            q = q.reshape(k, k)
            cov += (q - np.outer(s, s) / n) / (n - 1) / n if n > 1 else np.full((k, k), math.nan)
        out[key] = _delong_result(tuple(names[i] for i in idx), auc_values, (cov + cov.T) / 2, poss, negs)
    return out


def _delong_placements(data: DataFrame, scores: DataFrame, plan: dict, groups: list, cols: list,
                       group_cols: tuple) -> tuple[dict, dict]:
    """Passes B and C: the AUCs and placement sums of every group, by broadcast when all the minority scores fit
    ``DELONG_BROADCAST_SCORES``, else the groups that fit by broadcast and the rest by a sort and a join."""
    mins = scores.limit(DELONG_BROADCAST_SCORES + 1).toArrow()
    if mins.num_rows <= DELONG_BROADCAST_SCORES:
        return _delong_broadcast(data, plan, mins, groups)
    sizes = {r[_GID]: r["n"] for r in scores.groupBy(_GID).agg(F.count(F.lit(1)).alias("n")).collect()}
    small = _broadcast_groups(sizes, DELONG_BROADCAST_SCORES)
    big = sorted(set(range(len(groups))) - set(small))
    log.info("DeLong: %d distinct minority scores over %d groups, more than %d: %d group(s) by broadcast, %d by "
             "a range-partitioned sort and a join", sum(sizes.values()), len(groups), DELONG_BROADCAST_SCORES,
             len(small), len(big))
    aucs, acc = {}, {}
    if small:
        in_small = F.col(_GID).isin(*small)
        a, c = _delong_broadcast(data.where(in_small), plan, scores.where(in_small).toArrow(),
                                 _only_groups(groups, small))
        aucs.update(a)
        acc.update(c)
    if big:
        a, c = _delong_sorted(data.where(F.col(_GID).isin(*big)).withColumn(_RID, F.monotonically_increasing_id()),
                              plan, _only_groups(groups, big), len(cols), group_cols)
        aucs.update(a)
        acc.update(c)
    return aucs, acc


def _broadcast_groups(sizes: dict, bound: int) -> list:
    """The groups whose minority scores go the broadcast way when all of them together do not fit: the smallest
    first, as many as fit within ``bound`` distinct scores in all (``sizes``: {gid: distinct minority scores}). A
    task with few positives (CVR's conversions) then keeps the fast path while a large one (CTR's clicks) is
    sorted, instead of every task taking the sorted path."""
    out, total = [], 0
    for g in sorted(sizes, key=lambda g: (sizes[g], g)):
        if total + sizes[g] > bound:
            break
        out.append(g)
        total += sizes[g]
    return sorted(out)


def _only_groups(groups: list, gids: list) -> list:
    """``groups`` with the models of every group outside ``gids`` taken out (their indices, hence every gid, kept)."""
    keep = set(gids)
    return [g if i in keep else (g[0], [], g[2], g[3]) for i, g in enumerate(groups)]


def _delong_broadcast(data: DataFrame, plan: dict, mins, groups: list) -> tuple[dict, dict]:
    """Passes A' and B with the minority scores broadcast (module docstring, steps 3-4): ({(gid, i): exact AUC},
    {(gid, class): (n, sum of centered placements, sum of their cross products)})."""
    spark = data.sparkSession
    tables = _minority_tables(mins, groups)
    bc = spark.sparkContext.broadcast({k: v[0] for k, v in tables.items()})
    # pass A': the majority class counted against those scores: strictly below each, and tied with each
    hist = (data.mapInArrow(_make_majority_counter(plan, bc), _HIST_SCHEMA)
            .groupBy(_GID, _MIDX, _BUCKET).agg(F.sum(_NEG).alias(_NEG), F.sum(_POS).alias(_POS)).toArrow())
    placements = _placement_tables(tables, hist, groups)
    bc.unpersist()
    bc = spark.sparkContext.broadcast(placements)
    # pass B: every row's placements (centered on the exact AUCs), summed with their cross products per class
    sums = data.mapInArrow(_make_placement_summer(plan, bc), _SUMS_SCHEMA).collect()
    bc.unpersist()
    acc = {}
    for r in sums:
        k = (r[_GID], r[_Y])
        n, s, q = r["n"], np.array(r["s"]), np.array(r["q"])
        if k in acc:
            acc[k] = (acc[k][0] + n, acc[k][1] + s, acc[k][2] + q)
        else:
            acc[k] = (n, s, q)
    return {k: v[3] for k, v in placements.items()}, acc


def _delong_sorted(data: DataFrame, plan: dict, groups: list, n_models: int, group_cols: tuple) -> tuple[dict, dict]:
    """The placements without collecting or broadcasting scores (memory flat in the rows), for groups whose distinct
    minority scores outnumber DELONG_BROADCAST_SCORES: the rows exploded to one per (row, model), their distinct
    (group, model, score) counts per class range-partitioned and sorted as in ``auc`` (the exact AUC from the
    partitions' summaries, which also give each partition's counts before it), then a pass over the sorted counts
    writes each score's two placements, joined back to the rows and re-assembled per row by a pivot so the cross
    products pair the models on the same row. Returns what ``_delong_broadcast`` does."""
    spark = data.sparkSession
    long = data.mapInArrow(_make_long(plan), _LONG_SCHEMA).persist(CACHE)
    try:
        counts = long.groupBy(_GID, _MIDX, _S).agg(F.sum(_Y).cast("long").alias(_POS),
                                                   (F.count(F.lit(1)) - F.sum(_Y)).cast("long").alias(_NEG),
                                                   F.lit(0).cast("long").alias(_BAD))
        keys = [_GID, _MIDX, _S]
        n = int(spark.conf.get("spark.sql.shuffle.partitions"))
        ranged = counts.repartitionByRange(n, *keys).sortWithinPartitions(*keys).persist(CACHE)
        schema = StructType([StructField(_GID, IntegerType()), StructField(_MIDX, IntegerType())] + _SUMMARY_FIELDS)
        by = defaultdict(list)
        for r in ranged.mapInArrow(_make_summarizer([_GID, _MIDX]), schema).collect():
            by[(r[_GID], r[_MIDX])].append(r)
        aucs, offsets = {}, {}
        for gid, (key, idx, poss, negs) in enumerate(groups):
            n_min, n_maj = min(poss, negs), max(poss, negs)
            for i in idx:
                ordered, twice, p, q = _ordered_totals(by[(gid, i)])
                if (p, q) != (n_min, n_maj):
                    raise RuntimeError(f"DeLong test, {_where(key, group_cols)}: the sorted pass saw {p} + {q} rows "
                                       f"of classes of {n_min} + {n_maj}: the input changed between passes")
                aucs[(gid, i)] = twice / (2 * n_min * n_maj)
                first = np.array([r[_FIRST] for r in ordered])
                before = np.cumsum([[0, 0]] + [[r[_POS], r[_NEG]] for r in ordered[:-1]], axis=0)
                offsets[(gid, i)] = (first, before[:, 0], before[:, 1], n_min, n_maj, aucs[(gid, i)])
        bc = spark.sparkContext.broadcast(offsets)       # O(partitions x groups x models), whatever the rows
        place = ranged.mapInArrow(_make_sorted_placements(bc), _PLACE_SCHEMA)
        c = F.when(F.col(_Y) == 1, F.col("__m_cmin")).otherwise(F.col("__m_cmaj"))
        wide = (long.join(place, on=keys).select(_RID, _GID, _Y, _MIDX, c.alias("__m_c"))
                .groupBy(_RID, _GID, _Y).pivot(_MIDX, list(range(n_models))).agg(F.first("__m_c")))
        v = [F.col(f"`{i}`") for i in range(n_models)]
        aggs = [F.count(F.lit(1)).alias("n")] + [F.sum(v[a]).alias(f"s{a}") for a in range(n_models)]
        aggs += [F.sum(v[a] * v[b]).alias(f"q{a}_{b}") for a in range(n_models) for b in range(a, n_models)]
        rows = wide.groupBy(_GID, _Y).agg(*aggs).collect()
        bc.unpersist()
        ranged.unpersist()
    finally:
        long.unpersist()
    acc = {}
    for r in rows:
        idx = plan["present"][r[_GID]]
        k = len(idx)
        s = np.array([r[f"s{i}"] for i in idx], dtype=np.float64)
        q = np.zeros((k, k))
        for a, ia in enumerate(idx):
            for b, ib in enumerate(idx):
                q[a, b] = r[f"q{min(ia, ib)}_{max(ia, ib)}"]
        acc[(r[_GID], r[_Y])] = (r["n"], s, q.ravel())
    return aucs, acc


_RID = "__m_rid"
_LONG_SCHEMA = StructType([StructField(_RID, LongType(), False), StructField(_GID, IntegerType(), False),
                           StructField(_Y, IntegerType(), False), StructField(_MIDX, IntegerType(), False),
                           StructField(_S, DoubleType(), False)])
_PLACE_SCHEMA = StructType([StructField(_GID, IntegerType(), False), StructField(_MIDX, IntegerType(), False),
                            StructField(_S, DoubleType(), False), StructField("__m_cmin", DoubleType(), False),
                            StructField("__m_cmaj", DoubleType(), False)])


def _make_long(plan):
    """Wide rows -> one row per (row, model taking part in its group): row id, group, is-minority, model, oriented
    score."""
    def run(batches):
        import pyarrow as pa
        for batch in batches:
            gid, minority, scores = _class_views(batch, plan)
            rid = batch.column(_RID).to_numpy(zero_copy_only=False)
            for g, rows in _segments(gid):
                y = minority[rows].astype(np.int32)
                for i in plan["present"][g]:
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(rid[rows]), pa.array(np.full(len(rows), g, np.int32)), pa.array(y),
                         pa.array(np.full(len(rows), i, np.int32)), pa.array(scores[i][rows])],
                        names=[_RID, _GID, _Y, _MIDX, _S])
    return run


def _make_sorted_placements(bc):
    """Over the range-partitioned, sorted (group, model, score) class counts: each score's placement for a minority
    row, (2 majority below + majority tied) / 2 N_maj, and for a majority row, (2 minority above + minority tied)
    / 2 N_min, both centered on the exact AUC; the counts before a partition come from the broadcast offsets, found
    by the partition's first score."""
    def run(batches):
        import pyarrow as pa
        offsets = bc.value
        state = {}                 # (gid, model) -> [minority before, majority before] within this partition so far
        for batch in batches:
            if batch.num_rows == 0:
                continue
            gid = batch.column(_GID).to_numpy(zero_copy_only=False)
            midx = batch.column(_MIDX).to_numpy(zero_copy_only=False)
            s = batch.column(_S).to_numpy(zero_copy_only=False)
            mn = batch.column(_POS).to_numpy(zero_copy_only=False).astype(np.int64)
            mj = batch.column(_NEG).to_numpy(zero_copy_only=False).astype(np.int64)
            new = np.ones(len(s), bool)
            new[1:] = (gid[1:] != gid[:-1]) | (midx[1:] != midx[:-1])
            starts = np.flatnonzero(new)
            for a, b in zip(starts, np.append(starts[1:], len(s))):
                key = (int(gid[a]), int(midx[a]))
                first, min_before, maj_before, n_min, n_maj, auc_value = offsets[key]
                if key not in state:
                    p = int(np.searchsorted(first, s[a]))
                    state[key] = [int(min_before[p]), int(maj_before[p])]
                off_min, off_maj = state[key]
                below_min = off_min + np.cumsum(mn[a:b]) - mn[a:b]
                below_maj = off_maj + np.cumsum(mj[a:b]) - mj[a:b]
                cmin = (2.0 * below_maj + mj[a:b]) / (2.0 * n_maj) - auc_value
                cmaj = (2.0 * (n_min - below_min - mn[a:b]) + mn[a:b]) / (2.0 * n_min) - auc_value
                state[key] = [off_min + int(mn[a:b].sum()), off_maj + int(mj[a:b].sum())]
                yield pa.RecordBatch.from_arrays(
                    [pa.array(gid[a:b].astype(np.int32)), pa.array(midx[a:b].astype(np.int32)), pa.array(s[a:b]),
                     pa.array(cmin), pa.array(cmaj)], names=[_GID, _MIDX, _S, "__m_cmin", "__m_cmaj"])
    return run


_GKT_SCHEMA = StructType([StructField(_GID, IntegerType(), False), StructField(_MIDX, IntegerType(), False),
                          StructField(_S, DoubleType(), False), StructField(_POS, LongType(), False)])
_HIST_SCHEMA = StructType([StructField(_GID, IntegerType(), False), StructField(_MIDX, IntegerType(), False),
                           StructField(_BUCKET, LongType(), False), StructField(_NEG, LongType(), False),
                           StructField(_POS, LongType(), False)])
_SUMS_SCHEMA = StructType([StructField(_GID, IntegerType(), False), StructField(_Y, IntegerType(), False),
                           StructField("n", LongType(), False), StructField("s", ArrayType(DoubleType(), False)),
                           StructField("q", ArrayType(DoubleType(), False))])


def _class_views(batch, plan):
    """(gid, is-minority, {column index: oriented scores}) of one Arrow batch, as numpy (executor side)."""
    gid = batch.column(_GID).to_numpy(zero_copy_only=False)
    lab = batch.column(_Y).to_numpy(zero_copy_only=False)
    flip = np.array(plan["minority"])[gid] == 0
    minority = np.where(flip, lab == 0, lab == 1)
    sign = np.where(flip, -1.0, 1.0)
    scores = {}
    for i, v in enumerate(plan["vcols"]):
        col = batch.column(v)
        if col.null_count < len(col):
            scores[i] = col.to_numpy(zero_copy_only=False).astype(np.float64) * sign + 0.0  # + 0.0: -0.0 -> 0.0
    return gid, minority, scores


def _segments(gid):
    """(gid value, row indices) for each group present in a batch."""
    for g in np.unique(gid):
        yield int(g), np.flatnonzero(gid == g)


def _make_minority_scores(plan):
    def run(batches):
        import pyarrow as pa
        for batch in batches:
            gid, minority, scores = _class_views(batch, plan)
            for g, rows in _segments(gid):
                rows = rows[minority[rows]]
                for i in plan["present"][g]:
                    t, cnt = np.unique(scores[i][rows], return_counts=True)
                    yield pa.RecordBatch.from_arrays(
                        [pa.array(np.full(len(t), g, np.int32)), pa.array(np.full(len(t), i, np.int32)), pa.array(t),
                         pa.array(cnt.astype(np.int64))], names=[_GID, _MIDX, _S, _POS])
    return run


def _minority_tables(mins, groups) -> dict:
    """{(gid, model index): (sorted distinct minority scores, their counts)} from pass A's collected counts."""
    gid = mins.column(_GID).to_numpy()
    midx = mins.column(_MIDX).to_numpy()
    t = mins.column(_S).to_numpy()
    cnt = mins.column(_POS).to_numpy().astype(np.int64)
    out = {}
    for g, (_key, idx, _p, _n) in enumerate(groups):
        for i in idx:
            sel = (gid == g) & (midx == i)
            order = np.argsort(t[sel], kind="stable")
            out[(g, i)] = (t[sel][order], cnt[sel][order])
    return out


def _make_majority_counter(plan, bc):
    def run(batches):
        import pyarrow as pa
        tables = bc.value
        acc = {}
        for batch in batches:
            gid, minority, scores = _class_views(batch, plan)
            for g, rows in _segments(gid):
                rows = rows[~minority[rows]]
                for i in plan["present"][g]:
                    t = tables[(g, i)]
                    s = scores[i][rows]
                    right = np.searchsorted(t, s, "right")
                    left = np.searchsorted(t, s, "left")
                    below = np.bincount(right, minlength=len(t) + 1)       # majority rows with right == r
                    tie = np.bincount(left[right - left == 1], minlength=len(t) + 1)
                    a = acc.setdefault((g, i), [np.zeros(len(t) + 1, np.int64), np.zeros(len(t) + 1, np.int64)])
                    a[0] += below
                    a[1] += tie
        for (g, i), (below, tie) in acc.items():
            nz = np.flatnonzero((below > 0) | (tie > 0))
            yield pa.RecordBatch.from_arrays(
                [pa.array(np.full(len(nz), g, np.int32)), pa.array(np.full(len(nz), i, np.int32)), pa.array(nz),
                 pa.array(below[nz]), pa.array(tie[nz])], names=[_GID, _MIDX, _BUCKET, _NEG, _POS])
    return run


def _placement_tables(tables: dict, hist, groups) -> dict:
    """{(gid, i): (minority scores, minority placements, cumulative minority counts, exact AUC)} (driver side).

    With T the sorted distinct minority scores, c their counts, b[j] the majority rows scored below T[j] and e[j]
    those tied with it: a minority row at T[j] has placement (2 b[j] + e[j]) / 2N (N: majority size), and the
    exact AUC is sum_j c[j] (2 b[j] + e[j]) / 2PN, an integer numerator as in ``auc``."""
    gid = hist.column(_GID).to_numpy()
    midx = hist.column(_MIDX).to_numpy()
    binx = hist.column(_BUCKET).to_numpy()
    nb, nt = hist.column(_NEG).to_numpy(), hist.column(_POS).to_numpy()
    out = {}
    for g, (_key, idx, poss, negs) in enumerate(groups):
        n_min, n_maj = min(poss, negs), max(poss, negs)
        for i in idx:
            t, c = tables[(g, i)]
            sel = (gid == g) & (midx == i)
            below_at = np.zeros(len(t) + 1, np.int64)
            tie = np.zeros(len(t) + 1, np.int64)
            below_at[binx[sel]] = nb[sel]
            tie[binx[sel]] = nt[sel]
            below = np.cumsum(below_at)[:len(t)]      # majority with score < T[j]  (right index <= j)
            num = 2 * below + tie[:len(t)]
            twice = sum(int(a) * int(b) for a, b in zip(c, num)) if n_min * n_maj * 2 >= 2 ** 62 else int(c @ num)
            out[(g, i)] = (t, num / (2.0 * n_maj), np.cumsum(c), twice / (2 * n_min * n_maj))
    return out


def _make_placement_summer(plan, bc):
    def run(batches):
        import pyarrow as pa
        tables = bc.value
        acc = {}
        for batch in batches:
            gid, minority, scores = _class_views(batch, plan)
            for g, rows in _segments(gid):
                idx = plan["present"][g]
                for cls, sel in ((1, rows[minority[rows]]), (0, rows[~minority[rows]])):
                    if len(sel) == 0:
                        continue
                    c = np.empty((len(sel), len(idx)))
                    for j, i in enumerate(idx):
                        t, v_min, cum, auc_value = tables[(g, i)]
                        s = scores[i][sel]
                        if cls == 1:
                            v = v_min[np.searchsorted(t, s, "left")]
                        else:  # (2 #minority above s + #minority tied) / 2 n_min
                            right = np.searchsorted(t, s, "right")
                            left = np.searchsorted(t, s, "left")
                            upto = np.where(right > 0, cum[np.maximum(right - 1, 0)], 0)
                            tied = upto - np.where(left > 0, cum[np.maximum(left - 1, 0)], 0)
                            v = (2.0 * (cum[-1] - upto) + tied) / (2.0 * cum[-1])
                        c[:, j] = v - auc_value
                    a = acc.setdefault((g, cls), [0, np.zeros(len(idx)), np.zeros((len(idx), len(idx)))])
                    a[0] += len(sel)
                    a[1] += c.sum(axis=0)
                    a[2] += c.T @ c
        if acc:
            keys = list(acc)
            yield pa.RecordBatch.from_arrays(
                [pa.array([k[0] for k in keys], pa.int32()), pa.array([k[1] for k in keys], pa.int32()),
                 pa.array([acc[k][0] for k in keys], pa.int64()),
                 pa.array([acc[k][1].tolist() for k in keys], pa.list_(pa.float64())),
                 pa.array([acc[k][2].ravel().tolist() for k in keys], pa.list_(pa.float64()))],
                names=[_GID, _Y, "n", "s", "q"])
    return run


def _delong_result(models, auc_values, cov, poss, negs) -> DeLongResult:
    """Freeze the arrays and build the result."""
    for a in (auc_values, cov):
        a.setflags(write=False)
    return DeLongResult(models, auc_values, cov, int(poss), int(negs))



# ----------------------------------------------------------------------------------------------------------------- GAUC

GAUC_TASKS = ("ctr", "cvr", "ctcvr")
_USER = "__m_user"


def gauc(df: DataFrame, score_col: str, label_col: str, user_col: str, group_cols=(), *, unknown_user=None,
         num_partitions: int | None = None) -> dict[tuple, dict]:
    """The impression-weighted per-user AUC of one score per group: ``{group_tuple: {gauc, users, impressions,
    one_class_users}}`` (``gauc_wide`` with one model; the key is ``()`` without groups)."""
    res = gauc_wide(df.withColumn(_S, F.col(score_col)), {score_col: _S}, label_col, user_col, group_cols,
                    unknown_user=unknown_user, num_partitions=num_partitions)
    return {g: r[score_col] for g, r in res.items() if score_col in r}


def gauc_wide(df: DataFrame, models, label_col: str, user_col: str, group_cols=(), *, unknown_user=None,
              num_partitions: int | None = None) -> dict[tuple, dict]:
    """GAUC (the per-user AUC of Alibaba's papers, e.g. DIN, KDD 2018) of several score columns, exactly and in one
    shuffle: ``{group_tuple: {model id: {gauc, users, impressions, one_class_users}}}``.

    ::

        GAUC = sum_u n_u AUC_u / sum_u n_u      over the users u with both classes in the group's rows

    ``n_u`` is the user's number of rows (impressions) in the group, ``AUC_u`` the tie-aware AUC of the user's rows
    alone (pairs tied on the score count 1/2, as in ``auc``). Users with one class only have no AUC and are left out
    (counted in ``one_class_users``); ``users`` and ``impressions`` are those included. ``gauc`` is NaN when no user
    has both classes.

    ``df`` is wide, like ``delong_wide``'s input: one row per key, one score column per model (``models``: ``{model
    id: column}`` or a list of columns); a model scores the rows where its column is non-null (so a group may hold
    different models), NaN scores and labels outside {0, 1} raise ``MetricError``. Rows with a null ``user_col``,
    or equal to ``unknown_user`` (e.g. ``schemas.dataset.UNKNOWN_USER``), belong to no user and are left out.

    Distributed computation, no per-user Python and no rows at the driver: the rows are hash-partitioned by (group,
    user) and sorted by it, so each user's rows are contiguous in one partition; a ``mapInArrow`` pass takes them in
    Arrow batches (a user's rows split across batches are carried to the next one) and, per model, sorts the batch by
    (user, score) with numpy and gets every user's Mann-Whitney statistic from doubled mid-ranks within the user,
    all integers::

        2 U_u = sum over u's positives of (first + last rank of its score's tie run, 1-based within u) - P_u (P_u + 1)
        AUC_u = 2 U_u / (2 P_u N_u)

    The executors return, per (partition, group, model), the included users, impressions and ``sum n_u AUC_u``
    (float64; the only rounding); the driver adds them. Cost: one shuffle of the rows (all models at once) and a
    numpy sort per model per batch; memory per task: one Arrow batch plus the rows of its largest user.
    """
    group_cols = tuple(group_cols)
    if not isinstance(models, dict):
        models = {c: c for c in models}
    names = sorted(models, key=str)
    scols = [f"__m_g{i}" for i in range(len(names))]
    n_parts = num_partitions or int(df.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    user = F.col(user_col).cast("long")
    keep = user.isNotNull() if unknown_user is None else user.isNotNull() & (user != F.lit(unknown_user))
    rows = (df.where(keep)
            .select(*group_cols, user.alias(_USER), F.col(label_col).cast("double").alias(_Y),
                    *[F.col(models[m]).cast("double").alias(c) for m, c in zip(names, scols)])
            .repartition(n_parts, *group_cols, _USER)
            .sortWithinPartitions(*group_cols, _USER))
    out_schema = StructType([df.schema[g] for g in group_cols] + [
        StructField(_MIDX, IntegerType()), StructField("users", LongType()), StructField("one_class", LongType()),
        StructField("impressions", LongType()), StructField("weighted", DoubleType()),
        StructField("bad_scores", LongType()), StructField("bad_labels", LongType())])
    parts = rows.mapInArrow(_make_gauc_fn(list(group_cols), scols), out_schema).collect()
    acc: dict = {}
    for r in parts:
        key = (tuple(r[g] for g in group_cols), names[r[_MIDX]])
        a = acc.setdefault(key, [0, 0, 0, 0.0, 0, 0])
        for i, c in enumerate(("users", "one_class", "impressions", "weighted", "bad_scores", "bad_labels")):
            a[i] += r[c]
    out: dict = {}
    for (key, name), (users, one, imps, weighted, bad_s, bad_y) in sorted(
            acc.items(), key=lambda kv: (tuple((v is None, str(v)) for v in kv[0][0]), str(kv[0][1]))):
        where = f"{_where(key, group_cols)}, model {name!r}"
        if bad_s:
            raise MetricError(f"GAUC of {models[name]} vs {label_col}, {where}: {bad_s} rows have a NaN score")
        if bad_y:
            raise MetricError(f"GAUC of {models[name]} vs {label_col}, {where}: {bad_y} rows have a label that is "
                              f"null or not 0/1")
        out.setdefault(key, {})[name] = {"gauc": weighted / imps if imps else math.nan, "users": users,
                                         "impressions": imps, "one_class_users": one}
    return out


def _make_gauc_fn(group_cols: list, scols: list):
    """The executor-side function of ``gauc_wide``'s pass; self-contained (executors need not import esmm)."""

    def starts_of(batch):
        """(group-run starts, (group, user) segment starts) of a batch sorted by (group, user)."""
        import numpy as np
        import pyarrow.compute as pc
        n = batch.num_rows
        gnew = np.zeros(n, dtype=bool)
        gnew[0] = True
        for g in group_cols:
            a, b = batch.column(g).slice(1), batch.column(g).slice(0, n - 1)
            diff = pc.or_(pc.fill_null(pc.not_equal(a, b), False), pc.not_equal(pc.is_null(a), pc.is_null(b)))
            gnew[1:] |= diff.to_numpy(zero_copy_only=False)
        user = batch.column(_USER).to_numpy(zero_copy_only=False)
        snew = gnew.copy()
        snew[1:] |= user[1:] != user[:-1]
        return gnew, snew

    def measure(batch, gnew, snew, acc):
        """Add the batch's whole users to ``acc``: (group tuple, model index) -> [users, one-class users,
        impressions, sum n_u AUC_u, NaN scores, bad labels]."""
        import numpy as np
        seg = np.cumsum(snew) - 1
        grun = np.cumsum(gnew) - 1
        gfirst = np.flatnonzero(gnew)
        keys = [tuple(batch.column(g)[int(i)].as_py() for g in group_cols) for i in gfirst]
        n_groups = len(gfirst)
        y = batch.column(_Y).to_numpy(zero_copy_only=False).astype(np.float64)     # null -> NaN
        y_bad = ~((y == 0) | (y == 1))
        for j, c in enumerate(scols):
            col = batch.column(c)
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            s = col.to_numpy(zero_copy_only=False).astype(np.float64)
            nan = valid & np.isnan(s)
            bad = valid & ~nan & y_bad
            use = np.flatnonzero(valid & ~nan & ~y_bad)
            sums = [np.zeros(n_groups, np.int64) for _ in range(3)] + [np.zeros(n_groups)]
            if len(use):
                sg, ss, yy, gg = seg[use], s[use], y[use].astype(np.int64), grun[use]
                order = np.lexsort((ss, sg))
                sg, ss, yy, gg = sg[order], ss[order], yy[order], gg[order]
                m = len(sg)
                pos = np.arange(m)
                new_seg = np.r_[True, sg[1:] != sg[:-1]]
                first = np.maximum.accumulate(np.where(new_seg, pos, 0))      # the user's first row
                new_run = new_seg | np.r_[True, ss[1:] != ss[:-1]]              # a run of tied scores starts
                run_start = np.flatnonzero(new_run)
                run_last = np.r_[run_start[1:], m] - 1
                rid = np.cumsum(new_run) - 1
                rank2 = (run_start[rid] - first) + (run_last[rid] - first) + 2  # twice the 1-based mid-rank
                starts = np.flatnonzero(new_seg)
                cnt = np.diff(np.r_[starts, m])
                p = np.add.reduceat(yy, starts)
                q = cnt - p
                u2 = np.add.reduceat(rank2 * yy, starts) - p * (p + 1)
                both = (p > 0) & (q > 0)
                w = np.zeros(len(starts))
                w[both] = cnt[both] * (u2[both] / (2.0 * p[both] * q[both]))
                g_of = gg[starts]
                sums = [np.bincount(g_of[both], minlength=n_groups), np.bincount(g_of[~both], minlength=n_groups),
                        np.bincount(g_of[both], weights=cnt[both], minlength=n_groups).astype(np.int64),
                        np.bincount(g_of, weights=w, minlength=n_groups)]
            bad_s = np.bincount(grun[nan], minlength=n_groups)
            bad_y = np.bincount(grun[bad], minlength=n_groups)
            for gi in range(n_groups):
                vals = (int(sums[0][gi]), int(sums[1][gi]), int(sums[2][gi]), float(sums[3][gi]), int(bad_s[gi]),
                        int(bad_y[gi]))
                if any(vals):
                    a = acc.setdefault((keys[gi], j), [0, 0, 0, 0.0, 0, 0])
                    for k, v in enumerate(vals):
                        a[k] += v

    def run(batches):
        import numpy as np
        import pyarrow as pa
        acc, carry, types = {}, None, None

        def last_key(b, i):
            return tuple(b.column(g)[i].as_py() for g in group_cols), b.column(_USER)[i].as_py()

        for batch in batches:
            if batch.num_rows == 0:
                continue
            types = [batch.schema.field(g).type for g in group_cols]
            if carry is not None:
                tail = carry[-1]
                if last_key(tail, tail.num_rows - 1) == last_key(batch, 0) == last_key(batch, batch.num_rows - 1):
                    carry.append(batch)        # one user's rows go on: nothing to measure yet
                    continue
                batch = pa.Table.from_batches(carry + [batch]).combine_chunks().to_batches()[0]
            gnew, snew = starts_of(batch)
            cut = int(np.flatnonzero(snew)[-1])  # the last user may go on in the next batch
            if cut:
                measure(batch.slice(0, cut), gnew[:cut], snew[:cut], acc)
            carry = [batch.slice(cut)]
        if carry is not None:
            batch = pa.Table.from_batches(carry).combine_chunks().to_batches()[0]
            gnew, snew = starts_of(batch)
            measure(batch, gnew, snew, acc)
        if acc:
            keys = list(acc)
            cols = [pa.array([k[0][i] for k in keys], type=t) for i, t in enumerate(types)]
            vals = list(zip(*acc.values()))
            cols += [pa.array([k[1] for k in keys], pa.int32())]
            cols += [pa.array(vals[i], pa.int64()) for i in range(3)] + [pa.array(vals[3], pa.float64())]
            cols += [pa.array(vals[i], pa.int64()) for i in (4, 5)]
            yield pa.RecordBatch.from_arrays(cols, names=[*group_cols, _MIDX, "users", "one_class", "impressions",
                                                          "weighted", "bad_scores", "bad_labels"])

    return run


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

ORACLE_RUN = "oracle"          # protocol_metrics(oracle=True): the true probabilities' run id
_TRUE_CTCVR = "__true_ctcvr"


def protocol_metrics(pred_df: DataFrame, truth_df: DataFrame | None, runs: dict, *, own_ctr=("ctr", "esmm", "esmm_ns"),
                     on_one_class: str = "nan", num_partitions: int | None = None,
                     refs: dict | None = None, oracle: bool = False) -> tuple[list[dict], dict, dict]:
    """The paper's protocol for the runs of one prediction table, with DeLong's covariance, in a few passes.

    ``runs``: ``{run_id: method}`` of the table (``schemas.dataset.PREDICTION_SCHEMA``, one row per test impression
    and run). The table is pivoted once to one row per impression (a column per run and output), and every task is a
    filter of those rows: ``ctr``, ``cvr`` (clicked rows), ``ctcvr``, and with the ground truth ``cvr_entire`` and
    ``cvr_entire_clicked`` (p_cvr against ``would_convert``). ``delong_wide`` gives each task's exact AUCs and their
    covariance, one aggregation the log-loss and calibration, and ``gauc_wide`` (one more shuffle) the GAUC of the
    ``GAUC_TASKS`` over the impressions' ``user_key`` (unknown users left out): rows of those tasks gain ``gauc``,
    ``gauc_users`` (users with both classes, those GAUC averages over) and ``gauc_impressions``. A table without
    user keys (a dataset written before them) gets no GAUC keys, and a one-line warning says why. The reference CTR
    network (method ``ctr``, NaN p_cvr) takes part in the CTR task only; methods outside ``own_ctr`` score CTR with
    the reference network's pCTR (the paper's protocol), so their CTR row is the reference's (mapped in the returned
    aliases, not recomputed; GAUC included). ``refs`` ({run_id: its reference run_id}) names each run's reference
    where the table holds several (the runs of several experiment units, each with its own reference network); by
    default every run's is the table's one run of method ``ctr``. Each task's DeLong covariance then spans every
    unit's runs: a unit's block of it is the covariance of its own runs alone (DeLong's covariance of two AUCs
    depends on those two models' scores only). ``num_partitions`` is the pivot's partition count; by default the
    table's size sets it, and every shuffle's, for the call (``_sized_shuffles``: ~ROWS_PER_TASK prediction rows per
    partition, at most ``spark.sql.shuffle.partitions``).

    ``oracle`` (with ``truth_df``): the true probabilities take part as one more model, ``ORACLE_RUN``, in the
    ``ctr``, ``cvr``, ``ctcvr`` and ``cvr_entire`` tasks of the same passes (pCTR = true_ctr, pCVR = true_cvr, pCTCVR
    their product), instead of a pass of their own (``oracle_protocol_metrics``, whose rows these equal: a test
    checks it). Its rows come last, with ``run_id`` ``ORACLE_RUN`` and the AUC's DeLong standard error ``auc_se``;
    every impression must then have its truth row.

    Returns ``(rows, {task: DeLongResult}, {task: {run_id: run_id it shares scores with}})``; ``rows`` are the dicts
    of ``task_metrics``/``entire_space_cvr_metrics`` (``run_id, task, auc, logloss, calibration, n, positives``), and
    equal theirs (a test checks it).
    """
    if num_partitions is None:
        with _sized_shuffles(pred_df.sparkSession, pred_df.count()) as k:
            return protocol_metrics(pred_df, truth_df, runs, own_ctr=own_ctr, on_one_class=on_one_class,
                                    num_partitions=k, refs=refs, oracle=oracle)
    if ORACLE_RUN in runs:
        raise MetricError(f"protocol metrics: a run may not be called {ORACLE_RUN!r} (the true probabilities' name)")
    oracle = oracle and truth_df is not None
    scored = sorted(runs)
    names = scored + ([ORACLE_RUN] if oracle else [])
    col = {(r, o): f"__m_{o}_{i}" for i, r in enumerate(scored) for o in ("ctr", "cvr", "ctcvr")}
    if oracle:
        col.update({(ORACLE_RUN, "ctr"): TRUE_CTR, (ORACLE_RUN, "cvr"): TRUE_CVR, (ORACLE_RUN, "ctcvr"): _TRUE_CTCVR})
    ref = next((r for r in scored if runs[r] == "ctr"), None)
    n_parts = num_partitions
    run = F.col(RUN_ID)
    has_users = USER_KEY in pred_df.columns
    users = [F.max(USER_KEY).alias(USER_KEY)] if has_users else []
    wide = (pred_df.repartition(n_parts, SAMPLE_ID).groupBy(SAMPLE_ID)
            .agg(F.count(F.lit(1)).alias(_NROWS), F.max(CLICK).alias(CLICK), F.max(CONVERSION).alias(CONVERSION),
                 *users, *[F.max(F.when(run == r, F.col(src))).alias(col[(r, o)]) for r in scored
                           for o, src in (("ctr", P_CTR), ("cvr", P_CVR), ("ctcvr", P_CTCVR))]))
    if truth_df is not None:
        truth_cols = [SAMPLE_ID, WOULD_CONVERT, TRUE_CVR] + ([TRUE_CTR] if oracle else [])
        wide = wide.join(truth_df.select(*truth_cols), SAMPLE_ID, "left")
        if oracle:
            wide = wide.withColumn(_TRUE_CTCVR, F.col(TRUE_CTR).cast("double") * F.col(TRUE_CVR).cast("double"))
    wide = wide.persist(CACHE)
    try:
        y, z = F.col(CLICK), F.col(CONVERSION)
        cvr_runs = [r for r in scored if runs[r] != "ctr"]
        ctr_runs = [r for r in scored if ref is None or runs[r] in own_ctr]
        with_oracle = [ORACLE_RUN] if oracle else []
        tasks = [("ctr", None, y, "ctr", ctr_runs + with_oracle), ("cvr", y == 1, z, "cvr", cvr_runs + with_oracle),
                 ("ctcvr", None, y * z, "ctcvr", cvr_runs + with_oracle)]
        if truth_df is not None:
            w = F.col(WOULD_CONVERT)
            tasks += [("cvr_entire", None, w, "cvr", cvr_runs + with_oracle),
                      ("cvr_entire_clicked", y == 1, w, "cvr", cvr_runs)]
        parts = []
        for task, cond, label, out, members in tasks:
            part = wide if cond is None else wide.where(cond)
            parts.append(part.select(F.lit(task).alias(TASK), label.cast("int").alias(_Y), F.col(_NROWS),
                                     *([F.col(USER_KEY)] if has_users else []),
                                     *[(F.col(col[(r, out)]) if r in members else F.lit(None)).cast("double")
                                       .alias(f"__m_s{i}") for i, r in enumerate(names)]))
        stacked = parts[0]
        for p in parts[1:]:
            stacked = stacked.unionByName(p)
        stacked = stacked.persist(CACHE)
        try:
            bad = stacked.where(F.col(_NROWS) != len(scored)).count()
            if bad:
                raise MetricError(f"protocol metrics: {bad} task rows come from impressions that are not scored by "
                                  f"exactly the {len(scored)} runs {scored}")
            if oracle:
                untrue = wide.where(F.col(TRUE_CTR).isNull() | F.col(TRUE_CVR).isNull()).count()
                if untrue:
                    raise MetricError(f"protocol metrics: {untrue} test impressions have no ground-truth row, so the "
                                      "oracle cannot be scored on the same rows as the runs")
            scols = {r: f"__m_s{i}" for i, r in enumerate(names)}
            work = _fewer_tasks(stacked, stacked.count())
            dl = delong_wide(work, scols, _Y, (TASK,), on_one_class=on_one_class, cache=False)
            ll = _wide_logloss(work, scols)
            ga = _task_gauc(work, scols, has_users, num_partitions)
        finally:
            stacked.unpersist()
        ece = (calibration_error(wide, {r: col[(r, "cvr")] for r in cvr_runs}, TRUE_CVR)
               if truth_df is not None and cvr_runs else {})
    finally:
        wide.unpersist()
    rows, aliases = [], {}
    order = [t[0] for t in tasks]
    for task in order:
        res = dl.get((task,))
        if res is None:
            continue
        members = [r for r in names if r in res.models]
        aliases[task] = {r: (refs or {}).get(r, ref) for r in names
                         if task == "ctr" and r not in members and (refs or {}).get(r, ref) is not None}
        for r in names:
            src = aliases[task].get(r, r)
            if src not in members:
                continue
            c = ll[(task, src)]
            rows.append({RUN_ID: r, TASK: task, "auc": float(res.auc[res.index(src)]), **c,
                         **_gauc_fields(ga, task, src), **(ece.get(src, {}) if task == "cvr_entire" else {}),
                         **({"auc_se": res.se(r)} if r == ORACLE_RUN else {})})
    rows.sort(key=lambda d: (d[RUN_ID] == ORACLE_RUN, d[RUN_ID], order.index(d[TASK])))
    return rows, {t: dl[(t,)] for t in order if (t,) in dl}, aliases


def _task_gauc(stacked: DataFrame, scols: dict, has_users: bool, num_partitions: int | None) -> dict | None:
    """``gauc_wide`` of the GAUC_TASKS rows of the task-stacked wide rows, or None (with a one-line warning) when
    the predictions carry no user keys."""
    note = ("GAUC omitted: the predictions carry no user_key (a dataset written before user keys; re-run the ETL "
            "with --overwrite and evaluate again to get it)")
    if not has_users:
        log.warning(note)
        return None
    res = gauc_wide(stacked.where(F.col(TASK).isin(*GAUC_TASKS)), scols, _Y, USER_KEY, (TASK,),
                    unknown_user=UNKNOWN_USER, num_partitions=num_partitions)
    if not res:
        log.warning(note)
        return None
    log.info("GAUC over %s", ", ".join(f"{t}: {max(v['users'] for v in res[(t,)].values()):,} users"
                                       for t in GAUC_TASKS if (t,) in res))
    return res


def _gauc_fields(ga: dict | None, task: str, run: str) -> dict:
    """The GAUC keys of one metrics row (none without a GAUC result for the task and run)."""
    r = (ga or {}).get((task,), {}).get(run)
    return {} if r is None else {"gauc": r["gauc"], "gauc_users": r["users"], "gauc_impressions": r["impressions"]}


ECE_BINS = 20


def calibration_error(df: DataFrame, scores: dict, truth_col: str, bins: int = ECE_BINS,
                      relative_error: float = 1e-4) -> dict:
    """Expected calibration error of each score column against the true probabilities ``truth_col``, over every
    row of ``df`` (the entire space): ``{name: {"ece", "mean_pred", "mean_true", "ece_bins"}}``.

    ECE = sum_b (n_b / N) |mean score_b - mean truth_b| over ``bins`` equal-mass bins of the score (boundaries
    from one ``approxQuantile`` pass over all columns, rank error ``relative_error``; a score equal to a boundary
    goes to the lower bin, so ties never split). Against the *true* probability rather than 0/1 outcomes, so it
    measures the model's bias alone, without the outcomes' sampling noise. NaN scores (a model that does not
    predict pCVR) and rows without a true probability are left out. Two passes: the quantiles, then one aggregation of (model, bin) sums."""
    names = list(scores)
    if not names:
        return {}
    cols = [scores[n] for n in names]
    probs = [i / bins for i in range(1, bins)]
    edges = df.approxQuantile(cols, probs, relative_error)
    parts = []
    for i, (name, c) in enumerate(zip(names, cols)):
        s = F.col(c).cast("double")
        b = sum((F.when(s > F.lit(float(e)), 1).otherwise(0) for e in sorted(set(edges[i]))), F.lit(0))
        parts.append(df.where(s.isNotNull() & ~F.isnan(s) & F.col(truth_col).isNotNull()).select(
            F.lit(i).alias("__model"), b.alias("__bin"), s.alias("__p"), F.col(truth_col).cast("double").alias("__t")))
    stacked = parts[0]
    for p in parts[1:]:
        stacked = stacked.unionByName(p)
    agg = (stacked.groupBy("__model", "__bin")
           .agg(F.count(F.lit(1)).alias("n"), F.sum("__p").alias("sp"), F.sum("__t").alias("st")).collect())
    out = {}
    for i, name in enumerate(names):
        rows = [r for r in agg if r["__model"] == i]
        n = sum(r["n"] for r in rows)
        if n == 0:
            continue
        ece = sum(abs(r["sp"] - r["st"]) for r in rows) / n   # sum_b n_b/N |sp/n_b - st/n_b|
        out[name] = {"ece": ece, "mean_pred": sum(r["sp"] for r in rows) / n,
                     "mean_true": sum(r["st"] for r in rows) / n, "ece_bins": len(rows)}
    return out


def oracle_protocol_metrics(test_df_with_truth: DataFrame) -> list[dict]:
    """``oracle_metrics``'s rows (true probabilities as scores) plus each AUC's DeLong standard error ``auc_se``, from
    one ``delong_wide`` job over the task-stacked rows (no range-partitioned AUC pass; the AUCs are the same); with a
    ``user_key`` column, also the GAUC keys of ``protocol_metrics``' rows."""
    y, z, ctr, cvr = F.col(CLICK), F.col(CONVERSION), F.col(TRUE_CTR), F.col(TRUE_CVR)
    tasks = (("ctr", None, ctr, y), ("cvr", y == 1, cvr, z), ("ctcvr", None, ctr.cast("double") * cvr.cast("double"),
                                                               y * z),
             ("cvr_entire", None, cvr, F.col(WOULD_CONVERT)))
    stacked = None
    has_users = USER_KEY in test_df_with_truth.columns
    for task, cond, score, label in tasks:
        part = (test_df_with_truth if cond is None else test_df_with_truth.where(cond)).select(
            F.lit(task).alias(TASK), label.cast("int").alias(_Y), score.cast("double").alias("__m_s0"),
            *([F.col(USER_KEY)] if has_users else []))
        stacked = part if stacked is None else stacked.unionByName(part)
    stacked = stacked.persist(CACHE)
    try:
        n = stacked.count()
        with _sized_shuffles(stacked.sparkSession, n):
            work = _fewer_tasks(stacked, n)
            dl = delong_wide(work, {"oracle": "__m_s0"}, _Y, (TASK,), on_one_class="nan", cache=False)
            ll = _wide_logloss(work, {"oracle": "__m_s0"})
            ga = _task_gauc(work, {"oracle": "__m_s0"}, True, None) if has_users else None
    finally:
        stacked.unpersist()
    rows = []
    for task, *_ in tasks:
        if (task,) in dl:
            res = dl[(task,)]
            rows.append({METHOD: "oracle", TASK: task, "auc": float(res.auc[0]), **ll[(task, "oracle")],
                         "auc_se": res.se("oracle"), **_gauc_fields(ga, task, "oracle")})
    return rows


def _wide_logloss(stacked: DataFrame, scols: dict) -> dict:
    """{(task, run): {logloss, calibration, n, positives}} in one aggregation over the stacked wide rows."""
    y = F.col(_Y)
    aggs = [F.sum(y).alias("pos"), F.count(F.lit(1)).alias("n")]
    for r, c in scols.items():
        s = F.col(c)
        p = F.least(F.greatest(s, F.lit(EPS)), F.lit(1.0 - EPS))
        aggs += [F.avg(-(y * F.log(p) + (1 - y) * F.log(1 - p))).alias(f"ll_{c}"), F.avg(s).alias(f"mp_{c}"),
                 F.count(s).alias(f"n_{c}")]
    out = {}
    for row in stacked.groupBy(TASK).agg(*aggs).collect():
        for r, c in scols.items():
            if row[f"n_{c}"]:
                rate = row["pos"] / row["n"]
                out[(row[TASK], r)] = {"logloss": row[f"ll_{c}"],
                                       "calibration": row[f"mp_{c}"] / rate if rate > 0 else math.nan,
                                       "n": row["n"], "positives": row["pos"]}
    return out


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
