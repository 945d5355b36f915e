"""ETL on hand-written raw lines: parsing, encoding, quarantine, accounting, manifest, atomic/idempotent output."""
import json
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import functions as F

import schemas as S
from esmm.config import load_config
from esmm.etl import EtlError, run_etl, sample_tier, sample_tier_py
from esmm.features import FeatureLayout, encode_line_features

S_ROOT = Path(__file__).resolve().parents[1]
E, I, V = S.ENTRY_SEP, S.ID_SEP, S.VALUE_SEP
KA, KB, KC, KD, KX = "a" * 16, "b" * 16, "c" * 16, "d" * 16, "e" * 16


def fl(entries):
    return E.join(f"{f}{I}{i}{V}{v}" for f, i, v in entries)


def common(key, entries, num=None):
    return f"{key},{len(entries) if num is None else num},{fl(entries)}"


def skel(sid, click, conv, key, entries, num=None):
    return f"{sid},{click},{conv},{key},{len(entries) if num is None else num},{fl(entries)}"


A_ENT = [("101", 11, "1.0"), ("109_14", 5, "3.0"), ("109_14", 6, "1.0"), ("109_14", 7, "2.0"), ("124", 2, "1.0")]
S1 = [("205", 1001, "1.0"), ("210", 77, "1.0"), ("210", 78, "1.0"), ("301", 2, "1.0"), ("508", 900, "3.0")]


def write_raw(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    commons = [common(KA, A_ENT), common(KB, [("101", 12, "1.0")]), common(KC, [("101", 13, "1.0")]),
               common(KC, [("101", 14, "1.0")]), common(KD, [("101", 15, "1.0")], num=3)]
    skels = [
        skel(1, 1, 1, KA, S1),                                   # good, multi-valued 210
        skel(2, 0, 0, KB, [("205", 1002, "1.0")]),               # good
        "3,0,0," + KA + ",1",                                    # 5 columns
        skel(4, 0, 0, KA, [("205", 1003, "1.0")], num=2),        # feature_num mismatch
        skel(5, 0, 0, KA, [("205", "x1", "1.0")]),               # unparsable feature id
        skel(6, 0, 0, KX, [("205", 1004, "1.0")]),               # unknown common key
        skel(7, 0, 1, KA, [("205", 1005, "1.0")]),               # conversion without click
        skel(8, 1, 0, KC, [("205", 1006, "1.0")]),               # duplicated common key
        skel(9, 1, 0, KD, [("205", 1007, "1.0")]),               # its common line is malformed
        "",                                                      # empty line
        skel(11, 2, 0, KB, [("205", 1008, "1.0")]),              # click not 0/1
        f"12,0,0,{KB},1,205{I}1009",                             # entry without value separator
    ]
    (raw / "common_features_train.csv").write_text("\n".join(commons) + "\n")
    (raw / "sample_skeleton_train.csv").write_text("\n".join(skels) + "\n")
    (raw / "common_features_test.csv").write_text(common(KA, A_ENT) + "\n")
    (raw / "sample_skeleton_test.csv").write_text(skel(100, 1, 0, KA, [("205", 1001, "1.0")]) + "\n")
    return raw


@pytest.fixture(scope="module")
def etl_out(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("etl")
    raw = write_raw(tmp)
    cfg = load_config(None, ["etl.max_quarantine_share=1.0", "etl.sampling_rates=[0.5, 1.0]"])
    out = tmp / "dataset"
    manifest = run_etl(spark, cfg, str(raw), str(out))
    return cfg, raw, out, manifest


def test_rows_and_accounting(spark, etl_out):
    cfg, raw, out, m = etl_out
    r = m["rows"]
    assert r["skeleton_read"] == 12 + 1
    assert r["written"] == 3
    assert r["skeleton_quarantined"] == 10
    assert r["common_read"] == 6 and r["common_quarantined"] == 3  # both copies of KC, and KD
    train = spark.read.parquet(str(out / "train")).orderBy(S.SAMPLE_ID).collect()
    assert [row[S.SAMPLE_ID] for row in train] == [1, 2]
    assert [(row[S.CLICK], row[S.CONVERSION]) for row in train] == [(1, 1), (0, 0)]
    assert m["splits"]["train"]["rows"] == 2 and m["splits"]["test"]["rows"] == 1
    assert m["splits"]["train"]["clicks"] == 1 and m["splits"]["train"]["conversions"] == 1


def test_quarantine_reasons_name_the_problem(spark, etl_out):
    _, _, out, _ = etl_out
    q = spark.read.parquet(str(out / S.QUARANTINE)).collect()
    by_line = {row[S.Q_LINE].split(",")[0] if row[S.Q_KIND] == "skeleton" else row[S.Q_LINE][:16] + row[S.Q_KIND]:
               row[S.Q_REASON] for row in q}
    assert "expected 6 comma-separated columns, got 5" in by_line["3"]
    assert "feature_num=2 but feature_list has 1 entries" in by_line["4"]
    assert "feature_list entry 1" in by_line["5"] and "x1" in by_line["5"]
    assert KX in by_line["6"] and "no valid common features line" in by_line["6"]
    assert by_line["7"] == "conversion=1 with click=0"
    assert KC in by_line["8"] and KD in by_line["9"]
    assert "got 1" in by_line[""]
    assert "click: expected 0 or 1" in by_line["11"]
    assert "feature_list entry 1: expected" in by_line["12"] and "205^B1009" in by_line["12"]
    assert "appears on 2 lines" in by_line[KC + "common"]
    assert "feature_num=3 but feature_list has 1 entries" in by_line[KD + "common"]
    assert all(row[S.Q_FILE].endswith(".csv") for row in q)
    # every rejected line is kept byte for byte, including those rejected after parsing (orphans, duplicate keys)
    raw = (out.parent / "raw")
    skel_lines = (raw / "sample_skeleton_train.csv").read_text().split("\n")[:-1]
    common_lines = (raw / "common_features_train.csv").read_text().split("\n")[:-1]
    assert sorted(r[S.Q_LINE] for r in q if r[S.Q_KIND] == "skeleton") == sorted(skel_lines[2:])
    assert sorted(r[S.Q_LINE] for r in q if r[S.Q_KIND] == "common") == sorted(common_lines[2:])


def test_encoding_matches_python_reference(spark, etl_out):
    cfg, _, out, m = etl_out
    layout = FeatureLayout.from_config(cfg.features)
    row = spark.read.parquet(str(out / "train")).where(F.col(S.SAMPLE_ID) == 1).first()
    entries = [(f, int(i), float(v)) for f, i, v in A_ENT + S1]
    ids, wts = encode_line_features(layout, entries)
    assert list(row[S.FEAT_IDS]) == ids
    assert list(row[S.FEAT_WTS]) == pytest.approx(wts, abs=1e-6)
    assert len(ids) == layout.num_slots == m["layout"]["num_slots"]
    # hand-check the history field: top values 3.0, 2.0, 1.0 -> weights 1/2, 1/3, 1/6
    k = layout.field_index("109_14")
    s = layout.slot_starts[k]
    assert list(row[S.FEAT_WTS])[s:s + 3] == pytest.approx([0.5, 1 / 3, 1 / 6], abs=1e-6)
    # multi-valued 210 keeps both values, equal weights
    j = layout.field_index("210")
    s = layout.slot_starts[j]
    assert list(row[S.FEAT_WTS])[s:s + 3] == pytest.approx([0.5, 0.5, 0.0])


def test_manifest_idempotent_rerun_and_overwrite(spark, etl_out, tmp_path):
    cfg, raw, out, m = etl_out
    on_disk = json.loads((out / S.MANIFEST).read_text())
    assert on_disk["rows"] == m["rows"]
    assert on_disk["config"]["etl"]["sampling_rates"] == [0.5, 1.0]
    files = sorted(p.name for p in (out / "train").rglob("*.parquet"))
    again = run_etl(spark, cfg, str(raw), str(out))          # same inputs + config: kept as is
    assert again["rows"] == m["rows"]
    assert sorted(p.name for p in (out / "train").rglob("*.parquet")) == files
    other = load_config(None, ["etl.max_quarantine_share=1.0"])
    with pytest.raises(EtlError, match="--overwrite"):
        run_etl(spark, other, str(raw), str(out))
    assert not list(out.parent.glob("dataset.tmp-*"))


def test_quarantine_threshold_fails_without_committing(spark, etl_out, tmp_path):
    cfg, raw, _, _ = etl_out
    strict = load_config(None, ["etl.max_quarantine_share=0.5"])
    out = tmp_path / "strict"
    with pytest.raises(EtlError, match=r"76\.92% of skeleton lines were quarantined"):
        run_etl(spark, strict, str(raw), str(out))
    assert not out.exists()


def test_missing_common_file_is_a_clear_error(spark, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "sample_skeleton_train.csv").write_text(skel(1, 0, 0, KA, [("205", 1, "1.0")]) + "\n")
    with pytest.raises(EtlError, match="common_features_train.csv"):
        run_etl(spark, load_config(None), str(raw), str(tmp_path / "out"))


def test_sampling_tiers_are_nested_and_near_rate(spark):
    rates = (0.01, 0.1, 0.2, 0.5, 1.0)
    n = 200_000
    tiers = (spark.range(n).select(F.col("id").alias("sid"), sample_tier(F.col("id"), rates).alias("t"))
             .groupBy("t").count().collect())
    counts = {r.t: r["count"] for r in tiers}
    cum = np.cumsum([counts.get(t, 0) for t in range(len(rates))]) / n
    for got, want in zip(cum, rates):
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-9
    some = spark.range(50).select(F.col("id"), sample_tier(F.col("id"), rates).alias("t")).collect()
    assert [sample_tier_py(r.id, rates) for r in some] == [r.t for r in some]


def _rows(spark, out):
    data = sorted((r[S.SAMPLE_ID], r[S.CLICK], r[S.CONVERSION], tuple(r[S.FEAT_IDS]), tuple(r[S.FEAT_WTS]),
                   r[S.USER_KEY], split)
                  for split in S.SPLITS if (out / split).exists()
                  for r in spark.read.parquet(str(out / split)).collect())
    q = sorted(tuple(r) for r in spark.read.parquet(str(out / S.QUARANTINE)).collect())
    return data, q


def test_native_parser_gives_the_same_dataset_and_quarantine(spark, etl_out, tiny_dataset, tmp_path):
    """Two independent implementations (Spark SQL expressions + Spark's writer vs Arrow/NumPy kernels + pyarrow's
    writer) agree row for row; the native run also joins without broadcasts (etl.broadcast_common_mb=0: the common
    lines and the orphan and duplicate keys by shuffle joins, as at scale)."""
    cfg, raw, out, m = etl_out
    native = load_config(None, ["etl.max_quarantine_share=1.0", "etl.sampling_rates=[0.5, 1.0]", "etl.parser=native",
                                "etl.writer=spark", "etl.broadcast_common_mb=0"])
    nm = run_etl(spark, native, str(raw), str(tmp_path / "native"))
    assert nm["rows"] == m["rows"] and (nm["parser"], nm["writer"]) == ("native", "spark")
    assert (m["parser"], m["writer"]) == ("arrow", "arrow")
    assert nm["splits"] == m["splits"]
    assert _rows(spark, tmp_path / "native") == _rows(spark, out)
    # a generated log: many fields, multi-valued history fields, top-K truncation
    gen_raw, gen_out = tiny_dataset
    test_cfg = load_config(str(S_ROOT / "conf" / "test.yaml"), ["etl.parser=native"])
    run_etl(spark, test_cfg, gen_raw, str(tmp_path / "gen-native"))
    native_rows, arrow_rows = _rows(spark, tmp_path / "gen-native"), _rows(spark, Path(gen_out))
    assert len(arrow_rows[0]) > 1000 and native_rows == arrow_rows


def test_user_key_equal_for_equal_user_ids_and_both_parsers_agree(spark, tmp_path):
    """user_key = the whole xxhash64(int 0, long id) of field 101's id (Spark's, as esmm.features computes it); the
    same user id gives the same key across common lines and splits; several 101 entries: the one the encoding keeps
    first (highest value); no field 101: UNKNOWN_USER. Both parser/writer pairs write the same keys."""
    from esmm.features import spark_hash_long
    raw = tmp_path / "raw"
    raw.mkdir()
    commons = [common(KA, [("101", 11, "1.0"), ("124", 2, "1.0")]), common(KB, [("101", 11, "1.0")]),
               common(KC, [("101", 5, "1.0"), ("101", 99, "2.0"), ("101", 3, "2.0")]),  # top: value 2.0, id 3
               common(KD, [("124", 2, "1.0")])]                                          # no user id
    skels = [skel(i, 0, 0, k, [("205", i, "1.0")]) for i, k in enumerate((KA, KB, KC, KD, KA), start=1)]
    (raw / "common_features_train.csv").write_text("\n".join(commons) + "\n")
    (raw / "sample_skeleton_train.csv").write_text("\n".join(skels) + "\n")
    (raw / "common_features_test.csv").write_text(common(KA, [("101", 11, "1.0")]) + "\n")
    (raw / "sample_skeleton_test.csv").write_text(skel(100, 1, 0, KA, [("205", 1, "1.0")]) + "\n")
    keys = {}
    for parser, writer in (("arrow", "arrow"), ("native", "spark")):
        cfg = load_config(None, ["etl.sampling_rates=[1.0]", f"etl.parser={parser}", f"etl.writer={writer}"])
        out = tmp_path / parser
        run_etl(spark, cfg, str(raw), str(out))
        keys[parser] = {r[S.SAMPLE_ID]: r[S.USER_KEY] for split in S.SPLITS
                        for r in spark.read.parquet(str(out / split)).collect()}
        schema = spark.read.parquet(str(out / S.TRAIN)).schema
        assert schema[S.USER_KEY].dataType == S.DATASET_SCHEMA[S.USER_KEY].dataType
    u11 = spark_hash_long(0, 11)
    assert keys["arrow"] == {1: u11, 2: u11, 3: spark_hash_long(0, 3), 4: S.UNKNOWN_USER, 5: u11, 100: u11}
    assert keys["native"] == keys["arrow"]
    # the same 64-bit hash that field 101's bucket is cut from
    layout = FeatureLayout.from_config(load_config(None, []).features)
    assert layout.global_id("101", 11) == layout.offsets[0] + 1 + u11 % (layout.buckets[0] - 1)


# ------------------------------------------------------------------------------------------ dirty bytes

MAX_LINE = 2048


def dirty_raw(tmp_path):
    """Raw files with dirty bytes; returns (raw dir, {kind: {line bytes as the quarantine keeps them: reason part}},
    number of good skeleton lines)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    b = lambda s: s.encode()                                                        # noqa: E731
    long_common = b(common(KB, [("101", 10**9 + k, "1.0") for k in range(200)]))     # > MAX_LINE bytes
    long_skel = b(skel(30, 0, 0, KA, [("205", 10**6 + k, "1.0") for k in range(200)]))
    long_skel = long_skel[:MAX_LINE - 1] + "\u00e9".encode() + long_skel[MAX_LINE - 1:]   # the cut splits the e-acute
    assert len(long_common) > MAX_LINE and len(long_skel) > MAX_LINE
    fffd = b(f"6,0,0,{KA},2,205{I}\ufffd{V}1{E}205{I}6{V}")                      # a real U+FFFD, then a bad byte
    commons = [
        (b(common(KA, A_ENT + [("999", 1, "1.0"), ("999", 2, "1.0"), ("888", 3, "1.0")])), None),  # unknown fields
        (b"\xff" + b(KC[1:] + ",1," + fl([("101", 1, "1.0")])),
         "invalid UTF-8 at byte offset 0 (common_feature_index)"),
        (b(f"{KD},2,{fl([('101', 1, '1.0')])}{E}101{I}2{V}") + b"1\xff\xfe\x80", "(feature_list entry 2)"),
        (long_common, f"line is {len(long_common)} bytes, over etl.max_line_bytes={MAX_LINE}"),
        (b(f"{KA[:15]}\x00,1,{fl([('101', 7, '1.0')])}"), None),                    # NUL in a key: just a key
    ]
    skels = [
        (b(skel(1, 1, 0, KA, [("205", 1, "1.0"), ("777", 5, "2.0")])), None),       # good, one unknown field
        (b(skel(2, 0, 0, KA, [("205", 2, "1.0")])), None),
        # the reported line: \xff\xfe\x80 in a feature value
        (b(f"3,0,0,{KA},1,205{I}3{V}") + b"\xff\xfe\x80", "invalid UTF-8 at byte offset 31 (feature_list entry 1)"),
        (b"4\xc0\x80" + b(f",0,0,{KA},0,"), "invalid UTF-8 at byte offset 1 (sample_id)"),
        (b(f"5,0,0,{KA},2,{fl([('205', 5, '1.0')])}{E}205{I}") + b"5\xed\xa0\x80" + b(f"{V}1.0"),
         "(feature_list entry 2)"),                                                 # a surrogate, in an id
        # a real U+FFFD before the first invalid byte: the offset still counts bytes of the raw line
        (fffd + b"\xe2\x82", f"invalid UTF-8 at byte offset {len(fffd)} (feature_list entry 2)"),
        (b(f"7,0,0,{KA},1,205{I}1\x002{V}1.0"), "feature_list entry 1: expected"),    # NUL inside an id
        (b(skel(8, 0, 0, KA[:15] + "\x00", [("205", 8, "1.0")])), None),          # NUL in its key: it matches
        (b(skel(14, 0, 0, KB, [("205", 14, "1.0")])), "no valid common features line"),  # KB's line is too long
        (long_skel, f"line is {len(long_skel)} bytes, over etl.max_line_bytes={MAX_LINE}"),
        (b(skel(9, 0, 0, KA, [("205", 9, "1.0"), ("999", 1, "1.0")])), None),        # unknown field, good
        (b"10,0,0,\x80\x80,0,", "invalid UTF-8 at byte offset 7 (common_feature_index)"),
        (b"11,0,0,x,0,,\xff", "invalid UTF-8 at byte offset 12 (column 7)"),
    ]
    # CR: Hadoop's line reader ends a line at \n, \r or \r\n; a CRLF line is one good line, a stray CR splits one
    (raw / "common_features_train.csv").write_bytes(b"\n".join(x for x, _ in commons) + b"\n")
    (raw / "sample_skeleton_train.csv").write_bytes(
        b"\n".join(x for x, _ in skels) + b"\n" + b(skel(12, 0, 0, KA, [("205", 12, "1.0")])) + b"\r\n"
        + b(f"13,0,0,{KA},1,205{I}13{V}1.") + b"\r" + b"0\n")
    (raw / "common_features_test.csv").write_bytes(b(common(KA, A_ENT)) + b"\n\xfe\n")
    (raw / "sample_skeleton_test.csv").write_bytes(b(skel(100, 1, 0, KA, [("205", 1, "1.0")])) + b"\n\xfe\xff\n")
    expect = {"common": {x[:MAX_LINE]: r for x, r in commons if r is not None},
              "skeleton": {x[:MAX_LINE]: r for x, r in skels if r is not None}}
    expect["skeleton"][b"0"] = "expected 6 comma-separated columns, got 1"            # the fragment after the CR
    expect["common"][b"\xfe"] = "invalid UTF-8 at byte offset 0 (common_feature_index)"
    expect["skeleton"][b"\xfe\xff"] = "invalid UTF-8 at byte offset 0 (sample_id)"
    return raw, expect, 7                                                   # 1, 2, 8, 9; 12, 13 (CR); 100


@pytest.fixture(scope="module")
def dirty_etls(spark, tmp_path_factory):
    """The dirty raw log through both parser/writer pairs, once for the tests below: {parser: (manifest, out dir)},
    with (raw dir, expected quarantine, good skeleton lines)."""
    root = tmp_path_factory.mktemp("dirty")
    raw, expect, n_good = dirty_raw(root)
    outs = {}
    for parser, writer in (("arrow", "arrow"), ("native", "spark")):
        cfg = load_config(None, ["etl.max_quarantine_share=1.0", f"etl.max_line_bytes={MAX_LINE}",
                                 f"etl.parser={parser}", f"etl.writer={writer}"])
        outs[parser] = (run_etl(spark, cfg, str(raw), str(root / parser)), root / parser)
    return outs, expect, n_good


@pytest.mark.parametrize("parser", ["arrow", "native"])
def test_dirty_bytes_are_quarantined_never_raised(spark, dirty_etls, parser):
    outs, expect, n_good = dirty_etls
    m, out = outs[parser]
    r = m["rows"]
    assert r["written"] == n_good
    assert r["skeleton_read"] == r["written"] + r["skeleton_quarantined"] == n_good + len(expect["skeleton"])
    assert r["common_read"] == 5 + 2 and r["common_quarantined"] == len(expect["common"])
    q = spark.read.parquet(str(out / S.QUARANTINE)).collect()
    for kind in ("skeleton", "common"):
        got = {bytes(row[S.Q_RAW]): row for row in q if row[S.Q_KIND] == kind}
        assert sorted(got) == sorted(expect[kind])                  # each rejected line, byte for byte (or its cut)
        for line, want in expect[kind].items():
            assert want in got[line][S.Q_REASON], (line, got[line][S.Q_REASON])
            assert got[line][S.Q_LINE] == line.decode("utf-8", "replace")
    # the over-long line is kept by its first MAX_LINE bytes; the cut fell inside the e-acute
    long_row = next(row for row in q if "over etl.max_line_bytes" in row[S.Q_REASON] and row[S.Q_KIND] == "skeleton")
    assert len(long_row[S.Q_RAW]) == MAX_LINE and long_row[S.Q_LINE].endswith("\ufffd")
    assert m["unknown_fields"] == {"skeleton": 2, "common": 3}
    assert m["unknown_field_ids"] == {"skeleton": {"777": 1, "999": 1}, "common": {"999": 2, "888": 1}}
    train = sorted(row[S.SAMPLE_ID] for row in spark.read.parquet(str(out / "train")).collect())
    assert train == [1, 2, 8, 9, 12, 13]


def test_dirty_bytes_both_parsers_agree(spark, dirty_etls):
    outs, _, _ = dirty_etls
    (a, a_out), (n, n_out) = outs["arrow"], outs["native"]
    assert a["rows"] == n["rows"] and a["splits"] == n["splits"]
    assert (a["unknown_fields"], a["unknown_field_ids"]) == (n["unknown_fields"], n["unknown_field_ids"])
    assert a["quarantine_reasons"] == n["quarantine_reasons"]
    assert _rows(spark, a_out) == _rows(spark, n_out)


def test_output_ownership_lock_and_stale_staging(spark, etl_out, tmp_path):
    import os
    import shutil

    from esmm.outputs import MARKER, STAGING, Lock, OutputError
    cfg, raw, out, m = etl_out
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "dataset" and marker["run_id"] == m["run_id"]
    # a foreign directory, or one that merely holds a manifest.json, is refused, --overwrite or not, and left as it was
    for name, files in (("foreign", {"keep.parquet": b"x"}), ("manifest-only", {"manifest.json": b"{}"})):
        foreign = tmp_path / name
        foreign.mkdir()
        for f, data in files.items():
            (foreign / f).write_bytes(data)
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=f"{name} exists and was not created by esmm-spark"):
                run_etl(spark, cfg, str(raw), str(foreign), overwrite=overwrite)
        assert {p.name: p.read_bytes() for p in foreign.iterdir()} == files
    # a second writer while one holds the output fails fast, naming the holder
    with Lock(str(out), "etl"):
        with pytest.raises(OutputError, match=rf"being written by another job \(etl, pid {os.getpid()}"):
            run_etl(spark, cfg, str(raw), str(out))
    # staging left by a killed run is removed by the next run, which keeps the output; a user's backup copy named
    # like staging (our marker inside, no staging record of ours) survives it
    stale = out.parent / "dataset.tmp-0badc0de"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "part-0.parquet").write_bytes(b"half written")
    (stale / STAGING).write_text(json.dumps({"of": "dataset", "token": "0badc0de"}))
    backup = out.parent / "dataset.old-20261201"
    shutil.copytree(out, backup)
    again = run_etl(spark, cfg, str(raw), str(out))
    assert again["run_id"] == m["run_id"] and not stale.exists() and not (out.parent / "dataset.lock").exists()
    assert backup.exists() and (backup / MARKER).exists()


def test_a_users_backup_and_a_manifest_only_dir_survive_an_overwriting_etl(spark, etl_out, tmp_path):
    """--overwrite replaces the ETL's own output through its staging and never touches a user's `<out>.old-<date>`
    copy beside it (our marker inside, no staging record of ours), nor a directory that only holds a manifest."""
    import shutil

    from esmm.outputs import OutputError, is_committed
    cfg, raw, _, _ = etl_out
    out = tmp_path / "ds"
    first = run_etl(spark, cfg, str(raw), str(out))
    backup = tmp_path / "ds.old-20261201"
    shutil.copytree(out, backup)
    before = sorted((p.relative_to(backup), p.stat().st_size) for p in backup.rglob("*"))
    again = run_etl(spark, cfg, str(raw), str(out), overwrite=True)
    assert again["run_id"] != first["run_id"] and is_committed(str(out))
    assert sorted((p.relative_to(backup), p.stat().st_size) for p in backup.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "ds.old-20261201"]
    only = tmp_path / "only-manifest"
    only.mkdir()
    (only / "manifest.json").write_text("{}")
    with pytest.raises(OutputError, match="not created by esmm-spark"):
        run_etl(spark, cfg, str(raw), str(only), overwrite=True)
    assert [p.name for p in only.iterdir()] == ["manifest.json"]