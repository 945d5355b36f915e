"""Spark session construction. Files, on any filesystem, go through ``esmm.storage``; the session registers itself
there so that the driver reaches Hadoop-only schemes (``hdfs://``, ``viewfs://``) with the cluster's configuration."""
from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

# The Python workers are forked by esmm.spark_daemon: pyspark.daemon without Python 3.11's per-task re-read of every
# zip archive on the path (about 80 ms of CPU per task; see that module)
DAEMON_MODULE_KEY, DAEMON_MODULE = "spark.python.daemon.module", "esmm.spark_daemon"


def get_spark(spark_cfg, app_name: str | None = None) -> SparkSession:
    """Get or create the session. Under spark-submit the master comes from the submit command; otherwise from config.
    Its Python workers are forked by :mod:`esmm.spark_daemon` unless spark-submit names another
    ``spark.python.daemon.module``.

    Local Python workers (and the Horovod workers they start) are this interpreter with :func:`code_root` on their
    PYTHONPATH, so the code they import is the driver's: a checkout or an installed package alike."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with_code_root()
    builder = SparkSession.builder.appName(app_name or spark_cfg.app_name)
    submitted = _submit_conf()
    if "spark.master" not in submitted:
        builder = builder.master(spark_cfg.master).config("spark.driver.memory", spark_cfg.driver_memory)
    if DAEMON_MODULE_KEY not in submitted:   # a module given to spark-submit wins
        builder = builder.config(DAEMON_MODULE_KEY, DAEMON_MODULE)
    spark = (builder
             .config("spark.sql.shuffle.partitions", str(spark_cfg.shuffle_partitions))
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .getOrCreate())
    spark.sparkContext.setLogLevel("WARN")
    from esmm import storage
    storage.use_spark(spark)
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
