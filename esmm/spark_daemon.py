"""The Python daemon module of every Spark session the project starts (``spark.python.daemon.module``).

It is ``pyspark.daemon``, which forks the Python workers, with one fix for Python 3.11: before each task the worker calls
``importlib.invalidate_caches()`` (``setup_spark_files``), and on 3.11 every ``zipimporter`` in
``sys.path_importer_cache`` then reads its archive's whole directory again, eagerly. A PySpark worker holds about
twenty of them: one per package directory of ``pyspark.zip`` (1,220 entries), ``spark-core``'s jar (5,264), the
py4j zip and, on a cluster, the code zip, so every task paid about 80 ms of CPU before it started. On the test suite's
tiny tasks that was 40 of the workers' 60 busy CPU-seconds over tests/test_etl.py and tests/test_evaluate.py.
Python 3.12 made the reload lazy (CPython gh-103200); here an archive's directory is read again only when the file
changed (its size or modification time), which is what the reload is for. On 3.12 and later nothing is patched.

Installed by :func:`esmm.spark.get_spark` (and the test session) as ``spark.python.daemon.module``: Spark starts
``python -m esmm.spark_daemon pyspark.worker``, which patches ``zipimport`` and runs ``pyspark.daemon`` as its main
module; the workers it forks inherit the patch. (``spark.python.worker.module`` cannot carry it: the daemon only
imports worker modules named ``pyspark*``.) Without the daemon (``spark.python.use.daemon=false``) nothing changes.
"""
from __future__ import annotations

import os
import sys
import zipimport

_read_at: dict[str, tuple[int, int] | None] = {}   # archive -> (mtime_ns, size) when its directory was last read


def _invalidate_if_changed(self) -> None:
    """``zipimporter.invalidate_caches`` that skips an archive unchanged since this process last read it."""
    try:
        st = os.stat(self.archive)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    if stamp is not None and _read_at.get(self.archive) == stamp:
        return
    _reload(self)
    _read_at[self.archive] = stamp


if sys.version_info < (3, 12) and not getattr(zipimport.zipimporter.invalidate_caches, "_esmm", False):
    _reload = zipimport.zipimporter.invalidate_caches
    _invalidate_if_changed._esmm = True
    zipimport.zipimporter.invalidate_caches = _invalidate_if_changed

if __name__ == "__main__":
    import runpy
    runpy.run_module("pyspark.daemon", run_name="__main__", alter_sys=True)
