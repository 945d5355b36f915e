"""The pipeline as an Airflow DAG (examples/airflow/esmm_pipeline.py), run and retried by Airflow itself.

Airflow runs from its own environment (.venv-airflow, made by scripts/install.sh from requirements-airflow.txt: it pins
its own dependencies) with a SQLite metadata database in a temporary AIRFLOW_HOME; ``airflow dags test`` runs the DAG
in-process, each task a real ``spark-submit`` of one of our jobs, on conf/test.yaml:

- end to end on local Spark, with the training of ESMM killed (-9) mid-run: Airflow retries it, it resumes from its
  checkpoint, and its export equals an uninterrupted training's bit for bit; every output is committed and Table 2
  is written;
- a second run of the DAG reuses every task's output and changes no file;
- a raw log past the quarantine gate fails the DAG on the ETL task, once, without a retry (exit 3);
- end to end on a standalone cluster (scripts/local-cluster.sh).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AIRFLOW = os.path.join(ROOT, ".venv-airflow", "bin", "airflow")
DAGS = os.path.join(ROOT, "examples", "airflow")
SETS = ["experiment.figure_rates=[1.0]", "train.epochs=40", "train.patience=100", "train.checkpoint_every=10",
        "train.log_every=100"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(AIRFLOW), reason="no .venv-airflow: run `make install`")]


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": DAGS, "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "ESMM_HOME": ROOT, "ESMM_DAG_METHODS": "base,esmm", "ESMM_DAG_RETRIES": "2",
                "ESMM_DAG_RETRY_DELAY_S": "1"})
    r = subprocess.run([AIRFLOW, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env


def _params(work, **more) -> dict:
    return {"conf": "conf/test.yaml", "raw": f"{work}/raw", "dataset": f"{work}/dataset", "runs": f"{work}/runs",
            "sets": SETS, **more}


# A DAG run's limit. On a 2-core machine shared with two benchmarks the standalone run (each task ships the packed
# venv to the cluster) passed 15 minutes; a run killed at the limit fails its test with the log's tail.
DAG_TIMEOUT_S = 1800


def _dags_test(env, params: dict, log: str, on_start=None, timeout: int = DAG_TIMEOUT_S) -> tuple[int, str]:
    with open(log, "w") as f:
        p = subprocess.Popen([AIRFLOW, "dags", "test", "esmm_pipeline", "-c", json.dumps(params)], env=env,
                             stdout=f, stderr=subprocess.STDOUT, cwd=os.path.dirname(log), start_new_session=True)
        try:
            if on_start is not None:
                on_start(p)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                f.flush()
                pytest.fail(f"airflow dags test ran past {timeout}s; the end of its log ({log}):\n"
                            + open(log).read()[-4000:])
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return rc, open(log).read()


def _started(out: str, task: str) -> int:
    """How many tries of ``task`` the DAG run started."""
    return out.count(f"[DAG TEST] starting task_id={task} ")


def _job_pids(*words: str) -> list[int]:
    """Python processes whose command line holds every one of ``words`` (the job's driver, not spark-submit's JVM)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                args = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            argv = [a.decode(errors="replace") for a in args]
            if argv and "python" in os.path.basename(argv[0]) and all(any(w == a or a.endswith(w) for a in argv) for w in words):
                pids.append(int(d))
    return sorted(pids)


def _snapshot(root) -> dict:
    """Every file under ``root``: (size, mtime_ns) (lock files aside: taking a lock rewrites its holder's record)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".lock"):
                st = os.stat(os.path.join(dirpath, f))
                out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_size, st.st_mtime_ns)
    return out


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _committed(url) -> bool:
    return os.path.isfile(os.path.join(url, "_ESMM_COMMIT")) and os.path.isfile(os.path.join(url, "_SUCCESS"))


@pytest.fixture(scope="module")
def killed_and_retried(airflow_env, tmp_path_factory):
    """One DAG run on local Spark; the ESMM training is killed -9 once it has written a checkpoint."""
    work = tmp_path_factory.mktemp("dag-local")
    esmm_dir = work / "runs" / "experiment" / "runs" / "r0-rate1.0" / "esmm"
    killed = {}

    def kill_esmm(p):
        deadline = time.time() + 600
        while time.time() < deadline and p.poll() is None:
            pids = _job_pids("jobs/experiment.py", "--train", "esmm")
            ckpts = list(esmm_dir.glob("checkpoint-*.json")) if esmm_dir.is_dir() else []
            if pids and ckpts and not (esmm_dir / "model.pt").exists():
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed.update({"pids": pids, "checkpoints": sorted(c.name for c in ckpts)})
                return
            time.sleep(0.05)

    rc, out = _dags_test(airflow_env, _params(work), str(work / "dag.log"), on_start=kill_esmm)
    return {"work": work, "rc": rc, "out": out, "killed": killed, "esmm_dir": esmm_dir}


def test_the_dag_runs_end_to_end_and_retries_a_killed_training(killed_and_retried, tmp_path):
    r, work = killed_and_retried, killed_and_retried["work"]
    assert r["rc"] == 0, r["out"][-6000:]
    assert r["killed"], "the ESMM training finished before it could be killed"
    for task in ("generate", "etl", "train_ctr", "train_base", "evaluate_report"):
        assert _started(r["out"], task) == 1, task
    assert _started(r["out"], "train_esmm") == 2                         # the kill's try, then Airflow's retry
    assert re.search(r"esmm experiment exited (\d+) \(retried while tries are left\)", r["out"])   # not 2, 3 or 4
    runs = work / "runs" / "experiment" / "runs" / "r0-rate1.0"
    for url in (work / "raw", work / "dataset", runs / "ctr", runs / "base", runs / "esmm", work / "runs" / "experiment"):
        assert _committed(url), url
    summary = json.loads((r["esmm_dir"] / "train_summary.json").read_text())
    assert 0 < summary["steps"] - summary["steps_this_run"]               # the retry resumed from a checkpoint
    table2 = (work / "runs" / "experiment" / "table2.md").read_text()
    assert "| ESMM |" in table2 and "| BASE |" in table2 and "| ORACLE (true probabilities) |" in table2
    # the same training uninterrupted (one process, as the task's driver ran it): bit-identical parameters
    ref = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "experiment.py"), "--conf",
                          os.path.join(ROOT, "conf", "test.yaml"), "--dataset", str(work / "dataset"),
                          "--exp", str(tmp_path / "ref"), "--train", "esmm",
                          *[a for s in SETS + ["experiment.methods=[base, esmm]"] for a in ("--set", s)]],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    a = _weights(r["esmm_dir"] / "model.pt")
    b = _weights(tmp_path / "ref" / "runs" / "r0-rate1.0" / "esmm" / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_dag_run_reuses_everything_and_changes_nothing(killed_and_retried, airflow_env):
    r, work = killed_and_retried, killed_and_retried["work"]
    assert r["rc"] == 0
    before = _snapshot(work / "raw") | {f"dataset/{k}": v for k, v in _snapshot(work / "dataset").items()} | {
        f"runs/{k}": v for k, v in _snapshot(work / "runs").items()}
    rc, out = _dags_test(airflow_env, _params(work), str(work / "dag-again.log"))
    assert rc == 0, out[-6000:]
    after = _snapshot(work / "raw") | {f"dataset/{k}": v for k, v in _snapshot(work / "dataset").items()} | {
        f"runs/{k}": v for k, v in _snapshot(work / "runs").items()}
    assert after == before
    assert all(_started(out, t) == 1 for t in ("generate", "etl", "train_ctr", "train_base", "train_esmm",
                                               "evaluate_report"))
    for said in ("already holds generated data of the same generate config: nothing to do",
                 "is up to date (same inputs and config): nothing to do",
                 "r0-rate1.0/esmm already holds a finished run of the same inputs: skipping",
                 "is committed with the same units, ground truth and report settings: reused as it is"):
        assert said in out, said


def test_a_quarantine_gate_failure_fails_the_etl_task_without_retry(killed_and_retried, airflow_env, tmp_path):
    work = killed_and_retried["work"]
    bad = tmp_path / "raw-bad"
    bad.mkdir()
    for f in os.listdir(work / "raw"):
        if f.endswith(".csv"):
            shutil.copy(work / "raw" / f, bad / f)
    with open(bad / "sample_skeleton_train.csv", "a") as f:   # 5% of the train skeleton lines unparseable
        f.writelines(f"not,a,skeleton,line,{i}\n" for i in range(150))
    rc, out = _dags_test(airflow_env, _params(tmp_path, raw=str(bad), generate=False), str(tmp_path / "dag.log"))
    assert rc != 0
    assert "reason='params.generate is false'" in out                   # generate skipped: the raw log is given
    assert _started(out, "etl") == 1 and _started(out, "train_ctr") == 0  # one try, nothing downstream
    assert "esmm etl exited 3 (data-quality gate (quarantine); not retried)" in out
    assert "esmm-etl: error:" in out and "quarantine" in out
    assert not (tmp_path / "dataset").exists()


@pytest.fixture
def standalone(tmp_path):
    env = dict(os.environ, ESMM_CLUSTER_DIR=str(tmp_path / "cluster"))
    script = os.path.join(ROOT, "scripts", "local-cluster.sh")
    try:
        start = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        yield start.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", script, "stop"], env=env, capture_output=True, text=True, timeout=300)


def test_the_dag_runs_end_to_end_on_a_standalone_cluster(airflow_env, standalone, tmp_path):
    params = _params(tmp_path, master=standalone, sets=["experiment.figure_rates=[1.0]", "train.workers=2"])
    rc, out = _dags_test(airflow_env, params, str(tmp_path / "dag.log"))
    assert rc == 0, out[-6000:]
    assert f"--master {standalone}" in out and "--archives" in out and "esmm.zip" in out
    for url in (tmp_path / "raw", tmp_path / "dataset", tmp_path / "runs" / "experiment"):
        assert _committed(url), url
    assert "| ESMM |" in (tmp_path / "runs" / "experiment" / "table2.md").read_text()
