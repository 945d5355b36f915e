"""A non-``file`` scheme served by the Hadoop jars pyspark ships: ``viewfs://`` with a mount table onto a local
directory. The storage layer's Hadoop backend (driver-side files) and the Spark-side stages (generate, ETL with
Spark's Parquet writer) run on it; every output lands, committed, where the mount table points."""
import json

import pytest

from esmm import outputs as O
from esmm import storage


@pytest.fixture
def viewfs(spark, tmp_path, monkeypatch):
    backing = tmp_path / "backing"
    backing.mkdir()
    conf = spark._jsc.hadoopConfiguration()
    cluster = f"esmm{abs(hash(str(tmp_path))) % 10**8}"   # a mount table of this test's own (Hadoop caches per authority)
    conf.set(f"fs.viewfs.mounttable.{cluster}.link./data", f"file://{backing}")
    monkeypatch.setattr(storage, "_SPARK", spark)
    return f"viewfs://{cluster}/data", backing


def test_hadoop_backend_round_trips_files(viewfs):
    url, backing = viewfs
    assert storage._fs(url).__class__.__name__ == "_HadoopFS"
    storage.write_json(f"{url}/a/r.json", {"k": 1})
    assert json.loads((backing / "a" / "r.json").read_text()) == {"k": 1}
    assert storage.read_json(f"{url}/a/r.json") == {"k": 1} and storage.listdir(url) == ["a"]
    assert storage.isdir(f"{url}/a") and storage.isfile(f"{url}/a/r.json") and not storage.exists(f"{url}/b")
    assert storage.create_exclusive(f"{url}/lock", b"1") and not storage.create_exclusive(f"{url}/lock", b"2")
    storage.rename(f"{url}/a", f"{url}/b")
    assert storage.walk(url).keys() == {"b/r.json", "lock"}
    with O.Output(f"{url}/out", "dataset", {"v": 1}, "test") as o:                 # the lease lock, then a commit
        assert o.lock.lease
        storage.write_bytes(storage.join(o.stage(), "part-0"), b"xyz")
        o.commit()
    assert O.is_committed(f"{url}/out") and (backing / "out" / "part-0").read_bytes() == b"xyz"
    assert not (backing / "out.lock").exists()


def test_generate_and_etl_on_viewfs(spark, cfg, viewfs):
    import dataclasses

    from esmm.etl import run_etl
    from esmm.generator import generate
    url, backing = viewfs
    c = dataclasses.replace(cfg, etl=dataclasses.replace(cfg.etl, writer="spark"))
    g = generate(spark, c, f"{url}/raw")
    m = run_etl(spark, c, f"{url}/raw", f"{url}/ds")
    assert g["files"] and m["rows"]["written"] + m["rows"]["skeleton_quarantined"] == m["rows"]["skeleton_read"]
    assert O.is_committed(f"{url}/raw") and O.is_committed(f"{url}/ds")
    assert O.is_committed(str(backing / "ds"))                                      # the same files, seen locally
    assert json.loads((backing / "ds" / "manifest.json").read_text())["run_id"] == m["run_id"]
    assert m["raw_run_id"] == g["run_id"]
    assert run_etl(spark, c, f"{url}/raw", f"{url}/ds")["run_id"] == m["run_id"]    # up to date: reused
    assert sorted(p.name for p in backing.iterdir()) == ["ds", "raw"]
