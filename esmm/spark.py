"""Spark session construction and small Hadoop-filesystem helpers (atomic commit by rename)."""
from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def get_spark(spark_cfg, app_name: str | None = None) -> SparkSession:
    """Get or create the session. Under spark-submit the master comes from the submit command; otherwise from config."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
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
    fs, p = _fs(spark, path)
    out = fs.create(p, True)
    try:
        out.write(bytearray(text.encode("utf-8")))
    finally:
        out.close()


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
