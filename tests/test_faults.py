"""Fault injection with real processes on the tiny log (bench/faults.py runs the same scenarios at demo size):
kill -9 the ETL mid-write, two ETLs racing for one output, kill -9 the experiment mid-unit, a dead lock holder and
four racers. The commit-step kills and the user's files beside outputs are tested on the lifecycle itself
(tests/test_outputs.py) and the ETL (tests/test_etl.py); bench/faults.py runs them through every job."""
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import faults as F  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ctx(tiny_dataset, tmp_path_factory):
    """The session's tiny raw log and its ETL (built in-process with the same conf/test.yaml) as the reference."""
    c = F.Ctx(str(tmp_path_factory.mktemp("faults")), os.path.join(ROOT, "conf", "test.yaml"),
              ["spark.shuffle_partitions=4", "spark.master=local[2]"])
    c.raw = tiny_dataset[0]
    shutil.copytree(tiny_dataset[1], c.path("dataset-ref"))
    return c


def test_etl_killed_mid_write_reruns_to_the_same_dataset(ctx):
    r = F.etl_kill(ctx)
    assert r["ok"], r
    assert r["rows_lost"] == 0 and "identical" in r["outcome"]


def test_two_concurrent_etls_one_writer(ctx):
    r = F.concurrent_etl(ctx)
    assert r["ok"], r
    assert r["rows_lost"] == 0


def test_experiment_killed_mid_unit_reruns_to_the_same_table(ctx, spark):
    from esmm.config import load_config
    from esmm.experiment import run_experiment
    sets = ["experiment.methods=[esmm]", "experiment.figure_rates=[1.0]"]
    cfg = load_config(ctx.conf, ctx.sets + sets)
    r = F.experiment_kill(ctx, sets, reference=lambda ds, exp, truth: run_experiment(spark, cfg, ds, exp, truth))
    assert r["ok"], r


def test_a_dead_holders_lock_goes_to_exactly_one_racer(ctx):
    r = F.lock_takeover(ctx)
    assert r["ok"], r
