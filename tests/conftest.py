import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # on sys.path through pytest.ini's pythonpath
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYTHONPATH", str(ROOT))
# every Spark JVM of the test run, in this process or a job it starts, reads tests/spark-conf/spark-defaults.conf
os.environ.setdefault("SPARK_CONF_DIR", str(ROOT / "tests" / "spark-conf"))
# petastorm on pyarrow 14 uses the legacy ParquetDataset API; silence exactly those FutureWarnings.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")
warnings.filterwarnings("ignore", category=FutureWarning, module="pyarrow")


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    """One real local[2] Spark session for the whole test run (UI off, temp dirs under pytest's tmp)."""
    from pyspark.sql import SparkSession

    from esmm.spark import DAEMON_MODULE, DAEMON_MODULE_KEY
    local = tmp_path_factory.mktemp("spark-local")
    s = (SparkSession.builder.master("local[2]").appName("esmm-tests")
         .config("spark.ui.enabled", "false")
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.sql.shuffle.partitions", "4")
         .config("spark.default.parallelism", "4")
         .config("spark.local.dir", str(local))
         .config("spark.sql.warehouse.dir", str(local / "wh"))
         .config("spark.driver.memory", "2g")
         .config("spark.sql.execution.arrow.pyspark.enabled", "true")
         .config(DAEMON_MODULE_KEY, DAEMON_MODULE)                     # as every session of the project (esmm.spark)
         # The suite runs on 2 pytest-xdist workers (Makefile), each with this session, and is CPU-bound there: this
         # JVM takes tests/spark-conf's flags as well (C1 compiler, serial GC) and evaluates expressions without
         # generating classes (each new query otherwise compiles Java classes that the JIT compiles again for a few
         # tiny batches). Measured on make test's suite, 2 workers, quiet: 775 -> 673 CPU-s, 399 s -> 353 s wall
         # for the flags. (Run alone, one pytest process, the default compilers finish sooner: C2 then works on the
         # idle core.) The jobs the tests start as processes keep Spark's code generation.
         .config("spark.sql.codegen.wholeStage", "false")
         .config("spark.sql.codegen.factoryMode", "NO_CODEGEN")
         .getOrCreate())
    s.sparkContext.setLogLevel("ERROR")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def cfg():
    from esmm.config import load_config
    return load_config(ROOT / "conf" / "test.yaml")


@pytest.fixture(scope="session")
def tiny_dataset(spark, cfg, tmp_path_factory):
    """Generated raw log (conf/test.yaml) -> ETL dataset, built once per test run. Returns (raw, dataset).

    Under pytest-xdist the workers share one copy (in the run's common temp directory): the first to need it builds
    it while holding a file lock, the others wait for it and read it. Tests only read it (a test that changes a
    dataset copies it first), so one copy serves every worker."""
    import fcntl

    from esmm.etl import run_etl
    from esmm.generator import generate
    from esmm.outputs import is_committed
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny"
    root.mkdir(exist_ok=True)
    raw, ds = str(root / "raw"), str(root / "dataset")
    with open(root.parent / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                   # released when the file closes, or the holder dies
        if not (is_committed(raw) and is_committed(ds)):
            generate(spark, cfg, raw)
            run_etl(spark, cfg, raw, ds)
    return raw, ds


def recommit(path, run_id=None) -> None:
    """Commit an output a test changed by hand (a dataset copy with rewritten files, a new run id in its manifest)."""
    from esmm import outputs as O
    O.recommit(str(path), run_id)


# make test's files, slowest first (their time on 2 xdist workers, `--durations`): with `--dist loadfile` xdist hands
# out whole files, largest number of tests first, so a slow file with few tests (the standalone cluster's) started
# last and ran alone at the end. Handing the slowest out first lets the quick files fill the other worker's tail.
# Only the order changes, never what runs; a file not listed goes after these, in xdist's order.
SLOWEST_FIRST = ("tests/test_cluster.py", "tests/test_evaluate.py", "tests/test_train.py", "tests/test_etl.py",
                 "tests/test_train_faults.py", "tests/test_delong.py", "tests/test_pipeline.py", "tests/test_predict.py",
                 "tests/test_fuzz.py", "tests/test_gauc.py", "tests/test_validation.py")
_RANK = {f: i for i, f in enumerate(SLOWEST_FIRST)}


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SlowestFirst(LoadFileScheduling):
        def _assign_work_unit(self, node):
            for scope in sorted(self.workqueue, key=lambda s: _RANK.get(s, len(_RANK))):   # stable: xdist's order next
                self.workqueue.move_to_end(scope)
            super()._assign_work_unit(node)

    return SlowestFirst(config, log)
