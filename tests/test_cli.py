"""The jobs' scheduler contract (esmm/cli.py): exit codes, one-line errors, and the ``_SUCCESS`` marker of every
finished output. The subprocess tests run ``python jobs/<job>.py`` as a scheduler would; they fail before a JVM
starts."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import recommit

from esmm import cli
from esmm.outputs import SUCCESS

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf" / "test.yaml")
JOBS = ("generate", "etl", "train", "evaluate", "experiment", "pipeline")


def job(name: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYSPARK_PYTHON=sys.executable)
    return subprocess.run([sys.executable, str(ROOT / "jobs" / f"{name}.py"), "--conf", CONF, *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def error_line(r: subprocess.CompletedProcess, name: str) -> str:
    """The job's last stderr line, ``esmm-<job>: error: ...``; a traceback before it only for a failure (code 1)."""
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"esmm-{name}: error: "), r.stdout[-2000:] + r.stderr[-4000:]
    assert ("Traceback" in r.stderr) == (r.returncode == 1), r.stderr[-4000:]
    return lines[-1]


# ------------------------------------------------------------------------------------------------ in process

def test_exit_code_of_each_kind_of_error():
    from esmm.config import ConfigError
    from esmm.etl import EtlError, EtlOutputRefused, QuarantineGateError
    from esmm.evaluate import EvaluateError
    from esmm.experiment import ExperimentError, ExperimentOutputRefused
    from esmm.generator import GeneratorError, GeneratorOutputRefused
    from esmm.outputs import OutputError
    from esmm.train import TrainError, TrainOutputRefused
    codes = {ConfigError("x"): 2, QuarantineGateError("x"): 3, OutputError("x"): 4, EtlOutputRefused("x"): 4,
             GeneratorOutputRefused("x"): 4, TrainOutputRefused("x"): 4, ExperimentOutputRefused("x"): 4,
             EtlError("x"): 1, GeneratorError("x"): 1, TrainError("x"): 1, EvaluateError("x"): 1,
             ExperimentError("x"): 1, ValueError("x"): 1, KeyError("x"): 1}
    assert {type(e).__name__: cli.exit_code(e) for e in codes} == {type(e).__name__: c for e, c in codes.items()}
    # the new classes are still caught as their module's error
    assert isinstance(QuarantineGateError("x"), EtlError) and isinstance(TrainOutputRefused("x"), TrainError)


def _fake_job(error: Exception):
    def main(argv=None):
        cli.parse(cli.parser("a job that fails"), argv)
        raise error
    return main


@pytest.fixture
def restore_log_level():
    level = logging.getLogger("esmm").level
    yield
    logging.getLogger("esmm").setLevel(level)


def test_run_prints_one_line_and_a_traceback_only_for_failures_or_debug(capsys, restore_log_level):
    from esmm.outputs import OutputError
    from esmm.train import TrainError
    assert cli.run(_fake_job(OutputError("out is locked\nby another job")), [], name="esmm-x") == 4
    assert capsys.readouterr().err == "esmm-x: error: out is locked by another job\n"
    assert cli.run(_fake_job(KeyError("slots")), [], name="esmm-x") == 1          # a failure: its traceback first
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("esmm-x: error: KeyError: 'slots'\n")
    assert cli.run(_fake_job(TrainError("diverged")), [], name="esmm-x") == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("esmm.rundir.TrainError: diverged\nesmm-x: error: diverged\n")
    assert cli.run(_fake_job(OutputError("locked")), ["--log-level", "debug"], name="esmm-x") == 4
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("esmm-x: error: locked\n")
    assert cli.run(_fake_job(ValueError("never")), ["--set", "train.nope=1"], name="esmm-x") == 2
    err = capsys.readouterr().err
    assert err.startswith("esmm-x: error: train.nope: unknown key (known: [") and err.count("\n") == 1
    assert cli.run(lambda argv: None, [], name="esmm-x") == 0


def test_job_name_is_the_jobs_file_name():
    from jobs import etl, train
    assert (cli.job_name(etl.main), cli.job_name(train.main)) == ("esmm-etl", "esmm-train")


def test_quarantine_gate_exits_3(spark, tmp_path, capsys, restore_log_level):
    """A Spark job: the ETL's data-quality gate, on a raw log whose lines are mostly bad. In this process, on the
    test session (a job as a process with a JVM exits non-zero in tests/test_cluster.py's refused-path probe)."""
    from jobs import etl
    from test_etl import write_raw
    raw = write_raw(tmp_path)                                          # 10 of 13 skeleton lines are bad
    out = tmp_path / "dataset"
    code = cli.run(etl.main, ["--conf", CONF, "--raw", str(raw), "--out", str(out),
                              "--set", "etl.max_quarantine_share=0.5"])
    r = subprocess.CompletedProcess([], code, "", capsys.readouterr().err)   # what a scheduler would have seen
    assert r.returncode == 3, r.stderr[-3000:]
    assert "76.92% of skeleton lines were quarantined (> etl.max_quarantine_share=50.00%)" in error_line(r, "etl")
    assert not out.exists() and not list(tmp_path.glob(f"dataset.tmp-*/{SUCCESS}"))   # staging kept, unmarked


# ------------------------------------------------------------------------------------------------ subprocesses

@pytest.mark.parametrize("name", JOBS)
def test_bad_set_key_is_a_usage_error_in_every_job(name):
    r = job(name, "--set", "train.bogus=1", *(["--runs", "nowhere"] if name == "evaluate" else []), timeout=60)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "train.bogus: unknown key" in error_line(r, name)


def test_argparse_errors_exit_2_naming_the_job():
    r = job("etl", "--log-level", "loud", timeout=60)
    assert r.returncode == 2
    assert "esmm-etl: error: argument --log-level: invalid choice: 'LOUD'" in error_line(r, "etl")
    assert r.stderr.startswith("usage: esmm-etl ")


def _fake_dataset(tmp_path: Path) -> str:
    """Enough of a dataset for the training job to get to its output directory (the manifest's layout)."""
    ds = tmp_path / "dataset"
    ds.mkdir()
    (ds / "manifest.json").write_text(json.dumps({"layout": {}, "run_id": "dataset-fake"}))
    from esmm import outputs as O
    (ds / O.MARKER).write_text(json.dumps(O.marker_record("dataset")))
    recommit(ds, "dataset-fake")
    return str(ds)


def test_missing_input_is_a_failure(tmp_path):
    r = job("train", "--dataset", str(tmp_path / "nope"), "--out", str(tmp_path / "run"))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "no dataset manifest at" in error_line(r, "train")
    assert not (tmp_path / "run").exists()


def test_foreign_output_is_refused_with_4(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    r = job("train", "--dataset", _fake_dataset(tmp_path), "--out", str(foreign), "--overwrite")
    assert r.returncode == 4, r.stderr[-3000:]
    assert "was not created by esmm-spark" in error_line(r, "train")
    assert os.listdir(foreign) == ["notes.txt"]


def test_locked_output_is_refused_with_4(tmp_path):
    from esmm.outputs import Lock
    run = tmp_path / "run"
    with Lock(str(run), "train esmm (the first one)"):                 # held by this (live) process
        r = job("train", "--dataset", _fake_dataset(tmp_path), "--out", str(run))
    assert r.returncode == 4, r.stderr[-3000:]
    assert "is being written by another job (train esmm (the first one)" in error_line(r, "train")
    assert not run.exists()


# ------------------------------------------------------------------------------------------------ _SUCCESS

def test_reused_raw_log_and_dataset_keep_their_success(spark, tiny_dataset):
    """Every finished output carries ``_SUCCESS``; a re-run that reuses one keeps it. (The experiment's, its training
    runs' and an evaluation's: tests/test_evaluate.py, on the outputs that file builds anyway.)"""
    from esmm.config import load_config
    from esmm.etl import run_etl
    from esmm.generator import generate
    raw, ds = tiny_dataset
    assert os.path.isfile(os.path.join(raw, SUCCESS)) and os.path.isfile(os.path.join(ds, SUCCESS))
    cfg = load_config(CONF)
    assert generate(spark, cfg, raw)["skipped"] and run_etl(spark, cfg, raw, ds)["run_id"]    # reused: kept
    assert os.path.isfile(os.path.join(raw, SUCCESS)) and os.path.isfile(os.path.join(ds, SUCCESS))
