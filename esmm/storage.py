"""The one storage layer: every configured path (raw log, dataset, runs, experiment, evaluation, predictions, ground
truth, tracking) is read and written here, and nowhere else.

**Canonical form.** :func:`resolve` turns a path into one URL, once: a local path (relative to the working directory,
``~`` expanded) or a ``file:`` URL becomes ``file:///abs/path`` (percent-escapes undone: ``my%20dir`` is ``my dir``);
``s3://``/``s3n://`` become ``s3a://`` (Hadoop's client, which Spark uses); ``hdfs://``, ``viewfs://``, ``gs://``,
``abfs(s)://`` stay as they are, without a trailing slash. Two spellings of one place resolve to the same string, so
identities (``esmm.outputs``) compare them as equal, and every stage passes the same string to Spark, Petastorm,
pyarrow and Hadoop.

**Two backends, one interface.** Python code calls the functions below with a URL; they pick the filesystem:

- ``file://``: pyarrow's ``LocalFileSystem`` (also what runs inside Spark executors and Horovod workers); writes of
  small files are atomic (temporary file in the same directory, fsync, rename).
- any other scheme, in a process that has a Spark session (:func:`use_spark`, called by ``esmm.spark.get_spark``):
  Hadoop's ``FileSystem`` through the session's JVM, with the cluster's Hadoop configuration (credentials, name
  nodes, ``viewfs`` mount tables);
- any other scheme without a session (Horovod workers inside executors, plain Python): ``pyarrow.fs`` (``s3``,
  ``gs``, ``abfs``; ``hdfs`` needs ``libhdfs`` and the Hadoop ``CLASSPATH``, as Petastorm does).

Spark itself reads and writes Parquet at the same URLs through Hadoop. What each scheme guarantees (atomic rename,
exclusive create) and what the project assumes is in the README ("Storage contract"); ``esmm.outputs`` builds the
output lifecycle on top of these primitives without trusting a rename to be atomic.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import tempfile
import threading
import uuid
from urllib.parse import unquote, urlparse

_SPARK = None            # the driver's session, for Hadoop-only schemes (use_spark)
_LOCK = threading.Lock()

LOCAL = "file"
SCHEME_ALIASES = {"s3": "s3a", "s3n": "s3a"}


class StorageError(OSError):
    """A path cannot be resolved or reached; the message names it."""


class NotSharedError(StorageError):
    """A local path given to a job on a cluster is not visible to every executor (a configuration error: exit 2)."""


# ------------------------------------------------------------------------------------------------ URLs

def resolve(path) -> str:
    """The canonical URL of ``path`` (module docstring). Idempotent: ``resolve(resolve(p)) == resolve(p)``."""
    if path is None or str(path).strip() == "":
        raise StorageError("an empty path was given where a file or directory is expected")
    s = str(path)
    if "://" not in s and not s.startswith("file:"):
        return "file://" + os.path.abspath(os.path.expanduser(s))
    u = urlparse(s)
    scheme = SCHEME_ALIASES.get(u.scheme.lower(), u.scheme.lower())
    if scheme == LOCAL:
        if u.netloc not in ("", "localhost"):
            raise StorageError(f"{s}: a file URL with a host ({u.netloc!r}) is not a local path; use file:///abs/path")
        p = unquote(u.path) or "/"
        return "file://" + os.path.normpath(p if p.startswith("/") else "/" + p)
    if not u.netloc:
        raise StorageError(f"{s}: a {scheme}:// URL needs a bucket, container or name node after '//'")
    p = posixpath.normpath(unquote(u.path)) if u.path not in ("", "/") else ""
    return f"{scheme}://{u.netloc}{'' if p in ('', '.', '/') else p}"


def scheme(url: str) -> str:
    return resolve(url).split("://", 1)[0]


def is_local(url: str) -> bool:
    return scheme(url) == LOCAL


def local_path(url: str) -> str | None:
    """The local filesystem path of ``url`` (``file://`` only), else None."""
    u = resolve(url)
    return u[len("file://"):] if u.startswith("file://") else None


def join(url: str, *parts: str) -> str:
    out = resolve(url)
    for p in parts:
        if p:
            out = out.rstrip("/") + "/" + str(p).strip("/")
    return out


def parent(url: str) -> str:
    u = resolve(url)
    head, _, _ = u.rpartition("/")
    return head if not head.endswith(":/") and not head.endswith("://") else head + "/"


def basename(url: str) -> str:
    return resolve(url).rstrip("/").rpartition("/")[2]


def arrow_uri(url: str) -> str:
    """``url`` spelled for ``pyarrow.fs.FileSystem.from_uri`` (Python workers writing Parquet themselves): a plain
    local path, ``s3://`` for ``s3a://``, other URLs as they are."""
    u = resolve(url)
    if u.startswith("file://"):
        return u[len("file://"):]
    return "s3://" + u[len("s3a://"):] if u.startswith("s3a://") else u


def display(url: str) -> str:
    """How messages name a location: the plain path for local files, the URL otherwise."""
    return local_path(url) or resolve(url)


# ------------------------------------------------------------------------------------------------ backends

def use_spark(spark) -> None:
    """Route non-``file`` schemes of this (driver) process through ``spark``'s Hadoop filesystem."""
    global _SPARK
    _SPARK = spark


def _active_spark():
    if _SPARK is None:
        return None
    try:
        if _SPARK._jsc is None or _SPARK._jsc.sc().isStopped():
            return None
    except Exception:  # noqa: BLE001  (a stopped gateway)
        return None
    return _SPARK


class _Info:
    __slots__ = ("exists", "is_dir", "size", "mtime")

    def __init__(self, exists: bool, is_dir: bool = False, size: int = 0, mtime: float = 0.0):
        self.exists, self.is_dir, self.size, self.mtime = exists, is_dir, size, mtime


class _ArrowFS:
    """pyarrow.fs behind the module's interface (local files, and remote stores without a Spark session)."""

    def __init__(self, url: str):
        import pyarrow.fs as pafs
        self.pafs = pafs
        u = resolve(url)
        if u.startswith("file://"):
            self.fs = pafs.LocalFileSystem()
            self.local = True
        else:
            arrow_url = "s3://" + u[len("s3a://"):] if u.startswith("s3a://") else u
            try:
                self.fs, _ = pafs.FileSystem.from_uri(arrow_url)
            except Exception as e:  # noqa: BLE001  (pyarrow raises several kinds)
                raise StorageError(f"cannot reach {u} from this process without a Spark session ({e}); for hdfs:// "
                                   f"pyarrow needs libhdfs and the Hadoop CLASSPATH (see README, Storage contract)") from e
            self.local = False

    @staticmethod
    def path(url: str) -> str:
        u = resolve(url)
        if u.startswith("file://"):
            return u[len("file://"):]
        rest = u.split("://", 1)[1]
        return rest if not u.startswith(("hdfs://", "viewfs://")) else "/" + rest.split("/", 1)[1] if "/" in rest else "/"

    def info(self, url: str) -> _Info:
        fi = self.fs.get_file_info(self.path(url))
        if fi.type == self.pafs.FileType.NotFound:
            return _Info(False)
        mtime = fi.mtime.timestamp() if fi.mtime is not None else 0.0
        return _Info(True, fi.type == self.pafs.FileType.Directory, fi.size or 0, mtime)

    def listdir(self, url: str) -> list[str]:
        sel = self.pafs.FileSelector(self.path(url), allow_not_found=True)
        return sorted(posixpath.basename(fi.path.rstrip("/")) for fi in self.fs.get_file_info(sel))

    def walk(self, url: str) -> dict:
        base = self.path(url).rstrip("/")
        sel = self.pafs.FileSelector(base, recursive=True)
        return {fi.path[len(base) + 1:]: (int(fi.size or 0), fi.mtime.timestamp() if fi.mtime else 0.0)
                for fi in self.fs.get_file_info(sel) if fi.type == self.pafs.FileType.File}

    def makedirs(self, url: str) -> None:
        self.fs.create_dir(self.path(url), recursive=True)

    def read_bytes(self, url: str) -> bytes:
        with self.fs.open_input_stream(self.path(url)) as f:
            return f.read()

    def write_bytes(self, url: str, data: bytes) -> None:
        p = self.path(url)
        if self.local:  # atomic: a temporary file beside it, fsync, rename
            with _atomic_local(p) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
            return
        with self.fs.open_output_stream(p) as f:  # object stores: the object appears whole when the stream closes
            f.write(data)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        if self.local:
            p = self.path(url)
            os.makedirs(os.path.dirname(p) or "/", exist_ok=True)
            try:
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.info(url).exists:  # not exclusive on object stores: README, Storage contract
            return False
        self.write_bytes(url, data)
        return True

    def delete(self, url: str, recursive: bool) -> None:
        p, i = self.path(url), self.info(url)
        if not i.exists:
            return
        if i.is_dir:
            if recursive:
                self.fs.delete_dir(p)
            else:
                self.fs.delete_dir(p) if not self.listdir(url) else None
        else:
            self.fs.delete_file(p)

    def rename(self, src: str, dst: str) -> None:
        if self.info(dst).exists:
            raise StorageError(f"cannot move {display(src)} to {display(dst)}: the target exists")
        self.fs.create_dir(posixpath.dirname(self.path(dst)), recursive=True)
        self.fs.move(self.path(src), self.path(dst))

    def open_input(self, url: str):
        return self.fs.open_input_file(self.path(url))


class _HadoopFS:
    """Hadoop's FileSystem through a Spark session's JVM (the driver, for non-``file`` schemes)."""

    def __init__(self, spark, url: str):
        self.spark, self.jvm = spark, spark._jvm
        self.fs = self.jvm.org.apache.hadoop.fs.Path(resolve(url)).getFileSystem(spark._jsc.hadoopConfiguration())

    def p(self, url: str):
        return self.jvm.org.apache.hadoop.fs.Path(resolve(url))

    def info(self, url: str) -> _Info:
        try:
            st = self.fs.getFileStatus(self.p(url))
        except Exception as e:  # noqa: BLE001  (py4j wraps FileNotFoundException)
            if "FileNotFoundException" in str(e):
                return _Info(False)
            raise
        return _Info(True, bool(st.isDirectory()), int(st.getLen()), st.getModificationTime() / 1000.0)

    def listdir(self, url: str) -> list[str]:
        if not self.fs.exists(self.p(url)):
            return []
        return sorted(str(st.getPath().getName()) for st in self.fs.listStatus(self.p(url)))

    def walk(self, url: str) -> dict:
        top = self.fs.makeQualified(self.p(url)).toUri().getPath().rstrip("/")
        files, it = {}, self.fs.listFiles(self.p(url), True)
        while it.hasNext():
            st = it.next()
            files[st.getPath().toUri().getPath()[len(top) + 1:]] = (int(st.getLen()), st.getModificationTime() / 1000.0)
        return files

    def makedirs(self, url: str) -> None:
        self.fs.mkdirs(self.p(url))

    def read_bytes(self, url: str) -> bytes:
        stream = self.fs.open(self.p(url))
        try:
            return bytes(self.jvm.org.apache.commons.io.IOUtils.toByteArray(stream))
        finally:
            stream.close()

    def _write(self, url: str, data: bytes, overwrite: bool) -> None:
        out = self.fs.create(self.p(url), overwrite)
        try:
            out.write(bytearray(data))
        finally:
            out.close()

    def write_bytes(self, url: str, data: bytes) -> None:
        self._write(url, data, True)

    def create_exclusive(self, url: str, data: bytes) -> bool:
        try:
            self._write(url, data, False)  # exclusive on HDFS; not on S3A (README, Storage contract)
        except Exception as e:  # noqa: BLE001
            if "FileAlreadyExists" in str(e) or self.fs.exists(self.p(url)):
                return False
            raise
        return True

    def delete(self, url: str, recursive: bool) -> None:
        if self.fs.exists(self.p(url)):
            self.fs.delete(self.p(url), recursive)

    def rename(self, src: str, dst: str) -> None:
        if self.fs.exists(self.p(dst)):
            raise StorageError(f"cannot move {display(src)} to {display(dst)}: the target exists")
        parent_dir = self.p(dst).getParent()
        if parent_dir is not None and not self.fs.exists(parent_dir):
            self.fs.mkdirs(parent_dir)
        if not self.fs.rename(self.p(src), self.p(dst)):
            raise StorageError(f"could not move {display(src)} to {display(dst)}")

    def open_input(self, url: str):
        return io.BytesIO(self.read_bytes(url))


def _fs(url: str):
    u = resolve(url)
    if u.startswith("file://"):
        return _ArrowFS(u)
    spark = _active_spark()
    return _HadoopFS(spark, u) if spark is not None else _ArrowFS(u)


# ------------------------------------------------------------------------------------------------ operations

def info(url: str) -> _Info:
    return _fs(url).info(url)


def exists(url: str) -> bool:
    return _fs(url).info(url).exists


def isdir(url: str) -> bool:
    return _fs(url).info(url).is_dir


def isfile(url: str) -> bool:
    i = _fs(url).info(url)
    return i.exists and not i.is_dir


def listdir(url: str) -> list[str]:
    """Names in directory ``url`` (sorted; empty when it does not exist)."""
    return _fs(url).listdir(url)


def makedirs(url: str) -> None:
    _fs(url).makedirs(url)


def read_bytes(url: str) -> bytes:
    try:
        return _fs(url).read_bytes(url)
    except FileNotFoundError as e:
        raise StorageError(f"{display(url)} does not exist") from e


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file, replacing one: atomic on local files; on object stores the object appears when done."""
    _fs(url).write_bytes(url, data)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_json(url: str):
    return json.loads(read_bytes(url))


def write_json(url: str, obj) -> None:
    """The project's one JSON writer (keys sorted, indented)."""
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True, default=float).encode("utf-8"))


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` holding ``data`` unless it exists; whether this call created it. Exclusive on local files and
    HDFS; on object stores a check-then-write (README, Storage contract)."""
    return _fs(url).create_exclusive(url, data)


def delete(url: str, recursive: bool = False) -> None:
    """Remove a file or directory (no-op when absent). Only ``esmm.outputs`` deletes directories, after checking
    that the project created them."""
    _fs(url).delete(url, recursive)


def rename(src: str, dst: str) -> None:
    """Move ``src`` to ``dst`` (which must not exist). Atomic on local files and HDFS; a copy on object stores."""
    _fs(src).rename(src, dst)


def walk(url: str) -> dict:
    """{path relative to ``url``: (size, mtime)} of every file under directory ``url`` (a file: itself, as '')."""
    top = info(url)
    if not top.exists:
        return {}
    if not top.is_dir:
        return {"": (top.size, top.mtime)}
    return _fs(url).walk(url)  # one recursive listing, not a call per file


def concat_parts(parts_dir: str, dest: str) -> None:
    """Concatenate the ``part-*`` files of a Spark output directory (in partition order) into the one file ``dest``
    (local files: streamed; elsewhere through memory one part at a time)."""
    names = [n for n in listdir(parts_dir) if n.startswith("part-")]
    src, dst = local_path(parts_dir), local_path(dest)
    if src is not None and dst is not None:
        import shutil
        with open(dst, "wb") as out:
            for n in names:
                with open(os.path.join(src, n), "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        return
    write_bytes(dest, b"".join(read_bytes(join(parts_dir, n)) for n in names))


def file_digest(url: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 4 MiB chunks (checkpoints, exports)."""
    h, size = hashlib.sha256(), 0
    with _fs(url).open_input(url) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def save_torch(obj, url: str) -> None:
    """``torch.save`` to ``url`` (atomic on local files)."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(url, buf.getvalue())


def load_torch(url: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` of ``url``."""
    import torch
    return torch.load(io.BytesIO(read_bytes(url)), map_location=map_location, weights_only=True)


@contextlib.contextmanager
def _atomic_local(path: str):
    """A temporary path beside the local file ``path``; when the block ends it is fsynced and renamed onto ``path``
    (readers never see a partial file); removed on an error."""
    os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def local_file(url: str):
    """A local path to write a file that a library can only write to a path (TorchScript, CSV writers); it is moved
    (local) or uploaded (remote) to ``url`` when the block ends without an error."""
    lp = local_path(url)
    if lp is not None:
        with _atomic_local(lp) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="esmm-upload-") as d:
        tmp = os.path.join(d, basename(url))
        yield tmp
        with open(tmp, "rb") as f:
            write_bytes(url, f.read())


@contextlib.contextmanager
def local_dir(url: str):
    """A local directory for a library that writes a tree of files (TensorBoard event files): ``url`` itself when it
    is local, else a temporary directory uploaded to ``url`` when the block ends (also after an error)."""
    lp = local_path(url)
    if lp is not None:
        os.makedirs(lp, exist_ok=True)
        yield lp
        return
    with tempfile.TemporaryDirectory(prefix="esmm-upload-") as d:
        try:
            yield d
        finally:
            for root, _, files in os.walk(d):
                for name in files:
                    rel = os.path.relpath(os.path.join(root, name), d).replace(os.sep, "/")
                    with open(os.path.join(root, name), "rb") as f:
                        write_bytes(join(url, rel), f.read())


class Locked(OSError):
    """``flock_exclusive``: another live process holds the lock; ``holder`` is what it wrote into the file."""

    def __init__(self, holder: bytes):
        super().__init__("locked")
        self.holder = holder


def flock_exclusive(url: str, identity: bytes) -> int:
    """Hold an exclusive ``flock`` on the local file ``url`` (created if needed) and write ``identity`` into it;
    returns the descriptor (:func:`flock_release`). The kernel drops the lock when its holder dies, so a dead
    holder's lock is free at once and no two processes can both take it. Raises :class:`Locked` when a live
    process holds it."""
    import fcntl
    path = local_path(url)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(50):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 1 << 16)
            os.close(fd)
            raise Locked(holder) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our flock: lock the new one
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, identity, 0)
        os.fsync(fd)
        return fd
    raise StorageError(f"could not lock {display(url)}: the lock file keeps being replaced")


def flock_release(url: str, fd: int) -> None:
    """Remove the lock file while still holding it (a waiter that opened it re-checks the inode), then unlock."""
    import fcntl
    with contextlib.suppress(FileNotFoundError):
        os.remove(local_path(url))
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def check_shared(spark, url: str) -> None:
    """On a cluster master, a local (``file://``) path must be one every executor sees (an NFS mount): the driver
    writes a probe file under ``url`` and Spark tasks on every executor look for it. Refuses with a clear message
    otherwise, instead of letting each executor write to its own scratch disk. Other schemes are shared by nature."""
    if not is_local(url) or spark is None or spark.sparkContext.master.startswith("local"):
        return
    makedirs(url)
    probe = join(url, f".esmm-probe-{uuid.uuid4().hex[:12]}")
    write_bytes(probe, b"probe")
    path = local_path(probe)
    try:
        n = max(2, spark.sparkContext.defaultParallelism)
        seen = (spark.sparkContext.parallelize(range(n), n)
                .map(lambda _: (__import__("socket").gethostname(), __import__("os").path.exists(path)))
                .distinct().collect())
    finally:
        delete(probe)
    blind = sorted(h for h, ok in seen if not ok)
    if blind:
        raise NotSharedError(f"{display(url)} is a local path that the executors on {', '.join(blind)} cannot see: on "
                           f"a cluster every configured path must be shared storage (an NFS mount on every host, or "
                           f"an hdfs://, s3a://, gs:// or abfs:// URL)")
