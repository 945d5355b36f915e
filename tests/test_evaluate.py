"""Spark scoring against in-process predictions, the paper's CTCVR protocol, and a tiny experiment end to end."""
import csv
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import schemas as S
from esmm.batch import Batch
from esmm import evaluate as E
from esmm.config import EvaluateConfig, load_config
from esmm.evaluate import EvaluateError, ScoredRun, score_to_parquet
from esmm.experiment import ExperimentError, run_experiment
from esmm.methods import predict
from esmm.artifacts import EXPORT, load_export, read_manifest
from esmm.outputs import SUCCESS
from esmm.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf", "test.yaml")


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    _, ds = tiny_dataset
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for m in ("ctr", "base", "division", "esmm"):
        cfg = load_config(CONF, [f"train.method={m}"])
        train(cfg, ds, str(root / m))
        runs[m] = ScoredRun(m, m, str(root / m / EXPORT))
    return ds, root, runs


def _test_batch(ds):
    t = pq.read_table(os.path.join(ds, S.TEST)).sort_by(S.SAMPLE_ID)
    return t[S.SAMPLE_ID].to_numpy(), Batch.from_numpy(
        np.stack(t[S.FEAT_IDS].to_numpy(zero_copy_only=False)), np.stack(t[S.FEAT_WTS].to_numpy(zero_copy_only=False)),
        t[S.CLICK].to_numpy(), t[S.CONVERSION].to_numpy())


def test_spark_scoring_follows_the_protocol(spark, trained):
    ds, root, runs = trained
    out = str(root / "pred")
    width = read_manifest(ds)["layout"]["num_slots"]
    info = score_to_parquet(spark, ds, [runs["base"], runs["division"], runs["esmm"], runs["ctr"]], runs["ctr"],
                            out, width)
    pred = pq.read_table(out).to_pandas()
    sid, batch = _test_batch(ds)
    assert len(pred) == 4 * len(sid)
    ref_ctr = predict("ctr", load_export(runs["ctr"].export)[0], batch)[S.P_CTR].numpy()
    expected = {
        "base": (ref_ctr, predict("base", load_export(runs["base"].export)[0], batch)[S.P_CVR].numpy()),
        "esmm": tuple(predict("esmm", load_export(runs["esmm"].export)[0], batch)[k].numpy() for k in (S.P_CTR, S.P_CVR)),
    }
    div = predict("division", load_export(runs["division"].export)[0], batch)[S.P_CTCVR].numpy()
    expected["division"] = (ref_ctr, np.clip(div / ref_ctr, 0, 1))
    for method, (p_ctr, p_cvr) in expected.items():
        got = pred[pred[S.METHOD] == method].sort_values(S.SAMPLE_ID)
        assert got[S.SAMPLE_ID].tolist() == sid.tolist()
        np.testing.assert_allclose(got[S.P_CTR], p_ctr, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[S.P_CVR], p_cvr, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got[S.P_CTCVR], p_ctr * p_cvr, rtol=1e-5, atol=1e-7)
    assert info["division_clipped"] == int((div / ref_ctr > 1).sum())
    ctr_rows = pred[pred[S.METHOD] == "ctr"]
    assert ctr_rows[S.P_CVR].isna().all() and not ctr_rows[S.P_CTR].isna().any()


def test_non_esmm_methods_need_the_reference_ctr(spark, trained):
    ds, root, runs = trained
    with pytest.raises(EvaluateError, match="reference CTR"):
        score_to_parquet(spark, ds, [runs["base"]], None, str(root / "x"), 41)


def _sorted_predictions(path):
    t = pq.read_table(path)
    return t.schema, t.to_pandas().sort_values([S.RUN_ID, S.SAMPLE_ID]).reset_index(drop=True)


@pytest.mark.parametrize("exports", ["path", "broadcast"])
def test_scoring_in_passes_gives_the_same_predictions(spark, trained, exports):
    """One model per pass (each pass appending to the same staging directory) == every model in one pass, exactly;
    both ways of shipping the exports."""
    ds, root, runs = trained
    width = read_manifest(ds)["layout"]["num_slots"]
    order = [runs["base"], runs["division"], runs["esmm"]]     # the reference gets rows too, not being listed
    outs = {}
    for k in (1, 100):
        out = str(root / f"pred-{exports}-{k}")
        info = score_to_parquet(spark, ds, order, runs["ctr"], out, width,
                                evaluate=EvaluateConfig(models_per_pass=k, exports=exports))
        assert info["passes"] == (4 if k == 1 else 1)
        assert not [p for p in os.listdir(root) if ".tmp-" in p]    # staging renamed into place
        outs[k] = (info, _sorted_predictions(out))
    (info1, (schema1, one)), (info_all, (schema_all, together)) = outs[1], outs[100]
    assert info1["division_clipped"] == info_all["division_clipped"]
    assert schema1 == schema_all and schema1.names == S.PREDICTION_SCHEMA.names
    assert sorted(one[S.RUN_ID].unique()) == ["base", "ctr", "division", "esmm"]
    assert len(one) == 4 * len(_test_batch(ds)[0])
    assert one.equals(together)      # bit for bit, NaN p_cvr of the reference rows included


def test_worker_cache_holds_only_the_current_pass(trained, tmp_path):
    """The worker-side cache never holds more than models_per_pass + 1 models (the pass's and the reference)."""
    _, _, runs = trained
    exports, refs = E._resolve([runs["base"], runs["division"], runs["esmm"]], runs["ctr"])
    assert [e.run.run_id for e in exports] == ["base", "division", "esmm", "ctr"]
    assert {r: e.run.run_id for r, e in refs.items()} == {"base": "ctr", "division": "ctr"}   # ESMM: its own pCTR
    E._MODEL_CACHE.clear()
    try:
        for k in (1, 2, 3):
            for idx in E.plan_passes(len(exports), k):
                group = [exports[j] for j in idx]
                assert len(group) <= k
                sources = {e.digest: e.path for e in group + [refs[e.run.run_id] for e in group if e.run.run_id in refs]}
                nets = E._load_models(sources)
                assert set(E._MODEL_CACHE) == set(nets) == set(sources)
                assert len(E._MODEL_CACHE) <= k + 1
        # an export that changed after the driver hashed it is refused, not silently scored
        changed = tmp_path / "model.pt"
        changed.write_bytes(open(runs["base"].export, "rb").read() + b"x")
        with pytest.raises(EvaluateError, match="changed"):
            E._load_models({E._digest(runs["base"].export): str(changed)})
        assert not E._MODEL_CACHE       # the failed load evicted the previous pass first
    finally:
        E._MODEL_CACHE.clear()


def test_an_evicted_model_is_freed_without_the_cycle_collector(tiny_dataset, tmp_path):
    """The worker cache's eviction relies on reference counting (no gc.collect per task): every method's network,
    loaded from its export as a worker loads it, is freed as soon as the cache drops it, with the collector off."""
    import gc
    import weakref

    from esmm.artifacts import export_model, layout_from_manifest
    from esmm.methods import METHODS, build_model
    cfg = load_config(CONF)
    layout = layout_from_manifest(read_manifest(tiny_dataset[1]))
    E._MODEL_CACHE.clear()
    gc.disable()
    try:
        for method in METHODS:
            path = str(tmp_path / f"{method}.pt")
            export_model(build_model(method, layout, cfg.model), method, cfg, layout, path)
            digest = E._digest(path)
            (net,) = E._load_models({digest: path}).values()
            refs = [weakref.ref(t) for t in net.parameters()] + [weakref.ref(net)]
            del net
            E._retain_models(set())
            assert not E._MODEL_CACHE and all(r() is None for r in refs), method
    finally:
        gc.enable()
        E._MODEL_CACHE.clear()


def test_pass_plan_and_run_ids(trained):
    assert [list(r) for r in E.plan_passes(5, 2)] == [[0, 1], [2, 3], [4]]
    assert [list(r) for r in E.plan_passes(2, 100)] == [[0, 1]]
    with pytest.raises(EvaluateError, match=">= 1"):
        E.plan_passes(3, 0)
    _, _, runs = trained
    with pytest.raises(EvaluateError, match="two different exports"):
        E._resolve([runs["esmm"], ScoredRun("ctr", "esmm", runs["ctr"].export)], None)


def test_tiny_experiment_end_to_end_and_resume(spark, tiny_dataset, tmp_path):
    raw, ds = tiny_dataset
    # both units trained side by side (2 Spark tasks) and scored and measured together (one pass for both)
    cfg = load_config(CONF, ["experiment.methods=[base, aman, esmm]", "experiment.aman_rates=[0.5, 1.0]",
                             "experiment.figure_rates=[0.5, 1.0]", "experiment.figure_methods=[base, esmm]",
                             "train.workers=1", "experiment.parallel_runs=2", "experiment.units_per_evaluation=2"])
    exp = str(tmp_path / "exp")
    rep = run_experiment(spark, cfg, ds, exp, os.path.join(raw, "ground_truth"))
    models = [r["model"] for r in rep["table2"]]
    assert models == ["BASE", "AMAN", "ESMM", "ORACLE (true probabilities)"]
    aman = rep["table2"][1]
    assert aman["variant"] in ("aman[rate=0.5]", "aman[rate=1.0]")
    for r in rep["table2"]:
        assert 0 < r["cvr_auc"] < 100 and 0 < r["ctcvr_auc"] < 100
    oracle = rep["table2"][-1]
    assert oracle["ctr_auc"] > 60 and oracle["cvr_entire_auc"] > 60        # the generator leaves signal to find
    for p in rep["paths"].values():
        assert os.path.getsize(p) > 0
    units = sorted(os.listdir(os.path.join(exp, "metrics")))
    assert units == ["oracle.json", "r0-rate0.5.json", "r0-rate1.0.json"]
    saved = json.load(open(os.path.join(exp, "table2.json")))
    assert saved["config"]["experiment"]["methods"] == ["base", "aman", "esmm"]
    # Figure 3's lower rate trains figure_methods only; Table 2's rate trains every method and variant
    half = json.load(open(os.path.join(exp, "metrics", "r0-rate0.5.json")))
    full = json.load(open(os.path.join(exp, "metrics", "r0-rate1.0.json")))
    assert sorted({r["run_id"] for r in half["metrics"]}) == ["base", "ctr", "esmm"]
    assert sorted({r["run_id"] for r in full["metrics"]}) == ["aman[rate=0.5]", "aman[rate=1.0]", "base", "ctr", "esmm"]
    # per task, the DeLong record covers every run with that task, and its AUCs are the exact ones
    for task in ("ctr", "cvr", "ctcvr", "cvr_entire"):
        rec = full["delong"][task]
        exact = {r["run_id"]: r["auc"] for r in full["metrics"] if r["task"] == task}
        assert set(rec["models"]) | set(rec["aliases"]) == set(exact)      # CTR: single-task runs alias the reference
        assert all(exact[a] == exact[t] for a, t in rec["aliases"].items())
        for name, a in zip(rec["models"], rec["auc"]):
            assert a == pytest.approx(exact[name], abs=1e-12)
        assert all(rec["cov"][i][i] > 0 for i in range(len(rec["models"])))
    assert "ctr" in full["delong"]["ctr"]["models"] and "ctr" not in full["delong"]["cvr"]["models"]
    # measured together = measured alone: the smaller unit's runs cut out of the joint predictions and measured on
    # their own give its record's rows, and per task its block of the joint DeLong covariance
    assert half["evaluated_with"] == full["evaluated_with"] == ["r0-rate0.5", "r0-rate1.0"]
    from pyspark.sql import functions as F
    from esmm.evaluate import OWN_CTR_METHODS
    from esmm.metrics import protocol_metrics
    pred = spark.read.parquet(os.path.join(exp, "predictions", "r0-rate0.5+r0-rate1.0"))
    alone = (pred.where(F.col("run_id").startswith("r0-rate0.5/"))
             .withColumn("run_id", F.regexp_replace("run_id", "^r0-rate0.5/", "")))
    truth = spark.read.parquet(os.path.join(raw, "ground_truth"))
    rows, dl, aliases = protocol_metrics(alone, truth, {"ctr": "ctr", "base": "base", "esmm": "esmm"},
                                         own_ctr=OWN_CTR_METHODS)
    assert len(rows) == len(half["metrics"])
    for a, b in zip(rows, half["metrics"]):
        assert a.keys() == b.keys() and (a["run_id"], a["task"]) == (b["run_id"], b["task"])
        assert all(a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12, nan_ok=True) for k in a
                   if k not in ("run_id", "task")), a
    for task, res in dl.items():
        rec = half["delong"][task]
        assert rec["models"] == list(res.models) and rec["aliases"] == aliases.get(task, {})
        assert np.allclose(rec["cov"], res.cov, rtol=1e-12, atol=1e-15) and np.allclose(rec["auc"], res.auc, 0, 1e-15)
    # the significance rows are the paired tests of ESMM against the chosen variants, per task
    sig = {(s["competitor"], s["task"]) for s in saved["significance"]}
    assert sig == {(c, t) for c in ("BASE", "AMAN") for t in ("cvr", "ctcvr", "cvr_entire")}
    text = open(rep["paths"]["md"]).read()
    assert "DeLong" in text and "| ESMM minus | task |" in text
    fig = list(csv.DictReader(open(rep["paths"]["fig_csv"])))
    from esmm.validation import find_split, train_rows   # trained on: each subset's rows before the validation cut
    manifest = json.load(open(os.path.join(ds, "manifest.json")))
    split = find_split(os.path.join(ds, "train"), manifest, cfg.train.validation_share)
    assert {(p["rate"], int(p["train_impressions"])) for p in fig} == {(r, train_rows(manifest, split, float(r)))
                                                                       for r in ("0.5", "1.0")}
    assert {p["series"] for p in fig} == {"BASE", "AMAN", "ESMM", "ESMM - BASE"}
    assert saved["oracle"][0]["auc_se"] > 0
    # GAUC columns, from the ETL's user keys (the oracle's too)
    for r in rep["table2"]:
        assert 0 < r["cvr_gauc"] < 100 and 0 < r["ctcvr_gauc"] < 100 and r["cvr_gauc_users"] > 0
    assert "| CVR GAUC % | CTCVR GAUC % | CTR GAUC % |" in text and "users" in text
    # a re-run reuses every finished unit: remove the exports, which a re-run would need if it trained again
    for d, _, files in os.walk(os.path.join(exp, "runs")):
        for f in files:
            if f == EXPORT:
                os.remove(os.path.join(d, f))
    again = run_experiment(spark, cfg, ds, exp, os.path.join(raw, "ground_truth"))
    assert again["table2"] == rep["table2"]
    assert full["run_ids"]["esmm"] != half["run_ids"]["esmm"]          # unique across units
    # another config is refused instead of mixing old units into the new table; --overwrite starts over
    changed = load_config(CONF, ["experiment.methods=[esmm]", "experiment.figure_rates=[1.0]", "train.lr=0.002",
                                 "train.workers=1"])
    with pytest.raises(ExperimentError, match="unit r0-rate1.0 in .* another config"):
        run_experiment(spark, changed, ds, exp, None)
    fresh = run_experiment(spark, changed, ds, exp, None, overwrite=True)
    assert [r["model"] for r in fresh["table2"]] == ["ESMM"]
    assert sorted(os.listdir(os.path.join(exp, "metrics"))) == ["r0-rate1.0.json"]
    # every finished output carries _SUCCESS: the experiment and its training runs, also after a re-run reusing them
    runs = [os.path.join(exp, "runs", "r0-rate1.0", m) for m in ("ctr", "esmm")]
    for d in [exp] + runs:
        assert os.path.isfile(os.path.join(d, SUCCESS)), d
    resumed = run_experiment(spark, changed, ds, exp, None)["table2"]                   # resumed: all reused
    assert [(r["model"], r["cvr_auc"], r["ctcvr_auc"]) for r in resumed] == \
        [(r["model"], r["cvr_auc"], r["ctcvr_auc"]) for r in fresh["table2"]]
    assert all(os.path.isfile(os.path.join(d, SUCCESS)) for d in [exp] + runs)


def test_an_evaluation_carries_success_is_reused_and_a_stopped_rerun_keeps_the_old_one(spark, trained, tmp_path,
                                                                                       monkeypatch):
    from esmm.evaluate import evaluate_runs
    from esmm.outputs import is_committed
    ds, root, _ = trained
    esmm, ctr = [str(root / "esmm")], str(root / "ctr")
    out = str(tmp_path / "evaluation")
    first = evaluate_runs(spark, ds, esmm, ctr, out)
    assert os.path.isfile(os.path.join(out, "metrics.json")) and os.path.isfile(os.path.join(out, SUCCESS))
    stamp = os.stat(os.path.join(out, "metrics.json")).st_mtime_ns
    again = evaluate_runs(spark, ds, esmm, ctr, out)                      # same exports and dataset: reused
    assert again["predictions"] == first["predictions"] and len(again["metrics"]) == len(first["metrics"])
    assert os.stat(os.path.join(out, "metrics.json")).st_mtime_ns == stamp

    def interrupted(*a, **k):
        raise RuntimeError("killed while scoring")
    monkeypatch.setattr(E, "score_to_parquet", interrupted)            # a re-run replacing it, stopped half-way
    with pytest.raises(RuntimeError, match="killed while scoring"):
        evaluate_runs(spark, ds, esmm, ctr, out, overwrite=True)
    assert is_committed(out) and os.path.isfile(os.path.join(out, SUCCESS))   # the previous one, still whole
    assert [p for p in os.listdir(tmp_path) if p.startswith("evaluation.")] == []   # its staging removed


def test_exports_of_another_layout_and_foreign_outputs_are_refused(spark, trained, tmp_path):
    from esmm.outputs import OutputError
    ds, root, runs = trained
    blob = torch.load(runs["esmm"].export, weights_only=True)
    blob["layout"]["buckets"] = [b * 2 for b in blob["layout"]["buckets"]]
    other = str(tmp_path / "other.pt")
    torch.save(blob, other)
    width = read_manifest(ds)["layout"]["num_slots"]
    with pytest.raises(EvaluateError, match=r"other.pt \(esmm\) was trained on another feature layout .* buckets"):
        score_to_parquet(spark, ds, [ScoredRun("esmm", "esmm", other)], None, str(tmp_path / "p"), width)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    with pytest.raises(OutputError, match="mine exists and was not created by esmm-spark"):
        score_to_parquet(spark, ds, [runs["esmm"]], None, str(foreign), width)
    assert (foreign / "data.csv").read_text() == "1,2"


def test_protocol_metrics_equal_the_per_task_metrics_and_carry_delong(spark, trained, tiny_dataset):
    # protocol_metrics (one pivot, every task a filter, DeLong's exact AUCs) against task_metrics and
    # entire_space_cvr_metrics (one range-partitioned AUC job per call) on the same predictions
    from esmm.metrics import entire_space_cvr_metrics, protocol_metrics, task_metrics
    raw, _ = tiny_dataset
    ds, root, runs = trained
    out = str(root / "pred-protocol")
    score_to_parquet(spark, ds, [runs[m] for m in ("base", "division", "esmm", "ctr")], runs["ctr"], out,
                     read_manifest(ds)["layout"]["num_slots"])
    pred, truth = spark.read.parquet(out), spark.read.parquet(os.path.join(raw, "ground_truth"))
    key = "spark.sql.shuffle.partitions"
    saved = spark.conf.get(key)
    spark.conf.set(key, "64")       # a cluster-sized setting: the call sizes its shuffles to the table, then restores it
    try:
        rows, dl, aliases = protocol_metrics(pred, truth, {m: m for m in ("base", "division", "esmm", "ctr")},
                                             oracle=True)
        assert spark.conf.get(key) == "64"
    finally:
        spark.conf.set(key, saved)
    # the true probabilities measured in the same passes equal their own pass (oracle_protocol_metrics) on the rows
    from esmm.metrics import ORACLE_RUN, MetricError, oracle_protocol_metrics
    oracle = [r for r in rows if r[S.RUN_ID] == ORACLE_RUN]
    rows = [r for r in rows if r[S.RUN_ID] != ORACLE_RUN]
    test = spark.read.parquet(os.path.join(ds, S.TEST)).drop(S.FEAT_IDS, S.FEAT_WTS, S.SAMPLE_TIER)
    alone = {r["task"]: r for r in oracle_protocol_metrics(test.join(
        truth.select(S.SAMPLE_ID, S.TRUE_CTR, S.TRUE_CVR, S.WOULD_CONVERT), S.SAMPLE_ID))}
    assert [r["task"] for r in oracle] == ["ctr", "cvr", "ctcvr", "cvr_entire"] == list(alone)
    for r in oracle:
        want = alone[r["task"]]
        assert set(r) - {S.RUN_ID} == set(want) - {S.METHOD}, r["task"]
        for k, v in want.items():
            if k != S.METHOD:
                assert r[k] == pytest.approx(v, rel=1e-12, abs=1e-15), (r["task"], k)
    with pytest.raises(MetricError, match="may not be called 'oracle'"):
        protocol_metrics(pred, truth, {"oracle": "esmm"}, oracle=True)
    ref = task_metrics(pred, group_cols=(S.RUN_ID,), on_one_class="nan")
    ref += entire_space_cvr_metrics(pred, truth, group_cols=(S.RUN_ID,), on_one_class="nan")
    key = lambda r: (r[S.RUN_ID], r["task"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, ref))
    ref = {key(r): r for r in ref}
    for r in rows:
        want = ref[key(r)]
        assert r["auc"] == want["auc"], key(r)                       # both exact: bit-identical
        assert (r["n"], r["positives"]) == (want["n"], want["positives"]), key(r)
        assert r["logloss"] == pytest.approx(want["logloss"], rel=1e-9)
        assert r["calibration"] == pytest.approx(want["calibration"], rel=1e-9)
    # single-task methods score CTR with the reference network: they share its CTR row, aliased in the DeLong record
    assert dl["ctr"].models == ("ctr", "esmm", ORACLE_RUN) and aliases["ctr"] == {"base": "ctr", "division": "ctr"}
    assert dl["cvr"].models == ("base", "division", "esmm", ORACLE_RUN) and dl["cvr"].positives == ref[("esmm", "cvr")]["positives"]
    for task, res in dl.items():
        assert np.all(np.diag(res.cov) > 0) and np.allclose(res.cov, res.cov.T), task
    # GAUC of CTR, CVR and CTCVR: the ETL's user keys carried through scoring, against a per-user sklearn computation
    from sklearn.metrics import roc_auc_score
    pdf = pq.read_table(out).to_pandas()
    assert pdf[S.USER_KEY].notna().all() and pdf[S.USER_KEY].nunique() > 10
    spec = {"ctr": (S.P_CTR, S.CLICK), "cvr": (S.P_CVR, S.CONVERSION), "ctcvr": (S.P_CTCVR, S.CONVERSION)}
    for r in rows:
        if r["task"] not in spec:
            assert "gauc" not in r
            continue
        score, label = spec[r["task"]]
        part = pdf[pdf[S.RUN_ID] == aliases.get(r["task"], {}).get(r[S.RUN_ID], r[S.RUN_ID])]
        part = part[part[S.CLICK] == 1] if r["task"] == "cvr" else part
        num = den = users = 0
        for u, g in part.groupby(S.USER_KEY):
            if u != S.UNKNOWN_USER and g[label].nunique() == 2:
                num += len(g) * roc_auc_score(g[label], g[score].astype(np.float64))
                den += len(g)
                users += 1
        assert r["gauc_users"] == users > 0 and r["gauc_impressions"] == den, key(r)
        assert r["gauc"] == pytest.approx(num / den, abs=1e-9), key(r)


def test_dataset_without_user_keys_evaluates_without_gauc(spark, trained, tmp_path, caplog):
    """A dataset written before user_key existed: scoring writes null keys, the metrics omit GAUC with a note."""
    import shutil
    from esmm.metrics import protocol_metrics
    ds, root, runs = trained
    old = str(tmp_path / "old-dataset")
    shutil.copytree(ds, old)
    for d, _, files in os.walk(os.path.join(old, S.TEST)):
        for f in files:
            if f.endswith(".parquet"):
                path = os.path.join(d, f)
                pq.write_table(pq.read_table(path).drop([S.USER_KEY]), path)
    from conftest import recommit
    recommit(old)   # committed as an ETL of that time would have
    assert S.USER_KEY not in spark.read.parquet(os.path.join(old, S.TEST)).columns
    out = str(tmp_path / "pred-old")
    with caplog.at_level("WARNING"):
        score_to_parquet(spark, old, [runs["esmm"], runs["ctr"]], runs["ctr"], out,
                         read_manifest(old)["layout"]["num_slots"])
        pred = spark.read.parquet(out)
        assert pred.where(pred[S.USER_KEY].isNotNull()).count() == 0
        rows, dl, _ = protocol_metrics(pred, None, {"esmm": "esmm", "ctr": "ctr"})
    assert rows and all("gauc" not in r for r in rows) and set(dl) == {"ctr", "cvr", "ctcvr"}
    assert "GAUC will be omitted" in caplog.text and "GAUC omitted" in caplog.text
