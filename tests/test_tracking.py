"""esmm/tracking.py: MLflow runs in a file store, read back with MLflow's own client; off means off."""
import json
import os

import pytest
from mlflow.tracking import MlflowClient

from esmm.config import TrackingConfig, load_config, to_dict
from esmm.tracking import (RUN_FILE, TrackingError, flatten, log_run, metric_key, resolve_uri, table2_metrics)


def test_names_and_flattening():
    assert resolve_uri("data/mlruns") == "file://" + os.path.abspath("data/mlruns")
    assert resolve_uri("http://host:5000") == "http://host:5000" and resolve_uri("file:///x") == "file:///x"
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}
    assert metric_key("ORACLE (true probabilities)", "cvr_auc") == "ORACLE_true_probabilities.cvr_auc"
    rows = [{"model": "ESMM", "variant": "esmm", "repeats": 3, "cvr_auc": 70.5, "cvr_sig": "*", "ctr_std": float("nan")},
            {"model": "ORACLE (true probabilities)", "variant": "", "repeats": 1, "cvr_auc": 81.0}]
    assert table2_metrics(rows) == {"esmm.cvr_auc": 70.5, "ORACLE_true_probabilities.cvr_auc": 81.0}


def test_a_run_in_a_file_store_and_a_rerun_continues_it(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    (out / "table2.md").write_text("| ESMM |")
    cfg = load_config(None, [f"tracking.mlflow_uri={tmp_path}/mlruns", "tracking.mlflow_experiment=t"])
    rid = log_run(cfg.tracking, str(out), "exp", to_dict(cfg), {"esmm.cvr_auc": 70.5}, [str(out / "table2.md")])
    client = MlflowClient(f"file://{tmp_path}/mlruns")
    run = client.get_run(rid)
    assert run.data.metrics == {"esmm.cvr_auc": 70.5}
    assert run.data.params["train.lr"] == "0.001" and run.data.params["features.buckets.101"] == "200000"
    assert run.data.tags["esmm.output"] == f"file://{out}"          # the canonical URL
    assert [a.path for a in client.list_artifacts(rid)] == ["table2.md"]
    assert json.load(open(out / RUN_FILE))["run_id"] == rid
    # a re-run (a resumed experiment) logs into the same run
    assert log_run(cfg.tracking, str(out), "exp", to_dict(cfg), {"esmm.cvr_auc": 71.0}, []) == rid
    assert [m.value for m in client.get_metric_history(rid, "esmm.cvr_auc")] == [70.5, 71.0]
    assert len(client.search_runs([client.get_experiment_by_name("t").experiment_id])) == 1


def test_off_means_nothing_logged_and_a_bad_store_is_a_clear_error(tmp_path):
    out = tmp_path / "exp"
    out.mkdir()
    assert log_run(TrackingConfig(), str(out), "exp", {}, {"a": 1.0}, []) is None
    assert os.listdir(out) == []
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(TrackingError, match=r"the results are in .*exp, but logging them to MLflow at .*not-a-dir"):
        log_run(TrackingConfig(mlflow_uri=str(blocker / "mlruns")), str(out), "exp", {}, {"a": 1.0}, [])
