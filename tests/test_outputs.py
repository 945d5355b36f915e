"""Ownership markers, one-writer locks, stale staging and run ids (esmm/outputs.py, esmm/spark.py, evaluate)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from esmm import outputs as O
from esmm.evaluate import unique_run_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_claim_adopts_new_and_empty_dirs_refuses_foreign_and_other_kinds(tmp_path):
    rec = O.claim_dir(str(tmp_path / "new"), "evaluation", {"a": 1})
    assert rec["kind"] == "evaluation" and rec["inputs_fingerprint"] == O.fingerprint({"a": 1})
    assert O.claim_dir(str(tmp_path / "new"), "evaluation")["run_id"] == rec["run_id"]   # kept, not re-created
    (tmp_path / "empty").mkdir()
    assert O.claim_dir(str(tmp_path / "empty"), "experiment")["kind"] == "experiment"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(O.OutputError, match=r"foreign exists and was not created by esmm-spark"):
        O.claim_dir(str(foreign), "evaluation")
    with pytest.raises(O.OutputError, match=r"foreign exists and was not created by esmm-spark"):
        O.remove_owned(str(foreign), "evaluation")
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(O.OutputError, match="holds a 'evaluation' output, not a 'experiment'"):
        O.remove_owned(str(tmp_path / "new"), "experiment")
    O.remove_owned(str(tmp_path / "new"), "evaluation")
    assert not (tmp_path / "new").exists()
    O.remove_owned(str(tmp_path / "absent"), "evaluation")       # nothing there: nothing to do


def test_run_ids_are_unique_and_fingerprints_stable():
    a, b = O.new_run_id("train_run"), O.new_run_id("train_run")
    assert a != b and a.startswith("train_run-")
    assert O.fingerprint({"x": [1, 2], "y": "z"}) == O.fingerprint({"y": "z", "x": [1, 2]})
    assert O.fingerprint({"x": [1, 2]}) != O.fingerprint({"x": [2, 1]})
    m = {"run_id": "dataset-1", "inputs": [], "config_hash": "c", "layout": {}, "rows": {"written": 3}}
    assert O.dataset_fingerprint(m) == O.dataset_fingerprint({**m, "seconds": 99.0})   # timings do not count
    assert O.dataset_fingerprint(m) != O.dataset_fingerprint({**m, "run_id": "dataset-2"})  # a rebuild does


def test_unique_run_ids_lengthen_only_colliding_names():
    ids = unique_run_ids(["/e/runs/r0-rate1.0/esmm", "/e/runs/r0-rate0.1/esmm", "/e/runs/r0-rate1.0/base",
                          "/x/ctr"])
    assert ids == {"/e/runs/r0-rate1.0/esmm": "r0-rate1.0/esmm", "/e/runs/r0-rate0.1/esmm": "r0-rate0.1/esmm",
                   "/e/runs/r0-rate1.0/base": "base", "/x/ctr": "ctr"}
    assert unique_run_ids(["/a/b", "/a/b/"]) == {"/a/b": "b"}       # one directory, spelled twice


def test_clean_stale_staging_removes_only_this_outputs_staging(tmp_path):
    out = tmp_path / "dataset"
    for name in ("dataset.tmp-0123abcd", "dataset.old-89abcdef"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part-0.parquet").write_bytes(b"x")
    for name in ("dataset.tmp-keep", "dataset2.tmp-0123abcd", "other.tmp-0123abcd"):
        (tmp_path / name).mkdir()
    removed = O.clean_stale_staging(str(out))
    assert sorted(os.path.basename(p) for p in removed) == ["dataset.old-89abcdef", "dataset.tmp-0123abcd"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.tmp-keep", "dataset2.tmp-0123abcd",
                                                          "other.tmp-0123abcd"]


def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    out = str(tmp_path / "exp")
    with O.OutputLock(out, "experiment"):
        with pytest.raises(O.OutputError, match=rf"being written by another job \(experiment, pid {os.getpid()}"):
            O.OutputLock(out, "experiment").acquire()
    assert not os.path.exists(out + ".lock")
    with O.OutputLock(out, "again"):                                # free again after release
        assert json.load(open(out + ".lock"))["job"] == "again"


def test_lock_of_a_killed_holder_is_taken_over_a_live_ones_is_not(tmp_path):
    out = str(tmp_path / "dataset")
    code = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from esmm.outputs import OutputLock; "
            f"OutputLock({out!r}, 'etl').acquire(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(O.OutputError, match=rf"\(etl, pid {holder.pid} on "):
            O.OutputLock(out, "etl").acquire()
        holder.send_signal(signal.SIGKILL)                          # kill -9: the lock file stays behind
        holder.wait()
        assert os.path.exists(out + ".lock")
        t0 = time.time()
        with O.OutputLock(out, "etl-rerun"):
            assert json.load(open(out + ".lock"))["pid"] == os.getpid()
        assert time.time() - t0 < 5
        assert sorted(os.listdir(tmp_path)) == []                   # no lock, no stale copies left
    finally:
        if holder.poll() is None:
            holder.kill()


def test_atomic_json_never_leaves_a_torn_file(tmp_path):
    path = str(tmp_path / "s.json")
    O.atomic_write_json(path, {"a": 1})
    O.atomic_write_json(path, {"a": 2})
    assert json.load(open(path)) == {"a": 2} and os.listdir(tmp_path) == ["s.json"]
