"""The cluster path of ./spark-submit.sh on a real Spark standalone cluster (scripts/local-cluster.sh: a master and two
1-core workers on 127.0.0.1): the packed venv (--archives), the code zip (--py-files), the executors' Python and
Horovod workers inside executor tasks, end to end through jobs/pipeline.py on conf/test.yaml.

The job runs from a scratch directory with the config's relative paths (data/raw, data/dataset, data/runs): they
must be resolved on the driver, not in the executors' work dirs. The first run on a checkout packs the venv into
dist/venv.tar.gz (cached until requirements.txt or scripts/install.sh change).
"""
import glob
import json
import os
import re
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "local-cluster.sh")


def _master_state(webui: str) -> dict:
    with urllib.request.urlopen(f"{webui}/json/", timeout=10) as r:
        return json.load(r)


def _submit_env(cluster) -> dict:
    """The cluster's Spark configuration (``_production_strategies``). Two executors of one machine read each other's
    shuffle files from disk (host-local reads); with private scratch they cannot, as on two hosts, so the application
    turns host-local reads off (scripts/local-cluster.sh)."""
    env = dict(os.environ, SPARK_CONF_DIR=cluster["conf"])
    if cluster["private"] is None:
        return env
    return dict(env, SPARK_SUBMIT_OPTS="-Dspark.shuffle.readHostLocalDisk=false")


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _production_strategies(conf_dir) -> str:
    """The test run's Spark configuration (SPARK_CONF_DIR, tests/conftest.py) without its ``spark.sql.*`` execution
    strategies (interpreted expressions, no adaptive execution): the cluster's applications plan and run their
    queries as users' jobs do, with generated code and AQE. The JVM flags and the daemons' options stay."""
    src = os.environ.get("SPARK_CONF_DIR") or os.path.join(ROOT, "tests", "spark-conf")
    os.makedirs(conf_dir, exist_ok=True)
    for name in os.listdir(src):
        with open(os.path.join(src, name)) as f:
            lines = f.readlines()
        if name == "spark-defaults.conf":
            lines = [x for x in lines if not x.startswith("spark.sql.")]
        with open(os.path.join(conf_dir, name), "w") as f:
            f.writelines(lines)
    return str(conf_dir)


@pytest.fixture
def cluster(tmp_path):
    """A started local standalone cluster; always stopped afterwards (also when the start or the test fails)."""
    run = tmp_path / "cluster"
    private = tmp_path / "private"
    env = dict(os.environ, ESMM_CLUSTER_DIR=str(run), SPARK_CONF_DIR=_production_strategies(tmp_path / "spark-conf"))
    if _can_unshare():   # each worker in its own mount namespace with a private scratch tmpfs, as on separate hosts
        env["ESMM_CLUSTER_PRIVATE"] = str(private)
    try:
        start = subprocess.run(["bash", SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, f"local-cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
        url = start.stdout.strip().splitlines()[-1]
        assert url.startswith("spark://127.0.0.1:") and (run / "master-url").read_text().strip() == url
        yield {"url": url, "webui": (run / "webui-url").read_text().strip(), "dir": run, "conf": env["SPARK_CONF_DIR"],
               "private": private if "ESMM_CLUSTER_PRIVATE" in env else None}
    finally:
        stop = subprocess.run(["bash", SCRIPT, "stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, f"local-cluster.sh stop failed:\n{stop.stdout}\n{stop.stderr}"


@pytest.mark.parametrize("shipped", [pytest.param("node-venv", id="node-venv"),
                                     pytest.param("archive", id="archive", marks=pytest.mark.slow)])
def test_pipeline_on_standalone_cluster(cluster, tmp_path, shipped):
    """``archive``: the packed venv travels with each application (--archives), every executor unpacks it;
    ``node-venv``: ESMM_EXECUTOR_VENV names a venv every node has (this checkout's .venv, as the workers run on this
    machine), only the code and the configs travel."""
    env = _submit_env(cluster)
    if shipped == "node-venv":
        env["ESMM_EXECUTOR_VENV"] = os.path.join(ROOT, ".venv")
    else:
        env.pop("ESMM_EXECUTOR_VENV", None)
    state = _master_state(cluster["webui"])
    assert state["status"] == "ALIVE" and state["aliveworkers"] == 2 and state["cores"] == 2
    with open(os.path.join(cluster["conf"], "spark-defaults.conf")) as f:   # Spark's own execution strategies
        assert not [x for x in f if x.startswith("spark.sql.")]

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    # archive: each run's 2 Horovod workers in executor tasks; node-venv: the two runs side by side, a Spark task each
    workers = 2 if shipped == "archive" else 1
    cmd = [os.path.join(ROOT, "spark-submit.sh"), "--master", cluster["url"], os.path.join(ROOT, "jobs", "pipeline.py"),
           "--conf", os.path.join(ROOT, "conf", "test.yaml"), "--set", f"train.workers={workers}",
           "--set", f"experiment.parallel_runs={3 - workers}",
           "--set", "experiment.methods=[esmm]", "--set", "experiment.figure_rates=[1.0]"]
    t0 = time.time()
    run = subprocess.run(cmd, cwd=job_dir, capture_output=True, text=True, timeout=1500, env=env)
    seconds = time.time() - t0
    assert run.returncode == 0, f"spark-submit failed after {seconds:.0f}s:\n{run.stdout[-5000:]}\n{run.stderr[-5000:]}"
    assert "rows read 6,000 = written 6,000 + quarantined 0" in run.stdout
    assert "| ESMM |" in run.stdout and "| ORACLE (true probabilities) |" in run.stdout

    # the relative paths of conf/test.yaml landed under the job's directory
    runs = job_dir / "data" / "runs" / "experiment" / "runs" / "r0-rate1.0"
    for method in ("ctr", "esmm"):
        summary = json.loads((runs / method / "train_summary.json").read_text())
        assert summary["world_size"] == workers and summary["steps"] > 0, summary

    # the application ran on the standalone master, with one 1-core executor on each worker
    state = _master_state(cluster["webui"])
    apps = [a for a in state["completedapps"] if a["name"] == "esmm-pipeline"]
    assert len(apps) == 1 and apps[0]["state"] == "FINISHED" and not state["activeapps"], state
    app = apps[0]["id"]
    executors = sorted(glob.glob(str(cluster["dir"] / "work" / "worker-*" / app / "*")))
    assert len(executors) == 2 and {p.split(os.sep)[-3] for p in executors} == {"worker-1", "worker-2"}, executors
    for ex in executors:
        # each executor fetched the code zip into its work dir, and unpacked the venv only when it was shipped
        assert os.path.exists(os.path.join(ex, "esmm.zip")), os.listdir(ex)
        assert os.path.exists(os.path.join(ex, "environment", "bin", "python")) == (shipped == "archive"), os.listdir(ex)
    # every training ran inside an executor task (Horovod rank 0, or the run's own task side by side): its log is in
    # exactly one executor's stderr, not in the driver's output
    logs = [open(os.path.join(ex, "stderr"), errors="replace").read() for ex in executors]
    for method in ("ctr", "esmm"):
        trained = [log for log in logs
                   if re.search(rf"esmm\.train: .*training {method} on \d+ rows .* x {workers} workers", log)]
        assert len(trained) == 1, f"the {method} run's training log not found in exactly one executor's stderr"
        assert f"training {method} on" not in run.stdout + run.stderr
    # no output escaped into the executors' work dirs
    assert not any(os.path.exists(os.path.join(ex, "data")) for ex in executors)

    # a local path the executors cannot see (each worker's private scratch) is refused before training, exit 2
    if cluster["private"] is None:
        pytest.skip("unshare -m is not permitted here: the workers share one filesystem view, no private scratch")
    assert not list(cluster["private"].iterdir())                       # the workers' scratch never reached the driver
    cmd = [os.path.join(ROOT, "spark-submit.sh"), "--master", cluster["url"], os.path.join(ROOT, "jobs", "train.py"),
           "--conf", os.path.join(ROOT, "conf", "test.yaml"), "--dataset", str(job_dir / "data" / "dataset"),
           "--out", str(cluster["private"] / "run"), "--set", "train.workers=2", "--set", "train.method=esmm"]
    # one executor is enough to see that the path is not shared (each worker's scratch is its own): the probe's
    # application asks for one core, so the cluster starts one executor JVM for it, not two
    env = dict(env, SPARK_SUBMIT_OPTS=env.get("SPARK_SUBMIT_OPTS", "") + " -Dspark.cores.max=1")
    run = subprocess.run(cmd, cwd=job_dir, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 2, run.stderr[-3000:]
    said = run.stdout + run.stderr                                      # spark-submit passes the driver's stderr on
    assert "is a local path that the executors on" in said and "cannot see" in said
    assert not list(cluster["private"].iterdir())                       # the probe is gone, nothing was trained


class _FakeContext:
    def __init__(self, master, conf):
        self.master, self._conf = master, conf
        self.pythonExec = conf.get("spark.pyspark.python", "python3")

    def getConf(self):
        return self._conf


def test_horovod_worker_env_local_and_cluster(monkeypatch):
    """Horovod workers on a cluster start from the executors' Python with the shipped code zip, not the driver's."""
    from esmm.train import _worker_env
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "7")
    monkeypatch.setenv("VIRTUAL_ENV", "/driver/venv")
    env, exe = _worker_env(_FakeContext("local[2]", {}))
    assert exe is None and env["PYTHONPATH"].split(os.pathsep)[0] == ROOT and env["VIRTUAL_ENV"] == "/driver/venv"
    conf = {"spark.submit.pyFiles": "/driver/dist/esmm.zip,/driver/extra.py",
            "spark.pyspark.python": "./environment/bin/python"}
    env, exe = _worker_env(_FakeContext("spark://10.0.0.1:7077", conf))
    assert exe == "./environment/bin/python"
    assert env["PYTHONPATH"] == os.pathsep.join(["esmm.zip", "extra.py", "."]) and env["HOROVOD_CYCLE_TIME"] == "7"
    assert "VIRTUAL_ENV" not in env and "PATH" not in env


def test_node_venv_must_be_an_absolute_path(tmp_path):
    """ESMM_EXECUTOR_VENV names the same path on every node: a relative one is refused before anything is submitted."""
    r = subprocess.run([os.path.join(ROOT, "spark-submit.sh"), "--master", "spark://127.0.0.1:1",
                        os.path.join(ROOT, "jobs", "etl.py")], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, ESMM_EXECUTOR_VENV=".venv"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "ESMM_EXECUTOR_VENV must be an absolute path, got .venv" in r.stderr
