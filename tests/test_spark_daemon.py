"""esmm.spark_daemon: the session's Python workers are forked by it, and on Python 3.11 they re-read a zip archive's
directory before a task only when the archive changed (checked inside a real Spark task)."""
import sys


def _probe(archive: str):
    def run(_):
        import importlib
        import os
        import zipfile
        import zipimport

        patch = zipimport.zipimporter.invalidate_caches
        patched = getattr(patch, "_esmm", False)
        # the daemon ran esmm.spark_daemon as its main module: the patch's globals are that module's
        owner = patch.__globals__.get("__file__", "") if patched else ""
        reads, reload = [], patch.__globals__["_reload"] if patched else None
        if patched:
            patch.__globals__["_reload"] = lambda self: (reads.append(os.path.basename(self.archive)), reload(self))[1]
        try:
            importlib.invalidate_caches()                  # as before every task: the path's archives are unchanged
            unchanged = list(reads)
            with zipfile.ZipFile(archive, "w") as z:
                z.writestr("esmm_probe_a.py", "A = 1\n")
            sys.path.insert(0, archive)
            import esmm_probe_a
            with zipfile.ZipFile(archive, "w") as z:       # the archive changes: its directory must be read again
                z.writestr("esmm_probe_a.py", "A = 1\n")
                z.writestr("esmm_probe_b.py", "B = 2\n")
            importlib.invalidate_caches()
            import esmm_probe_b
            yield patched, unchanged, reads[len(unchanged):], esmm_probe_a.A + esmm_probe_b.B, owner
        finally:
            if patched:
                patch.__globals__["_reload"] = reload
            sys.path.remove(archive)
            sys.modules.pop("esmm_probe_a", None)
            sys.modules.pop("esmm_probe_b", None)
    return run


def test_workers_reread_only_changed_zip_archives(spark, tmp_path):
    spark.range(4).count()                                 # a task has run: the daemon and a worker exist
    ((patched, unchanged, changed, total, owner),) = spark.sparkContext.parallelize([0], 1).mapPartitions(
        _probe(str(tmp_path / "probe.zip"))).collect()
    assert patched == (sys.version_info < (3, 12))
    assert owner.endswith("esmm/spark_daemon.py") or not patched   # patched by the daemon that forked the worker
    assert total == 3                                    # the module added to the changed archive was found
    if patched:
        assert unchanged == []                           # pyspark.zip, py4j's zip, spark-core's jar: not re-read
        assert changed == ["probe.zip"]                  # read again once, by the one importer of that archive
