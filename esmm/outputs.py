"""Who owns an output directory, who is writing it, and what it was built from.

Every directory a job writes (raw log, dataset, training run, evaluation, experiment) carries a marker file,
``_ESMM_OUTPUT``: JSON with the kind of output, a unique run id, when/where it was created and the identity of its
inputs. Three rules follow from it:

- **Nothing is deleted that the project did not create.** A job replaces or removes a directory only when the marker
  is there and names the same kind; a foreign directory (no marker) is refused with a message naming it, whatever
  ``--overwrite`` says.
- **One writer per output.** A job holds ``<out>.lock`` while it writes; the lock is created with exclusive
  semantics (``O_CREAT | O_EXCL`` on a local filesystem, ``create(overwrite=false)`` on Hadoop filesystems), so a
  second job on the same output fails fast and names the holder. A lock left by a killed job on this host (its pid is
  gone) is taken over; a lock from another host must be removed by hand (the message says which file).
- **Outputs know their inputs.** :func:`fingerprint` hashes what an output was built from (manifest, layout,
  config sections, upstream run ids); reuse and resume compare fingerprints, never directory names.

The functions here work on local paths; ``esmm.spark`` has the Hadoop-filesystem versions the Spark jobs use for
``hdfs://``/``s3a://`` outputs.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import uuid

MARKER = "_ESMM_OUTPUT"
SUCCESS = "_SUCCESS"   # Hadoop's convention: an empty file written last into a finished output directory
STAGING_RE = r"\.(tmp|old)-[0-9a-f]{8}$"   # <out>.tmp-1a2b3c4d (staging), <out>.old-1a2b3c4d (being replaced)


class OutputRefused(Exception):
    """Mixin of the errors that refuse to write, replace or reuse an output: a directory built from other inputs or
    config without ``--overwrite`` (``EtlOutputRefused``, ``GeneratorOutputRefused``, ``TrainOutputRefused``,
    ``ExperimentOutputRefused``); :class:`OutputError` (foreign directory, locked by another job) is the other kind.
    The jobs exit with code 4 on either (``esmm.cli``)."""


class OutputError(RuntimeError):
    """An output directory cannot be written, replaced or reused; the message names it and says what to do."""


# ------------------------------------------------------------------------------------------------ identity

def fingerprint(obj) -> str:
    """A short stable hash of a JSON-able object (keys sorted): equal inputs, equal fingerprints."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dataset_fingerprint(manifest: dict) -> str:
    """Identity of an ETL output: its run id, raw inputs, config hash, layout and row counts (not its timings).
    A dataset rebuilt with ``--overwrite`` gets a new run id, so models and metrics of the old one never pass as
    its own."""
    keys = ("run_id", "inputs", "config_hash", "layout", "rows")
    return fingerprint({k: manifest.get(k) for k in keys})


def new_run_id(kind: str) -> str:
    """Unique across runs, hosts and units: ``<kind>-<UTC time>-<random>``."""
    return f"{kind}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def marker_record(kind: str, inputs: dict | None = None, run_id: str | None = None) -> dict:
    return {"kind": kind, "run_id": run_id or new_run_id(kind), "inputs": inputs or {},
            "inputs_fingerprint": fingerprint(inputs or {}),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "pid": os.getpid()}


# ------------------------------------------------------------------------------------------------ files

def atomic_write_json(path: str, obj) -> None:
    """Write JSON to a temporary file in the same directory, fsync, rename: readers never see a torn file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 4 MiB chunks (checkpoints, exports)."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_marker(path: str) -> dict | None:
    """The marker of directory ``path``, or None when it has none (or is not a directory)."""
    m = os.path.join(path, MARKER)
    if not os.path.isfile(m):
        return None
    try:
        with open(m) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise OutputError(f"{m} is unreadable ({e}); the directory's owner is unknown: inspect it by hand") from e


def write_marker(path: str, record: dict) -> dict:
    atomic_write_json(os.path.join(path, MARKER), record)
    return record


def owned(path: str, kind: str) -> dict | None:
    """The marker of an existing directory this project created as ``kind``; None when ``path`` does not exist.

    Raises :class:`OutputError` for a foreign directory (no marker, or a file) or one of another kind."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        raise OutputError(f"{path} exists and is not a directory; choose another output path")
    rec = read_marker(path)
    if rec is None:
        raise OutputError(f"{path} exists and was not created by esmm-spark (no {MARKER} marker): refusing to "
                          f"write into or delete it; move it away or choose another output path")
    if rec.get("kind") != kind:
        raise OutputError(f"{path} holds a {rec.get('kind')!r} output, not a {kind!r} one: refusing to replace it")
    return rec


def claim_dir(path: str, kind: str, inputs: dict | None = None) -> dict:
    """Make ``path`` an output directory of ``kind`` (created, or an empty directory adopted) and return its marker.

    An existing directory of the same kind keeps its marker (the caller compares ``inputs_fingerprint`` to decide
    between resume and refusal); a foreign non-empty directory is refused."""
    if os.path.isdir(path) and not os.listdir(path):
        return write_marker(path, marker_record(kind, inputs))
    rec = owned(path, kind)
    if rec is not None:
        return rec
    os.makedirs(path, exist_ok=True)
    return write_marker(path, marker_record(kind, inputs))


def remove_owned(path: str, kind: str) -> None:
    """Delete an output directory only if this project created it as ``kind`` (no-op when absent)."""
    if owned(path, kind) is not None:
        shutil.rmtree(path)


def write_success(path: str) -> None:
    """Mark directory ``path`` finished: an empty ``_SUCCESS`` file, written (and fsynced) after everything else."""
    with open(os.path.join(path, SUCCESS), "w") as f:
        f.flush()
        os.fsync(f.fileno())


def clear_success(path: str) -> None:
    """Unmark ``path`` before its finished content is rewritten in place (no-op when unmarked)."""
    try:
        os.remove(os.path.join(path, SUCCESS))
    except FileNotFoundError:
        pass


def is_finished(path: str) -> bool:
    """Whether directory ``path`` carries the ``_SUCCESS`` marker."""
    return os.path.isfile(os.path.join(path, SUCCESS))


def clean_stale_staging(out: str) -> list[str]:
    """Remove ``<out>.tmp-*`` / ``<out>.old-*`` left by killed runs (call while holding ``out``'s lock)."""
    parent, name = os.path.split(os.path.abspath(out))
    removed = []
    if not os.path.isdir(parent):
        return removed
    pat = re.compile(re.escape(name) + STAGING_RE)
    for entry in os.listdir(parent):
        if pat.fullmatch(entry):
            p = os.path.join(parent, entry)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------ locks

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """Exclusive lock on a local output path: ``<out>.lock`` created with ``O_CREAT | O_EXCL``.

    Use as a context manager; the lock file holds the holder's host, pid, job and start time. A lock whose holder
    is a dead process on this host is stale and taken over (a ``kill -9``-ed job leaves one)."""

    def __init__(self, out: str, job: str = ""):
        self.out = os.path.abspath(out)
        self.path = self.out.rstrip("/") + ".lock"
        self.job = job
        self.held = False

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": self.job,
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as e:
                if e.errno != errno.EEXIST:
                    raise
                holder = self._holder()
                if not holder:  # being written right now, or torn by a crash between create and write
                    import time
                    time.sleep(0.2)
                    holder = self._holder()
                if holder and holder.get("host") == me["host"] and not _pid_alive(int(holder.get("pid", -1))):
                    try:  # stale: its holder is gone; rename first so two takers cannot both remove it
                        os.replace(self.path, f"{self.path}.stale-{uuid.uuid4().hex[:8]}")
                    except FileNotFoundError:
                        pass
                    for f in os.listdir(os.path.dirname(self.path)):
                        if f.startswith(os.path.basename(self.path) + ".stale-"):
                            try:
                                os.remove(os.path.join(os.path.dirname(self.path), f))
                            except FileNotFoundError:
                                pass
                    continue
                raise OutputError(
                    f"{self.out} is being written by another job ({holder.get('job') or 'unknown job'}, pid "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}): "
                    f"one writer per output. If that job is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OutputError(f"could not lock {self.out}: {self.path} keeps reappearing")

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
