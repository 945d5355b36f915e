"""esmm.metrics: exact distributed AUC against sklearn, hand-computed log-loss, and the paper's task protocol."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from esmm.metrics import (MetricError, auc, entire_space_cvr_metrics, global_auc, logloss_and_calibration,
                          oracle_metrics, oracle_protocol_metrics, task_metrics)
from schemas.dataset import GROUND_TRUTH_SCHEMA, PREDICTION_SCHEMA

TOL = 1e-9


def _df(spark, scores, labels, groups=None, dtype="double"):
    pdf = pd.DataFrame({"s": np.asarray(scores, dtype=np.float32 if dtype == "float" else np.float64),
                        "y": np.asarray(labels, dtype=np.int32)})
    if groups is not None:
        pdf["g"] = list(groups)
    return spark.createDataFrame(pdf)


def test_hand_example(spark):
    # positives 0.35 and 0.8; negatives 0.1 and 0.4. Pairs won: 0.35>0.1 (1), 0.35<0.4 (0), 0.8 beats both (2) -> 3/4.
    assert global_auc(_df(spark, [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]), "s", "y") == pytest.approx(0.75, abs=TOL)


def test_hand_example_with_tie(spark):
    # positives 0.5 and 0.9; negatives 0.2 and 0.5. 0.5 vs 0.2 -> 1, 0.5 vs 0.5 tie -> 1/2, 0.9 beats both -> 2.
    # (1 + 0.5 + 2) / (2 * 2) = 0.875
    assert global_auc(_df(spark, [0.2, 0.5, 0.5, 0.9], [0, 1, 0, 1]), "s", "y") == pytest.approx(0.875, abs=TOL)


def test_matches_sklearn_random_ties_skewed_as_groups(spark):
    # three cases evaluated at once as groups: random scores, heavy ties (1 decimal), 0.5% positives
    rng = np.random.default_rng(7)
    cases = {"random": (5000, 0.3, None), "ties": (5000, 0.3, 1), "skewed": (20000, 0.005, None)}
    frames = []
    for name, (n, rate, decimals) in cases.items():
        y = (rng.random(n) < rate).astype(int)
        s = rng.random(n) + 0.4 * y  # informative but overlapping
        frames.append(pd.DataFrame({"s": s if decimals is None else np.round(s, decimals), "y": y, "g": name}))
    pdf = pd.concat(frames, ignore_index=True)
    got = auc(spark.createDataFrame(pdf).repartition(5), "s", "y", ["g"], num_partitions=7)
    assert set(got) == {(name,) for name in cases}
    for name, part in pdf.groupby("g"):
        assert got[(name,)] == pytest.approx(roc_auc_score(part.y, part.s), abs=TOL), name
    assert pdf[pdf.g == "ties"].s.nunique() <= 15 and pdf[pdf.g == "skewed"].y.sum() > 50


def test_many_partitions_and_small_arrow_batches(spark):
    # 13 input partitions, 13 range partitions, and groups that span many Arrow batches inside one partition
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 3000)
    s = np.round(rng.random(3000) + 0.2 * y, 3)
    g = rng.choice(["a", "b"], 3000)
    df = _df(spark, s, y, groups=g).repartition(13)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "37")
    try:
        got = auc(df, "s", "y", ["g"], num_partitions=13)
        assert global_auc(df, "s", "y", num_partitions=13) == pytest.approx(roc_auc_score(y, s), abs=TOL)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert set(got) == {("a",), ("b",)}
    for name in "ab":
        assert got[(name,)] == pytest.approx(roc_auc_score(y[g == name], s[g == name]), abs=TOL)


def test_more_range_partitions_than_distinct_scores(spark):
    # 4 distinct scores spread over 8 range partitions: some partitions are empty, every key is whole in one
    rng = np.random.default_rng(5)
    s = rng.choice([0.1, 0.3, 0.5, 0.9], 500)
    y = (rng.random(500) < 0.2 + 0.5 * (s > 0.4)).astype(int)
    df = _df(spark, s, y).repartition(13)
    assert global_auc(df, "s", "y", num_partitions=8) == pytest.approx(roc_auc_score(y, s), abs=TOL)


def test_float32_scores(spark):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 4000)
    s = (rng.random(4000) * 1e-3 + 0.5 + 1e-4 * y).astype(np.float32)  # float32 rounding creates ties
    df = _df(spark, s, y, dtype="float")
    assert dict(df.dtypes)["s"] == "float"
    assert global_auc(df, "s", "y") == pytest.approx(roc_auc_score(y, s), abs=TOL)


def test_one_class_raises_naming_group_label_and_counts(spark):
    df = _df(spark, [0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 0, 1, 0], ["x", "x", "x", "z", "z"])
    with pytest.raises(MetricError, match=r"'g': 'x'.*'y'.*positives=0, negatives=3"):
        auc(df, "s", "y", ["g"])
    got = auc(df, "s", "y", ["g"], on_one_class="nan")
    assert math.isnan(got[("x",)]) and got[("z",)] == 0.0  # z: positive 0.4 below negative 0.5


def test_null_score_and_bad_label_raise(spark):
    df = spark.createDataFrame([(0.1, 0), (None, 1), (0.3, 1)], "s double, y int")
    with pytest.raises(MetricError, match="null or NaN score"):
        global_auc(df, "s", "y")
    df = spark.createDataFrame([(0.1, 0), (0.2, 2), (0.3, 1)], "s double, y int")
    with pytest.raises(MetricError, match="not 0/1"):
        global_auc(df, "s", "y")


def test_logloss_and_calibration_by_hand(spark):
    # rows (p, y): (0.9, 1), (0.2, 0), (0.6, 0) -> logloss = -(ln 0.9 + ln 0.8 + ln 0.4) / 3
    # mean prediction 1.7 / 3, observed rate 1/3, calibration 1.7
    got = logloss_and_calibration(_df(spark, [0.9, 0.2, 0.6], [1, 0, 0]), "s", "y")[()]
    assert got["logloss"] == pytest.approx(-(math.log(0.9) + math.log(0.8) + math.log(0.4)) / 3, abs=TOL)
    assert got["mean_pred"] == pytest.approx(1.7 / 3, abs=TOL)
    assert got["observed_rate"] == pytest.approx(1 / 3, abs=TOL)
    assert got["calibration"] == pytest.approx(1.7, abs=TOL)
    assert (got["n"], got["positives"]) == (3, 1)
    # clipping: p = 0 with y = 1 costs -ln(1e-7), not infinity; p = 1 with y = 1 costs -ln(1 - 1e-7)
    clipped = logloss_and_calibration(_df(spark, [0.0, 1.0], [1, 1]), "s", "y")[()]
    assert clipped["logloss"] == pytest.approx((-math.log(1e-7) - math.log(1 - 1e-7)) / 2, rel=1e-12)


def _predictions(spark):
    # (click, conversion, p_ctr, p_cvr, p_ctcvr); method "m" is hand-checked, "b" only differs in p_cvr.
    rows = [(1, 1, 0.8, 0.6, 0.48), (1, 0, 0.7, 0.3, 0.21), (1, 0, 0.6, 0.7, 0.48),
            (0, 0, 0.65, 0.01, 0.18), (0, 0, 0.1, 0.05, 0.01)]
    b_cvr = [0.9, 0.3, 0.7, 0.95, 0.05]
    data = [(i, c, v, a, p, t, "m", "r0", None) for i, (c, v, a, p, t) in enumerate(rows)]
    data += [(i, c, v, a, b_cvr[i], t, "b", "r0", None) for i, (c, v, a, p, t) in enumerate(rows)]
    return spark.createDataFrame(data, PREDICTION_SCHEMA)


def test_task_metrics_protocol(spark):
    rows = task_metrics(_predictions(spark))
    got = {(r["method"], r["task"]): r for r in rows}
    assert [(r["method"], r["task"]) for r in rows] == [("b", "ctr"), ("b", "cvr"), ("b", "ctcvr"),
                                                        ("m", "ctr"), ("m", "cvr"), ("m", "ctcvr")]
    # CTR: clicked 0.8, 0.7, 0.6 vs unclicked 0.65, 0.1 -> (2 + 2 + 1) / 6
    assert got["m", "ctr"]["auc"] == pytest.approx(5 / 6, abs=TOL)
    # CVR on clicked rows only: converted 0.6 vs 0.3 (won), 0.7 (lost) -> 1/2.
    # Including the unclicked rows (0.01, 0.05) would give 3/4: the protocol must not.
    assert got["m", "cvr"]["auc"] == pytest.approx(0.5, abs=TOL)
    assert (got["m", "cvr"]["n"], got["m", "cvr"]["positives"]) == (3, 1)
    # CTCVR over all rows, label click*conversion: 0.48 vs 0.21, 0.18, 0.01 (won) and 0.48 (tie) -> 3.5 / 4
    assert got["m", "ctcvr"]["auc"] == pytest.approx(0.875, abs=TOL)
    assert (got["m", "ctcvr"]["n"], got["m", "ctcvr"]["positives"]) == (5, 1)
    # method b: clicked p_cvr 0.9 (converted) vs 0.3, 0.7 -> 1.0 (its unclicked 0.95 would lower it)
    assert got["b", "cvr"]["auc"] == pytest.approx(1.0, abs=TOL)
    p_ctr = np.float32([0.8, 0.7, 0.6, 0.65, 0.1]).astype(float)
    y = np.array([1, 1, 1, 0, 0])
    ll = -np.mean(y * np.log(p_ctr) + (1 - y) * np.log(1 - p_ctr))
    assert got["m", "ctr"]["logloss"] == pytest.approx(ll, abs=1e-9)
    assert got["m", "ctr"]["calibration"] == pytest.approx(p_ctr.mean() / 0.6, abs=1e-9)


def _truth(spark):
    rng = np.random.default_rng(13)
    n = 400
    ctr, cvr = rng.random(n).astype(np.float32) * 0.5, rng.random(n).astype(np.float32)
    click = (rng.random(n) < ctr).astype(int)
    would = (rng.random(n) < cvr).astype(int)
    pdf = pd.DataFrame({"sample_id": np.arange(n), "true_ctr": ctr, "true_cvr": cvr, "would_convert": would,
                        "click": click, "conversion": click * would})
    return pdf, spark.createDataFrame(pdf, GROUND_TRUTH_SCHEMA)


def test_oracle_metrics(spark):
    pdf, truth = _truth(spark)
    got = {r["task"]: r["auc"] for r in oracle_metrics(truth)}
    clicked = pdf[pdf.click == 1]
    expect = {"ctr": roc_auc_score(pdf.click, pdf.true_ctr),
              "cvr": roc_auc_score(clicked.conversion, clicked.true_cvr),
              "ctcvr": roc_auc_score(pdf.conversion, pdf.true_ctr.astype(float) * pdf.true_cvr.astype(float)),
              "cvr_entire": roc_auc_score(pdf.would_convert, pdf.true_cvr)}
    assert got == pytest.approx(expect, abs=TOL)
    # the one-job version used by experiments: the same rows (AUCs bit-identical), plus DeLong standard errors
    fast = oracle_protocol_metrics(truth)
    slow = {r["task"]: r for r in oracle_metrics(truth)}
    for r in fast:
        want = slow[r["task"]]
        assert r["auc"] == want["auc"] and (r["n"], r["positives"]) == (want["n"], want["positives"])
        assert r["logloss"] == pytest.approx(want["logloss"], rel=1e-9)
        assert 0 < r["auc_se"] < 0.1
    assert [r["task"] for r in fast] == list(slow)


def test_entire_space_cvr_metrics(spark):
    pdf, truth = _truth(spark)
    rng = np.random.default_rng(17)
    p_cvr = np.clip(pdf.true_cvr + rng.normal(0, 0.2, len(pdf)), 0.01, 0.99).astype(np.float32)
    preds = spark.createDataFrame(pd.DataFrame({
        "sample_id": pdf.sample_id, "click": pdf.click, "conversion": pdf.conversion, "p_ctr": pdf.true_ctr,
        "p_cvr": p_cvr, "p_ctcvr": pdf.true_ctr * p_cvr, "method": "esmm", "run_id": "r0", "user_key": 1}),
        PREDICTION_SCHEMA)
    got = {r["task"]: r for r in entire_space_cvr_metrics(preds, truth)}
    m = pdf.click.to_numpy() == 1
    assert got["cvr_entire"]["auc"] == pytest.approx(roc_auc_score(pdf.would_convert, p_cvr), abs=TOL)
    assert got["cvr_entire"]["calibration"] == pytest.approx(p_cvr.astype(float).mean() / pdf.would_convert.mean(),
                                                             rel=1e-9)
    assert got["cvr_entire_clicked"]["auc"] == pytest.approx(roc_auc_score(pdf.would_convert[m], p_cvr[m]), abs=TOL)
    assert got["cvr_entire_clicked"]["n"] == int(m.sum())
    with pytest.raises(MetricError, match="null or not 0/1"):  # a prediction without ground truth is not dropped
        entire_space_cvr_metrics(preds, truth.where("sample_id > 0"))


def test_calibration_error_against_true_probabilities_by_hand(spark):
    from esmm.metrics import calibration_error
    rows = [(0.1, 0.1, 0.1, float("nan")), (0.2, 0.1, 0.1, float("nan")), (0.3, 0.5, 0.5, 0.2), (0.4, 0.5, 0.5, 0.2)]
    df = spark.createDataFrame(rows, "p double, t double, exact double, half double")
    out = calibration_error(df, {"m": "p", "oracle": "exact", "partial": "half"}, "t", bins=2, relative_error=0.0)
    # median boundary 0.2: bin 0 = {0.1, 0.2} (mean p .15 vs truth .1), bin 1 = {0.3, 0.4} (mean p .35 vs .5)
    assert out["m"]["ece"] == pytest.approx(2 / 4 * 0.05 + 2 / 4 * 0.15)
    assert out["m"]["mean_pred"] == pytest.approx(0.25) and out["m"]["mean_true"] == pytest.approx(0.3)
    assert out["oracle"]["ece"] == pytest.approx(0.0)           # the truth itself is perfectly calibrated
    # NaN scores are left out: 2 rows, one bin (ties at the boundary stay together), |0.2 - 0.5| = 0.3
    assert out["partial"]["ece"] == pytest.approx(0.3) and out["partial"]["ece_bins"] == 1


def test_metrics_shuffles_are_sized_to_the_table_and_the_setting_restored(spark):
    from esmm.metrics import ROWS_PER_TASK, _sized_shuffles
    key = "spark.sql.shuffle.partitions"
    saved = spark.conf.get(key)
    slots = spark.sparkContext.defaultParallelism
    spark.conf.set(key, "64")
    try:
        with _sized_shuffles(spark, 1000) as k:              # a small table: two partitions per task slot
            assert k == 2 * slots and spark.conf.get(key) == str(k)
        assert spark.conf.get(key) == "64"
        with _sized_shuffles(spark, 40 * ROWS_PER_TASK) as k:  # ~ROWS_PER_TASK rows each
            assert k == max(2 * slots, 40)
        with _sized_shuffles(spark, 1000 * ROWS_PER_TASK) as k:  # never more than configured
            assert k == 64
        with pytest.raises(RuntimeError):
            with _sized_shuffles(spark, 1000):
                raise RuntimeError("a failing pass")
        assert spark.conf.get(key) == "64"                    # restored on errors too
    finally:
        spark.conf.set(key, saved)
