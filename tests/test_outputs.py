"""The output lifecycle (esmm/outputs.py) and the storage layer (esmm/storage.py): canonical paths, ownership,
commit records, recovery of interrupted commits, user files beside outputs, locks and their takeover."""
import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from esmm import outputs as O
from esmm import storage
from esmm.evaluate import unique_run_ids

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ storage

def test_paths_and_their_urls_resolve_to_one_canonical_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = f"file://{tmp_path}/data/my dir"
    for spelling in ("data/my dir", f"{tmp_path}/data/my dir/", f"file://{tmp_path}/data/my%20dir",
                     f"file:{tmp_path}/data/my dir", f"file://localhost{tmp_path}/data/./my dir"):
        assert storage.resolve(spelling) == want, spelling
    assert storage.resolve(want) == want                                    # idempotent
    assert storage.resolve("s3://bucket/a/b/") == storage.resolve("s3a://bucket/a/b") == "s3a://bucket/a/b"
    assert storage.resolve("hdfs://nn:8020/x//y") == "hdfs://nn:8020/x/y"
    assert storage.join("hdfs://nn:8020/x", "runs", "esmm") == "hdfs://nn:8020/x/runs/esmm"
    assert storage.parent("s3a://b/k/runs") == "s3a://b/k" and storage.basename("s3a://b/k/runs") == "runs"
    assert storage.arrow_uri("s3a://b/k") == "s3://b/k" and storage.arrow_uri(want) == f"{tmp_path}/data/my dir"
    with pytest.raises(storage.StorageError, match="with a host"):
        storage.resolve("file://otherhost/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.resolve("s3a:///x")


def test_local_files_round_trip_through_the_storage_layer(tmp_path):
    d = f"file://{tmp_path}/a b"
    storage.write_json(storage.join(d, "x", "r.json"), {"k": 1})
    assert storage.read_json(f"{tmp_path}/a b/x/r.json") == {"k": 1}
    assert storage.listdir(d) == ["x"] and storage.isdir(storage.join(d, "x"))
    assert storage.create_exclusive(storage.join(d, "lock"), b"1")
    assert not storage.create_exclusive(storage.join(d, "lock"), b"2")
    assert storage.read_bytes(storage.join(d, "lock")) == b"1"
    assert set(storage.walk(d)) == {"x/r.json", "lock"}
    storage.rename(storage.join(d, "x"), storage.join(d, "y"))
    with pytest.raises(storage.StorageError, match="target exists"):
        storage.rename(storage.join(d, "lock"), storage.join(d, "y"))
    assert sorted(os.listdir(f"{tmp_path}/a b")) == ["lock", "y"]           # no temporary files left


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "open":
                yield node.lineno, "open"
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) and \
                    isinstance(f.value.value, ast.Name) and f.value.value.id == "os" and f.value.attr == "path":
                yield node.lineno, f"os.path.{f.attr}"
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                    (f.value.id == "shutil" or (f.value.id == "os" and f.attr in
                                               ("makedirs", "replace", "remove", "listdir", "rename", "mkdir",
                                                "rmdir", "unlink", "scandir", "walk"))):
                yield node.lineno, f"{f.value.id}.{f.attr}"


# (file, function) pairs that touch the local filesystem for something that is not a configured path
ALLOWED = {
    ("esmm/cli.py", "job_name"),             # the job's own script name
    ("esmm/spark.py", "code_root"), ("esmm/spark.py", "with_code_root"),   # where the code is
    ("esmm/train.py", "_worker_env"),        # the code root and --py-files names for Horovod workers
    ("esmm/outputs.py", "code_version"),     # the checkout's .git
    ("esmm/tracking.py", "_log_artifact"),   # a temporary copy of a remote artifact for MLflow
}


def test_no_local_file_calls_on_configured_paths_outside_the_storage_layer():
    found = []
    for path in sorted((ROOT / "esmm").glob("*.py")) + sorted((ROOT / "jobs").glob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "esmm/storage.py":
            continue
        tree = ast.parse(path.read_text())
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for line, call in _calls(fn):
                if (rel, fn.name) not in ALLOWED:
                    found.append(f"{rel}:{line} {fn.name}: {call}")
    assert not found, "file access outside esmm/storage.py:\n" + "\n".join(sorted(set(found)))


# ------------------------------------------------------------------------------------------------ identity

def test_run_ids_are_unique_fingerprints_stable_and_code_is_identified():
    a, b = O.new_run_id("train_run"), O.new_run_id("train_run")
    assert a != b and a.startswith("train_run-")
    assert O.fingerprint({"x": [1, 2], "y": "z"}) == O.fingerprint({"y": "z", "x": [1, 2]})
    assert O.fingerprint({"x": [1, 2]}) != O.fingerprint({"x": [2, 1]})
    m = {"run_id": "dataset-1", "inputs": [], "config_hash": "c", "layout": {}, "rows": {"written": 3}}
    assert O.dataset_fingerprint(m) == O.dataset_fingerprint({**m, "seconds": 99.0})   # timings do not count
    assert O.dataset_fingerprint(m) != O.dataset_fingerprint({**m, "run_id": "dataset-2"})  # a rebuild does
    import esmm
    code = O.marker_record("dataset")["code"]
    assert code["package"] == esmm.__version__
    if (ROOT / ".git").is_dir():
        assert len(code["git_commit"]) == 40


def test_unique_run_ids_lengthen_only_colliding_names():
    ids = unique_run_ids(["/e/runs/r0-rate1.0/esmm", "/e/runs/r0-rate0.1/esmm", "/e/runs/r0-rate1.0/base",
                          "file:///x/ctr"])
    assert ids == {"file:///e/runs/r0-rate1.0/esmm": "r0-rate1.0/esmm",
                   "file:///e/runs/r0-rate0.1/esmm": "r0-rate0.1/esmm",
                   "file:///e/runs/r0-rate1.0/base": "base", "file:///x/ctr": "ctr"}
    assert unique_run_ids(["/a/b", "/a/b/", "file:///a/b"]) == {"file:///a/b": "b"}   # one directory, 3 spellings


# ------------------------------------------------------------------------------------------------ the lifecycle

def _build(out, inputs=None, content=b"v1", overwrite=False):
    with O.Output(str(out), "dataset", inputs or {"v": 1}, "test", overwrite) as o:
        if o.reusable:
            return o.committed
        o.refuse_other_inputs()
        tmp = o.stage()
        storage.write_bytes(storage.join(tmp, "part-0"), content)
        return o.commit()


def test_stage_commit_reuse_refuse_and_replace(tmp_path):
    out = tmp_path / "ds"
    rec = _build(out)
    assert O.is_committed(str(out)) and rec["files"]["part-0"] == 2
    assert (out / "_SUCCESS").exists() and json.loads((out / O.MARKER).read_text())["kind"] == "dataset"
    assert _build(out)["run_id"] == rec["run_id"]                              # same inputs: reused
    with pytest.raises(O.OutputRefused, match="built from other inputs .*what differs: v"):
        _build(out, {"v": 2})
    new = _build(out, {"v": 2}, b"v2!", overwrite=True)
    assert new["run_id"] != rec["run_id"] and (out / "part-0").read_bytes() == b"v2!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]                # no staging, no lock left
    (out / "part-0").write_bytes(b"torn")                                      # a listed file changed size
    assert not O.is_committed(str(out))


def test_foreign_and_manifest_only_directories_are_never_replaced(tmp_path):
    for name, files in (("notes", {"notes.txt": "mine"}), ("ds", {"manifest.json": "{}", "part-0": "x"})):
        d = tmp_path / name
        d.mkdir()
        for f, text in files.items():
            (d / f).write_text(text)
        for overwrite in (False, True):
            with pytest.raises(O.OutputError, match="was not created by esmm-spark"):
                _build(d, overwrite=overwrite)
        assert {p.name: p.read_text() for p in d.iterdir()} == files
    (tmp_path / "empty").mkdir()
    _build(tmp_path / "empty")                                                  # an empty directory holds nothing
    assert O.is_committed(str(tmp_path / "empty"))


def test_a_users_backups_beside_an_output_survive_every_job(tmp_path):
    out = tmp_path / "ds"
    _build(out)
    import shutil
    for name in ("ds.old-20261201", "ds.tmp-0123abcd"):                     # copies of our output, our marker inside
        shutil.copytree(out, tmp_path / name)
    (tmp_path / "ds.old-89abcdef").mkdir()                                  # a plain folder of the user's
    for inputs, overwrite in (({"v": 1}, False), ({"v": 2}, True), ({"v": 3}, False)):
        try:
            _build(out, inputs, overwrite=overwrite)
        except O.OutputRefused:
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.old-20261201", "ds.old-89abcdef",
                                                          "ds.tmp-0123abcd"]
    assert O.is_committed(str(tmp_path / "ds.old-20261201"))


COMMIT_STEPS = ("staged", "old-moved", "new-moved")


@pytest.mark.parametrize("step", COMMIT_STEPS)
@pytest.mark.parametrize("first", [True, False])
def test_a_kill_at_every_commit_step_leaves_a_committed_output_findable_and_recovered(tmp_path, step, first):
    """A job killed between the commit's steps: at every instant one committed version is findable; the next job
    on the output finishes the swap (or restores the old one) instead of deleting anything."""
    out = tmp_path / "ds"
    if not first:
        _build(out, {"v": 1}, b"old")
    code = ("from esmm import outputs as O, storage\n"
            f"with O.Output({str(out)!r}, 'dataset', {{'v': 2}}, 'test', True) as o:\n"
            "    tmp = o.stage(); storage.write_bytes(storage.join(tmp, 'part-0'), b'new'); o.commit()\n")
    env = {**os.environ, O.FAULT_ENV: step, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == (0 if first and step == "old-moved" else 137), r.stderr  # no old version to move
    where = O.find_committed(str(out))
    assert where is not None                                                    # findable right after the kill
    assert (Path(storage.local_path(where)) / "part-0").read_bytes() in (b"old", b"new")
    with O.Output(str(out), "dataset", {"v": 2}, "test") as o:               # the next job recovers
        assert o.committed is not None and o.reusable                          # the new version, committed
    assert (out / "part-0").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_an_interrupted_copy_on_a_store_without_atomic_rename_is_not_committed(tmp_path):
    out = tmp_path / "ds"
    _build(out, content=b"12345")
    (out / "part-0").write_bytes(b"12")                                          # a copy cut short
    assert O.find_committed(str(out)) is None
    (out / "part-0").unlink()
    assert not O.is_committed(str(out))
    _build(out, content=b"again")                                                # same inputs: rebuilt, not reused
    assert (out / "part-0").read_bytes() == b"again"


def test_a_second_writer_is_detected_at_commit(tmp_path):
    out = tmp_path / "ds"
    with O.Output(str(out), "dataset", {"v": 1}, "test", lock=False) as a:
        tmp = a.stage()
        storage.write_bytes(storage.join(tmp, "part-0"), b"a")
        _build(out, {"v": 1}, b"b")                                             # another job commits meanwhile
        with pytest.raises(O.OutputError, match="committed by another job"):
            a.commit()
    assert (out / "part-0").read_bytes() == b"b"


def test_in_place_outputs_keep_the_predecessor_until_the_new_one_commits(tmp_path):
    out = tmp_path / "run"
    with O.Output(str(out), "train_run", {"v": 1}) as o:
        o.claim()
        (out / "model.pt").write_bytes(b"old")
        o.commit_in_place()
    with O.Output(str(out), "train_run", {"v": 2}) as o:
        with pytest.raises(O.OutputRefused):
            o.claim(has_results=lambda: True)
    with O.Output(str(out), "train_run", {"v": 2}, overwrite=True) as o:
        o.claim()
        olds = [p.name for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
        assert len(olds) == 1 and (tmp_path / olds[0] / "model.pt").read_bytes() == b"old"
    with O.Output(str(out), "train_run", {"v": 2}) as o:                    # a resumed run, then its commit
        assert o.recover() == [] and (tmp_path / olds[0]).exists()            # not committed yet: kept
        o.claim()
        (out / "model.pt").write_bytes(b"new")
        o.commit_in_place()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------------------------------ locks

def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    out = str(tmp_path / "exp")
    with O.Lock(out, "experiment"):
        with pytest.raises(O.OutputError, match=rf"being written by another job \(experiment, pid {os.getpid()}"):
            O.Lock(out, "experiment").acquire()
    assert not os.path.exists(out + ".lock")
    with O.Lock(out, "again"):
        assert json.load(open(out + ".lock"))["job"] == "again"


HOLD = ("import sys, time\nfrom esmm.outputs import Lock\n"
        "Lock(sys.argv[1], sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)\n")


def test_a_killed_holders_lock_is_taken_over_by_exactly_one_of_many_racers(tmp_path):
    out = str(tmp_path / "dataset")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out, "etl"], stdout=subprocess.PIPE, text=True, env=env)
    racers = []
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(O.OutputError, match=rf"\(etl, pid {holder.pid} on "):
            O.Lock(out, "etl").acquire()
        race = ("import sys, time\nfrom esmm.outputs import Lock, OutputError\n"
                "while time.time() < float(sys.argv[2]): pass\n"
                "try:\n    Lock(sys.argv[1], 'racer').acquire(); print('won', flush=True); time.sleep(5)\n"
                "except OutputError:\n    print('lost', flush=True)\n")
        start = time.time() + 3
        racers = [subprocess.Popen([sys.executable, "-c", race, out, str(start)], stdout=subprocess.PIPE, text=True,
                                   env=env) for _ in range(4)]
        time.sleep(1.5)
        holder.send_signal(signal.SIGKILL)                                      # kill -9 while they wait
        holder.wait()
        results = [r.stdout.readline().strip() for r in racers]
        assert sorted(results) == ["lost", "lost", "lost", "won"]
    finally:
        for p in [holder] + racers:
            if p.poll() is None:
                p.kill()


@pytest.mark.parametrize("blocked", [False, True], ids=["default", "sigterm-blocked-by-the-parent"])
def test_sigterm_releases_the_lock(tmp_path, blocked):
    """Also when the job inherits a signal mask that blocks SIGTERM (as from a runner's thread)."""
    out = str(tmp_path / "ds")
    code = ("import sys, time\nfrom esmm import cli\nfrom esmm.outputs import Lock\ncli.release_on_sigterm()\n"
            "with Lock(sys.argv[1], 'etl'):\n    print('locked', flush=True); time.sleep(60)\n")
    block = (lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})) if blocked else None
    p = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True, preexec_fn=block,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == "locked"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143
        assert not os.path.exists(out + ".lock")
    finally:
        if p.poll() is None:
            p.kill()


def test_lease_lock_is_renewed_and_a_dead_holders_lease_is_taken_over_once(tmp_path):
    """The lease protocol used on Hadoop filesystems and object stores, run here over local files."""
    out = str(tmp_path / "ds")
    a = O.Lock(out, "a", lease=True, lease_s=2.0).acquire()
    first = json.load(open(out + ".lock"))["renewed"]
    time.sleep(1.2)
    assert json.load(open(out + ".lock"))["renewed"] > first                   # renewed while alive
    with pytest.raises(O.OutputError, match=r"\(a, pid"):
        O.Lock(out, "b", lease=True, lease_s=2.0).acquire()
    a._stop.set()                                                               # a dies: its lease runs out
    time.sleep(2.5)
    b = O.Lock(out, "b", lease=True, lease_s=2.0).acquire()
    assert json.load(open(out + ".lock"))["job"] == "b"
    with pytest.raises(O.OutputError):
        a.verify()                                                              # a's commit would refuse
    b.release()
    assert not os.path.exists(out + ".lock") and not os.path.exists(out + ".lock.takeover")
