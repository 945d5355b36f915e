"""The main job end to end on the test config: generate -> ETL -> Horovod training in Spark tasks -> Table 2."""
import os

from jobs import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pipeline_main_job(spark, tmp_path, capsys, monkeypatch):
    """Every configured path a file:// URL, run from a working directory outside the checkout: every output lands at
    its URL (the training runs inside Spark tasks included: two side by side), nothing under the working directory."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    url = f"file://{tmp_path}"
    sets = [f"paths.raw={url}/raw", f"paths.dataset={url}/ds", f"paths.runs={url}/runs",
            "experiment.parallel_runs=2", "experiment.methods=[base, esmm]", "experiment.figure_rates=[1.0]",
            f"tracking.mlflow_uri={url}/mlruns"]
    argv = ["--conf", os.path.join(ROOT, "conf", "test.yaml")]
    for s in sets:
        argv += ["--set", s]
    report = pipeline.main(argv)
    out = capsys.readouterr().out
    assert "rows read 6,000 = written 6,000 + quarantined 0" in out
    assert "| ESMM |" in out and "| ORACLE (true probabilities) |" in out
    assert [r["model"] for r in report["table2"]][:2] == ["BASE", "ESMM"]
    summary = os.path.join(tmp_path, "runs", "experiment", "runs", "r0-rate1.0", "esmm", "train_summary.json")
    assert '"world_size": 1' in open(summary).read()        # side by side: one worker per run, in Spark tasks

    # the experiment is one MLflow run (file store): the config as params, Table 2 as metrics, the reports as artifacts
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"file://{tmp_path}/mlruns")
    exp = client.get_experiment_by_name("esmm-spark")
    (run,) = client.search_runs([exp.experiment_id])
    esmm = next(r for r in report["table2"] if r["variant"] == "esmm")
    assert abs(run.data.metrics["esmm.cvr_auc"] - esmm["cvr_auc"]) < 1e-9
    assert run.data.params["experiment.parallel_runs"] == "2" and run.data.params["experiment.methods"] == "['base', 'esmm']"
    assert {"table2.md", "table2.json", "figure3.png"} <= {a.path for a in client.list_artifacts(run.info.run_id)}

    # the entire-space pCVR calibration against the generator's true pCVR, on every CVR run's cvr_entire row
    import json
    unit = json.load(open(os.path.join(tmp_path, "runs", "experiment", "metrics", "r0-rate1.0.json")))
    ece = [r for r in unit["metrics"] if r["task"] == "cvr_entire"]
    assert {r["run_id"] for r in ece} == {"base", "esmm"}
    assert all(0 <= r["ece"] < 1 and 0 < r["mean_true"] < 1 and r["ece_bins"] >= 1 for r in ece)

    # every output committed at its URL; a prediction with URL paths lands at its URL too; nothing under the cwd
    from esmm.outputs import is_committed
    from jobs import predict
    exp = os.path.join(tmp_path, "runs", "experiment")
    for d in ("raw", "ds", "runs/experiment", "runs/experiment/runs/r0-rate1.0/esmm"):
        assert is_committed(f"{url}/{d}"), d
    assert os.path.isfile(os.path.join(exp, "runs", "r0-rate1.0", "esmm", "model.pt"))
    predict.main(["--conf", os.path.join(ROOT, "conf", "test.yaml"), "--set", f"paths.dataset={url}/ds",
                  "--model", f"{url}/runs/experiment/runs/r0-rate1.0/esmm", "--out", f"{url}/pred"])
    assert is_committed(f"{url}/pred") and os.path.isdir(os.path.join(tmp_path, "pred", "predictions"))
    assert os.listdir(cwd) == []
