"""Training faults and run-directory identity, on the tiny dataset, with real Horovod processes where ranks matter.
(Also the two 2-rank ``jobs/train.py`` runs that succeed, an export and an early stop: they ride on the same
``horovodrun`` launch instead of two of their own.)

Faults are injected through the data or the files, never through mocks: a dataset copy whose tier-0 file holds NaN
feature weights, a copy whose tier-0 file is empty, truncated or bit-flipped checkpoint files, a foreign directory, a
held lock. The multi-rank tests share one run of this file as a script under ``horovodrun -np 2`` (``_rank_main``
at the bottom): each rank runs ``jobs/train.py`` for every scenario in turn and records what it raised, so a test sees
every rank's error; a rank left waiting in a collective would show as a timeout.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from esmm.config import ConfigError, load_config  # noqa: E402
from conftest import recommit  # noqa: E402
from esmm.outputs import MARKER, Lock, OutputError, read_marker  # noqa: E402
from esmm.artifacts import EXPORT, SUMMARY, layout_from_manifest, load_export, read_manifest  # noqa: E402
from esmm.train import (TENSORBOARD, TrainError, build_state, check_finite_parameters, list_checkpoints,  # noqa: E402
                        train)

VENV_BIN = Path(sys.executable).parent
CONF = ROOT / "conf" / "test.yaml"


def _cfg(*sets):
    return load_config(CONF, list(sets))


# ------------------------------------------------------------------------------------------------ datasets

def _copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _tier0_file(ds: str) -> str:
    (path,) = glob.glob(f"{ds}/train/sample_tier=0/*.parquet")
    return path


@pytest.fixture(scope="module")
def nan_dataset(tiny_dataset, tmp_path_factory):
    """The tiny dataset with every feature weight of the train split's tier-0 file (one row group) set to NaN."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    ds = _copy(tiny_dataset[1], tmp_path_factory.mktemp("nan") / "dataset")
    f = _tier0_file(ds)
    t = pq.read_table(f)
    i = t.schema.get_field_index("feat_wts")
    w = t.column(i).combine_chunks()
    nan = pa.ListArray.from_arrays(w.offsets, pa.array(np.full(len(w.values), np.nan, np.float32)))
    pq.write_table(t.set_column(i, t.schema.field(i), nan.cast(t.schema.field(i).type)), f)
    recommit(ds)
    return ds


@pytest.fixture(scope="module")
def empty_shard_dataset(tiny_dataset, tmp_path_factory):
    """The tiny dataset whose train tier-0 file is one empty row group: at rate 0.1 (tiers 0-1, two row groups) one of
    two ranks has no rows."""
    import pyarrow.parquet as pq
    ds = _copy(tiny_dataset[1], tmp_path_factory.mktemp("empty") / "dataset")
    f = _tier0_file(ds)
    pq.write_table(pq.read_table(f).slice(0, 0), f)
    recommit(ds)
    return ds


@pytest.fixture(scope="module")
def rebuilt_dataset(tiny_dataset, tmp_path_factory):
    """The same rows under another ETL run id: what ``jobs/etl.py --overwrite`` leaves behind."""
    ds = _copy(tiny_dataset[1], tmp_path_factory.mktemp("rebuilt") / "dataset")
    m = Path(ds) / "manifest.json"
    manifest = json.loads(m.read_text())
    manifest["run_id"] = "dataset-rebuilt"
    m.write_text(json.dumps(manifest))
    recommit(ds, "dataset-rebuilt")
    return ds


# ------------------------------------------------------------------------------------------------ horovodrun

def _every_rank(tmp_path, scenarios: dict, np_=2) -> dict[str, list[dict]]:
    """``jobs/train.py`` under one ``horovodrun -np 2`` for every scenario in turn (``{name: (dataset, out, sets)}``):
    {name: what each rank returned or raised}. One launch for all of them: each scenario ends with the same error on
    both ranks, so the ranks meet the next one in step, as two jobs launched one after another would."""
    spec = tmp_path / "scenarios.json"
    spec.write_text(json.dumps({name: ["--conf", str(CONF), "--dataset", dataset, "--out", str(out)]
                                + [a for s in sets for a in ("--set", s)]
                                for name, (dataset, out, sets) in scenarios.items()}))
    prefix = str(tmp_path / "result")
    cmd = [str(VENV_BIN / "horovodrun"), "-np", str(np_), "--gloo", sys.executable, __file__, prefix, str(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {name: [json.loads(Path(f"{prefix}.{name}.rank{k}.json").read_text()) for k in range(np_)]
            for name in scenarios}


@pytest.fixture(scope="module")
def two_ranks(nan_dataset, empty_shard_dataset, tiny_dataset, tmp_path_factory):
    """The multi-rank fault scenarios of this file, run by one horovodrun: {name: (run dir, every rank's result)}."""
    root = tmp_path_factory.mktemp("two-ranks")
    ds = tiny_dataset[1]
    # no valid checkpoint: a run stopped at step 5 (checkpoints at steps 2 and 4), one cut short and one bit-flipped
    ckpt = ("train.method=esmm", "train.checkpoint_every=2")
    train(_cfg(*ckpt), ds, str(root / "no-valid-checkpoint"), stop_at_step=5)
    (_, p4), (_, p2) = list_checkpoints(str(root / "no-valid-checkpoint"))
    Path(p4).write_bytes(Path(p4).read_bytes()[:100])
    flipped = bytearray(Path(p2).read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF                                 # same size, one bit pattern changed
    Path(p2).write_bytes(bytes(flipped))
    scenarios = {
        "nan-esmm": (nan_dataset, ("train.sampling_rate=0.1", "train.method=esmm")),
        "nan-base": (nan_dataset, ("train.sampling_rate=0.1", "train.method=base")),
        "rank-without-data": (empty_shard_dataset, ("train.sampling_rate=0.1",)),
        "no-valid-checkpoint": (ds, ckpt),
        # two jobs that succeed, for tests/test_train.py's and tests/test_validation.py's questions (below)
        "esmm-ns-exports": (ds, ("train.method=esmm_ns",)),
        "early-stop": (ds, ("train.method=esmm", "train.lr=1.0e-30", "train.eval_every=1", "train.patience=2",
                            "train.epochs=2", "train.choose_from=any")),
    }
    results = _every_rank(root, {name: (d, root / name, sets) for name, (d, sets) in scenarios.items()})
    return {name: (root / name, results[name]) for name in scenarios}


def _same_error_on_every_rank(results: list[dict], kind: str, pattern: str) -> str:
    assert all("error" in r for r in results), results
    assert {r["error"] for r in results} == {kind}, results
    assert len({r["message"] for r in results}) == 1, results   # the same verdict everywhere
    assert re.search(pattern, results[0]["message"]), results[0]["message"]
    return results[0]["message"]


# ------------------------------------------------------------------------------------------------ 2 ranks that succeed

def test_horovodrun_job_trains_and_exports(two_ranks):
    """``horovodrun -np 2 ... jobs/train.py``: both ranks return, rank 0 wrote the export and the summary."""
    run, results = two_ranks["esmm-ns-exports"]
    assert all("ok" in r for r in results), results
    model, blob = load_export(str(run / EXPORT))
    assert blob["method"] == "esmm_ns"
    assert json.loads((run / SUMMARY).read_text())["world_size"] == 2


def test_two_horovod_ranks_stop_early_at_the_same_step(two_ranks):
    """Rank 0 evaluates, both ranks stop at its decision (a rank left training would hang in the next allreduce)."""
    run, results = two_ranks["early-stop"]
    assert all("ok" in r for r in results), results
    s = json.loads((run / SUMMARY).read_text())
    assert s["world_size"] == 2 and s["stopped_early"] and s["steps"] == 3
    assert [e["step"] for e in s["validation"]["evals"]] == [1, 2, 3]
    assert (run / TENSORBOARD).is_dir() and (run / EXPORT).exists()


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"), ("train.lr=.nan", "train.lr"), ("train.lr=0", "train.lr"),
    ("train.beta1=1", "train.beta1"), ("train.beta1=-0.1", "train.beta1"), ("train.beta2=1.0", "train.beta2"),
    ("train.eps=0", "train.eps"), ("train.eps=.inf", "train.eps"), ("train.eps=-1.0e-8", "train.eps"),
])
def test_unusable_optimizer_settings_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key) + r": must be"):
        _cfg(override)


def test_boundary_optimizer_settings_are_accepted():
    cfg = _cfg("train.beta1=0", "train.beta2=0.0", "train.lr=1.0e-6", "train.eps=1.0e-12")
    assert (cfg.train.beta1, cfg.train.beta2) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------ non-finite values

@pytest.mark.parametrize("method", ["esmm", "base"])  # the flag rides alone (esmm) or on the weight allreduce (base)
def test_nan_in_a_batch_stops_both_ranks_with_nothing_written(two_ranks, method):
    run, results = two_ranks[f"nan-{method}"]
    _same_error_on_every_rank(results, "TrainError", r"non-finite loss at step 1 on rank\(s\) \[[01]\] of 2")
    assert sorted(os.listdir(run)) == [MARKER]                      # no export, summary or checkpoint


def test_no_checkpoint_is_written_from_a_diverged_state(nan_dataset, tmp_path):
    """One process, every tier, the reader's (seeded) row-group order: the NaN rows arrive after the first step; the
    checkpoints before it are all finite and there is none of that step or after."""
    run = str(tmp_path / "run")
    with pytest.raises(TrainError, match=r"non-finite loss at step (\d+) on rank\(s\) \[0\] of 1") as e:
        train(_cfg("train.method=esmm", "train.checkpoint_every=1", "train.shuffle_buffer=0"), nan_dataset, run)
    bad_step = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert bad_step > 1 and list_checkpoints(run)
    assert not os.path.exists(os.path.join(run, EXPORT)) and not os.path.exists(os.path.join(run, SUMMARY))
    for step, path in list_checkpoints(run):
        assert step < bad_step
        model = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(v).all() for v in model.values())


def test_nonfinite_parameters_are_a_collective_error(tiny_dataset):
    from esmm import distributed as D
    cfg = _cfg()
    dist = D.init(1)
    state = build_state(cfg, layout_from_manifest(read_manifest(tiny_dataset[1])), dist)
    check_finite_parameters(state, dist, "checkpoint")                # finite: nothing happens
    with torch.no_grad():
        next(state.model.parameters())[0, 0] = float("inf")
    with pytest.raises(TrainError, match=r"non-finite parameters at step 0 on rank\(s\) \[0\] of 1 \(before the "
                                         r"checkpoint: "):
        check_finite_parameters(state, dist, "checkpoint")


# ------------------------------------------------------------------------------------------------ data

def test_rank_without_data_stops_both_ranks_before_training(two_ranks):
    run, results = two_ranks["rank-without-data"]
    msg = _same_error_on_every_rank(results, "TrainError", r"no training data on rank\(s\) \[[01]\] of 2")
    assert "read no rows" in msg
    assert sorted(os.listdir(run)) == [MARKER]


# ------------------------------------------------------------------------------------------------ checkpoints

def _params(path):
    model, blob = load_export(str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}, blob


def test_truncated_checkpoint_falls_back_to_the_previous_one(tiny_dataset, tmp_path, caplog):
    _, ds = tiny_dataset
    cfg = _cfg("train.method=aman", "train.checkpoint_every=4", "train.epochs=2")
    full = train(cfg, ds, str(tmp_path / "full"))
    cut = str(tmp_path / "cut")
    train(cfg, ds, cut, stop_at_step=9)                                # checkpoints at steps 4 and 8
    (s8, p8), (s4, _) = list_checkpoints(cut)
    assert (s8, s4) == (8, 4)
    data = Path(p8).read_bytes()
    Path(p8).write_bytes(data[: len(data) // 2])                       # a write cut short
    Path(p8 + ".tmp-4242").write_bytes(data[:100])                     # and the temp file of a killed write
    with caplog.at_level("WARNING", logger="esmm.train"):
        resumed = train(cfg, ds, cut)
    assert "checkpoint-000000004.pt (step 4)" in caplog.text and "truncated" in caplog.text
    assert resumed["steps"] == full["steps"] and resumed["steps_this_run"] == full["steps"] - 4
    pf, _ = _params(tmp_path / "full" / EXPORT)
    pr, _ = _params(Path(cut) / EXPORT)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)
    last = full["steps"]                                              # 22: 2 epochs of 11 steps (validation held out)
    assert [s for s, _ in list_checkpoints(cut)] == [last, (last - 1) // 4 * 4]  # the last two, corrupt one replaced
    assert not glob.glob(f"{cut}/*.tmp-*")                              # partial writes removed


def test_no_valid_checkpoint_is_one_clear_error_on_both_ranks(two_ranks):
    run, results = two_ranks["no-valid-checkpoint"]                # checkpoint 4 cut to 100 bytes, 2 bit-flipped
    msg = _same_error_on_every_rank(results, "TrainError", r"no valid checkpoint in ")
    assert "checkpoint-000000004.pt: 100 bytes" in msg and "checkpoint-000000002.pt: sha256 mismatch" in msg
    assert "--overwrite" in msg
    assert not (run / EXPORT).exists()


# ------------------------------------------------------------------------------------------------ run directory

def test_foreign_directory_is_refused_even_with_overwrite(tiny_dataset, tmp_path):
    from jobs.train import main
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not created by esmm-spark"):
        train(_cfg(), tiny_dataset[1], str(d))
    with pytest.raises(OutputError, match="not created by esmm-spark"):
        main(["--conf", str(CONF), "--dataset", tiny_dataset[1], "--out", str(d), "--overwrite"])
    assert os.listdir(d) == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"


def test_changed_inputs_are_refused_and_overwrite_starts_over(tiny_dataset, rebuilt_dataset, tmp_path):
    from jobs.train import main
    _, ds = tiny_dataset
    run = str(tmp_path / "run")
    first = train(_cfg(), ds, run)
    marker = read_marker(run)
    assert first["run_id"] == marker["run_id"] and marker["kind"] == "train_run"
    saved = json.loads(Path(run, SUMMARY).read_text())
    _, blob = load_export(os.path.join(run, EXPORT))
    assert saved["run_id"] == blob["run_id"] == marker["run_id"]
    assert saved["dataset_fingerprint"] == blob["dataset_fingerprint"]

    again = train(_cfg(), ds, run)                                    # same inputs: reused, not retrained
    assert again["skipped"] and again["run_id"] == first["run_id"]
    with pytest.raises(TrainError, match=r"what differs: the config: train\.lr 0\.001 -> 0\.01\b.*--overwrite"):
        train(_cfg("train.lr=0.01"), ds, run)
    with pytest.raises(TrainError, match=r"what differs: the dataset \(fingerprint"):
        train(_cfg(), rebuilt_dataset, run)
    assert read_marker(run) == marker and json.loads(Path(run, SUMMARY).read_text()) == saved   # untouched

    (summary,) = main(["--conf", str(CONF), "--dataset", ds, "--out", run, "--overwrite", "--set", "train.lr=0.01"])
    assert not summary.get("skipped") and summary["run_id"] != first["run_id"]
    assert read_marker(run)["inputs"]["train"]["lr"] == 0.01


def test_unfinished_run_of_another_dataset_is_not_resumed(tiny_dataset, rebuilt_dataset, tmp_path):
    run = str(tmp_path / "run")
    train(_cfg("train.checkpoint_every=2"), tiny_dataset[1], run, stop_at_step=3)
    with pytest.raises(TrainError, match=r"what differs: the dataset"):
        train(_cfg("train.checkpoint_every=2"), rebuilt_dataset, run)
    assert [s for s, _ in list_checkpoints(run)] == [2]


def test_run_dir_with_nothing_of_its_run_yet_is_reclaimed(tiny_dataset, rebuilt_dataset, tmp_path):
    run = str(tmp_path / "run")
    train(_cfg(), rebuilt_dataset, run, stop_at_step=1)                # stopped before its first checkpoint
    assert os.listdir(run) == [MARKER]
    before = read_marker(run)
    summary = train(_cfg(), tiny_dataset[1], run)                      # other inputs, but nothing to mix with
    assert summary["run_id"] != before["run_id"]
    assert read_marker(run)["inputs_fingerprint"] != before["inputs_fingerprint"]


def test_second_training_into_a_locked_run_dir_fails_fast(tiny_dataset, tmp_path):
    run = str(tmp_path / "run")
    with Lock(run, job="train esmm (the first one)"):
        t0 = time.time()
        with pytest.raises(OutputError, match=r"being written by another job \(train esmm \(the first one\)"):
            train(_cfg(), tiny_dataset[1], run)
        assert time.time() - t0 < 10
    assert not os.path.exists(run)                                     # refused before claiming anything
    assert train(_cfg(), tiny_dataset[1], run)["steps"] > 0           # the lock is gone: it trains


# ------------------------------------------------------------------------------------------------ rank worker

def _rank_main(prefix: str, spec: str) -> None:
    """Under horovodrun: run ``jobs/train.py`` for each scenario of ``spec`` in turn and record this rank's summaries
    or error in ``prefix.<scenario>.rank<r>.json``."""
    from jobs.train import main
    rank = int(os.environ.get("HOROVOD_RANK", "0"))
    for name, argv in json.loads(Path(spec).read_text()).items():
        try:
            out = {"ok": main(list(argv))}
        except Exception as e:  # noqa: BLE001  (the test compares every rank's error)
            out = {"error": type(e).__name__, "message": str(e)}
        Path(f"{prefix}.{name}.rank{rank}.json").write_text(json.dumps(out, default=str))


if __name__ == "__main__":
    _rank_main(*sys.argv[1:])
