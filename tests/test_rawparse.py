"""The vectorized raw-line parser (esmm/rawparse.py), without Spark: encodings against the plain-Python reference,
reasons worded exactly, number parsing that does not depend on what else is in the chunk, and the byte chunking."""
import random

import numpy as np
import pyarrow as pa
import pytest

import schemas as S
from esmm import rawparse
from esmm.config import load_config
from esmm.etl import _arrow_parser
from esmm.features import FeatureLayout, encode_line_features, spark_hash_long
from esmm.rawparse import SideEncoder, parse_common, parse_skeleton, sort_order, to_float64, to_int64

E, I, V = S.ENTRY_SEP, S.ID_SEP, S.VALUE_SEP
LAYOUT = FeatureLayout.from_config(load_config(None, ["features.max_len={'109_14': 3, '210': 2}"]).features)
CE, SE = SideEncoder(LAYOUT, S.COMMON_FIELDS), SideEncoder(LAYOUT, S.SKELETON_FIELDS)


def fl(entries):
    return E.join(f"{f}{I}{i}{V}{v}" for f, i, v in entries)


def random_entries(rng, fields, n):
    """Entries with repeated fields, tied and zero values, repeated ids and an unknown field now and then."""
    out = []
    for _ in range(n):
        f = rng.choice(fields + ("999",)) if rng.random() < 0.05 else rng.choice(fields)
        out.append((f, rng.choice([rng.randrange(10**12), rng.randrange(5)]), rng.choice(["1.0", "2", "0", "0.5",
                                                                                          "3e0", "7.25"])))
    return out


def test_encoding_equals_python_reference_line_by_line():
    rng = random.Random(7)
    commons = [random_entries(rng, S.COMMON_FIELDS, rng.randrange(0, 40)) for _ in range(60)]
    skels = [random_entries(rng, S.SKELETON_FIELDS, rng.randrange(0, 12)) for _ in range(60)]
    c = parse_common(pa.array([f"{k:016x},{len(e)},{fl(e)}" for k, e in enumerate(commons)]), CE)
    s = parse_skeleton(pa.array([f"{k},1,0,{k:016x},{len(e)},{fl(e)}" for k, e in enumerate(skels)]), SE)
    assert all(r is None for r in c["reason"]) and all(r is None for r in s["reason"])
    for k in range(60):
        want_ids, want_wts = encode_line_features(LAYOUT, [(f, int(i), float(v)) for f, i, v in commons[k] + skels[k]])
        assert np.concatenate([c["ids"][k], s["ids"][k]]).tolist() == want_ids
        # float64 arithmetic then one rounding to float32, like the reference: bit-identical
        assert np.array_equal(np.concatenate([c["wts"][k], s["wts"][k]]), np.array(want_wts, np.float32))
        # user key: the whole hash of the 101 entry the encoding keeps first (highest value, then smallest id)
        users = sorted((-float(v), int(i)) for f, i, v in commons[k] if f == S.USER_FIELD)
        assert c[S.USER_KEY][k] == (spark_hash_long(0, users[0][1]) if users else S.UNKNOWN_USER)
    assert len({int(x) for x in c[S.USER_KEY]}) > 10 and S.UNKNOWN_USER in c[S.USER_KEY]


def test_top_k_ties_and_weights_by_hand():
    # 109_14 keeps 3 of 4: values 5, 3, 3 (tie -> smaller id first), weights 5/11, 3/11, 3/11
    entries = [("109_14", 9, "3"), ("109_14", 4, "1"), ("109_14", 8, "3"), ("109_14", 2, "5"), ("101", 1, "0")]
    line = f"{'a' * 16},5,{fl(entries)}"
    c = parse_common(pa.array([line]), CE)
    k = LAYOUT.field_index("109_14")
    s = LAYOUT.slot_starts[k]
    ids = c["ids"][0][s:s + 3] - LAYOUT.offsets[k]
    from esmm.features import bucket_of
    assert ids.tolist() == [bucket_of(k, 2, LAYOUT.buckets[k]), bucket_of(k, 8, LAYOUT.buckets[k]),
                            bucket_of(k, 9, LAYOUT.buckets[k])]
    assert c["wts"][0][s:s + 3].tolist() == pytest.approx([5 / 11, 3 / 11, 3 / 11])
    # 101 is single-slot: weight 1 even with value 0; an absent field keeps its "missing" slot with weight 1
    assert c["wts"][0][LAYOUT.slot_starts[0]] == 1.0
    j = LAYOUT.field_index("121")
    assert c["ids"][0][LAYOUT.slot_starts[j]] == LAYOUT.offsets[j] and c["wts"][0][LAYOUT.slot_starts[j]] == 1.0


def test_all_zero_values_get_equal_weights():
    line = f"0,1,0,{'a' * 16},2,{fl([('210', 1, '0'), ('210', 2, '0')])}"
    s = parse_skeleton(pa.array([line]), SE)
    j = LAYOUT.field_index("210")
    at = LAYOUT.slot_starts[j] - LAYOUT.slot_starts[LAYOUT.field_index(S.SKELETON_FIELDS[0])]
    assert s["wts"][0][at:at + 2].tolist() == [0.5, 0.5]


KEY = "f" * 16
BAD_SKELETON = {
    "1,0,0": "expected 6 comma-separated columns, got 3",
    f"x,0,0,{KEY},0,": "sample_id: not an integer: 'x'",
    f"1,2,0,{KEY},0,": "click: expected 0 or 1, got '2'",
    f"1,1,,{KEY},0,": "conversion: expected 0 or 1, got ''",
    f"1,0,1,{KEY},0,": "conversion=1 with click=0",
    f"1,0,0,{KEY},1.5,": "feature_num: not an integer: '1.5'",
    f"1,0,0,{KEY},2,{fl([('205', 1, '1')])}": "feature_num=2 but feature_list has 1 entries",
    f"1,0,0,{KEY},0,{fl([('205', 1, '1')])}": "feature_num=0 but feature_list has 1 entries",
    f"1,0,0,{KEY},2,{fl([('205', 1, '1'), ('205', 'x', '1')])}":
        "feature_list entry 2: expected 'field^Bid^Cvalue' with integer id and numeric value, got '205^Bx^C1'",
    f"1,0,0,{KEY},1,205{I}7": "feature_list entry 1: expected 'field^Bid^Cvalue' with integer id and numeric "
                              "value, got '205^B7'",
    f"1,0,0,{KEY},1,{fl([('205', 1, 'inf')])}": "feature_list entry 1: expected 'field^Bid^Cvalue' with integer "
                                                "id and numeric value, got '205^B1^Cinf'",
}


def test_bad_skeleton_lines_get_the_first_reason_in_order():
    good = f"5,1,1,{KEY},1,{fl([('205', 1, '1')])}"
    lines = [good, *BAD_SKELETON, good]
    s = parse_skeleton(pa.array(lines), SE)
    assert s["reason"].tolist() == [None, *BAD_SKELETON.values(), None]
    assert s[S.SAMPLE_ID][0] == 5 and s[S.CLICK][0] == 1 and s[S.CONVERSION][0] == 1
    assert s[S.COMMON_KEY].to_pylist()[:2] == [KEY, None]   # a line with the wrong column count has no key


def test_bad_common_lines():
    lines = [f"{KEY},1,{fl([('101', 3, '1')])}", f"{KEY},1", f"{KEY},one,", f"{KEY},0,", f"{KEY},1,101{I}3{V}1{V}2"]
    c = parse_common(pa.array(lines), CE)
    assert c["reason"].tolist() == [
        None, "expected 3 comma-separated columns, got 2", "feature_num: not an integer: 'one'", None,
        "feature_list entry 1: expected 'field^Bid^Cvalue' with integer id and numeric value, got '101^B3^C1^C2'"]


def test_numbers_do_not_depend_on_the_rest_of_the_chunk():
    ints = ["12", "-3", "007", "+4", " 5", "1.0", "", "123456789012345678", "1234567890123456789"]
    v, ok = to_int64(pa.array(ints))
    assert ok.tolist() == [True, True, True, False, False, False, False, True, False]
    assert v[ok].tolist() == [12, -3, 7, 123456789012345678]
    assert to_int64(pa.array(["12", "-3"]))[0].tolist() == [12, -3]          # the fast path, same values
    floats = ["1.0", "3", ".5", "5.", "-2e1", "+1.5", "nan", "inf", "x", ""]
    v, ok = to_float64(pa.array(floats))
    assert ok.tolist() == [True] * 6 + [False] * 4
    assert v[ok].tolist() == [1.0, 3.0, 0.5, 5.0, -20.0, 1.5]
    fast, fast_ok = to_float64(pa.array(floats[:6]))
    assert fast_ok.all() and fast.tolist() == v[ok].tolist()


def test_mapinarrow_chunking_gives_the_same_rows(monkeypatch):
    rng = random.Random(3)
    lines = [f"{k:016x},{n},{fl(random_entries(rng, S.COMMON_FIELDS, n))}" for k, n in
             ((k, rng.randrange(1, 30)) for k in range(200))]
    batch = pa.RecordBatch.from_arrays([pa.array(lines), pa.array(["f.csv"] * 200), pa.array(["train"] * 200)],
                                       names=["value", "file", "raw_split"])
    whole = pa.Table.from_batches(list(_arrow_parser("common", LAYOUT)([batch])))
    monkeypatch.setattr(rawparse, "CHUNK_BYTES", 1000)
    chunks = list(_arrow_parser("common", LAYOUT)([batch, batch.slice(0, 0)]))
    assert len(chunks) > 10
    assert pa.Table.from_batches(chunks).equals(whole)
    assert whole.num_rows == 200 and whole.column("file").to_pylist() == ["f.csv"] * 200


@pytest.mark.parametrize("case", ["counts", "floats", "wide_ids", "negative_ids", "big_values"])
def test_sort_order_equals_lexsort(case):
    rng = np.random.default_rng(11)
    n = 20000
    group = np.sort(rng.integers(0, 3000, n))
    val = rng.integers(0, 4, n).astype(float)
    fid = rng.integers(0, 50, n)
    if case == "floats":
        val = rng.choice([0.25, 1.0, 0.5, 0.125, 3.0], n) * rng.choice([1, -1], n)
    if case == "wide_ids":
        fid = rng.integers(0, 2**62, n)
    if case == "negative_ids":
        fid = rng.integers(-50, 50, n)
    if case == "big_values":
        val = rng.choice([1.0, 2.0**30, 7.0], n)
    assert np.array_equal(sort_order(group, val, fid), np.lexsort((fid, -val, group)))


def test_dirty_bytes_are_reasons_not_exceptions():
    good = f"5,1,1,{KEY},2,{fl([('205', 1, '1'), ('999', 4, '1')])}"
    dirty = [b"1,0,0," + KEY.encode() + b",1,205" + I.encode() + b"7" + V.encode() + b"\xff\xfe\x80",
             b"\xc0\x80,0,0,x,0,", b"1,0,0,\xed\xa0\x80,0,", b"1,0,0,x,0,,\xe2\x82"]
    lines = [good.encode(), *dirty, good.encode()]
    arr = pa.array(lines, pa.binary()).view(pa.string())          # as Spark hands them over: unvalidated bytes
    s = parse_skeleton(arr, SE)
    assert s["reason"].tolist() == [
        None, "invalid UTF-8 at byte offset 31 (feature_list entry 1)", "invalid UTF-8 at byte offset 0 (sample_id)",
        "invalid UTF-8 at byte offset 6 (common_feature_index)", "invalid UTF-8 at byte offset 11 (column 7)", None]
    clean = parse_skeleton(pa.array([good, good]), SE)
    assert np.array_equal(s["ids"][[0, 5]], clean["ids"]) and np.array_equal(s["wts"][[0, 5]], clean["wts"])
    assert s[S.COMMON_KEY].to_pylist() == [KEY, None, None, None, None, KEY]
    assert s["unknown"].to_pylist() == [["999"], None, None, None, None, ["999"]]


def test_invalid_utf8_finds_exactly_the_bad_lines():
    rng = random.Random(5)
    lines = [f"line {k}".encode() for k in range(2000)]
    bad = sorted(rng.sample(range(2000), 37))
    for k in bad:
        lines[k] = lines[k] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])
    arr = pa.array(lines, pa.binary()).view(pa.string())
    assert rawparse.invalid_utf8(arr).tolist() == bad
    assert rawparse.invalid_utf8(arr.slice(0, 0)).tolist() == []


def test_over_long_lines_and_unknown_fields():
    lines = [f"{KEY},2,{fl([('101', 1, '1'), ('77', 2, '1')])}", f"{KEY},1,{fl([('101', 1, '1')])}"]
    c = parse_common(pa.array(lines), CE, np.array([len(lines[0]), 5000]), 4096)
    assert c["reason"].tolist() == [None, "line is 5000 bytes, over etl.max_line_bytes=4096 (only its first 4096 kept)"]
    assert c["unknown"].to_pylist() == [["77"], None]
    # through the mapInArrow function, whose 4th column is the line's length when the JVM cut it
    batch = pa.RecordBatch.from_arrays([pa.array(lines), pa.array(["f.csv"] * 2), pa.array(["train"] * 2),
                                        pa.array([None, 5000], pa.int32())],
                                       names=["value", "file", "raw_split", "line_bytes"])
    out = pa.Table.from_batches(list(_arrow_parser("common", LAYOUT, max_line_bytes=4096)([batch])))
    assert out.column("reason").to_pylist() == c["reason"].tolist()
    assert out.column("value").to_pylist() == [None, lines[1]]
    assert out.column("unknown_fields").to_pylist() == [["77"], None]
