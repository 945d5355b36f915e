"""GAUC (esmm.metrics.gauc / gauc_wide / protocol_metrics): against a direct per-user computation with sklearn, by
hand, and without user keys."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

import schemas as S
from esmm.metrics import MetricError, gauc, gauc_wide, protocol_metrics

TOL = 1e-9


def direct_gauc(pdf: pd.DataFrame, score: str, label: str, user: str = "u", unknown=None) -> dict:
    """The definition, one user at a time: sum_u n_u AUC_u / sum_u n_u over users with both classes."""
    num = den = users = one = 0
    for u, part in pdf.dropna(subset=[user, score]).groupby(user):
        if unknown is not None and u == unknown:
            continue
        if part[label].nunique() < 2:
            one += 1
            continue
        num += len(part) * roc_auc_score(part[label], part[score])
        den += len(part)
        users += 1
    return {"gauc": num / den if den else math.nan, "users": users, "impressions": den, "one_class_users": one}


def test_hand_example(spark):
    # user 1: positives 0.9 and 0.5, negative 0.5 -> (1 + 1/2) / 2 = 0.75 over 3 impressions
    # user 2: positive 0.2 below negative 0.8 -> 0 over 2 impressions
    # user 3: negatives only -> left out; user 0 (unknown) and a null user: left out
    # GAUC = (3 * 0.75 + 2 * 0) / 5 = 0.45
    rows = [(1, 0.9, 1), (1, 0.5, 0), (1, 0.5, 1), (2, 0.2, 1), (2, 0.8, 0), (3, 0.3, 0), (3, 0.4, 0),
            (0, 0.1, 1), (0, 0.9, 0), (None, 0.1, 1), (None, 0.9, 0)]
    df = spark.createDataFrame(rows, "u long, s double, y int")
    got = gauc(df, "s", "y", "u", unknown_user=0)[()]
    assert got["gauc"] == pytest.approx(0.45, abs=TOL)
    assert (got["users"], got["impressions"], got["one_class_users"]) == (2, 5, 1)
    # without an unknown key, user 0 counts: AUC 0 over 2 more impressions -> 2.25 / 7
    got = gauc(df, "s", "y", "u")[()]
    assert got["gauc"] == pytest.approx(2.25 / 7, abs=TOL) and got["users"] == 3


def _random_table(seed=11, users=400):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 30, users)
    u = np.repeat(rng.choice(2**62, users, replace=False) - 2**61, sizes)          # signed 64-bit keys
    rate = rng.choice([0.0, 0.05, 0.3, 0.7, 1.0], users)[np.repeat(np.arange(users), sizes)]  # some one-class users
    y = (rng.random(len(u)) < rate).astype(np.int32)
    pdf = pd.DataFrame({"u": u, "y": y,
                        "a": np.round(rng.random(len(u)) + 0.3 * y, 1),          # heavy ties
                        "b": (rng.random(len(u)) + 0.1 * y).astype(np.float32),  # float32 scores
                        "g": rng.choice(["x", "y"], len(u))})
    return pdf.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_matches_direct_computation_with_ties_groups_and_small_batches(spark):
    pdf = _random_table()
    pdf["b"] = pdf["b"].where(pdf.g == "x")           # model b scores group x only
    df = spark.createDataFrame(pdf).repartition(5)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7")   # users span many Arrow batches
    try:
        got = gauc_wide(df, {"A": "a", "B": "b"}, "y", "u", ["g"], num_partitions=3)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert set(got) == {("x",), ("y",)} and set(got[("y",)]) == {"A"} and set(got[("x",)]) == {"A", "B"}
    for g, part in pdf.groupby("g"):
        for model, col in (("A", "a"), ("B", "b")):
            if model not in got[(g,)]:
                continue
            want = direct_gauc(part, col, "y")
            have = got[(g,)][model]
            assert have["gauc"] == pytest.approx(want["gauc"], abs=TOL), (g, model)
            assert {k: have[k] for k in ("users", "impressions", "one_class_users")} == \
                {k: want[k] for k in ("users", "impressions", "one_class_users")}
    assert got[("x",)]["A"]["one_class_users"] > 20 and got[("x",)]["A"]["users"] > 50
    # one group, one score, defaults
    whole = gauc(df, "a", "y", "u")[()]
    assert whole["gauc"] == pytest.approx(direct_gauc(pdf, "a", "y")["gauc"], abs=TOL)


def test_nan_score_and_bad_label_raise(spark):
    df = spark.createDataFrame([(1, 0.1, 0), (1, float("nan"), 1)], "u long, s double, y int")
    with pytest.raises(MetricError, match="NaN score"):
        gauc(df, "s", "y", "u")
    df = spark.createDataFrame([(1, 0.1, 0), (1, 0.2, 2)], "u long, s double, y int")
    with pytest.raises(MetricError, match="not 0/1"):
        gauc(df, "s", "y", "u")


def _predictions(spark, pdf, with_users=True):
    """A PREDICTION_SCHEMA table of two runs (ESMM and the reference CTR network) over ``pdf``'s impressions."""
    from pyspark.sql import functions as F
    rows = []
    for run, method in (("esmm", "esmm"), ("ctr", "ctr")):
        p_ctr = pdf.p_ctr if method == "esmm" else pdf.p_ctr_ref
        rows.append(pd.DataFrame({S.SAMPLE_ID: pdf.sid, S.CLICK: pdf.click, S.CONVERSION: pdf.conv,
                                  S.P_CTR: p_ctr.astype(np.float32), S.P_CVR: pdf.p_cvr.astype(np.float32),
                                  S.P_CTCVR: (p_ctr * pdf.p_cvr).astype(np.float32), S.METHOD: method,
                                  S.RUN_ID: run, S.USER_KEY: pdf.u}))
    df = spark.createDataFrame(pd.concat(rows, ignore_index=True), S.PREDICTION_SCHEMA)
    for c in (S.P_CVR, S.P_CTCVR):   # the reference network predicts no CVR: NaN (not null: Arrow would not take it)
        df = df.withColumn(c, F.when(F.col(S.METHOD) == "ctr", F.lit(float("nan"))).otherwise(F.col(c)).cast("float"))
    return df if with_users else df.drop(S.USER_KEY)


def _impressions(seed=5, users=150):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 40, users)
    u = np.repeat(np.arange(users) * 7919 - 300, sizes)
    u[u == -300] = S.UNKNOWN_USER            # the first user is "unknown": left out of GAUC
    n = len(u)
    click = (rng.random(n) < 0.3).astype(np.int32)
    conv = click * (rng.random(n) < 0.4).astype(np.int32)
    return pd.DataFrame({"sid": np.arange(n), "u": u, "click": click, "conv": conv,
                         "p_ctr": np.round(rng.random(n) * 0.5 + 0.2 * click, 2),
                         "p_ctr_ref": np.round(rng.random(n) * 0.5 + 0.1 * click, 2),
                         "p_cvr": np.round(rng.random(n) * 0.5 + 0.2 * conv, 2)})


def test_protocol_metrics_gauc_per_task(spark):
    pdf = _impressions()
    rows, _, aliases = protocol_metrics(_predictions(spark, pdf), None, {"esmm": "esmm", "ctr": "ctr"},
                                        own_ctr=("ctr", "esmm"))
    got = {(r[S.RUN_ID], r["task"]): r for r in rows}
    f32 = lambda x: x.astype(np.float32).astype(np.float64)                       # noqa: E731
    pdf = pdf.assign(s_ctr=f32(pdf.p_ctr), s_ref=f32(pdf.p_ctr_ref), s_cvr=f32(pdf.p_cvr),
                     s_ctcvr=(pdf.p_ctr * pdf.p_cvr).astype(np.float32).astype(np.float64))
    clicked = pdf[pdf.click == 1]
    want = {("esmm", "ctr"): direct_gauc(pdf, "s_ctr", "click", unknown=0),
            ("ctr", "ctr"): direct_gauc(pdf, "s_ref", "click", unknown=0),
            ("esmm", "cvr"): direct_gauc(clicked, "s_cvr", "conv", unknown=0),
            ("esmm", "ctcvr"): direct_gauc(pdf, "s_ctcvr", "conv", unknown=0)}
    for key, w in want.items():
        assert got[key]["gauc"] == pytest.approx(w["gauc"], abs=TOL), key
        assert (got[key]["gauc_users"], got[key]["gauc_impressions"]) == (w["users"], w["impressions"]), key
    assert ("ctr", "cvr") not in got      # the reference network predicts no CVR


def test_without_user_keys_gauc_is_omitted(spark, caplog):
    pdf = _impressions(users=30)
    for with_users in (False, True):
        preds = _predictions(spark, pdf, with_users)
        if with_users:   # the table of a dataset written before user keys: the column is there, all null
            from pyspark.sql import functions as F
            preds = preds.withColumn(S.USER_KEY, F.lit(None).cast("long"))
        with caplog.at_level("WARNING", logger="esmm.metrics"):
            rows, dl, _ = protocol_metrics(preds, None, {"esmm": "esmm", "ctr": "ctr"}, own_ctr=("ctr", "esmm"))
        assert rows and all("gauc" not in r for r in rows) and "cvr" in dl
        assert "GAUC omitted" in caplog.text
        caplog.clear()


def test_oracle_rows_carry_gauc_with_user_keys(spark):
    from esmm.metrics import oracle_protocol_metrics
    rng = np.random.default_rng(3)
    n = 600
    pdf = pd.DataFrame({"sample_id": np.arange(n), "user_key": rng.integers(0, 40, n),
                        "true_ctr": np.round(rng.random(n) * 0.5, 2).astype(np.float32),
                        "true_cvr": np.round(rng.random(n), 2).astype(np.float32)})
    pdf["click"] = (rng.random(n) < pdf.true_ctr).astype(np.int32)
    pdf["would_convert"] = (rng.random(n) < pdf.true_cvr).astype(np.int32)
    pdf["conversion"] = pdf.click * pdf.would_convert
    rows = {r["task"]: r for r in oracle_protocol_metrics(spark.createDataFrame(pdf))}
    pdf["s_ctr"] = pdf.true_ctr.astype(np.float64)
    want = direct_gauc(pdf, "s_ctr", "click", user="user_key", unknown=S.UNKNOWN_USER)
    assert rows["ctr"]["gauc"] == pytest.approx(want["gauc"], abs=TOL) and rows["ctr"]["gauc_users"] == want["users"]
    assert "gauc" in rows["cvr"] and "gauc" not in rows["cvr_entire"]
