"""esmm-spark as an Airflow DAG: generate -> ETL -> the reference CTR network -> one training per method ->
evaluation and report (Table 2, Figure 3).

Copy this file into your DAGs folder, point ``ESMM_HOME`` at an installed esmm-spark checkout (``make install``: its
``.venv`` holds Spark, torch and Horovod; Airflow itself runs from its own environment), and trigger it with params::

    airflow dags trigger esmm_pipeline --conf '{"master": "spark://head:7077", "conf": "conf/default.yaml",
        "dataset": "hdfs:///esmm/dataset", "runs": "hdfs:///esmm/runs", "raw": "hdfs:///esmm/raw", "generate": false}'

Every task is a ``SparkSubmitOperator`` running one of the project's jobs (``jobs/*.py``) with ``--conf`` and
``--set``, exactly as ``./spark-submit.sh`` would:

- ``generate`` (skipped when ``generate`` is false: the raw log is already at ``raw``), ``etl``;
- ``train_ctr`` then ``train_<method>`` for every method of ``ESMM_DAG_METHODS`` (``jobs/experiment.py --train``:
  the experiment's own runs, in the directories it reads them from; UNBIAS waits for the CTR network, whose pCTR it
  trains with);
- ``evaluate_report``: ``jobs/experiment.py``, which finds every training finished, scores all of them on the test
  split in one Spark job, computes the AUCs, DeLong's test and GAUC, and writes Table 2 and Figure 3.

The jobs' exit codes map to Airflow's semantics (``EsmmSubmitOperator``): 1 (a crash, a killed process, a lost
executor) fails the try and Airflow retries it (``retries``, the jobs resume from their checkpoints and reuse what is
committed); 2 (config or usage error), 3 (the ETL's quarantine gate) and 4 (an output refused) fail the task at once
without retries (``AirflowFailException``), with the job's one-line error as the failure message. A re-run of the
whole DAG reuses every committed output and changes nothing.

Params: ``master`` (empty: the Spark connection ``spark_conn_id``'s master), ``conf`` (relative to ``ESMM_HOME`` or
absolute), ``sets`` (a list of ``key=value`` overrides), ``raw``/``dataset``/``runs`` (local paths or URLs; empty:
the config's ``paths``), ``generate``. Environment: ``ESMM_HOME``, ``ESMM_DAG_METHODS`` (comma-separated; default
the paper's seven), ``ESMM_DAG_RETRIES`` (2) and ``ESMM_DAG_RETRY_DELAY_S`` (60); ``ESMM_EXECUTOR_VENV`` as for
``spark-submit.sh`` (a venv on every node: the packed venv is not shipped).
"""
from __future__ import annotations

import os
import subprocess
from datetime import timedelta

import pendulum
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import DAG, Param
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSkipException

ESMM_HOME = os.path.abspath(os.environ.get("ESMM_HOME", os.path.join(os.path.dirname(__file__), "..", "..")))
METHODS = [m.strip() for m in os.environ.get(
    "ESMM_DAG_METHODS", "base,aman,oversampling,unbias,division,esmm_ns,esmm").split(",") if m.strip()]
NEEDS_CTR = {"unbias"}          # trains on the reference CTR network's pCTR (the others need it only to be scored)
NOT_RETRIED = {2: "config or usage error", 3: "data-quality gate (quarantine)", 4: "output refused"}


class EsmmSubmitOperator(SparkSubmitOperator):
    """One esmm-spark job through ``spark-submit``, configured from the DAG run's params, with the jobs' exit-code
    contract: 2, 3 and 4 fail the task without retries, anything else (1, a kill) is left to ``retries``."""

    def __init__(self, *, job: str, job_args: list[str] | None = None, skip_unless: str = "", **kwargs):
        kwargs.setdefault("name", f"esmm-{job}")
        kwargs.setdefault("driver_memory", os.environ.get("SPARK_DRIVER_MEMORY", "2g"))
        super().__init__(application=os.path.join(ESMM_HOME, "jobs", f"{job}.py"), **kwargs)
        self.job, self.job_args, self.skip_unless = job, list(job_args or []), skip_unless

    def execute(self, context):
        p = context["params"]
        if self.skip_unless and not p.get(self.skip_unless):
            raise AirflowSkipException(f"params.{self.skip_unless} is false")
        venv = os.path.join(ESMM_HOME, ".venv", "bin")
        conf = p["conf"] if os.path.isabs(p["conf"]) else os.path.join(ESMM_HOME, p["conf"])
        sets = list(p.get("sets") or []) + [f"paths.{k}={p[k]}" for k in ("raw", "dataset", "runs") if p.get(k)]
        sets.append(f"experiment.methods=[{', '.join(METHODS)}]")
        self.application_args = ["--conf", conf] + [a for s in sets for a in ("--set", s)] + self.job_args
        master = p.get("master") or ""
        env = {"PATH": venv + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": ESMM_HOME,
               "PYSPARK_DRIVER_PYTHON": os.path.join(venv, "python")}
        spark_conf = {"spark.ui.showConsoleProgress": "false",
                      "spark.driver.extraJavaOptions":
                          f"-Dlog4j2.configurationFile=file:{ESMM_HOME}/conf/log4j2.properties"}
        if master.startswith("local") or (not master and self._local_connection()):
            env["PYSPARK_PYTHON"] = os.path.join(venv, "python")
        else:  # a cluster: the code and the venv travel with the job (scripts/package.sh, as spark-submit.sh does),
            # or the code alone when every node has the venv at ESMM_EXECUTOR_VENV
            node_venv = os.environ.get("ESMM_EXECUTOR_VENV", "")
            if node_venv and not os.path.isabs(node_venv):   # as spark-submit.sh: a relative path means nothing there
                raise AirflowFailException(f"ESMM_EXECUTOR_VENV must be an absolute path (a venv on every node), got "
                                           f"{node_venv!r}")
            package = ["bash", os.path.join(ESMM_HOME, "scripts", "package.sh")] + (["--code-only"] if node_venv else [])
            paths = subprocess.run(package, check=True, capture_output=True, text=True).stdout.split()
            if node_venv:
                self.py_files, pyexec = paths[-1], os.path.join(node_venv, "bin", "python")
            else:
                self.py_files, self._archives, pyexec = paths[-2], f"{paths[-1]}#environment", "./environment/bin/python"
            self.files = ",".join(os.path.join(ESMM_HOME, "conf", f) for f in sorted(os.listdir(
                os.path.join(ESMM_HOME, "conf"))) if f.endswith((".yaml", ".properties")))
            env["PYSPARK_PYTHON"] = pyexec
            spark_conf.update({"spark.pyspark.driver.python": os.path.join(venv, "python"),
                               "spark.pyspark.python": pyexec,
                               "spark.executorEnv.PYSPARK_PYTHON": pyexec,
                               "spark.yarn.appMasterEnv.PYSPARK_PYTHON": pyexec})
            if master.startswith(("spark://127.", "spark://localhost")):  # scripts/local-cluster.sh: loopback only
                env["SPARK_LOCAL_IP"] = "127.0.0.1"
                spark_conf.update({"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"})
        self.env_vars = env
        self.conf = {**spark_conf, **(self.conf or {})}
        self._hook = self._get_hook()
        if master:
            self._hook._connection["master"] = master
        try:
            return super().execute(context)
        except Exception as e:  # noqa: BLE001  (the hook's AirflowException; the exit code decides)
            code = getattr(getattr(self._hook, "_submit_sp", None), "returncode", None)
            if code in NOT_RETRIED:
                raise AirflowFailException(f"esmm {self.job} exited {code} ({NOT_RETRIED[code]}; not retried): "
                                           f"{self._error_line()}") from None
            raise AirflowException(f"esmm {self.job} exited {code} (retried while tries are left): "
                                   f"{self._error_line()}") from e

    def _local_connection(self) -> bool:
        from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
        return str(SparkSubmitHook(conn_id=self._conn_id)._connection["master"]).startswith("local")

    def _error_line(self) -> str:
        """The job's one-line error (``esmm-<job>: error: ...``), else the last line it printed."""
        lines = list(getattr(self._hook, "_last_submit_log_lines", []) or [])
        errors = [ln for ln in lines if ": error: " in ln]
        return (errors or lines or ["(no output)"])[-1].strip()


with DAG(
    dag_id="esmm_pipeline",
    description="esmm-spark: generate -> ETL -> trainings -> evaluation and Table 2",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["esmm-spark"],
    params={
        "master": Param("local[2]", type="string", description="Spark master; empty: the connection's"),
        "conf": Param("conf/demo.yaml", type="string", description="config file (relative to ESMM_HOME)"),
        "sets": Param([], type="array", description="config overrides, key=value"),
        "raw": Param("", type="string", description="raw log path or URL (empty: the config's paths.raw)"),
        "dataset": Param("", type="string", description="dataset path or URL (empty: paths.dataset)"),
        "runs": Param("", type="string", description="runs path or URL (empty: paths.runs)"),
        "generate": Param(True, type="boolean", description="generate the raw log first (false: it is at raw)"),
    },
    default_args={
        "retries": int(os.environ.get("ESMM_DAG_RETRIES", "2")),
        "retry_delay": timedelta(seconds=float(os.environ.get("ESMM_DAG_RETRY_DELAY_S", "60"))),
        "conn_id": os.environ.get("ESMM_DAG_SPARK_CONN_ID", "spark_default"),
    },
) as dag:
    generate = EsmmSubmitOperator(task_id="generate", job="generate", skip_unless="generate")
    etl = EsmmSubmitOperator(task_id="etl", job="etl", trigger_rule="none_failed")
    train_ctr = EsmmSubmitOperator(task_id="train_ctr", job="experiment", job_args=["--train", "ctr"])
    evaluate_report = EsmmSubmitOperator(task_id="evaluate_report", job="experiment")
    generate >> etl >> train_ctr
    for method in METHODS:
        train = EsmmSubmitOperator(task_id=f"train_{method}", job="experiment", job_args=["--train", method])
        (train_ctr if method in NEEDS_CTR else etl) >> train >> evaluate_report
    train_ctr >> evaluate_report
