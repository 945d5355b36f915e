"""Fault injection with real processes: kill -9 jobs mid-write, race two writers, corrupt checkpoints, feed NaNs.

    .venv/bin/python bench/faults.py [--conf conf/demo.yaml] [--impressions 1000000] [--workdir /tmp/esmm-faults]
        [--only etl_kill,concurrent_etl,...]

Each scenario runs the project's own jobs as separate processes (``python jobs/<job>.py``: a driver and its Spark
JVM, or ``horovodrun`` workers), injects one fault, re-runs as a user would, and checks the outcome against an
uninterrupted run. One row per scenario: what happened, rows lost (must be 0), seconds to recover (the re-run's wall
time). ``tests/test_faults.py`` (the ETL and experiment scenarios) and ``tests/test_faults_train.py`` (the training
ones) run the same scenarios on the tiny test log.

Scenarios:
- ``etl_kill``: ``kill -9`` the ETL (its whole process group) once its staging directory holds Parquet files; the
  re-run must produce a dataset identical to an uninterrupted run and leave no staging directory or lock.
- ``concurrent_etl``: two ETLs on one output at once; exactly one writes it, the other fails fast naming the holder.
- ``foreign_dir``: generator, ETL, evaluation, experiment and training pointed at a directory they did not create
  (with ``--overwrite`` where the job has it): every one refuses and the directory is unchanged.
- ``experiment_kill``: ``kill -9`` the experiment job while a unit trains; the re-run completes and its Table 2
  equals an uninterrupted run's.
- ``train_kill_worker``: ``kill -9`` one of two ``horovodrun`` workers mid-epoch; the job fails naming the rank; the
  re-run resumes from the last checkpoint and ends with the parameters of an uninterrupted run (bit-identical).
- ``train_truncated_checkpoint``: truncate the last checkpoint of a stopped run; the re-run falls back to the
  previous one and ends with the parameters of an uninterrupted run.
- ``train_nan``: a NaN enters training; every rank stops with the same error, nothing is exported.
- ``commit_kill``: the ETL replacing a dataset is killed at each step of its commit; a committed dataset is findable
  right after the kill, and the re-run finishes the swap (identical dataset, nothing lost, nothing left over).
- ``user_files``: a user's ``<out>.old-20261201`` copies beside every output and a directory that merely holds a
  ``manifest.json`` survive generate, ETL, training and the experiment, with and without ``--overwrite``.
- ``lock_takeover``: the holder of an output's lock is killed -9 while 4 processes wait; exactly one takes it.

The training scenarios size their runs with ``train_plan`` (about ``TRAIN_STEPS`` steps, ``TRAIN_CHECKPOINTS``
checkpoints, method esmm, one torch thread per worker): seconds per run at the default size.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable


class Ctx:
    """Where a scenario works: a config file, --set overrides, and a raw log shared by every scenario."""

    def __init__(self, workdir: str, conf: str, sets: list[str]):
        self.workdir, self.conf, self.sets = os.path.abspath(workdir), conf, list(sets)
        self.raw = os.path.join(self.workdir, "raw")
        os.makedirs(self.workdir, exist_ok=True)

    def args(self, *extra: str) -> list[str]:
        out = ["--conf", self.conf]
        for s in self.sets + list(extra):
            out += ["--set", s]
        return out

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)


# ------------------------------------------------------------------------------------------------ processes

def start(ctx: Ctx, job: str, args: list[str], log_name: str) -> subprocess.Popen:
    """A job as its own process group (its Spark JVM and Python workers die with it on killpg)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(ctx.path(f"{log_name}.log"), "w")
    return subprocess.Popen([PY, os.path.join(ROOT, "jobs", f"{job}.py"), *args], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(ctx: Ctx, job: str, args: list[str], log_name: str, timeout: float = 1800) -> tuple[int, float, str]:
    """(exit code, seconds, log text) of a job run to its end."""
    t0 = time.time()
    return wait_log(ctx, start(ctx, job, args, log_name), log_name, t0, timeout)


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


def kill_when(p: subprocess.Popen, ready, timeout: float = 900, poll: float = 0.2) -> bool:
    """kill -9 ``p``'s process group as soon as ``ready()`` is true; False when the job ended first."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if p.poll() is not None:
            return False
        if ready():
            kill_group(p)
            return True
        time.sleep(poll)
    kill_group(p)
    raise TimeoutError("the fault point was never reached")


def ensure_raw(ctx: Ctx) -> None:
    rc, _, log = run(ctx, "generate", ctx.args() + ["--out", ctx.raw], "generate")
    if rc != 0:
        raise RuntimeError(f"generation failed:\n{log[-3000:]}")


# ------------------------------------------------------------------------------------------------ checks

def dataset_digest(path: str) -> str:
    """Content hash of a dataset's rows (train and test, every column, in sample_id order): equal hashes, equal data
    whatever the file names and row order on disk."""
    import pyarrow.parquet as pq

    import schemas as S
    h = hashlib.sha256()
    for split in (S.TRAIN, S.TEST):
        t = pq.read_table(os.path.join(path, split))
        t = t.select(sorted(t.column_names)).sort_by(S.SAMPLE_ID)
        for name in t.column_names:
            h.update(name.encode())
            for chunk in t[name].combine_chunks().to_pylist() if t.num_rows < 50_000 else [None]:
                h.update(repr(chunk).encode())
            if t.num_rows >= 50_000:
                import pyarrow as pa
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, pa.schema([t.schema.field(name)])) as w:
                    w.write_table(t.select([name]).combine_chunks())
                h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def rows_lost(manifest: dict) -> int:
    r = manifest["rows"]
    return r["skeleton_read"] - r["written"] - r["skeleton_quarantined"]


def leftovers(out: str) -> list[str]:
    """Staging directories and locks of ``out`` still on disk."""
    return sorted(glob.glob(f"{out}.tmp-*") + glob.glob(f"{out}.old-*") + glob.glob(f"{out}.lock*"))


def _manifest(path: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------ scenarios

def reference_dataset(ctx: Ctx) -> tuple[str, float]:
    """An uninterrupted ETL of the shared raw log (built once); returns (path, seconds)."""
    out = ctx.path("dataset-ref")
    t0 = time.time()
    rc, _, log = run(ctx, "etl", ctx.args() + ["--raw", ctx.raw, "--out", out], "etl-ref")
    if rc != 0:
        raise RuntimeError(f"reference ETL failed:\n{log[-3000:]}")
    return out, time.time() - t0


def etl_kill(ctx: Ctx) -> dict:
    ref = ensure_reference_dataset(ctx)
    out = ctx.path("dataset-killed")
    shutil.rmtree(out, ignore_errors=True)
    p = start(ctx, "etl", ctx.args() + ["--raw", ctx.raw, "--out", out], "etl-killed")
    staged = lambda: bool(glob.glob(f"{out}.tmp-*/*/*/*.parquet") or glob.glob(f"{out}.tmp-*/*/*.parquet"))  # noqa
    killed = kill_when(p, staged)
    left = leftovers(out)
    rc, secs, log = run(ctx, "etl", ctx.args() + ["--raw", ctx.raw, "--out", out], "etl-rerun")
    same = rc == 0 and dataset_digest(out) == dataset_digest(ref)
    lost = rows_lost(_manifest(out)) if rc == 0 else None
    ok = killed and rc == 0 and same and lost == 0 and not leftovers(out) and bool(left)
    return {"scenario": "etl_kill", "ok": ok, "rows_lost": lost, "recover_s": secs,
            "outcome": (f"killed with {len(left)} staging dir/lock left; re-run {'identical' if same else 'DIFFERENT'}"
                        f" to an uninterrupted run, {len(leftovers(out))} left after" if killed
                        else "the ETL finished before the fault point")}


def concurrent_etl(ctx: Ctx) -> dict:
    out = ctx.path("dataset-race")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    procs = [start(ctx, "etl", ctx.args() + ["--raw", ctx.raw, "--out", out], f"etl-race{i}") for i in (0, 1)]
    rcs = [p.wait(1800) for p in procs]
    logs = [open(ctx.path(f"etl-race{i}.log")).read() for i in (0, 1)]
    refused = [i for i in (0, 1) if rcs[i] != 0 and "being written by another job" in logs[i]]
    # the loser either lost the lock race, or (started late) found the winner's finished output and kept it
    kept = [i for i in (0, 1) if rcs[i] == 0 and "up to date" in logs[i]]
    ok = (sorted(rcs).count(0) >= 1 and (len(refused) == 1 or len(kept) == 1) and not leftovers(out)
          and rows_lost(_manifest(out)) == 0)
    return {"scenario": "concurrent_etl", "ok": ok, "rows_lost": rows_lost(_manifest(out)) if rcs.count(0) else None,
            "recover_s": time.time() - t0,
            "outcome": f"exit codes {rcs}; " + ("the second failed fast naming the holder" if refused else
                                                 "the second found the first's output up to date" if kept else
                                                 "NO writer was refused")}


def foreign_dir(ctx: Ctx) -> dict:
    base = ctx.path("foreign")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    with open(os.path.join(base, "precious.txt"), "w") as f:
        f.write("not the project's")
    t0 = time.time()
    ref = ensure_reference_dataset(ctx)
    attempts = {"generate": ["--out", base, "--overwrite"],
                "etl": ["--raw", ctx.raw, "--out", base, "--overwrite"],
                "experiment": ["--dataset", ref, "--exp", base, "--overwrite"],
                "train": ["--dataset", ref, "--out", base, "--overwrite"]}
    refused = {}
    for job, extra in attempts.items():
        rc, _, log = run(ctx, job, ctx.args() + extra, f"foreign-{job}")
        refused[job] = rc != 0 and "was not created by esmm-spark" in log
    intact = os.listdir(base) == ["precious.txt"] and open(os.path.join(base, "precious.txt")).read().startswith("not")
    return {"scenario": "foreign_dir", "ok": all(refused.values()) and intact, "rows_lost": 0,
            "recover_s": time.time() - t0,
            "outcome": f"refused by {sum(refused.values())}/{len(refused)} jobs "
                       f"({', '.join(j for j, r in refused.items() if r)}); directory "
                       f"{'unchanged' if intact else 'CHANGED'}"}


def _table2(exp: str) -> list:
    with open(os.path.join(exp, "table2.json")) as f:
        return json.load(f)["table2"]


def _table_diff(a: list, b: list, tol: float = 1e-3) -> list[str]:
    """Cells of two Table 2s that differ: text exactly, numbers (AUC points, %) beyond ``tol``. The trained models
    are bit-identical (checked by the training scenarios), but another Spark session feeds the scoring networks
    other Arrow batches, and float32 GEMMs over other batch shapes may round a score one ulp apart: a near-tie pair
    can flip (observed: a CTR AUC of 54.43697 vs 54.43702 on the tiny log), and Spark may order the oracle's and
    the intervals' sums differently. 1e-3 points is 100x that and far below any difference Table 2 reports."""
    if [x.get("model") for x in a] != [y.get("model") for y in b]:
        return ["the rows differ"]
    out = []
    for x, y in zip(a, b):
        for k in sorted(set(x) | set(y)):
            u, v = x.get(k), y.get(k)
            if isinstance(u, float) and isinstance(v, float):
                if not (u == v or (u != u and v != v) or abs(u - v) <= tol):
                    out.append(f"{x.get('model')}.{k}: {u} vs {v}")
            elif u != v:
                out.append(f"{x.get('model')}.{k}: {u!r} vs {v!r}")
    return out


def experiment_kill(ctx: Ctx, exp_sets: list[str], reference=None) -> dict:
    """``reference(dataset, exp_dir, truth)``: builds the uninterrupted experiment (default: the job as a process;
    the tests run it in their own Spark session, which gives the same table and saves a JVM start)."""
    ref_ds = ensure_reference_dataset(ctx)
    args = lambda exp: ctx.args(*exp_sets) + ["--dataset", ref_ds, "--exp", exp,  # noqa: E731
                                              "--truth", os.path.join(ctx.raw, "ground_truth")]
    ref_exp, exp = ctx.path("exp-ref"), ctx.path("exp-killed")
    for d in (ref_exp, exp):
        shutil.rmtree(d, ignore_errors=True)
    if reference is not None:
        reference(ref_ds, ref_exp, os.path.join(ctx.raw, "ground_truth"))
    else:
        rc, _, log = run(ctx, "experiment", args(ref_exp), "exp-ref")
        if rc != 0:
            raise RuntimeError(f"reference experiment failed:\n{log[-3000:]}")
    p = start(ctx, "experiment", args(exp), "exp-killed")
    # mid-unit: the second training of the first unit has started (the first one is finished)
    in_unit = lambda: len(glob.glob(os.path.join(exp, "runs", "*", "*", "train_summary.json"))) >= 1  # noqa: E731
    killed = kill_when(p, in_unit)
    rc, secs, log = run(ctx, "experiment", args(exp), "exp-rerun")
    diff = [] if rc != 0 else _table_diff(_table2(ref_exp), _table2(exp))
    same = rc == 0 and not diff
    return {"scenario": "experiment_kill", "diff": diff[:5], "ok": killed and same and not leftovers(exp), "rows_lost": 0 if same else None,
            "recover_s": secs,
            "outcome": (f"killed mid-unit; re-run {'gives the same' if same else 'gives a DIFFERENT'} Table 2"
                        if killed else "the experiment finished before the fault point")}


# ------------------------------------------------------------------------------------------------ training

HOROVODRUN = os.path.join(os.path.dirname(PY), "horovodrun")
TRAIN_STEPS = 120       # steps of a scenario's training run (a few seconds of the demo model on 2 cores)
TRAIN_CHECKPOINTS = 8   # checkpoints per run: the first comes early, most of the run is left when the fault lands


def start_hvd(ctx: Ctx, np_: int, args: list[str], log_name: str) -> subprocess.Popen:
    """``horovodrun -np N --gloo python -m jobs.train ARGS`` as its own process group. Its workers are not in that
    group: each runs under a Horovod middleman in a session of its own (``kill_tree`` reaches them)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(ctx.path(f"{log_name}.log"), "w")
    return subprocess.Popen([HOROVODRUN, "-np", str(np_), "--gloo", PY, "-m", "jobs.train", *args], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_tree(p: subprocess.Popen) -> None:
    """kill -9 ``p``, its process group and every descendant (Horovod workers live in sessions of their own)."""
    import psutil
    try:
        kids = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    kill_group(p)
    for k in kids:
        try:
            k.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(kids, timeout=10)


def wait_log(ctx: Ctx, p: subprocess.Popen, log_name: str, t0: float, timeout: float) -> tuple[int, float, str]:
    """(exit code, seconds since ``t0``, log text) of a started job; its whole tree is killed on timeout."""
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(p)
        raise
    with open(ctx.path(f"{log_name}.log")) as f:
        return rc, time.time() - t0, f.read()


def run_hvd(ctx: Ctx, np_: int, args: list[str], log_name: str, timeout: float = 1800) -> tuple[int, float, str]:
    t0 = time.time()
    return wait_log(ctx, start_hvd(ctx, np_, args, log_name), log_name, t0, timeout)


def when(p: subprocess.Popen, ready, timeout: float = 900, poll: float = 0.05) -> bool:
    """Poll until ``ready()`` is true (True) or ``p`` ends first (False); unlike ``kill_when`` it kills nothing
    itself (``ready`` injects the fault). On timeout the whole tree is killed."""
    t_end = time.time() + timeout
    while time.time() < t_end:
        if p.poll() is not None:
            return False
        if ready():
            return True
        time.sleep(poll)
    kill_tree(p)
    raise TimeoutError("the fault point was never reached")


def worker_pid(p: subprocess.Popen, rank: int) -> int | None:
    """The pid of ``horovodrun`` ``p``'s worker of ``rank``: the Python process running jobs.train with that
    HOROVOD_RANK in its environment (horovodrun -> middleman -> shell -> python)."""
    import psutil
    try:
        kids = psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for k in kids:
        try:
            if k.environ().get("HOROVOD_RANK") == str(rank) and k.cmdline()[1:3] == ["-m", "jobs.train"]:
                return k.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return None


def ensure_reference_dataset(ctx: Ctx) -> str:
    """The uninterrupted ETL of the shared raw log every scenario compares with (built once per workdir)."""
    ref = ctx.path("dataset-ref")
    if not os.path.exists(os.path.join(ref, "manifest.json")):
        reference_dataset(ctx)
    return ref


def train_plan(ctx: Ctx, dataset: str, workers: int, steps: int = TRAIN_STEPS,
               checkpoints: int = TRAIN_CHECKPOINTS) -> tuple[list[str], int]:
    """(--set overrides, total steps) of a training of about ``steps`` steps with ``workers`` workers on ``dataset``:
    the smallest sampling rate with at least ``steps / 2`` steps per epoch (the full train split when none has), as
    many epochs as reach ``steps``, a checkpoint every ``total / checkpoints`` steps, one torch thread per worker."""
    from esmm.config import load_config
    from esmm.data import steps_per_epoch, subset_rows
    from esmm.artifacts import read_manifest
    cfg, manifest = load_config(ctx.conf, ctx.sets), read_manifest(dataset)
    rates = sorted(manifest["sampling_rates"])
    rate = next((r for r in rates if steps_per_epoch(subset_rows(manifest, "train", r), cfg.train.batch_size,
                                                     workers) >= steps / 2), rates[-1])
    per = steps_per_epoch(subset_rows(manifest, "train", rate), cfg.train.batch_size, workers)
    epochs = max(1, -(-steps // per))
    every = max(1, per * epochs // checkpoints)
    sets = ["train.method=esmm", f"train.sampling_rate={rate}", f"train.epochs={epochs}",
            f"train.checkpoint_every={every}", f"train.log_every={every}", "train.threads=1"]
    return sets, per * epochs


def train_args(ctx: Ctx, sets: list[str], dataset: str, out: str) -> list[str]:
    return ctx.args(*sets) + ["--dataset", dataset, "--out", out]


def fresh_run_dir(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    for f in glob.glob(f"{out}.lock*"):
        os.remove(f)


def checkpoint_steps(out: str) -> list[int]:
    """Steps of the checkpoints of ``out`` that are complete (their sidecar is written), newest first."""
    return sorted((int(m.group(1)) for m in map(re.compile(r"checkpoint-(\d+)\.json$").search,
                                                glob.glob(os.path.join(out, "checkpoint-*.json"))) if m),
                  reverse=True)


def newest_valid_checkpoint(out: str) -> int | None:
    """The step resuming from ``out`` should start at: its newest checkpoint that passes the sidecar check."""
    from esmm.train import checkpoint_problem, list_checkpoints
    return next((st for st, path in list_checkpoints(out) if checkpoint_problem(path) is None), None)


def same_parameters(a: str, b: str) -> tuple[bool, float]:
    """(every tensor bit-identical, largest absolute difference) of the ``model.pt`` exports of run dirs a and b."""
    import torch

    from esmm.artifacts import EXPORT, load_export
    sa, sb = (load_export(os.path.join(d, EXPORT))[0].state_dict() for d in (a, b))
    if sa.keys() != sb.keys():
        return False, float("inf")
    equal = all(torch.equal(sa[k], sb[k]) for k in sa)
    diff = max((float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel()), default=0.0)
    return equal, diff


def resumed_steps(log: str) -> dict[int, int]:
    """{rank: step} from the "rank R resumed from step N" lines of a training log."""
    return {int(r): int(s) for r, s in re.findall(r"rank (\d+) resumed from step (\d+)", log)}


def _reference_training(ctx: Ctx, np_: int, sets: list[str], dataset: str, name: str) -> str:
    out = ctx.path(name)
    fresh_run_dir(out)
    args = train_args(ctx, sets, dataset, out)
    rc, _, log = run_hvd(ctx, np_, args, name) if np_ > 1 else run(ctx, "train", args, name)
    if rc != 0:
        raise RuntimeError(f"uninterrupted training ({name}) failed:\n{log[-3000:]}")
    return out


def train_kill_worker(ctx: Ctx, steps: int = TRAIN_STEPS) -> dict:
    """kill -9 rank 1 of ``horovodrun -np 2`` once a checkpoint exists; the job must fail naming the rank, and the
    same command must resume from the last valid checkpoint and end bit-identical to an uninterrupted run. Exact
    equality is the bar: Gloo's allreduce of 2 ranks sums a + b (commutative, so the same bits whatever the fusion),
    the sparse allgather is in rank order, the stream and per-step seeds are replayed from the checkpoint."""
    ds = ensure_reference_dataset(ctx)
    sets, total = train_plan(ctx, ds, 2, steps)
    ref = _reference_training(ctx, 2, sets, ds, "train-2w-ref")
    out = ctx.path("train-2w-killed")
    fresh_run_dir(out)
    args = train_args(ctx, sets, ds, out)
    t0 = time.time()
    p = start_hvd(ctx, 2, args, "train-2w-killed")
    fault = {}

    def ready():
        done = [s for s in checkpoint_steps(out) if s < total]
        pid = worker_pid(p, 1) if done else None
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        fault.update(pid=pid, checkpoint=done[0])
        return True
    killed = when(p, ready)
    rc_killed, _, log_killed = wait_log(ctx, p, "train-2w-killed", t0, 300)
    first = re.search(r"Process name: (\d+)\s+Exit code: (-?\d+)", log_killed)
    rank1 = re.search(r"Process 1 exit with status code (-?\d+)", log_killed)
    named = rc_killed != 0 and rank1 is not None and rank1.group(1) == "137" and first is not None
    unfinished = not os.path.exists(os.path.join(out, "model.pt"))
    expect = newest_valid_checkpoint(out)
    rc, secs, log = run_hvd(ctx, 2, args, "train-2w-rerun")
    resumed = resumed_steps(log)
    same, diff = same_parameters(ref, out) if rc == 0 else (False, float("nan"))
    ok = (killed and named and unfinished and rc == 0 and expect is not None and expect > 0
          and resumed == {0: expect, 1: expect} and same)
    if not killed:
        outcome = "the training finished before the fault point"
    else:
        outcome = (f"rank 1 (pid {fault['pid']}) killed after checkpoint {fault['checkpoint']} of {total} steps; job "
                   f"exit {rc_killed}, horovodrun: process 1 exit {rank1.group(1) if rank1 else '?'}, first failed "
                   f"process {first.group(1) if first else '?'}; re-run resumed from step "
                   f"{sorted(set(resumed.values())) or 'NONE'} (newest valid {expect}), parameters "
                   f"{'bit-identical' if same else f'DIFFERENT (max |diff| {diff:.3g})'} to an uninterrupted run")
    return {"scenario": "train_kill_worker", "ok": ok, "rows_lost": 0 if same else None, "recover_s": secs,
            "outcome": outcome, "resumed_from": resumed.get(0), "failed_rank": 1 if rank1 else None,
            "first_failed": int(first.group(1)) if first else None, "max_abs_diff": diff}


def train_truncated_checkpoint(ctx: Ctx, steps: int = TRAIN_STEPS) -> dict:
    """kill -9 a 1-process training once two checkpoints exist, cut its newest checkpoint to half its size; the
    re-run must say it falls back to the previous one and end bit-identical to an uninterrupted run."""
    from esmm.train import list_checkpoints
    ds = ensure_reference_dataset(ctx)
    sets, total = train_plan(ctx, ds, 1, steps)
    ref = _reference_training(ctx, 1, sets, ds, "train-1w-ref")
    out = ctx.path("train-1w-cut")
    fresh_run_dir(out)
    args = train_args(ctx, sets, ds, out)
    p = start(ctx, "train", args, "train-1w-cut")
    killed = kill_when(p, lambda: len([s for s in checkpoint_steps(out) if s < total]) >= 2, poll=0.05)
    ckpts = list_checkpoints(out)
    cut_step, cut = ckpts[0] if ckpts else (None, None)
    if cut is not None and os.path.exists(cut):
        with open(cut, "rb") as f:
            data = f.read()
        with open(cut, "wb") as f:
            f.write(data[: len(data) // 2])
    expect = newest_valid_checkpoint(out)
    rc, secs, log = run(ctx, "train", args, "train-1w-rerun")
    fell_back = re.search(r"resuming from the previous checkpoint \S+ \(step (\d+)\): (.*)", log)
    resumed = resumed_steps(log)
    same, diff = same_parameters(ref, out) if rc == 0 else (False, float("nan"))
    ok = (killed and cut_step is not None and expect is not None and expect < cut_step and rc == 0
          and fell_back is not None and int(fell_back.group(1)) == expect and resumed == {0: expect} and same)
    outcome = (f"killed at {len(ckpts)} checkpoints {[s for s, _ in ckpts]} of {total} steps, cut step {cut_step} to "
               f"half; re-run {'fell back to step ' + fell_back.group(1) if fell_back else 'did NOT fall back'}, "
               f"resumed from {resumed.get(0)}, parameters "
               f"{'bit-identical' if same else f'DIFFERENT (max |diff| {diff:.3g})'} to an uninterrupted run"
               if killed else "the training finished before the fault point")
    return {"scenario": "train_truncated_checkpoint", "ok": ok, "rows_lost": 0 if same else None, "recover_s": secs,
            "outcome": outcome, "truncated": cut_step, "resumed_from": resumed.get(0),
            "fallback_reason": fell_back.group(2) if fell_back else None, "max_abs_diff": diff}


def inject_nan(dataset: str) -> tuple[str, int]:
    """Set every feature weight of the first row group of the train split's first tier-0 file (read at every
    sampling rate) to NaN, keeping the file's row groups as they are. Returns (file, rows changed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    import schemas as S
    path = sorted(glob.glob(os.path.join(dataset, S.TRAIN, "sample_tier=0", "*.parquet")))[0]
    pf = pq.ParquetFile(path)
    groups = [pf.read_row_group(i) for i in range(pf.num_row_groups)]
    t = groups[0]
    i = t.schema.get_field_index(S.FEAT_WTS)
    w = t.column(i).combine_chunks()
    nan = pa.ListArray.from_arrays(w.offsets, pa.array(np.full(len(w.values), np.nan, np.float32)))
    groups[0] = t.set_column(i, t.schema.field(i), nan.cast(t.schema.field(i).type))
    with pq.ParquetWriter(path + ".nan", pf.schema_arrow) as wr:
        for g in groups:
            wr.write_table(g)
    os.replace(path + ".nan", path)
    from esmm.outputs import recommit
    recommit(dataset)  # the dataset as an ETL that wrote these rows would have committed it
    return path, t.num_rows


def train_nan(ctx: Ctx, steps: int = TRAIN_STEPS) -> dict:
    """NaN feature weights in one row group, ``horovodrun -np 2``: both ranks must stop with the same TrainError
    naming the step; no export, no summary, no checkpoint of that step or after, and no lock left."""
    import torch

    from esmm.artifacts import EXPORT, SUMMARY
    from esmm.train import list_checkpoints
    ds = ctx.path("dataset-nan")
    shutil.rmtree(ds, ignore_errors=True)
    shutil.copytree(ensure_reference_dataset(ctx), ds)
    _, nan_rows = inject_nan(ds)
    sets, total = train_plan(ctx, ds, 2, steps)
    out = ctx.path("train-nan")
    fresh_run_dir(out)
    rc, secs, log = run_hvd(ctx, 2, train_args(ctx, sets, ds, out), "train-nan")
    errors = {int(r): m for r, m in re.findall(r"^\[(\d+)\]<stderr>:\S*TrainError: (.*)$", log, re.M)}
    exits = {int(r): int(c) for r, c in re.findall(r"Process (\d+) exit with status code (-?\d+)", log)}
    step = re.search(r"non-finite loss at step (\d+) on rank\(s\) \[[\d, ]+\] of 2", errors.get(0, ""))
    bad = int(step.group(1)) if step else None
    same_error = sorted(errors) == [0, 1] and len(set(errors.values())) == 1 and bad is not None
    written = [f for f in (EXPORT, SUMMARY) if os.path.exists(os.path.join(out, f))]
    ckpts = list_checkpoints(out)
    clean = bad is not None and all(
        s < bad and all(bool(torch.isfinite(v).all()) for v in torch.load(p, weights_only=True)["model"].values())
        for s, p in ckpts)
    # each rank exits 1 on its TrainError, or 143 when horovodrun's SIGTERM (sent once the other rank has exited)
    # reaches it after its traceback was printed, during Horovod's shutdown
    ok = (rc != 0 and same_error and sorted(exits) == [0, 1] and 0 not in exits.values() and not written
          and clean and not leftovers(out))
    return {"scenario": "train_nan", "ok": ok, "rows_lost": 0 if ok else None, "recover_s": secs,
            "outcome": (f"{nan_rows} NaN rows; exit {rc}, ranks {sorted(errors)} raised "
                        f"{'the same' if same_error else 'NOT the same'} TrainError at step {bad} (worker exits "
                        f"{exits}); {', '.join(written) or 'nothing'} exported, {len(ckpts)} earlier finite "
                        f"checkpoint(s) {[s for s, _ in ckpts]}, lock {'LEFT' if leftovers(out) else 'released'}"),
            "errors": errors, "nan_step": bad, "exits": exits}


# ------------------------------------------------------------------------------------------------ output lifecycle

COMMIT_STEPS = ("staged", "old-moved", "new-moved")


def commit_kill(ctx: Ctx, steps: tuple = COMMIT_STEPS) -> dict:
    """kill the ETL replacing a committed dataset (``--overwrite``) at each step of its commit (``ESMM_FAULT_COMMIT``:
    the staging committed; the old version moved aside; the new one moved into place): right after the kill a
    committed dataset must be findable, and a plain re-run must finish the swap, lose nothing and leave nothing."""
    from esmm.outputs import FAULT_ENV, find_committed, is_committed
    ref = ensure_reference_dataset(ctx)
    t0, done, bad = time.time(), {}, []
    out = ctx.path("dataset-commit")
    shutil.rmtree(out, ignore_errors=True)
    for f in glob.glob(f"{out}.*"):
        shutil.rmtree(f, ignore_errors=True)
    shutil.copytree(ref, out)
    for step in steps:
        os.environ[FAULT_ENV] = step
        try:
            rc, _, log = run(ctx, "etl", ctx.args() + ["--raw", ctx.raw, "--out", out, "--overwrite"], f"commit-{step}")
        finally:
            os.environ.pop(FAULT_ENV, None)
        findable = find_committed(out) is not None
        rc2, _, _ = run(ctx, "etl", ctx.args() + ["--raw", ctx.raw, "--out", out], f"commit-{step}-rerun")
        ok = (rc == 137 and findable and rc2 == 0 and is_committed(out) and not leftovers(out)
              and rows_lost(_manifest(out)) == 0 and dataset_digest(out) == dataset_digest(ref))
        done[step] = ok
        if not ok:
            bad.append(f"{step}: exit {rc}, findable {findable}, re-run exit {rc2}, left {leftovers(out)}")
    ok = len(done) == len(steps) > 0 and all(done.values())
    return {"scenario": "commit_kill", "ok": ok, "rows_lost": 0 if ok else None,
            "recover_s": time.time() - t0,
            "outcome": f"killed at {len(done)} commit steps ({', '.join(done)}): committed version findable and "
                       f"re-run completes at {sum(done.values())}/{len(done)}" + (f" ({'; '.join(bad)})" if bad else "")}


def user_files(ctx: Ctx, only: tuple = ("generate", "etl", "train", "experiment")) -> dict:
    """A user's ``<out>.old-20261201`` copy beside the raw log, the dataset, a run and an experiment, and a directory
    that merely holds a ``manifest.json``: every job, with and without ``--overwrite``, leaves them as they were."""
    ref = ensure_reference_dataset(ctx)
    t0 = time.time()
    base = ctx.path("user-files")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    outs = {j: os.path.join(base, j) for j in ("raw", "dataset", "run", "exp")}
    shutil.copytree(ctx.raw, outs["raw"])     # the generator finds it up to date (same generate config)
    backups = {}
    for j, out in outs.items():
        b = f"{out}.old-20261201"
        if j in ("raw", "dataset"):            # copies of this project's outputs, its markers inside
            shutil.copytree(outs["raw"] if j == "raw" else ref, b)
        else:
            os.makedirs(b)
            with open(os.path.join(b, "notes.txt"), "w") as f:
                f.write("mine")
        backups[b] = tree_digest(b)
    manifest_only = os.path.join(base, "manifest-only")
    os.makedirs(manifest_only)
    with open(os.path.join(manifest_only, "manifest.json"), "w") as f:
        f.write("{}")
    backups[manifest_only] = tree_digest(manifest_only)
    exp_sets = ["experiment.methods=[esmm]", "experiment.figure_methods=[]", "experiment.figure_rates=[1.0]"]
    jobs = [("generate", ["--out", outs["raw"]]), ("etl", ["--raw", outs["raw"], "--out", outs["dataset"]]),
            ("train", ["--dataset", outs["dataset"], "--out", outs["run"], "--set", "train.method=esmm"]),
            ("experiment", ["--dataset", outs["dataset"], "--exp", outs["exp"], *[a for s in exp_sets
                                                                                  for a in ("--set", s)]])]
    codes, refused = [], 0
    jobs = [(job, extra) for job, extra in jobs if job in only]
    for over in ([], ["--overwrite"]):
        for job, extra in jobs:
            rc, _, _ = run(ctx, job, ctx.args() + extra + over, f"user-{job}{'-over' if over else ''}")
            codes.append(rc)
        rc, _, log = run(ctx, "etl", ctx.args() + ["--raw", outs["raw"], "--out", manifest_only] + over,
                         f"user-manifest-only{'-over' if over else ''}")
        refused += rc == 4 and "was not created by esmm-spark" in log
    intact = {b: tree_digest(b) == d for b, d in backups.items()}
    ok = all(intact.values()) and refused == 2 and all(c == 0 for c in codes)
    return {"scenario": "user_files", "ok": ok, "rows_lost": 0, "recover_s": time.time() - t0,
            "outcome": f"{sum(intact.values())}/{len(intact)} user directories unchanged after {len(codes)} jobs "
                       f"(exit codes {codes}); the manifest-only directory refused {refused}/2 times"}


def tree_digest(path: str) -> str:
    """Names and bytes of every file under ``path``."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(root, name)
            h.update(os.path.relpath(p, path).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def lock_takeover(ctx: Ctx, racers: int = 4) -> dict:
    """kill -9 the holder of an output's lock while ``racers`` processes wait to take it: exactly one must get it
    (flock: the kernel frees a dead holder's lock; no stale-lock guessing, no race between takers)."""
    out = ctx.path("lock-race")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    hold = ("import sys, time\nfrom esmm.outputs import Lock\nLock(sys.argv[1], 'holder').acquire()\n"
            "print('locked', flush=True); time.sleep(120)\n")
    race = ("import sys, time\nfrom esmm.outputs import Lock, OutputError\n"
            "while time.time() < float(sys.argv[2]): pass\n"
            "try:\n    Lock(sys.argv[1], 'racer').acquire(); print('won', flush=True); time.sleep(5)\n"
            "except OutputError:\n    print('lost', flush=True)\n")
    t0 = time.time()
    holder = subprocess.Popen([PY, "-c", hold, out], stdout=subprocess.PIPE, text=True, env=env)
    procs = []
    try:
        holder.stdout.readline()
        start_at = time.time() + 3
        procs = [subprocess.Popen([PY, "-c", race, out, str(start_at)], stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(racers)]
        time.sleep(1.5)
        holder.kill()
        holder.wait()
        results = [p.stdout.readline().strip() for p in procs]
    finally:
        for p in [holder] + procs:
            if p.poll() is None:
                p.kill()
    won = results.count("won")
    return {"scenario": "lock_takeover", "ok": won == 1, "rows_lost": 0, "recover_s": time.time() - t0,
            "outcome": f"holder killed -9 with {racers} racers waiting: {won} took the lock"}


SCENARIOS = ("etl_kill", "concurrent_etl", "foreign_dir", "experiment_kill", "train_kill_worker",
             "train_truncated_checkpoint", "train_nan", "commit_kill", "user_files", "lock_takeover")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", default="conf/demo.yaml")
    p.add_argument("--impressions", type=int, default=1_000_000)
    p.add_argument("--workdir", default="/tmp/esmm-faults")
    p.add_argument("--only", default=",".join(SCENARIOS))
    p.add_argument("--set", action="append", default=[], dest="sets")
    a = p.parse_args(argv)
    ctx = Ctx(a.workdir, a.conf, [f"generate.impressions={a.impressions}", "train.workers=1", *a.sets])
    t0 = time.time()
    ensure_raw(ctx)
    print(f"raw log: {a.impressions:,} impressions ({a.conf}) in {time.time() - t0:.0f}s", flush=True)
    exp_sets = ["experiment.methods=[base, esmm]", "experiment.repeats=1", "experiment.figure_rates=[0.1]",
                "train.epochs=1"]
    rows = []
    for name in a.only.split(","):
        fn = globals()[name]
        r = fn(ctx, exp_sets) if name == "experiment_kill" else fn(ctx)
        rows.append(r)
        print(f"{r['scenario']:28s} {'ok  ' if r['ok'] else 'FAIL'} rows lost {r['rows_lost']!s:>4}  "
              f"recover {r['recover_s']:7.1f}s  {r['outcome']}", flush=True)
    print(f"\n{sum(r['ok'] for r in rows)}/{len(rows)} scenarios as expected")
    with open(os.path.join(ctx.workdir, "faults.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
