"""The output lifecycle: one class, :class:`Output`, that every stage (generate, ETL, train, evaluate, predict,
experiment) uses to own, lock, stage, commit, reuse or refuse its output directory, on any store ``esmm.storage``
reaches. A stage declares its output's kind and inputs; the rules live here only.

Files an output directory carries (all small):

- ``_ESMM_OUTPUT``, the **marker**: kind, run id, when/where it was created, the identity of its inputs and of the
  code (package version and git commit). Nothing without this project's marker is ever written into, replaced or
  deleted, ``--overwrite`` included: a foreign directory (a user's folder that merely holds a ``manifest.json``, say)
  is refused with a message naming it.
- ``_ESMM_COMMIT``, the **commit record**, written last: run id, inputs fingerprint, and the relative path and size of
  every file the output holds. An output is *committed* when its record is there and every listed file is there with
  its size; readers and reuse trust committed outputs only. This does not rely on rename being atomic: on an object
  store a directory "rename" is a copy, and a copy interrupted half-way lacks files or the record, so it is not
  committed. ``_SUCCESS`` (Hadoop's convention, for schedulers' sensors) is written just before the record.
- ``_ESMM_STAGING`` in a staging directory ``<out>.tmp-<token>``: which output it stages and its token. Cleanup of
  leftovers touches only siblings that this record (or the output's own commit or marker) ties to ``out``, so a
  user's ``<out>.old-20261201`` backup is never touched, whatever its name.

**Staged outputs** (raw log, dataset, predictions, evaluation): written into ``<out>.tmp-<token>``, committed there,
then swapped in: ``out -> <out>.old-<token>``, ``<out>.tmp-<token> -> out``, old deleted. At every instant one committed
version is findable: ``out``, or the committed staging directory (:func:`find_committed`); a job killed between two
steps is rolled forward (or back) by the next job on the output (:meth:`Output.recover`), never deleted.

**In-place outputs** (training runs, experiments): the directory is claimed (marker), written in place (a training run
resumes from its checkpoints), and committed at the end. ``--overwrite`` moves an owned predecessor to
``<out>.old-<token>`` (recorded in the new marker) and deletes it only when the new output commits.

**Locks** (:class:`Lock`, ``<out>.lock``): local files use ``flock``: the kernel releases a dead holder's lock, so a
takeover cannot race and a kill -9 leaves nothing to clean. Other filesystems use a lease: the lock file is created
exclusively (exclusive on HDFS) and renewed by a thread while the job lives; a lease older than ``ESMM_LOCK_LEASE_S``
(120 s) is a dead holder's and is taken over through an exclusive ``<out>.lock.takeover`` file, so two takers cannot
both win. SIGTERM releases the lock (``esmm.cli`` turns it into an exit). Where the store cannot create exclusively
(S3), the commit detects a second writer instead: it re-reads the lock's token and the output's committed run id
before swapping and refuses if either changed.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import uuid

from esmm import storage

log = logging.getLogger(__name__)

MARKER = "_ESMM_OUTPUT"
SUCCESS = "_SUCCESS"
COMMIT = "_ESMM_COMMIT"
STAGING = "_ESMM_STAGING"
BOOKKEEPING = (MARKER, SUCCESS, COMMIT, STAGING)
LEASE_S = float(os.environ.get("ESMM_LOCK_LEASE_S", "120"))
_SIBLING_RE = r"\.(tmp|old)-([0-9a-f]{8})$"
FAULT_ENV = "ESMM_FAULT_COMMIT"   # tests/bench: kill this process at a named commit step (bench/faults.py)


class OutputRefused(Exception):
    """An output holds results of other inputs and ``--overwrite`` was not given (exit code 4)."""


class OutputError(RuntimeError):
    """An output cannot be written, replaced or reused (foreign, another kind, locked, changed under us); exit 4."""


class InputChanged(RuntimeError):
    """A committed input (the dataset) was replaced while a job read it; a re-run reads the new one (exit 1)."""


# ------------------------------------------------------------------------------------------------ identity

def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (keys sorted): equal inputs, equal fingerprints."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dataset_fingerprint(manifest: dict) -> str:
    """Identity of an ETL output: its run id, raw inputs, config hash, layout and row counts (not its timings)."""
    keys = ("run_id", "inputs", "config_hash", "layout", "rows")
    return fingerprint({k: manifest.get(k) for k in keys})


def new_run_id(kind: str) -> str:
    """Unique across runs, hosts and units: ``<kind>-<UTC time>-<random>``."""
    return f"{kind}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The package version, and the git commit (with ``dirty``) when the code runs from a checkout."""
    import esmm
    out = {"package": esmm.__version__}
    root = os.path.dirname(os.path.dirname(os.path.abspath(esmm.__file__)))
    if os.path.isdir(os.path.join(root, ".git")):
        try:
            commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if commit:
                out.update({"git_commit": commit, "dirty": bool(dirty)})
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def marker_record(kind: str, inputs: dict | None = None, run_id: str | None = None) -> dict:
    return {"kind": kind, "run_id": run_id or new_run_id(kind), "inputs": inputs or {},
            "inputs_fingerprint": fingerprint(inputs or {}), "code": code_version(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "pid": os.getpid()}


# ------------------------------------------------------------------------------------------------ records

def _read_record(url: str, what: str) -> dict | None:
    if not storage.isfile(url):
        return None
    try:
        rec = storage.read_json(url)
        if not isinstance(rec, dict):
            raise ValueError("not a JSON object")
        return rec
    except (OSError, ValueError) as e:
        raise OutputError(f"{storage.display(url)} is unreadable ({e}); the {what} is unknown: inspect the directory "
                          f"by hand") from e


def read_marker(out: str) -> dict | None:
    """The marker of directory ``out``; None when it has none. An unreadable marker raises :class:`OutputError`."""
    return _read_record(storage.join(out, MARKER), "directory's owner")


def walk_files(out: str) -> dict:
    """{relative path: size} of every file under ``out`` but the commit record."""
    return {rel: size for rel, (size, _) in storage.walk(out).items() if rel != COMMIT}


def read_commit(out: str, verify: bool = True) -> dict | None:
    """The commit record of ``out`` when it is committed (record there, every listed file there with its size);
    None otherwise (absent, being written, an interrupted copy)."""
    try:
        rec = _read_record(storage.join(out, COMMIT), "commit")
    except OutputError:
        return None
    return rec if rec is None or not verify or _complete(out, rec) else None


def _complete(out: str, rec: dict) -> bool:
    """Every file the commit record lists is under ``out`` with its size."""
    have = walk_files(out)
    return all(have.get(rel) == size for rel, size in (rec.get("files") or {}).items())


def is_committed(out: str) -> bool:
    return read_commit(out) is not None


def find_committed(out: str) -> str | None:
    """Where the committed version of ``out`` is: ``out`` itself, or during an interrupted swap its committed staging
    directory ``<out>.tmp-<token>`` (the next job on ``out`` moves it into place). None: nothing committed."""
    out = storage.resolve(out)
    if is_committed(out):
        return out
    for token, kind_, url in _siblings(out):
        if kind_ == "tmp" and _staging_record(url, out, token) and is_committed(url):
            return url
    return None


def write_success(out: str) -> None:
    storage.write_bytes(storage.join(out, SUCCESS), b"")


def _commit_record(out: str, run_id: str, token: str, extra: dict | None = None) -> dict:
    rec = {"run_id": run_id, "token": token, "code": code_version(),
           "committed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **(extra or {})}
    write_success(out)
    rec["files"] = walk_files(out)
    storage.write_json(storage.join(out, COMMIT), rec)
    return rec


def recommit(out: str, run_id: str | None = None) -> dict:
    """Commit an output whose files were changed on purpose outside its job (fault injection, test fixtures): the
    commit record lists the files as they are now. Never called by the jobs themselves."""
    if read_marker(out) is None:
        raise OutputError(f"{storage.display(out)} has no {MARKER} marker: not this project's output")
    rec = read_commit(out, verify=False) or {"token": "00000000"}
    if run_id is not None:
        rec["run_id"] = run_id
    write_success(out)
    rec["files"] = walk_files(out)
    storage.write_json(storage.join(out, COMMIT), rec)
    return rec


def _siblings(out: str) -> list[tuple[str, str, str]]:
    """(token, "tmp"|"old", url) of the siblings of ``out`` named like this project's staging."""
    name, parent = storage.basename(out), storage.parent(out)
    pat = re.compile(re.escape(name) + _SIBLING_RE)
    out_ = []
    for entry in storage.listdir(parent):
        m = pat.fullmatch(entry)
        if m:
            out_.append((m.group(2), m.group(1), storage.join(parent, entry)))
    return out_


def _staging_record(url: str, out: str, token: str) -> bool:
    """Whether ``url`` is a staging directory this project made for ``out`` with ``token``."""
    try:
        rec = _read_record(storage.join(url, STAGING), "staging directory")
    except OutputError:
        return False
    return bool(rec) and rec.get("of") == storage.basename(out) and rec.get("token") == token


def _fault(step: str) -> None:
    """Tests and bench/faults.py kill the job at a named commit step (``ESMM_FAULT_COMMIT=<step>``)."""
    if os.environ.get(FAULT_ENV) == step:
        log.warning("fault injection: killed at commit step %r", step)
        os._exit(137)


# ------------------------------------------------------------------------------------------------ locks

class Lock:
    """One writer per output: ``<out>.lock`` (module docstring: flock on local files, a renewed lease elsewhere)."""

    def __init__(self, out: str, job: str = "", lease: bool | None = None, lease_s: float | None = None):
        self.out = storage.resolve(out)
        self.url = self.out + ".lock"
        self.job = job
        self.lease = (not storage.is_local(self.url)) if lease is None else lease  # tests run leases on local files
        self.lease_s = LEASE_S if lease_s is None else lease_s
        self.token = uuid.uuid4().hex
        self.held = False
        self._fd = None
        self._stop = None

    def identity(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "job": self.job, "token": self.token,
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "renewed": time.time()}

    def _busy(self, holder: dict) -> OutputError:
        return OutputError(
            f"{storage.display(self.out)} is being written by another job ({holder.get('job') or 'unknown job'}, "
            f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}): one writer "
            f"per output. On a local filesystem the lock frees itself when that process ends; elsewhere its lease "
            f"runs out {self.lease_s:.0f} s after the holder stops renewing it")

    # -- local: flock
    def _acquire_local(self) -> None:
        try:
            self._fd = storage.flock_exclusive(self.url, json.dumps(self.identity()).encode())
        except storage.Locked as e:
            try:
                holder = json.loads(e.holder or b"{}")
            except ValueError:
                holder = {}
            raise self._busy(holder) from None

    # -- elsewhere: an exclusive file and a lease
    def _holder(self) -> dict:
        try:
            return storage.read_json(self.url) if storage.exists(self.url) else {}
        except (OSError, ValueError):
            return {}

    def _acquire_lease(self) -> None:
        for _ in range(3):
            if storage.create_exclusive(self.url, json.dumps(self.identity()).encode()):
                self._start_renewal()
                return
            holder = self._holder()
            age = time.time() - float(holder.get("renewed", time.time()))
            if age < self.lease_s:
                raise self._busy(holder)
            take = self.url + ".takeover"  # only one taker passes this exclusive create
            if not storage.create_exclusive(take, json.dumps(self.identity()).encode()):
                other = {}
                with contextlib.suppress(OSError, ValueError):
                    other = storage.read_json(take)
                if time.time() - float(other.get("renewed", 0)) < self.lease_s:
                    raise self._busy(holder)
                storage.delete(take)  # a taker that died mid-takeover: its own lease ran out
                continue
            try:
                if self._holder().get("token") == holder.get("token"):  # still the stale holder's: remove it
                    storage.delete(self.url)
                    log.warning("took over %s: its holder (%s, pid %s on %s) stopped renewing it %.0f s ago",
                                storage.display(self.url), holder.get("job"), holder.get("pid"), holder.get("host"),
                                age)
            finally:
                storage.delete(take)
        raise OutputError(f"could not lock {storage.display(self.out)}: {storage.display(self.url)} keeps reappearing")

    def _start_renewal(self) -> None:
        self._stop = threading.Event()

        def renew():
            while not self._stop.wait(self.lease_s / 4):
                if self._holder().get("token") != self.token:
                    log.error("the lock %s is no longer this job's: the commit will refuse", self.url)
                    return
                storage.write_bytes(self.url, json.dumps({**self.identity(), "renewed": time.time()}).encode())

        threading.Thread(target=renew, name=f"lease {self.url}", daemon=True).start()

    def acquire(self) -> "Lock":
        if self.lease:
            self._acquire_lease()
        else:
            self._acquire_local()
        self.held = True
        return self

    def verify(self) -> None:
        """Before a commit: this job still holds the lock (on object stores, no second writer took it)."""
        if self.held and self.lease and self._holder().get("token") != self.token:
            raise OutputError(f"another job took the lock of {storage.display(self.out)} while this one wrote it: "
                              f"not committing over its work")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._fd is not None:
            storage.flock_release(self.url, self._fd)
            self._fd = None
            return
        if self._stop is not None:
            self._stop.set()
        if self._holder().get("token") == self.token:
            storage.delete(self.url)

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ the lifecycle

class Output:
    """The lifecycle of one output directory; use as a context manager (it holds the lock).

    ``kind``: what the directory holds; ``inputs``: what it is built from (compared by fingerprint, paths in
    canonical form); ``refused``: the exception class raised for other inputs without ``overwrite``;
    ``lock=False`` for a sub-output whose parent's lock is held (an experiment's per-unit predictions)."""

    def __init__(self, out: str, kind: str, inputs: dict | None = None, job: str = "", overwrite: bool = False,
                 refused: type = OutputRefused, lock: bool = True, describe=None):
        self.out = storage.resolve(out)
        self.kind, self.inputs, self.overwrite, self.refused = kind, inputs or {}, overwrite, refused
        self.describe = describe  # (old inputs, new inputs) -> [what differs], for the refusal message
        self.job = job or kind
        self.lock = Lock(self.out, self.job) if lock else None
        self.marker: dict | None = None       # the directory's marker, when it exists
        self.committed: dict | None = None    # its commit record, when committed
        self.token = uuid.uuid4().hex[:8]
        self.staging: str | None = None
        self.keep_staging = False             # a failed job leaves its staging for inspection (quarantine gate)

    # -- entering: lock, recover, inspect
    def __enter__(self) -> "Output":
        if self.lock is not None:
            self.lock.acquire()
        try:
            self.recover()
            self.inspect()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging is not None and exc_type is not None and not self.keep_staging:
            with contextlib.suppress(Exception):
                if _staging_record(self.staging, self.out, self.token) and not is_committed(self.staging):
                    storage.delete(self.staging, recursive=True)
        if self.lock is not None:
            self.lock.release()

    def inspect(self) -> None:
        i = storage.info(self.out)
        self.marker = self.committed = self._seen = None
        if not i.exists:
            return
        d = storage.display(self.out)
        if not i.is_dir:
            raise OutputError(f"{d} exists and is not a directory; choose another output path")
        if not storage.listdir(self.out):
            return
        self.marker = read_marker(self.out)
        if self.marker is None:
            raise OutputError(f"{d} exists and was not created by esmm-spark (no {MARKER} marker): refusing to write "
                              f"into, replace or delete it, --overwrite included; move it away or choose another path")
        if self.marker.get("kind") != self.kind:
            raise OutputError(f"{d} holds a {self.marker.get('kind')!r} output, not a {self.kind!r} one: refusing to "
                              f"replace it")
        rec = read_commit(self.out, verify=False)   # one read: the run id seen, and committed if complete
        self._seen = (rec or {}).get("run_id")
        self.committed = rec if rec is not None and _complete(self.out, rec) else None

    @property
    def same_inputs(self) -> bool:
        return self.marker is not None and self.marker.get("inputs_fingerprint") == fingerprint(self.inputs)

    @property
    def reusable(self) -> dict | None:
        """The commit record of a committed output of the same inputs (nothing to do), unless ``overwrite``."""
        return self.committed if self.committed is not None and self.same_inputs and not self.overwrite else None

    def differences(self) -> str:
        old = (self.marker or {}).get("inputs") or {}
        keys = (self.describe(old, self.inputs) if self.describe else
                sorted(k for k in set(old) | set(self.inputs) if old.get(k) != self.inputs.get(k)))
        code_now, code_then = code_version(), (self.marker or {}).get("code")
        note = f" (built by {code_then}, this is {code_now})" if code_then and code_then != code_now else ""
        return ("; ".join(keys) or "inputs recorded in another form") + note

    def refuse_other_inputs(self, what: str = "") -> None:
        """Raise ``refused`` when ``out`` holds a result of other inputs and ``overwrite`` is off."""
        if self.marker is not None and not self.same_inputs and not self.overwrite:
            raise self.refused(f"{storage.display(self.out)} holds {what or 'a ' + self.kind} "
                               f"({self.marker.get('run_id')}) built from other inputs (what differs: "
                               f"{self.differences()}); pass --overwrite to replace it, or choose another path")

    # -- staged outputs
    def stage(self) -> str:
        """A fresh staging directory for the new version, tied to ``out`` by its staging record."""
        self.staging = f"{self.out}.tmp-{self.token}"
        storage.makedirs(self.staging)
        storage.write_json(storage.join(self.staging, STAGING), {"of": storage.basename(self.out),
                                                                  "token": self.token, "host": socket.gethostname(),
                                                                  "pid": os.getpid()})
        self.run_id = new_run_id(self.kind)
        storage.write_json(storage.join(self.staging, MARKER), marker_record(self.kind, self.inputs, self.run_id))
        return self.staging

    def commit(self, extra: dict | None = None) -> dict:
        """Commit the staging directory (record written last), then swap it into place (module docstring)."""
        tmp = self.staging
        rec = _commit_record(tmp, self.run_id, self.token, {"inputs_fingerprint": fingerprint(self.inputs),
                                                          **(extra or {})})
        _fault("staged")
        self._check_no_second_writer()
        if storage.exists(self.out):
            if storage.listdir(self.out):
                storage.rename(self.out, f"{self.out}.old-{self.token}")
                _fault("old-moved")
            else:
                storage.delete(self.out)  # an empty directory (made by hand before the first run) holds nothing
        storage.rename(tmp, self.out)
        _fault("new-moved")
        storage.delete(f"{self.out}.old-{self.token}", recursive=True)
        self.staging, self.committed, self._seen = None, rec, rec["run_id"]
        self.marker = read_marker(self.out)
        return rec

    def _check_no_second_writer(self) -> None:
        if self.lock is not None:
            self.lock.verify()
        now = read_commit(self.out, verify=False)
        if (now or {}).get("run_id") != self._seen:
            raise OutputError(f"{storage.display(self.out)} was committed by another job ({(now or {}).get('run_id')}) "
                              f"while this one wrote it: not replacing it")

    # -- in-place outputs
    def claim(self, has_results=None) -> dict:
        """Make ``out`` this output's directory, in place (training runs, experiments); returns its marker.

        Same inputs: the marker is kept (resume, reuse). Other inputs: refused unless ``overwrite``, or unless
        ``has_results()`` says nothing of the old run is there yet; with ``overwrite`` an owned predecessor is moved
        to ``<out>.old-<token>``, deleted when the new output commits."""
        if self.marker is not None and not self.same_inputs:
            if self.overwrite or (has_results is not None and not has_results()):
                if self.overwrite:
                    storage.rename(self.out, f"{self.out}.old-{self.token}")
                    log.info("moved the previous %s aside to %s until this run commits", self.kind,
                             storage.display(f"{self.out}.old-{self.token}"))
                self.marker = None
            else:
                self.refuse_other_inputs()
        elif self.marker is not None and self.overwrite:
            storage.rename(self.out, f"{self.out}.old-{self.token}")
            self.marker = None
        if self.marker is None:
            storage.makedirs(self.out)
            rec = marker_record(self.kind, self.inputs)
            self._seen = None  # a new directory: nothing of it is committed yet
            if storage.exists(f"{self.out}.old-{self.token}"):
                rec["replaces"] = self.token
            storage.write_json(storage.join(self.out, MARKER), rec)
            self.marker, self.committed = rec, None
        self.run_id = self.marker["run_id"]
        return self.marker

    def uncommit(self) -> None:
        """Before rewriting a committed in-place output (an experiment gaining a unit)."""
        storage.delete(storage.join(self.out, COMMIT))
        storage.delete(storage.join(self.out, SUCCESS))
        self.committed = self._seen = None

    def commit_in_place(self, extra: dict | None = None) -> dict:
        self._check_no_second_writer()
        rec = _commit_record(self.out, self.marker["run_id"], self.marker.get("replaces") or self.token,
                             {"inputs_fingerprint": fingerprint(self.inputs), **(extra or {})})
        if self.marker.get("replaces"):
            storage.delete(f"{self.out}.old-{self.marker['replaces']}", recursive=True)
        self.committed, self._seen = rec, rec["run_id"]
        return rec

    # -- recovery of interrupted commits
    def recover(self) -> list[str]:
        """Finish or undo what a killed job left of a commit of ``out`` (call while holding the lock): a committed
        staging directory is moved into place, an uncommitted one removed, a predecessor restored when no new version
        was committed, or removed when one was. Siblings that are not tied to ``out`` by a staging record, its marker
        or its commit are left alone whatever their names (a user's ``<out>.old-20261201``)."""
        done = []
        sibs = _siblings(self.out)
        if not sibs:
            return done
        out_marker = out_commit = None
        with contextlib.suppress(OutputError):
            out_marker = read_marker(self.out) if storage.isdir(self.out) else None
            out_commit = read_commit(self.out, verify=False) if out_marker else None
        tmps = {t: u for t, k, u in sibs if k == "tmp" and _staging_record(u, self.out, t)}
        ours_old = {(out_commit or {}).get("token"), (out_marker or {}).get("replaces")} - {None}
        for token, kind_, url in sibs:
            if kind_ == "tmp" and token in tmps:
                if is_committed(url):  # the job got as far as its commit: finish its swap
                    if storage.exists(self.out):
                        if is_committed(self.out) and out_marker is not None:
                            storage.rename(self.out, f"{self.out}.old-{token}")  # the version it replaces
                        elif _staging_record(self.out, self.out, token):  # an interrupted copy of this staging
                            storage.delete(self.out, recursive=True)
                        else:
                            continue  # out is something else: leave both alone
                    storage.rename(url, self.out)
                    storage.delete(f"{self.out}.old-{token}", recursive=True)
                    done.append(f"moved the committed {storage.display(url)} into place")
                    ours_old.add(token)
                    out_marker = read_marker(self.out)
                else:
                    storage.delete(url, recursive=True)
                    done.append(f"removed the unfinished staging directory {storage.display(url)}")
        for token, kind_, url in sibs:
            if kind_ != "old":
                continue
            if token in ours_old or token in tmps:
                if not storage.exists(self.out):
                    storage.rename(url, self.out)  # nothing new was committed: the predecessor comes back
                    done.append(f"restored {storage.display(url)}")
                elif token in ours_old and is_committed(self.out):
                    storage.delete(url, recursive=True)
                    done.append(f"removed the replaced version {storage.display(url)}")
            else:
                log.info("left %s alone: its name looks like staging of %s, but nothing ties it to this project's "
                         "runs", storage.display(url), storage.display(self.out))
        for d in done:
            log.warning("%s (left by an interrupted job)", d)
        return done


def check_pinned(dataset: str, run_id: str, what: str) -> None:
    """Readers pin what they read: the dataset must still be the committed run ``run_id``."""
    rec = read_commit(dataset, verify=False)
    now = (rec or {}).get("run_id")
    if now != run_id:
        raise InputChanged(f"the dataset {storage.display(dataset)} changed while {what} read it (run {run_id} -> "
                            f"{now or 'nothing committed'}): an ETL re-run replaced it; start {what} again")
