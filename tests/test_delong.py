"""esmm.metrics.delong: DeLong's covariance against a direct O(n^2) numpy computation, a hand-checked case with
ties, identical models, a bootstrap, the exact AUC, groups, and the checks on the stacked rows."""
import contextlib
import math

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F
from scipy.stats import rankdata

from esmm.metrics import MetricError, auc, delong, delong_wide

EXACT = 1e-12

# Hand-checked case: 3 positives (keys p0-p2) and 4 negatives (n0-n3), scores per model, ties within a model.
HAND = {"a": ([0.9, 0.5, 0.3], [0.5, 0.3, 0.2, 0.1]),
        "b": ([1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]),
        "c": ([0.9, 0.5, 0.3], [0.5, 0.3, 0.2, 0.1])}  # c is a copy of a


def _long_rows(group, scores: dict, labels) -> list[dict]:
    """Stacked rows for one group: ``scores`` maps model -> per-key scores aligned with ``labels``."""
    return [{"g": group, "m": m, "k": i, "s": float(s[i]), "y": int(labels[i])}
            for m, s in scores.items() for i in range(len(labels))]


def _hand_scores():
    labels = [1, 1, 1, 0, 0, 0, 0]
    return {m: pos + neg for m, (pos, neg) in HAND.items()}, labels


def _random_scores(seed, n, models, decimals):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2], y[2:4] = 1, 0  # both classes, at least two of each
    x = rng.normal(size=n) + 0.8 * y
    return {m: np.round(x + rng.normal(scale=0.5 + i, size=n), decimals) for i, m in enumerate(models)}, y


def _reference(scores: dict, labels):
    """Direct DeLong: pairwise placements (O(P N) per model), then sample covariances with ddof=1."""
    y = np.asarray(labels)
    v10, v01 = [], []
    for m in sorted(scores):
        s = np.asarray(scores[m], dtype=float)
        sp, sn = s[y == 1], s[y == 0]
        wins = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
        v10.append(wins.mean(axis=1))
        v01.append(wins.mean(axis=0))
    v10, v01 = np.array(v10), np.array(v01)
    cov = np.atleast_2d(np.cov(v10, ddof=1)) / v10.shape[1] + np.atleast_2d(np.cov(v01, ddof=1)) / v01.shape[1]
    return v10.mean(axis=1), cov


def _medium_scores():
    """2000 keys, two correlated models (shared signal x, independent noise), scores on a 0.01 grid (ties)."""
    rng = np.random.default_rng(11)
    n = 2000
    y = (rng.random(n) < 0.3).astype(int)
    x = rng.normal(size=n) + 1.0 * y
    scores = {m: np.round(x + rng.normal(scale=noise, size=n), 2) for m, noise in (("m1", 0.6), ("m2", 0.9))}
    return scores, y


CASES = {"hand": _hand_scores(),
         "r1": _random_scores(1, 40, ["a", "b", "d"], 1),   # heavy ties: one decimal
         "r2": _random_scores(2, 60, ["a", "b", "d"], 2),
         "medium": _medium_scores()}


@pytest.fixture(scope="module", params=["broadcast", "sorted", "mixed"])
def stacked(spark, request):
    """All cases as groups of one DataFrame (plus a one-class group and a null group value holding the hand case),
    evaluated in one delong call with 4 range partitions/buckets and 16-row Arrow batches, so bucket offsets and
    batch-spanning tie runs are exercised; once with the minority scores broadcast, once by the distributed sort
    (DELONG_BROADCAST_SCORES = 0, 4 shuffle partitions), once mixed (a bound of 30 scores: the small groups
    broadcast, the others sorted, in the same call)."""
    rows = [r for name, (scores, labels) in CASES.items() for r in _long_rows(name, scores, labels)]
    rows += _long_rows("one", {"a": [0.1, 0.2], "b": [0.3, 0.4]}, [0, 0])
    rows += _long_rows(None, *CASES["hand"])
    df = spark.createDataFrame(pd.DataFrame(rows).sample(frac=1.0, random_state=0))
    with _delong_path(spark, request.param, batch=16):
        got = delong(df, "s", "y", "m", "k", ["g"], on_one_class="nan", num_partitions=4)
        aucs = auc(df, "s", "y", ["g", "m"], on_one_class="nan", num_partitions=4)
    return got, aucs


@contextlib.contextmanager
def _delong_path(spark, path: str, batch: int):
    import esmm.metrics as M
    saved = (M.DELONG_BROADCAST_SCORES, spark.conf.get("spark.sql.shuffle.partitions"))
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch))
    if path in ("sorted", "mixed"):
        M.DELONG_BROADCAST_SCORES = 0 if path == "sorted" else 30
        spark.conf.set("spark.sql.shuffle.partitions", "4")
    try:
        yield
    finally:
        M.DELONG_BROADCAST_SCORES = saved[0]
        spark.conf.set("spark.sql.shuffle.partitions", saved[1])
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")


def test_hand_example(stacked):
    # Model a, V10 over positives 0.9, 0.5, 0.3 against negatives 0.5, 0.3, 0.2, 0.1:
    #   4/4, (3 + 1/2)/4, (2 + 1/2)/4 = 24/24, 21/24, 15/24 -> AUC_a = 20/24 = 5/6
    #   S10_aa = ((4/24)^2 + (1/24)^2 + (-5/24)^2) / 2 = 21/576
    # V01 over negatives 0.5, 0.3, 0.2, 0.1: (1 + 1/2)/3, (2 + 1/2)/3, 1, 1 = 3/6, 5/6, 6/6, 6/6 (mean 5/6)
    #   S01_aa = ((-2/6)^2 + 0 + (1/6)^2 + (1/6)^2) / 3 = 2/36
    #   var_a = S10_aa / 3 + S01_aa / 4 = 7/576 + 8/576 = 15/576
    # Model b (binary scores), positives 1, 1, 0 and negatives 1, 0, 0, 0:
    #   V10 = 3.5/4, 3.5/4, 1.5/4 = 21/24, 21/24, 9/24 -> AUC_b = 17/24; S10_bb = (16 + 16 + 64)/576 / 2 = 48/576
    #   V01 = (0 + 2/2)/3, (2 + 1/2)/3 x3 = 2/6, 5/6, 5/6, 5/6 (mean 17/24); S01_bb = 6.75/36 / 3 = 36/576
    #   var_b = 16/576 + 9/576 = 25/576
    #   S10_ab = (4*4 + 1*4 + 5*8)/576 / 2 = 30/576; S01_ab = (2*2.25 + 0 + 0.75 + 0.75)/36 / 3 = 32/576
    #   cov_ab = 10/576 + 8/576 = 18/576
    # diff a - b = 3/24 = 1/8, var = (15 + 25 - 2*18)/576 = 1/144, se = 1/12, z = 1.5
    got, _ = stacked
    r = got[("hand",)]
    assert r.models == ("a", "b", "c") and (r.positives, r.negatives) == (3, 4)
    np.testing.assert_allclose(r.auc, [20 / 24, 17 / 24, 20 / 24], rtol=0, atol=EXACT)
    expect = np.array([[15, 18, 15], [18, 25, 18], [15, 18, 15]]) / 576
    np.testing.assert_allclose(r.cov, expect, rtol=0, atol=EXACT)
    assert r.se("a") == pytest.approx(math.sqrt(15 / 576), abs=EXACT)
    ab = r.compare("a", "b")
    assert ab["diff"] == pytest.approx(1 / 8, abs=EXACT) and ab["se"] == pytest.approx(1 / 12, abs=EXACT)
    assert ab["z"] == pytest.approx(1.5, abs=1e-9)
    assert ab["p_value"] == pytest.approx(0.1336144025377, abs=1e-9)  # 2 * (1 - Phi(1.5))
    assert ab["ci_low"] == pytest.approx(1 / 8 - 1.959963984540054 / 12, abs=1e-9)
    assert ab["ci_high"] == pytest.approx(1 / 8 + 1.959963984540054 / 12, abs=1e-9)
    assert r.compare("b", "a")["z"] == pytest.approx(-1.5, abs=1e-9)
    with pytest.raises(KeyError):
        r.se("zzz")


def test_identical_models_have_zero_difference(stacked):
    got, _ = stacked
    ac = got[("hand",)].compare("a", "c", level=0.9)
    assert ac == {"diff": 0.0, "se": 0.0, "ci_low": 0.0, "ci_high": 0.0, "z": 0.0, "p_value": 1.0}


def test_matches_direct_computation_per_group(stacked):
    got, _ = stacked
    for name, (scores, labels) in CASES.items():
        r = got[(name,)]
        ref_auc, ref_cov = _reference(scores, labels)
        assert r.models == tuple(sorted(scores))
        assert (r.positives, r.negatives) == (int(np.sum(labels)), len(labels) - int(np.sum(labels)))
        np.testing.assert_allclose(r.auc, ref_auc, rtol=0, atol=EXACT, err_msg=name)
        np.testing.assert_allclose(r.cov, ref_cov, rtol=0, atol=EXACT, err_msg=name)
        assert np.allclose(r.cov, r.cov.T, rtol=0, atol=1e-15)
    # the groups hold different data and get different, independently correct results; a null group value is a group
    assert not np.allclose(got[("r1",)].cov, got[("r2",)].cov)
    np.testing.assert_array_equal(got[(None,)].cov, got[("hand",)].cov)


def test_aucs_equal_exact_auc_and_one_class_group_is_nan(stacked):
    got, aucs = stacked
    for (g,), r in got.items():
        for i, m in enumerate(r.models):
            a = aucs[(g, m)]
            assert (math.isnan(a) and math.isnan(r.auc[i])) or r.auc[i] == a, (g, m)
    one = got[("one",)]
    assert one.models == ("a", "b") and (one.positives, one.negatives) == (0, 2)
    assert np.isnan(one.auc).all() and np.isnan(one.cov).all() and math.isnan(one.compare("a", "b")["p_value"])
    assert list(got) == [("hand",), ("medium",), ("one",), ("r1",), ("r2",), (None,)]
    assert not got[("hand",)].auc.flags.writeable


def test_bootstrap_agrees_on_medium_case(stacked):
    got, _ = stacked
    r = got[("medium",)]  # exactness against the direct computation is checked above
    scores, y = CASES["medium"]

    def rank_auc(s, lab):  # Mann-Whitney with mid-ranks for ties
        p = lab.sum()
        return (rankdata(s)[lab == 1].sum() - p * (p + 1) / 2) / (p * (len(lab) - p))

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boot = np.random.default_rng(5)
    diffs, a1 = [], []
    for _ in range(300):  # stratified bootstrap over keys: both models see the same resample
        idx = np.concatenate([boot.choice(pos, len(pos)), boot.choice(neg, len(neg))])
        a = [rank_auc(scores[m][idx], y[idx]) for m in ("m1", "m2")]
        diffs.append(a[0] - a[1])
        a1.append(a[0])
    res = r.compare("m1", "m2")
    assert res["se"] == pytest.approx(np.std(diffs, ddof=1), rel=0.15)
    assert r.se("m1") == pytest.approx(np.std(a1, ddof=1), rel=0.15)
    assert r.cov[0, 1] > 0.3 * math.sqrt(r.cov[0, 0] * r.cov[1, 1])  # the shared signal correlates the AUCs
    assert res["ci_low"] < res["diff"] < res["ci_high"] and 0 <= res["p_value"] <= 1


def test_mismatched_rows_raise(spark):
    scores, labels = _hand_scores()
    rows = _long_rows("hand", scores, labels)
    # b lacks key 6: per-model (positives, negatives) differ, caught by the first pass
    df = spark.createDataFrame(pd.DataFrame([r for r in rows if not (r["m"] == "b" and r["k"] == 6)]))
    with pytest.raises(MetricError, match=r"'g': 'hand'.*\(positives, negatives\) differ.*'b': \(3, 3\)"):
        delong(df, "s", "y", "m", "k", ["g"], num_partitions=2)
    # same counts, but b scores key 60 instead of key 6
    moved = [{**r, "k": 60} if (r["m"] == "b" and r["k"] == 6) else r for r in rows]
    with pytest.raises(MetricError, match=r"'g': 'hand'.*\['a', 'b', 'c'\].*do not score the same keys"):
        delong(spark.createDataFrame(pd.DataFrame(moved)), "s", "y", "m", "k", ["g"], num_partitions=2)


def test_swapped_labels_raise_and_bad_values_raise(spark):
    scores, labels = _hand_scores()
    rows = _long_rows("hand", scores, labels)
    # same counts per model, but c labels key 0 negative and key 6 positive
    swapped = [{**r, "y": 1 - r["y"]} if r["m"] == "c" and r["k"] in (0, 6) else r for r in rows]
    with pytest.raises(MetricError, match="do not score the same keys with the same labels"):
        delong(spark.createDataFrame(pd.DataFrame(swapped)), "s", "y", "m", "k", ["g"], num_partitions=2)
    base = spark.createDataFrame(pd.DataFrame(rows))
    with pytest.raises(MetricError, match=r"model 'a'.*null or NaN score"):
        delong(base.withColumn("s", F.when((base.m == "a") & (base.k == 3), None).otherwise(base.s)),
               "s", "y", "m", "k", num_partitions=2)
    with pytest.raises(MetricError, match="not 0/1"):
        delong(base.withColumn("y", base.y * 2), "s", "y", "m", "k", num_partitions=2)
    with pytest.raises(MetricError, match=r"one class only \(positives=0, negatives=7\)"):
        delong(base.withColumn("y", base.y * 0), "s", "y", "m", "k", num_partitions=2)


@pytest.mark.parametrize("path", ["broadcast", "sorted", "mixed"])
def test_wide_rows_majority_positive_groups_and_model_subsets(spark, path):
    # delong_wide: one row per key. Group "flip" has more positives than negatives (the minority class is then the
    # negatives: scores are negated internally); group "sub" has no scores for model c (it does not take part).
    flip, y_flip = _random_scores(7, 50, ["a", "b", "c"], 1)
    y_flip = 1 - y_flip                                  # ~60% positives
    sub, y_sub = _random_scores(8, 30, ["a", "b"], 2)
    rows = [{"g": "flip", "y": int(y_flip[i]), **{m: float(flip[m][i]) for m in "abc"}} for i in range(50)]
    rows += [{"g": "sub", "y": int(y_sub[i]), "a": float(sub["a"][i]), "b": float(sub["b"][i]), "c": None}
             for i in range(30)]
    df = spark.createDataFrame(pd.DataFrame(rows).sample(frac=1.0, random_state=1), "g string, y int, a double, "
                               "b double, c double")
    with _delong_path(spark, path, batch=7):
        got = delong_wide(df.repartition(3), {"m_a": "a", "m_b": "b", "m_c": "c"}, "y", ["g"])
    assert y_flip.sum() > len(y_flip) / 2
    for g, (scores, labels) in (("flip", (flip, y_flip)), ("sub", (sub, y_sub))):
        ref_auc, ref_cov = _reference(scores, labels)
        r = got[(g,)]
        assert r.models == tuple(f"m_{m}" for m in sorted(scores))
        np.testing.assert_allclose(r.auc, ref_auc, rtol=0, atol=EXACT, err_msg=g)
        np.testing.assert_allclose(r.cov, ref_cov, rtol=0, atol=EXACT, err_msg=g)
    # a model that scores only some keys of a group it takes part in is an error
    part = df.withColumn("c", F.when((df.g == "sub") & (df.a > 0), F.lit(0.5)).otherwise(df.c))
    with pytest.raises(MetricError, match=r"'g': 'sub'.*\['m_c'\] score only"):
        delong_wide(part, {"m_a": "a", "m_b": "b", "m_c": "c"}, "y", ["g"])


def test_protocol_metrics_refuses_impressions_not_scored_by_every_run(spark):
    # a prediction table where run "b" lacks impression 3: a clear error naming the runs, no silently dropped rows
    from esmm.metrics import protocol_metrics
    rows = [(i, i % 2, 0, 0.1 * (i + 1) / 2, 0.2, 0.02, "base", r) for r in ("a", "b") for i in range(6)
            if not (r == "b" and i == 3)]
    df = spark.createDataFrame(rows, "sample_id long, click int, conversion int, p_ctr float, p_cvr float, "
                                     "p_ctcvr float, method string, run_id string")
    with pytest.raises(MetricError, match=r"not scored by exactly the 2 runs \['a', 'b'\]"):
        protocol_metrics(df, None, {"a": "base", "b": "base"})


def test_groups_that_fit_stay_on_the_broadcast_path_when_others_do_not(spark, monkeypatch):
    """Two groups (a few distinct minority scores, and many): with a bound between them the small one goes the
    broadcast way and the large one the sorted way in the same call, and both equal the direct computation."""
    import esmm.metrics as M
    few, y_few = _random_scores(11, 40, ["a", "b"], 1)              # one decimal: few distinct scores
    many, y_many = _random_scores(12, 300, ["a", "b"], 6)           # six decimals: nearly all distinct
    rows = [{"g": "few", "y": int(y_few[i]), "a": float(few["a"][i]), "b": float(few["b"][i])} for i in range(40)]
    rows += [{"g": "many", "y": int(y_many[i]), "a": float(many["a"][i]), "b": float(many["b"][i])}
             for i in range(300)]
    df = spark.createDataFrame(pd.DataFrame(rows), "g string, y int, a double, b double")
    went = {}
    for name in ("_delong_broadcast", "_delong_sorted"):
        orig = getattr(M, name)

        def spy(data, plan, *rest, _orig=orig, _name=name):
            groups = rest[1] if _name == "_delong_broadcast" else rest[0]
            went[_name] = sorted(str(g[0]) for g in groups if g[1])
            return _orig(data, plan, *rest)
        monkeypatch.setattr(M, name, spy)
    monkeypatch.setattr(M, "DELONG_BROADCAST_SCORES", 60)
    got = delong_wide(df, {"m_a": "a", "m_b": "b"}, "y", ["g"])
    assert went == {"_delong_broadcast": ["('few',)"], "_delong_sorted": ["('many',)"]}
    for g, (scores, labels) in (("few", (few, y_few)), ("many", (many, y_many))):
        ref_auc, ref_cov = _reference(scores, labels)
        np.testing.assert_allclose(got[(g,)].auc, ref_auc, rtol=0, atol=EXACT, err_msg=g)
        np.testing.assert_allclose(got[(g,)].cov, ref_cov, rtol=0, atol=EXACT, err_msg=g)


def test_the_oracle_needs_a_truth_row_for_every_impression(spark):
    # protocol_metrics(oracle=True) with ground truth for 5 of 6 impressions: a clear error, not an oracle row
    # measured on other rows than the runs'
    from esmm.metrics import protocol_metrics
    rows = [(i, i % 2, int(i % 4 == 1), 0.1 * (i + 1), 0.2, 0.02, "esmm", "a") for i in range(6)]
    df = spark.createDataFrame(rows, "sample_id long, click int, conversion int, p_ctr float, p_cvr float, "
                                     "p_ctcvr float, method string, run_id string")
    truth = spark.createDataFrame([(i, 0.1, 0.2, int(i % 3 == 0)) for i in range(5)],
                                  "sample_id long, true_ctr float, true_cvr float, would_convert int")
    with pytest.raises(MetricError, match="1 test impressions have no ground-truth row"):
        protocol_metrics(df, truth, {"a": "esmm"}, oracle=True)


def test_the_sorted_path_collects_and_broadcasts_nothing_that_grows_with_the_rows(spark, monkeypatch):
    """Every row a DeLong call brings to the driver (collect, toArrow) and every object it broadcasts, recorded at
    2,000 and 8,000 keys: the broadcast path's grow with the distinct minority scores, the sorted path's do not."""
    import pickle

    from pyspark import SparkContext
    from pyspark.sql.classic.dataframe import DataFrame
    seen = {"rows": 0, "bytes": 0}

    def counting(name, size):
        orig = getattr(DataFrame, name)

        def wrapper(self, *a, **k):
            out = orig(self, *a, **k)
            seen["rows"] = max(seen["rows"], size(out))
            return out
        monkeypatch.setattr(DataFrame, name, wrapper)
    counting("collect", len)
    counting("toArrow", lambda t: t.num_rows)
    orig_bc = SparkContext.broadcast

    def broadcast(self, value):
        seen["bytes"] = max(seen["bytes"], len(pickle.dumps(value)))
        return orig_bc(self, value)
    monkeypatch.setattr(SparkContext, "broadcast", broadcast)

    def run(n, path):
        scores, y = _random_scores(5, n, ["a", "b"], 6)            # six decimals: nearly every score distinct
        df = spark.createDataFrame(pd.DataFrame({"y": y, "a": scores["a"], "b": scores["b"]})).persist()
        seen.update(rows=0, bytes=0)
        with _delong_path(spark, path, batch=1000):
            r = delong_wide(df, {"a": "a", "b": "b"}, "y")[()]
        df.unpersist()
        ref_auc, ref_cov = _reference(scores, y)
        np.testing.assert_allclose(r.auc, ref_auc, rtol=0, atol=EXACT)
        np.testing.assert_allclose(r.cov, ref_cov, rtol=0, atol=EXACT)
        return dict(seen)

    small, large = run(2000, "sorted"), run(8000, "sorted")
    assert small["rows"] > 0 and small["bytes"] > 0                 # the instrument sees the calls
    assert large["rows"] <= small["rows"] + 8 and large["bytes"] <= small["bytes"] + 512, (small, large)
    assert large["rows"] < 100                                      # partitions x models, not keys
    b_small, b_large = run(2000, "broadcast"), run(8000, "broadcast")
    assert b_large["rows"] > 3 * b_small["rows"] > 1000             # the instrument sees what grows
