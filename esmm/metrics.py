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
variance ``c_aa + c_bb - 2 c_ab`` and is tested against the normal distribution. Placements depend on the whole
score ordering of one model while the covariance pairs placements of *different* models on the same key, so the
distributed computation is:

1. (pass 1, the AUC job above with ``(group, model)`` as the group) range-partitioned ``(group, model, score)``
   counts give, per group and model, the validation counts, P, N, the exact AUC, and for every range partition its
   first score, P and N. The sorted first scores are fixed *bucket boundaries* and the partition totals are exact
   per-bucket counts (the partitions held disjoint, ordered score ranges), so the driver knows, per bucket, the
   negatives below it and the positives before it. Nothing later depends on re-running the range sampling.
2. (pass 2) the rows and the distinct-score counts are unioned: every distinct ``(group, model, score)`` becomes a
   *header* carrying its ``(pos_s, neg_s)``, followed by its rows. A broadcast join gives every row the integer id
   of its (group, model), a ``mapInArrow`` before the shuffle its bucket (``searchsorted`` on the boundaries, which
   travel inside the function: a few floats per partition and model); ``repartition`` on ``(id, bucket)`` +
   ``sortWithinPartitions`` on ``(id, bucket, score, header first)`` lays each bucket out in score order, and a
   second ``mapInArrow`` (numpy cumulative sums over the headers, state carried across Arrow batches of a bucket,
   O(1) memory however large a tie run is) gives each row its placement from the bucket's offsets and the running
   counts ``neg_upto_s``/``pos_upto_s`` of the bucket's negatives/positives scored <= s:
   ``V10 = (2 (neg_before_bucket + neg_upto_s) - neg_s) / 2N`` and
   ``V01 = (2 (P - pos_before_bucket - pos_upto_s) + pos_s) / 2P`` (integer numerators), emitted centered on the
   model's exact AUC;
3. one aggregation per ``(group, key, label)`` assembles each key's K placements, and one per ``(group, label)``
   sums them, their cross products and the matched-key counts. Only ``K + K(K+1)/2`` sums per group and class reach
   the driver, which forms ``S = (sum c_k c_l - sum c_k sum c_l / n) / (n - 1)``; centering on the known mean
   keeps the sums free of cancellation.

Besides re-aggregating the distinct-score counts, pass 2 shuffles the rows twice (the bucket exchange and the per-key
assembly) plus the tiny per-class sums; no join of placements back to the rows is needed because the headers travel
with them.

The key check is exact and free: a group is accepted only if every model has the same (P, N) (pass 1) and every
(key, label) of the group has exactly one row of every model (step 3), so missing or duplicated keys and labels that
differ between models all raise ``MetricError``.

Log-loss clips probabilities to ``[1e-7, 1 - 1e-7]``; calibration is mean prediction / observed positive rate.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from statistics import NormalDist

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import DecimalType, DoubleType, IntegerType, LongType, StructField, StructType

from schemas.dataset import (CLICK, CONVERSION, METHOD, P_CTCVR, P_CTR, P_CVR, SAMPLE_ID, TRUE_CTR, TRUE_CVR,
                             WOULD_CONVERT)

log = logging.getLogger(__name__)

EPS = 1e-7
TASK = "task"
# Internal column names (prefixed so they do not collide with the caller's group columns).
_S, _Y, _POS, _NEG, _BAD = "__m_score", "__m_label", "__m_pos", "__m_neg", "__m_bad_label"
_FIRST, _NUM2, _BAD_S = "__m_first_score", "__m_twice_num", "__m_bad_score"
_MODEL, _KEY, _KIND, _GID, _BUCKET, _MIDX, _C, _NROWS = ("__m_model", "__m_key", "__m_kind", "__m_gid",
                                                      "__m_bucket", "__m_midx", "__m_centered", "__m_nrows")
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


def delong(df: DataFrame, score_col: str, label_col: str, model_col: str, key_col: str, group_cols=(), *,
           on_one_class: str = "raise", num_partitions: int | None = None) -> dict[tuple, DeLongResult]:
    """DeLong covariance of the AUCs of several models scored on the same keys, per group.

    ``df`` is long format: one row per ``(group..., model, key)`` with a numeric score and a 0/1 label, e.g.
    a prediction table stacked by model with the sample id as ``key_col``. Model ids are compared as strings. Within a
    group every model must score the same keys with the same labels, exactly once, else ``MetricError`` names the
    group and models. Null/NaN scores, labels outside {0, 1} and null model ids raise; a group with one class raises
    or, with ``on_one_class="nan"``, gets NaN ``auc``/``cov``. ``num_partitions`` is the range-partition and bucket
    count (default: ``spark.sql.shuffle.partitions``). Returns ``{group_values_tuple: DeLongResult}`` (key ``()``
    without groups). See the module docstring for the algorithm: two passes, nothing row-level on the driver.
    ``df`` is evaluated twice, so it must be deterministic (persist it when it is expensive or is not); a mismatch
    between the passes is detected (placements not averaging to the AUC) rather than silently used.
    """
    if on_one_class not in ("raise", "nan"):
        raise ValueError(f"on_one_class must be 'raise' or 'nan', got {on_one_class!r}")
    group_cols = tuple(group_cols)
    gm = (*group_cols, _MODEL)
    n_parts = num_partitions or int(df.sparkSession.conf.get("spark.sql.shuffle.partitions"))
    # + 0.0 turns -0.0 into 0.0, so rows sort exactly like their (normalized) distinct-score headers
    rows = df.select(*[F.col(g) for g in group_cols], F.col(model_col).cast("string").alias(_MODEL),
                     F.col(key_col).alias(_KEY), (F.col(score_col).cast("double") + F.lit(0.0)).alias(_S),
                     F.col(label_col).alias(_Y))
    counts = _score_label_counts(rows, _S, _Y, gm)

    # pass 1: validation, P/N, exact AUCs and bucket boundaries per (group, model)
    per_gm = defaultdict(list)
    for r in _partition_summaries(counts, gm, n_parts):
        per_gm[tuple(r[c] for c in gm)].append(r)
    per_group = defaultdict(dict)
    for (*key, model), parts in per_gm.items():
        where = f"{_where(tuple(key), group_cols)}, model {model!r}"
        _check_summaries(parts, where, score_col, label_col, what="DeLong AUC")
        if model is None:
            raise MetricError(f"DeLong test, {_where(tuple(key), group_cols)}: "
                              f"{sum(r[_POS] + r[_NEG] for r in parts)} rows have a null {model_col}")
        per_group[tuple(key)][model] = _ordered_totals(parts)

    results, specs = {}, []  # specs: (group key, models, P, N, per model (ordered parts, twice numerator))
    for key in sorted(per_group, key=lambda k: tuple((v is None, str(v)) for v in k)):
        by_model = per_group[key]
        models = tuple(sorted(by_model))
        sizes = {m: (by_model[m][2], by_model[m][3]) for m in models}
        if len(set(sizes.values())) > 1:
            raise MetricError(f"DeLong test, {_where(key, group_cols)}: models must score the same keys with the same "
                              f"labels, but their (positives, negatives) differ: {sizes}")
        poss, negs = sizes[models[0]]
        if poss == 0 or negs == 0:
            msg = (f"DeLong test of {score_col} is undefined for {_where(key, group_cols)}: label column "
                   f"{label_col!r} has one class only (positives={poss}, negatives={negs})")
            if on_one_class == "raise":
                raise MetricError(msg)
            log.warning("%s; reporting NaN", msg)
            k = len(models)
            results[key] = _delong_result(models, np.full(k, math.nan), np.full((k, k), math.nan), poss, negs)
            continue
        specs.append((key, models, poss, negs, [(by_model[m][0], by_model[m][1]) for m in models]))
    if specs:
        results.update(_delong_pass2(rows, counts, specs, group_cols, n_parts, model_col))
    return {key: results[key] for key in sorted(results, key=lambda k: tuple((v is None, str(v)) for v in k))}


def _delong_result(models, auc_values, cov, poss, negs) -> DeLongResult:
    """Freeze the arrays and build the result."""
    for a in (auc_values, cov):
        a.setflags(write=False)
    return DeLongResult(models, auc_values, cov, int(poss), int(negs))


def _delong_pass2(rows: DataFrame, counts: DataFrame, specs: list, group_cols: tuple, n_parts: int,
                  model_col: str) -> dict[tuple, DeLongResult]:
    """Placements, per-key assembly and the covariance sums for the groups of ``specs`` (module docstring, 2-3)."""
    gm = (*group_cols, _MODEL)
    all_models = sorted({m for _, models, *_ in specs for m in models})
    midx_of = {m: i for i, m in enumerate(all_models)}
    # driver-side tables, indexed by gid (one per valid (group, model)) and by flat bucket = base[gid] + bucket
    lookup, bounds, base, nbuckets, pos_before, neg_before = [], [], [], [], [], []
    tot_p, tot_n, exact_auc, midx = [], [], [], []
    for key, models, poss, negs, per_model in specs:
        for m, (ordered, twice_num) in zip(models, per_model):
            lookup.append((*key, m, len(lookup)))
            bounds.append(np.array([r[_FIRST] for r in ordered], dtype=np.float64))
            base.append(len(pos_before))
            nbuckets.append(len(ordered))
            pos_before += np.cumsum([0] + [r[_POS] for r in ordered[:-1]]).tolist()
            neg_before += np.cumsum([0] + [r[_NEG] for r in ordered[:-1]]).tolist()
            tot_p.append(poss)
            tot_n.append(negs)
            exact_auc.append(twice_num / (2 * poss * negs))
            midx.append(midx_of[m])
    tables = {"base": np.array(base, np.int64), "nbuckets": np.array(nbuckets, np.int64),
              "pos_before": np.array(pos_before, np.int64), "neg_before": np.array(neg_before, np.int64),
              "P": np.array(tot_p, np.int64), "N": np.array(tot_n, np.int64),
              "auc": np.array(exact_auc, np.float64), "midx": np.array(midx, np.int32)}

    spark = rows.sparkSession
    lk_names = [f"__m_lk{i}" for i in range(len(gm))]
    lk_schema = StructType([StructField(n, counts.schema[c].dataType) for n, c in zip(lk_names, gm)]
                           + [StructField(_GID, IntegerType(), False)])
    lk = F.broadcast(spark.createDataFrame(lookup, lk_schema))
    data = rows.select(*gm, _KEY, _S, F.col(_Y).cast("int").alias(_Y), F.lit(1).alias(_KIND))
    headers = counts.select(*gm, _S, _POS, _NEG, F.lit(0).alias(_KIND))
    both = data.unionByName(headers, allowMissingColumns=True)
    both = (both.join(lk, on=[both[c].eqNullSafe(lk[n]) for c, n in zip(gm, lk_names)], how="inner")
            .select(*group_cols, _KEY, _Y, _S, _POS, _NEG, _KIND, _GID))
    bucketed_schema = StructType(both.schema.fields + [StructField(_BUCKET, IntegerType(), False)])
    bucketed = both.mapInArrow(_make_bucketer(dict(enumerate(bounds))), bucketed_schema)
    placed_schema = StructType([both.schema[g] for g in group_cols]
                               + [both.schema[_KEY], both.schema[_Y], StructField(_MIDX, IntegerType(), False),
                                  StructField(_C, DoubleType(), False)])
    placed = (bucketed.repartition(n_parts, _GID, _BUCKET)
              .sortWithinPartitions(_GID, _BUCKET, _S, _KIND)
              .mapInArrow(_make_placer(tables, list(group_cols)), placed_schema))

    v = [f"__m_v{k}" for k in range(len(all_models))]
    per_key = placed.groupBy(*group_cols, _KEY, _Y).agg(
        F.count(F.lit(1)).alias(_NROWS),
        *[F.max(F.when(F.col(_MIDX) == k, F.col(_C))).alias(v[k]) for k in range(len(all_models))])
    pairs = sorted({(midx_of[a], midx_of[b]) for _, models, *_ in specs for a in models for b in models
                    if midx_of[a] <= midx_of[b]})
    sums = per_key.groupBy(*group_cols, _Y).agg(
        F.count(F.lit(1)).alias("keys"), F.sum(_NROWS).alias("rows"),
        *[F.count(v[k]).alias(f"n{k}") for k in range(len(all_models))],
        *[F.sum(v[k]).alias(f"s{k}") for k in range(len(all_models))],
        *[F.sum(F.col(v[k]) * F.col(v[l])).alias(f"q{k}_{l}") for k, l in pairs]).collect()
    by_class = {(tuple(r[g] for g in group_cols), r[_Y]): r for r in sums}

    out = {}
    for key, models, poss, negs, per_model in specs:
        where = _where(key, group_cols)
        ids = [midx_of[m] for m in models]
        scatter = []
        for label, n in ((1, poss), (0, negs)):
            r = by_class.get((key, label))
            matched = {m: (r[f"n{i}"] if r is not None else 0) for m, i in zip(models, ids)}
            if r is None or r["keys"] != n or r["rows"] != n * len(models) or set(matched.values()) != {n}:
                got = (r["keys"], r["rows"]) if r is not None else (0, 0)
                raise MetricError(
                    f"DeLong test, {where}: the models {list(models)} (column {model_col!r}) do not score the same "
                    f"keys with the same labels: label {label} has {got[0]} distinct keys and {got[1]} rows, keys "
                    f"scored per model {matched}; expected {n} keys scored exactly once by every model")
            s = np.array([r[f"s{i}"] for i in ids], dtype=np.float64)
            q = np.array([[r[f"q{min(i, j)}_{max(i, j)}"] for j in ids] for i in ids], dtype=np.float64)
            if np.any(np.abs(s) > 1e-9 * n):  # placements average to the exact AUC unless buckets went wrong
                raise RuntimeError(f"DeLong test, {where}: placements do not average to the exact AUCs "
                                   f"(mean deviations {(s / n).tolist()})")
            scatter.append((q - np.outer(s, s) / n) / (n - 1) / n if n > 1 else np.full(q.shape, math.nan))
        auc_values = np.array([twice / (2 * poss * negs) for _, twice in per_model], dtype=np.float64)
        out[key] = _delong_result(models, auc_values, scatter[0] + scatter[1], poss, negs)
    return out


def _make_bucketer(bounds: dict):
    """Executor function (before the bucket shuffle): bucket = index of the last boundary <= score, per gid."""

    def assign(batches):
        import numpy as np
        import pyarrow as pa
        for batch in batches:
            gid = batch.column(_GID).to_numpy(zero_copy_only=False)
            score = batch.column(_S).to_numpy(zero_copy_only=False)
            bucket = np.empty(len(gid), dtype=np.int32)
            for g in np.unique(gid):  # one numpy step per (group, model) present in the batch
                m = gid == g
                bucket[m] = np.searchsorted(bounds[int(g)], score[m], side="right") - 1
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.array(bucket, pa.int32())],
                                             names=[*batch.schema.names, _BUCKET])

    return assign


def _make_placer(t: dict, group_cols: list):
    """Executor function over (gid, bucket, score, header-first)-sorted rows: each data row's centered placement.

    Within a bucket, header rows carry ``(pos_s, neg_s)`` of the score that the following data rows have; the
    inclusive running sums of header counts (``pos_upto``/``neg_upto``) and the last header's counts are carried
    from one Arrow batch to the next while the bucket continues.
    """

    def place(batches):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        carry = None  # (gid, bucket, pos_upto, neg_upto, pos_s, neg_s) at the end of the previous batch
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            gid = batch.column(_GID).to_numpy(zero_copy_only=False).astype(np.int64)
            bucket = batch.column(_BUCKET).to_numpy(zero_copy_only=False).astype(np.int64)
            header = batch.column(_KIND).to_numpy(zero_copy_only=False) == 0
            pos, neg = (np.where(header, pc.fill_null(batch.column(c), 0).to_numpy(zero_copy_only=False), 0)
                        .astype(np.int64) for c in (_POS, _NEG))
            if np.any(bucket < 0) or np.any(bucket >= t["nbuckets"][gid]):
                raise RuntimeError("DeLong placement: a score falls outside its (group, model)'s buckets")
            new = np.ones(n, dtype=bool)
            new[1:] = (gid[1:] != gid[:-1]) | (bucket[1:] != bucket[:-1])
            starts = np.flatnonzero(new)
            lengths = np.diff(np.append(starts, n))
            pos_upto, neg_upto = np.cumsum(pos), np.cumsum(neg)
            pos_upto -= np.repeat(pos_upto[starts] - pos[starts], lengths)  # inclusive, within the segment
            neg_upto -= np.repeat(neg_upto[starts] - neg[starts], lengths)
            last = np.maximum.accumulate(np.where(header, np.arange(n), -1))  # the row's score's header
            pos_s, neg_s = pos[np.maximum(last, 0)], neg[np.maximum(last, 0)]
            orphan = last < 0  # data rows before the batch's first header: their header was in an earlier batch
            if carry is not None and (carry[0], carry[1]) == (gid[0], bucket[0]):
                pos_upto[:lengths[0]] += carry[2]
                neg_upto[:lengths[0]] += carry[3]
                pos_s[orphan], neg_s[orphan] = carry[4], carry[5]
            elif orphan.any():
                raise RuntimeError("DeLong placement: rows arrived before their score's header")
            carry = (gid[-1], bucket[-1], pos_upto[-1], neg_upto[-1], pos_s[-1], neg_s[-1])

            data = ~header
            g, flat = gid[data], t["base"][gid[data]] + bucket[data]
            label = batch.column(_Y).filter(pa.array(data)).to_numpy(zero_copy_only=False)
            v10 = (2 * (t["neg_before"][flat] + neg_upto[data]) - neg_s[data]) / (2.0 * t["N"][g])
            v01 = (2 * (t["P"][g] - t["pos_before"][flat] - pos_upto[data]) + pos_s[data]) / (2.0 * t["P"][g])
            centered = np.where(label == 1, v10, v01) - t["auc"][g]
            picked = batch.filter(pa.array(data))
            cols = [picked.column(c) for c in [*group_cols, _KEY, _Y]]
            cols += [pa.array(t["midx"][g], pa.int32()), pa.array(centered, pa.float64())]
            yield pa.RecordBatch.from_arrays(cols, names=[*group_cols, _KEY, _Y, _MIDX, _C])

    return place


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
