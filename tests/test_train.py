"""Training on real Petastorm readers and real Horovod processes, on the tiny generated dataset."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import schemas as S
from esmm.config import load_config
from esmm.data import Prefetch, _chunks, shuffled_batches, steps_per_epoch, subset_rows, tier_for_rate, train_stream
from esmm.artifacts import EXPORT, SUMMARY, load_export, read_manifest
from esmm import storage
from esmm.train import launch, list_checkpoints, train
from esmm.validation import find_split, train_rows

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def small(cfg_path, **sets):
    over = [f"{k}={v}" for k, v in sets.items()]
    return load_config(cfg_path, over)


@pytest.fixture(scope="module")
def conf():
    return ROOT / "conf" / "test.yaml"


def test_shards_cover_the_subset_exactly_once(tiny_dataset):
    _, ds = tiny_dataset
    m = read_manifest(ds)
    for rate in (0.5, 1.0):
        tier = tier_for_rate(m, rate)
        seen = []
        for rank in range(2):
            ids = np.concatenate([c[S.SAMPLE_ID] for c in _chunks(f"{ds}/train", tier, rank, 2, seed=3, workers=1,
                                                                    num_epochs=1)])
            seen.append(ids)
        assert len(seen[0]) > 0 and len(seen[1]) > 0
        assert not set(seen[0]) & set(seen[1])                      # disjoint shards
        assert len(seen[0]) + len(seen[1]) == subset_rows(m, "train", rate)
        assert len(set(np.concatenate(seen))) == subset_rows(m, "train", rate)


def test_shuffle_buffer_keeps_every_row_once_and_mixes():
    chunks = [{S.SAMPLE_ID: np.arange(i * 100, (i + 1) * 100), S.CLICK: np.zeros(100, np.int32),
               S.CONVERSION: np.zeros(100, np.int32), S.FEAT_IDS: np.tile(np.arange(i * 100, (i + 1) * 100)[:, None], 3),
               S.FEAT_WTS: np.ones((100, 3), np.float32)} for i in range(7)]
    batches = list(shuffled_batches(iter(chunks), 64, 150, seed=1))
    ids = torch.cat([b.sample_id for b in batches]).numpy()
    assert sorted(ids.tolist()) == list(range(700))
    assert [len(b) for b in batches[:-1]] == [64] * (len(batches) - 1)
    assert all((b.ids[:, 0] == b.sample_id).all() for b in batches)   # rows stay intact
    assert not np.array_equal(ids, np.arange(700))                     # and get mixed
    again = torch.cat([b.sample_id for b in shuffled_batches(iter(chunks), 64, 150, seed=1)]).numpy()
    assert np.array_equal(ids, again)


def test_prefetch_makes_the_same_batches_in_the_same_order(tiny_dataset):
    """``train.prefetch`` moves where batches are made (a background thread), not which: the stream of the real
    Petastorm reader, over more than one pass, is the same with and without it, row for row."""
    _, ds = tiny_dataset
    m = read_manifest(ds)
    n = 2 * -(-subset_rows(m, "train", 1.0) // 64) + 3               # past the end of the second pass

    def first(prefetch):
        stream = train_stream(f"{ds}/train", m, 1.0, 0, 1, 64, 100, seed=5, prefetch=prefetch)
        try:
            return [next(stream) for _ in range(n)]
        finally:
            stream.close()
    plain, ahead = first(0), first(3)
    assert len(plain) == len(ahead) == n
    for a, b in zip(plain, ahead):
        assert torch.equal(a.sample_id, b.sample_id) and torch.equal(a.ids, b.ids) and torch.equal(a.wts, b.wts)
        assert torch.equal(a.click, b.click) and torch.equal(a.conversion, b.conversion)


def test_list_columns_come_as_petastorm_makes_them_without_its_per_row_step(tiny_dataset, tmp_path):
    """``_ColumnResults`` (flat values reshaped) gives the arrays, dtypes and order of Petastorm's own conversion
    (``to_pandas`` + ``np.vstack``) on the real reader; a list column of uneven widths is a DataError naming it."""
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq
    from petastorm import make_batch_reader

    from esmm.data import READ_COLUMNS, DataError, dataset_url
    _, ds = tiny_dataset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with make_batch_reader(dataset_url(f"{ds}/train"), schema_fields=READ_COLUMNS, shuffle_row_groups=True,
                               seed=3, num_epochs=1, workers_count=1, reader_pool_type="thread") as reader:
            stock = [{c: getattr(ch, c) for c in READ_COLUMNS} for ch in reader]
    ours = list(_chunks(f"{ds}/train", None, 0, 1, seed=3, workers=1, num_epochs=1))
    assert len(stock) == len(ours) > 1
    for a, b in zip(stock, ours):
        for c in READ_COLUMNS:
            assert a[c].dtype == b[c].dtype and a[c].shape == b[c].shape and np.array_equal(a[c], b[c]), c
    assert ours[0][S.FEAT_IDS].ndim == 2

    bad = tmp_path / "ragged"
    bad.mkdir()
    pq.write_table(pa.table({S.SAMPLE_ID: [1, 2], S.CLICK: [0, 1], S.CONVERSION: [0, 0],
                             S.FEAT_IDS: [[1, 2, 3], [4, 5]], S.FEAT_WTS: [[1.0, 1.0, 1.0], [1.0, 1.0]]}),
                   bad / "part-0.parquet")
    with pytest.raises(DataError, match=r"column 'feat_(ids|wts)': every row must hold a list of one width "
                                        r"\(widths 2 to 3"):
        list(_chunks(str(bad), None, 0, 1, seed=3, workers=1, num_epochs=1))


def test_prefetch_raises_the_sources_error_in_place_and_closes_the_source():
    closed = []

    def source(fail_at):
        try:
            for i in range(10):
                if i == fail_at:
                    raise ValueError(f"bad row group {i}")
                yield i
        finally:
            closed.append(fail_at)

    p = Prefetch(source(3), depth=2)
    assert [next(p), next(p), next(p)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad row group 3"):
        next(p)
    with pytest.raises(StopIteration):                               # the stream ends at the error
        next(p)
    p.close()
    assert closed == [3] and not p._thread.is_alive()

    p = Prefetch(source(None), depth=2)                              # a source that ends: every item, then the end
    assert list(p) == list(range(10))
    p.close()
    assert closed == [3, None]

    p = Prefetch(source(99), depth=1)                                # closed while its thread waits on a full queue
    assert next(p) == 0
    p.close()
    assert closed == [3, None, 99] and not p._thread.is_alive()
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Prefetch(iter([]), depth=0)


def test_fixed_steps_per_epoch():
    assert steps_per_epoch(1000, 100, 2) == 5
    assert steps_per_epoch(1001, 100, 2) == 6
    assert steps_per_epoch(10, 100, 4) == 1


def _params(path):
    model, blob = load_export(path)
    return {k: v.clone() for k, v in model.state_dict().items()}, blob


def test_same_seed_same_parameters_and_export_contents(tiny_dataset, conf, tmp_path):
    _, ds = tiny_dataset
    cfg = small(conf, **{"train.method": "esmm"})
    a = train(cfg, ds, str(tmp_path / "a"))
    b = train(cfg, ds, str(tmp_path / "b"))
    pa, blob = _params(tmp_path / "a" / EXPORT)
    pb, _ = _params(tmp_path / "b" / EXPORT)
    split = find_split(f"{ds}/train", read_manifest(ds), cfg.train.validation_share)   # on by default
    assert a["rows"] == train_rows(read_manifest(ds), split, 1.0) == subset_rows(read_manifest(ds), "train", 1.0) - \
        split["rows"]
    assert a["steps"] == b["steps"] == steps_per_epoch(a["rows"], 256, 1)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert blob["method"] == "esmm" and blob["config"]["train"]["method"] == "esmm"
    assert blob["layout"]["num_embeddings"] == read_manifest(ds)["layout"]["num_embeddings"]
    summary = json.loads((tmp_path / "a" / SUMMARY).read_text())
    assert summary["history"] and np.isfinite(summary["last"]["loss"])


def test_resume_after_interruption_equals_uninterrupted(tiny_dataset, conf, tmp_path):
    _, ds = tiny_dataset
    cfg = small(conf, **{"train.method": "aman", "train.checkpoint_every": 4, "train.epochs": 2})
    full = train(cfg, ds, str(tmp_path / "full"))
    part = train(cfg, ds, str(tmp_path / "cut"), stop_at_step=7)       # "crash" after step 7: last checkpoint is 4
    assert part["steps"] == 7 and not (tmp_path / "cut" / EXPORT).exists()
    (step, path), = list_checkpoints(str(tmp_path / "cut"))
    assert step == 4 and torch.load(storage.local_path(path), weights_only=True)["step"] == 4
    resumed = train(cfg, ds, str(tmp_path / "cut"))
    assert resumed["steps"] == full["steps"] and resumed["steps_this_run"] == full["steps"] - 4
    pf, _ = _params(tmp_path / "full" / EXPORT)
    pr, _ = _params(tmp_path / "cut" / EXPORT)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)


def test_unbias_needs_the_reference_ctr_network(tiny_dataset, conf, tmp_path):
    _, ds = tiny_dataset
    cfg = small(conf, **{"train.method": "unbias", "paths.runs": str(tmp_path)})
    with pytest.raises(Exception, match="reference CTR network"):
        train(cfg, ds, str(tmp_path / "unbias"))
    train(small(conf, **{"train.method": "ctr"}), ds, str(tmp_path / "ctr"))
    out = train(cfg, ds, str(tmp_path / "unbias"))
    assert np.isfinite(out["last"]["loss"])


def test_runs_side_by_side_train_the_same_models_as_one_after_another(spark, tiny_dataset, conf, tmp_path):
    """experiment.parallel_runs: each run in its own Spark task (its own Python worker) trains bit for bit what the
    driver trains when the runs go one after another; UNBIAS starts after the reference CTR network it reads; a run
    that cannot start fails with its own error class, naming it, after the others have finished."""
    from esmm.outputs import OutputError
    _, ds = tiny_dataset
    ctr_dir = str(tmp_path / "{}" / "ctr")
    jobs = lambda where: [(small(conf, **{"train.method": m, "train.ctr_model": f"{ctr_dir.format(where)}/{EXPORT}"}),
                           ds, str(tmp_path / where / m)) for m in ("ctr", "unbias", "esmm")]
    one = launch(jobs("one"), 1, spark)
    two = launch(jobs("two"), 1, spark, parallel=2)
    assert [s["method"] for s in two] == ["ctr", "unbias", "esmm"]
    for m, a, b in zip(("ctr", "unbias", "esmm"), one, two):
        assert a["steps"] == b["steps"] > 0 and a["last"] == b["last"], m
        pa, _ = _params(tmp_path / "one" / m / EXPORT)
        pb, _ = _params(tmp_path / "two" / m / EXPORT)
        assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa), m
    foreign = tmp_path / "three" / "esmm"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"three/esmm.* not created by esmm-spark"):
        launch(jobs("three"), 1, spark, parallel=2)
    assert (tmp_path / "three" / "unbias" / EXPORT).exists() and (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(Exception, match="train each run with one worker"):
        launch(jobs("four"), 2, spark, parallel=2)


def test_side_by_side_unbias_waits_for_its_own_units_ctr_network(conf):
    """The schedule of experiment.parallel_runs: each unit's UNBIAS waits for that unit's reference CTR network."""
    from esmm.config import to_dict
    from esmm.experiment import config_for, unit_specs
    from esmm.train import dependencies
    cfg = small(conf, **{"experiment.methods": "[base, unbias, esmm]", "etl.sampling_rates": "[0.5, 1.0]"})
    specs = unit_specs(cfg, 0, 1.0) + unit_specs(cfg, 0, 0.5)
    payload = [(to_dict(config_for(cfg, s, "/exp")), "/ds", storage.resolve(s.run_dir("/exp"))) for s in specs]
    name = lambda i: "/".join(payload[i][2].split("/")[-2:])
    assert {name(i): [name(j) for j in js] for i, js in dependencies(payload).items()} == \
        {"r0-rate1.0/unbias": ["r0-rate1.0/ctr"], "r0-rate0.5/unbias": ["r0-rate0.5/ctr"]}
    assert dependencies(payload[1:4]) == {}      # its network not among the jobs: the run checks the export itself


def _horovodrun(np_, args, env=None):

    cmd = [str(VENV_BIN / "horovodrun"), "-np", str(np_), "--gloo", sys.executable] + args
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_two_horovod_processes_match_one_process_on_the_same_global_batches(tiny_dataset, conf, tmp_path):
    # every registered method (the paper's, the reference CTR network and the successors), in one horovodrun. AMAN
    # is the exception by design: each rank draws its own uniforms for its slice of un-clicked rows, so 2 ranks keep
    # another random subset than 1 process (equal in distribution, not in value)
    from esmm.methods import METHODS
    _, ds = tiny_dataset
    script = str(ROOT / "tests" / "hvd_equivalence.py")
    names = [m for m in METHODS if m != "aman"]
    methods = ",".join(names)
    _horovodrun(2, [script, ds, str(conf), str(tmp_path / "two"), "256", "6", methods])
    subprocess.run([sys.executable, script, ds, str(conf), str(tmp_path / "one"), "256", "6", methods],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    waited = json.loads((tmp_path / "two.wait.json").read_text())
    # a rank waiting for a late one sleeps between polls instead of spinning a core (Horovod's own wait: about its
    # whole wall time in CPU), and the training below equals the 1-process run with that wait in place
    assert waited["size"] == 2 and waited["wall_s"] > 0.4 and waited["cpu_s"] < 0.25 * waited["wall_s"], waited
    for method in names:
        r0 = torch.load(tmp_path / f"two.{method}.rank0.pt")
        r1 = torch.load(tmp_path / f"two.{method}.rank1.pt")
        one = torch.load(tmp_path / f"one.{method}.rank0.pt")
        assert all(torch.equal(r0[k], r1[k]) for k in r0), method                # ranks stay identical
        for k in r0:                                                            # and equal the 1-process run
            assert torch.allclose(r0[k], one[k], atol=2e-5, rtol=1e-4), (method, k)
        init = torch.load(tmp_path / f"one.{method}.init.pt")
        assert all(not torch.equal(init[k], one[k]) for k in one), method        # every tensor was trained


# test_horovodrun_job_trains_and_exports: in tests/test_train_faults.py, on the 2-rank horovodrun launch its scenarios share


def test_horovod_spark_run_two_workers(spark, tiny_dataset, conf, tmp_path):
    _, ds = tiny_dataset
    cfg = small(conf, **{"train.method": "esmm", "train.workers": 2})
    out = launch([(cfg, ds, str(tmp_path / "spark_run"))], 2, spark)
    assert len(out) == 1 and out[0]["world_size"] == 2 and out[0]["steps"] > 0
    assert (tmp_path / "spark_run" / EXPORT).exists()


def test_a_dataset_replaced_during_training_stops_the_next_pass(tiny_dataset, tmp_path):
    """Readers pin what they read: every pass over the train split first checks the dataset's committed run id, so an
    `etl --overwrite` between two passes stops training instead of mixing two datasets."""
    import shutil

    from conftest import recommit
    from esmm.artifacts import read_manifest
    from esmm.data import _passes
    from esmm.outputs import InputChanged
    ds = str(tmp_path / "ds")
    shutil.copytree(tiny_dataset[1], ds)
    m = read_manifest(ds)
    first_tier = int(m["splits"]["train"]["subsets"][str(m["sampling_rates"][0])]["rows"])
    chunks = _passes(storage.join(ds, "train"), 0, 0, 1, seed=1, workers=1, pin=(ds, m["run_id"]))
    seen = 0
    while seen < first_tier:                       # the whole first pass reads
        seen += len(next(chunks)["sample_id"])
    assert seen == first_tier
    recommit(ds, "dataset-rebuilt")                # what an ETL --overwrite commits meanwhile
    with pytest.raises(InputChanged, match=r"changed while training read it .*-> dataset-rebuilt"):
        next(chunks)
