import numpy as np
import pytest
from pyspark.sql import functions as F

from esmm.config import load_config
from esmm.features import FeatureLayout, bucket_of, encode_line_features, hash_ids, spark_hash_long


def test_python_hash_equals_spark_xxhash64(spark):
    rng = np.random.default_rng(0)
    ids = np.concatenate([[0, 1, -1, 2**62, -(2**63), 2**63 - 1], rng.integers(-(2**63), 2**63 - 1, 300)])
    rows = [(int(fi), int(x)) for fi in (0, 5, 22) for x in ids]
    df = spark.createDataFrame(rows, "fi int, x long")
    got = df.select("fi", "x", F.xxhash64("fi", "x").alias("h"),
                    (F.pmod(F.xxhash64("fi", "x"), F.lit(999)) + 1).alias("b")).collect()
    for r in got:
        assert spark_hash_long(r.fi, r.x) == r.h
        assert bucket_of(r.fi, r.x, 1000) == r.b
    for fi in (0, 5, 22):
        sub = [r for r in got if r.fi == fi]
        vec = hash_ids(fi, np.array([r.x for r in sub], dtype=np.int64), 1000)
        assert vec.tolist() == [r.b for r in sub]


def test_buckets_are_in_range_and_spread():
    b = hash_ids(3, np.arange(100_000), 101)
    assert b.min() >= 1 and b.max() <= 100
    counts = np.bincount(b, minlength=101)[1:]
    assert counts.min() > 800 and counts.max() < 1200  # ~1000 each for a decent hash


def test_layout_and_reference_encoding():
    cfg = load_config(None, ["features.max_len={'109_14': 3}"])
    lay = FeatureLayout.from_config(cfg.features)
    assert lay.num_fields == 23
    assert lay.num_slots == sum(cfg.features.max_len.values())
    i = lay.field_index("109_14")
    entries = [("109_14", 10, 2.0), ("109_14", 11, 6.0), ("109_14", 12, 1.0), ("109_14", 13, 1.0), ("101", 5, 1.0)]
    ids, wts = encode_line_features(lay, entries)
    s = lay.slot_starts[i]
    off = lay.offsets[i]
    # top-3 by value, ties broken by the smaller feature id: 11 (6.0), 10 (2.0), 12 (1.0); weights = value / 9
    assert ids[s:s + 3] == [off + bucket_of(i, f, lay.buckets[i]) for f in (11, 10, 12)]
    assert wts[s:s + 3] == pytest.approx([6 / 9, 2 / 9, 1 / 9])
    # a missing field gets its reserved bucket 0 with weight 1 in the first slot, padding after
    j = lay.field_index("110_14")
    assert ids[lay.slot_starts[j]:lay.slot_starts[j] + lay.max_len[j]] == [lay.offsets[j]] * lay.max_len[j]
    assert wts[lay.slot_starts[j]:lay.slot_starts[j] + lay.max_len[j]] == [1.0] + [0.0] * (lay.max_len[j] - 1)
