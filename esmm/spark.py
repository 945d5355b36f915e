"""Spark session construction and small Hadoop-filesystem helpers: atomic commit by rename, ownership markers,
one-writer locks and stale-staging cleanup for outputs on any Hadoop filesystem (``esmm.outputs`` explains the
rules; on the local filesystem these delegate to it)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def get_spark(spark_cfg, app_name: str | None = None) -> SparkSession:
    """Get or create the session. Under spark-submit the master comes from the submit command; otherwise from config.

    Local Python workers (and the Horovod workers they start) are this interpreter with :func:`code_root` on their
    PYTHONPATH, so the code they import is the driver's: a checkout or an installed package alike."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with_code_root()
    builder = SparkSession.builder.appName(app_name or spark_cfg.app_name)
    if "spark.master" not in _submit_conf():
        builder = builder.master(spark_cfg.master).config("spark.driver.memory", spark_cfg.driver_memory)
    spark = (builder
             .config("spark.sql.shuffle.partitions", str(spark_cfg.shuffle_partitions))
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    return spark


def code_root() -> str:
    """The directory holding the ``esmm`` and ``schemas`` packages this process imported (the checkout's root, or
    site-packages for ``pip install .``)."""
    import esmm
    return os.path.dirname(os.path.dirname(os.path.abspath(esmm.__file__)))


def with_code_root() -> None:
    """Put :func:`code_root` first on this process's PYTHONPATH (the environment its child processes inherit; the
    project never edits ``sys.path``)."""
    import site
    root = code_root()
    if root in site.getsitepackages() + [site.getusersitepackages()]:
        return  # an installed package: every process of this interpreter imports it already
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not parts or os.path.abspath(parts[0]) != root:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + [p for p in parts if os.path.abspath(p) != root])


def _submit_conf() -> dict:
    """Spark conf passed by spark-submit (visible to the driver before the session starts)."""
    conf = {}
    for item in os.environ.get("PYSPARK_SUBMIT_ARGS", "").split("--conf")[1:]:
        k, _, v = item.strip().partition("=")
        conf[k] = v
    if os.environ.get("SPARK_ENV_LOADED") or os.environ.get("PYSPARK_GATEWAY_PORT"):
        conf["spark.master"] = "submitted"
    return conf


def _fs(spark: SparkSession, path: str):
    jvm = spark._jvm
    p = jvm.org.apache.hadoop.fs.Path(path)
    return p.getFileSystem(spark._jsc.hadoopConfiguration()), p


def exists(spark: SparkSession, path: str) -> bool:
    fs, p = _fs(spark, path)
    return bool(fs.exists(p))


def delete(spark: SparkSession, path: str) -> None:
    fs, p = _fs(spark, path)
    if fs.exists(p):
        fs.delete(p, True)


def rename(spark: SparkSession, src: str, dst: str) -> None:
    """Atomic on HDFS and local filesystems (a directory rename); fails loudly if the rename is refused."""
    fs, s = _fs(spark, src)
    _, d = _fs(spark, dst)
    parent = d.getParent()
    if parent is not None and not fs.exists(parent):
        fs.mkdirs(parent)
    if not fs.rename(s, d):
        raise OSError(f"could not rename {src} -> {dst}")


def commit_dir(spark: SparkSession, tmp: str, out: str, replace: bool) -> None:
    """Move a finished staging directory into place; an existing ``out`` is swapped out, then deleted."""
    if replace:
        import uuid
        old = f"{out}.old-{uuid.uuid4().hex[:8]}"
        rename(spark, out, old)
        rename(spark, tmp, out)
        delete(spark, old)
    else:
        rename(spark, tmp, out)


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """Write a small text file (replacing one); on the local filesystem without Hadoop's ``.crc`` side file."""
    local = local_path(spark, path)
    if local is not None:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        with open(local, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    fs, p = _fs(spark, path)
    out = fs.create(p, True)
    try:
        out.write(bytearray(text.encode("utf-8")))
    finally:
        out.close()


def write_success(spark: SparkSession, out: str) -> None:
    """The ``_SUCCESS`` marker (``esmm.outputs.SUCCESS``) of a finished directory, written after everything else;
    on the local filesystem without Hadoop's ``.crc`` side file."""
    from esmm import outputs
    local = local_path(spark, out)
    if local is not None:
        outputs.write_success(local)
    else:
        write_text(spark, f"{out}/{outputs.SUCCESS}", "")


def read_text(spark: SparkSession, path: str) -> str:
    return "\n".join(r.value for r in spark.read.text(path, wholetext=True).collect())


def arrow_uri(spark: SparkSession, path: str) -> str:
    """``path`` fully qualified by Hadoop (relative paths resolved as Spark resolves them), spelled for pyarrow.fs:
    a plain absolute path for the local filesystem, ``s3://`` for ``s3a://``, other URIs (``hdfs://``) as they are."""
    fs, p = _fs(spark, path)
    q = str(fs.makeQualified(p).toString())
    if q.startswith("file:"):
        return "/" + q[len("file:"):].lstrip("/")
    if q.startswith("s3a://"):
        return "s3://" + q[len("s3a://"):]
    return q


# ------------------------------------------------------------------------------------------------ ownership, locks

def local_path(spark: SparkSession, path: str) -> str | None:
    """The local path of ``path`` when it lives on the local filesystem (``file:`` or a plain path), else None."""
    fs, p = _fs(spark, path)
    if fs.getScheme() != "file":
        return None
    from urllib.parse import unquote, urlparse
    return unquote(urlparse(str(fs.makeQualified(p).toUri())).path)  # "my%20dir" -> "my dir"


def read_small(spark: SparkSession, path: str) -> str | None:
    """A small file's text through the Hadoop filesystem, or None when it does not exist."""
    fs, p = _fs(spark, path)
    if not fs.exists(p):
        return None
    stream = fs.open(p)
    try:
        return spark._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
    finally:
        stream.close()


def read_marker(spark: SparkSession, out: str) -> dict | None:
    from esmm.outputs import MARKER
    text = read_small(spark, f"{out}/{MARKER}")
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None


def owned(spark: SparkSession, out: str, kind: str, legacy: str | None = None) -> dict | None:
    """The marker of ``out`` when this project wrote it as ``kind``; None when ``out`` does not exist. A directory
    without the marker is foreign (:class:`esmm.outputs.OutputError`), unless it holds ``legacy`` (the file older
    versions wrote instead: the generator's ``_GENERATED.json``, the ETL's ``manifest.json``)."""
    from esmm.outputs import MARKER, OutputError
    fs, p = _fs(spark, out)
    if not fs.exists(p):
        return None
    if fs.getFileStatus(p).isDirectory() and len(fs.listStatus(p)) == 0:
        fs.delete(p, False)  # an empty directory (made by hand before the first run) holds nothing: adopt it
        return None
    rec = read_marker(spark, out)
    if rec is None:
        if legacy and exists(spark, f"{out}/{legacy}"):
            return {"kind": kind, "legacy": True}
        raise OutputError(f"{out} exists and was not created by esmm-spark (no {MARKER} marker): refusing to write "
                          f"into, replace or delete it; move it away or choose another output path")
    if rec.get("kind") != kind:
        raise OutputError(f"{out} holds a {rec.get('kind')!r} output, not a {kind!r} one: refusing to replace it")
    return rec


def write_marker(spark: SparkSession, out: str, record: dict) -> None:
    from esmm.outputs import MARKER
    write_text(spark, f"{out}/{MARKER}", json.dumps(record, indent=2, sort_keys=True))


def clean_stale_staging(spark: SparkSession, out: str) -> list[str]:
    """Delete ``<out>.tmp-*`` / ``<out>.old-*`` directories left by killed runs (call while holding the lock)."""
    from esmm.outputs import STAGING_RE
    fs, p = _fs(spark, out)
    parent = p.getParent()
    if parent is None or not fs.exists(parent):
        return []
    pat = re.compile(re.escape(p.getName()) + STAGING_RE)
    removed = []
    for st in fs.listStatus(parent):
        name = st.getPath().getName()
        if pat.fullmatch(name):
            fs.delete(st.getPath(), True)
            removed.append(str(st.getPath()))
    if removed:
        log.warning("removed %d stale staging director%s of %s left by an interrupted run: %s", len(removed),
                    "y" if len(removed) == 1 else "ies", out, ", ".join(removed))
    return removed


@contextlib.contextmanager
def output_lock(spark: SparkSession, out: str, job: str):
    """Hold ``<out>.lock`` (exclusive create) while writing ``out``; see ``esmm.outputs.OutputLock``. On a
    non-local filesystem a stale lock cannot be told from a live one: the error names the file to delete."""
    from esmm.outputs import OutputError, OutputLock
    local = local_path(spark, out)
    if local is not None:
        with OutputLock(local, job):
            yield
        return
    fs, p = _fs(spark, out.rstrip("/") + ".lock")
    holder = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "job": job})
    try:
        stream = fs.create(p, False)
    except Exception as e:  # noqa: BLE001 (py4j wraps FileAlreadyExistsException)
        if "FileAlreadyExists" not in str(e) and not fs.exists(p):
            raise
        raise OutputError(f"{out} is being written by another job ({read_small(spark, str(p))}): one writer per "
                          f"output. If that job is gone, delete {p}") from None
    try:
        stream.write(bytearray(holder.encode()))
    finally:
        stream.close()
    try:
        yield
    finally:
        fs.delete(p, False)
