"""Raw Ali-CCP log -> the processed Parquet dataset (layout in schemas/dataset.py).

Every raw line is read and parsed exactly once; the join is a distributed join (broadcast or shuffle):

1. read the common and skeleton text files (``spark.read.text``) and parse each line into its typed columns, its
   side's encoded feature slots and a ``reason`` when it is bad (naming the column/field/entry). The default parser
   (``etl.parser: arrow``, ``esmm/rawparse.py``) runs vectorized Arrow/NumPy kernels on batches of lines in
   ``mapInArrow``; ``etl.parser: native`` does the same with Spark SQL expressions (``parse_skeleton``,
   ``parse_common``, ``encode_fields``). Both give identical rows; bench/etl.py measures them side by side;
2. encoding, per field: top-K entries by value, hashed into the field's bucket range with the one hash of
   ``esmm.features`` (Spark's ``xxhash64``), padded to fixed length; common lines are encoded once per key, and each
   also gets its ``user_key`` (the same hash of its field-101 user id, kept whole; ``schemas.dataset``);
3. common keys seen on several lines are rejected; good skeleton lines are left-joined to the good common lines on
   (raw file split, common_feature_index); a line without a match is quarantined as an orphan. The joined rows are
   persisted, so the dataset and the quarantine are two filters of one parse;
4. the train/test split (raw files, or the time split at the median sample_id) and the nested sampling tier
   (a hash of sample_id; the subset at rate ``rates[t]`` is ``sample_tier <= t``, read by partition pruning);
5. dataset and quarantine are written into a temporary directory, rows read == rows written + rows quarantined is
   checked, the manifest written, then the directory is moved into place in one rename (outputs appear atomically).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

import schemas as S
from esmm import storage
from esmm.config import Config, to_dict
from esmm.features import FeatureLayout
from esmm.outputs import Output, OutputRefused
from esmm.rawparse import FLOAT_RE, INT_RE

log = logging.getLogger(__name__)

HASH_MOD = 1_000_000  # sampling tiers use pmod(xxhash64(sample_id), HASH_MOD) / HASH_MOD as a uniform draw
ENTRY = "entries"
RAW_SPLIT = "raw_split"
FILE = "file"
REASON = "reason"
LINE_BYTES = "line_bytes"   # an over-long line's length in the file (null for the others, whose value is whole)
UNKNOWN = "unknown_fields"  # per parsed line: the field names of its entries with a field not in schemas/raw.py
ARROW_BATCH_BYTES = 64 << 20  # spark.sql.execution.arrow.maxBytesPerBatch during the ETL (batches to the parser)
UNKNOWN_TOP = 5             # unknown field ids listed by name in the manifest
ORPHAN = "common_feature_index %s: no valid common features line in the matching common_features file"
DUPLICATE = "common_feature_index %s appears on %d lines"


class EtlError(RuntimeError):
    """The ETL refused its input or its output; the message says which file/threshold/path and why."""


class QuarantineGateError(EtlError):
    """The data-quality gate: more than ``etl.max_quarantine_share`` of the skeleton lines were quarantined (the
    output is not committed; jobs exit with code 3)."""


class EtlOutputRefused(EtlError, OutputRefused):
    """The output exists and was built from other inputs or config; ``--overwrite`` replaces it (exit code 4)."""


# ------------------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class RawInputs:
    skeleton: dict  # raw split -> path
    common: dict

    def fingerprint(self, spark: SparkSession) -> list:
        """(path, total bytes, newest mtime) per input: cheap change detection for idempotent re-runs."""
        out = []
        for kind, paths in (("skeleton", self.skeleton), ("common", self.common)):
            for split, path in sorted(paths.items()):
                files = storage.walk(path).values()
                out.append({"kind": kind, "split": split, "path": path, "bytes": sum(s for s, _ in files),
                            "mtime": int(max((m for _, m in files), default=0) * 1000)})
        return out


def find_inputs(spark: SparkSession, raw_dir: str, need_train: bool = True) -> RawInputs:
    """The Ali-CCP files under ``raw_dir`` (plain files or Spark part-file directories of the same names). The ETL
    needs the train split (``need_train``); scoring (esmm/predict.py) takes either split or both."""
    skel, common = {}, {}
    raw_dir = storage.resolve(raw_dir)
    for split in S.RAW_SPLITS:
        sp = storage.join(raw_dir, S.SKELETON_FILE.format(split=split))
        cp = storage.join(raw_dir, S.COMMON_FILE.format(split=split))
        if storage.exists(sp):
            if not storage.exists(cp):
                raise EtlError(f"{sp} has no matching common features file: expected {cp}")
            skel[split], common[split] = sp, cp
    if not skel and not need_train:
        raise EtlError(f"no {S.SKELETON_FILE.format(split='{train,test}')} under {raw_dir}")
    if need_train and "train" not in skel:
        raise EtlError(f"no {S.SKELETON_FILE.format(split='train')} under {raw_dir} "
                       f"(run jobs/generate.py, or point paths.raw at the Ali-CCP files)")
    return RawInputs(skel, common)


def _read_lines(spark: SparkSession, paths: dict, max_line_bytes: int) -> DataFrame:
    """(value, file, raw_split, line_bytes) per raw line. Spark's text source keeps a line's bytes as they are in
    the file (no UTF-8 decoding or U+FFFD substitution: the parsers check UTF-8 themselves); lines end at \\n, \\r
    or \\r\\n (Hadoop's line reader). A line over ``max_line_bytes`` is cut here to its first max_line_bytes bytes
    (``line_bytes`` keeps its length, for its quarantine reason), so nothing after the reader holds more."""
    n = F.octet_length("value")
    cut = F.substring(F.col("value").cast("binary"), 1, max_line_bytes).cast("string")
    frames = [spark.read.text(p).select(F.when(n > max_line_bytes, cut).otherwise(F.col("value")).alias("value"),
                                        F.col("_metadata.file_path").alias(FILE), F.lit(split).alias(RAW_SPLIT),
                                        F.when(n > max_line_bytes, n).alias(LINE_BYTES))
              for split, p in sorted(paths.items())]
    df = frames[0]
    for f in frames[1:]:
        df = df.unionByName(f)
    return df


# ------------------------------------------------------------------------------------------------ parsing

def _field_index() -> Column:
    """field name -> its index in the slot order; entries carry it so one native sort groups them by field."""
    return F.create_map(*[x for i, f in enumerate(S.ALL_FIELDS) for x in (F.lit(f), F.lit(i))])


def _entries(feature_list: Column) -> Column:
    """feature_list string -> array<struct<f, nv, id, value, field, raw, ok>>.

    ``f`` is the field's slot-order index (null for an unknown field) and ``nv`` = -value, so that the natural order
    of the structs is (field, value descending, id): ``encode_fields`` relies on it. ``ok`` is false for a
    malformed entry (not ``field^Bid^Cvalue``, or a non-integer id / non-numeric value).
    """
    parts = F.when(feature_list == "", F.array().cast("array<string>")).otherwise(F.split(feature_list, S.ENTRY_SEP))

    def one(e: Column) -> Column:
        field = F.substring_index(e, S.ID_SEP, 1)
        rest = F.substring_index(e, S.ID_SEP, -1)
        fid = _int_col(F.substring_index(rest, S.VALUE_SEP, 1))
        val = _float_col(F.substring_index(rest, S.VALUE_SEP, -1))
        well_formed = (F.size(F.split(e, f"[{S.ID_SEP}{S.VALUE_SEP}]")) == 3) & \
            (F.instr(e, S.ID_SEP) < F.instr(e, S.VALUE_SEP))
        return F.struct(F.element_at(_field_index(), field).alias("f"), (-val).alias("nv"), fid.alias("id"),
                        val.alias("value"), field.alias("field"), e.alias("raw"),
                        (well_formed & fid.isNotNull() & val.isNotNull() & ~F.isnan(val)
                         & (F.abs(val) < F.lit(float("inf")))).alias("ok"))

    return F.transform(parts, one)


def _first_bad_entry_reason(entries: Column) -> Column:
    """Null, or which entry is malformed and how it reads (native array functions: no per-entry lambda)."""
    pos = F.array_position(entries.getField("ok"), F.lit(False))               # 1-based, 0 when all are fine
    return F.when(pos > 0, F.format_string(
        "feature_list entry %d: expected 'field^Bid^Cvalue' with integer id and numeric value, got %s",
        pos, _q(F.get(entries, (pos - 1).cast("int")).getField("raw"))))


def _q(text: Column) -> Column:
    """Quote a raw value for an error message, with the entry separators shown as ^B / ^C."""
    shown = F.regexp_replace(F.regexp_replace(text, S.ID_SEP, "^B"), S.VALUE_SEP, "^C")
    return F.concat(F.lit("'"), F.coalesce(shown, F.lit("")), F.lit("'"))


def _int_col(text: Column) -> Column:
    """Text -> long by esmm.rawparse's integer grammar, so both parsers accept the same numbers (Spark's cast alone
    also takes '+1', ' 1', '1\\x00' and 19 digits)."""
    return F.when(text.rlike(INT_RE), text.try_cast("long"))


def _float_col(text: Column) -> Column:
    """Text -> double by esmm.rawparse's number grammar (Spark's cast alone also takes ' 1', '1d', '0x1p3')."""
    return F.when(text.rlike(FLOAT_RE), text.try_cast("double"))


def _line_ok() -> Column:
    """The line is whole (not cut at etl.max_line_bytes) and valid UTF-8; the other checks only run on such lines."""
    return F.col(LINE_BYTES).isNull() & F.is_valid_utf8(F.col("value"))


def _line_reason(columns: tuple, max_line_bytes: int) -> Column:
    """The reason of a line that fails ``_line_ok``, worded as in ``esmm.rawparse`` (too_long, utf8_reason); only
    evaluated on such lines (a CASE WHEN branch).

    The first invalid byte's offset: in ``make_valid_utf8`` of the line (with any U+FFFD already in it swapped for
    U+FFFC, of the same 3 bytes), the characters before the first U+FFFD are the line's valid prefix."""
    v = F.col("value")
    shown = F.make_valid_utf8(F.replace(v, F.lit("\ufffd"), F.lit("\ufffc")))
    prefix = F.substr(shown, F.lit(1), F.instr(shown, "\ufffd") - 1)

    def count(text: Column, sep: str) -> Column:
        return F.length(text) - F.length(F.replace(text, F.lit(sep), F.lit("")))

    col = count(prefix, S.COL_SEP) + 1
    entry = count(F.substring_index(prefix, S.COL_SEP, -1), S.ENTRY_SEP) + 1
    where = (F.when(col == len(columns), F.format_string("feature_list entry %d", entry))
             .when(col < len(columns), F.element_at(F.array(*[F.lit(c) for c in columns]), col))
             .otherwise(F.format_string("column %d", col)))
    return (F.when(F.col(LINE_BYTES).isNotNull(), F.format_string(
                f"line is %d bytes, over etl.max_line_bytes={max_line_bytes} (only its first {max_line_bytes} kept)",
                LINE_BYTES))
            .otherwise(F.format_string("invalid UTF-8 at byte offset %d (%s)", F.octet_length(prefix), where)))


def parse_skeleton(lines: DataFrame, max_line_bytes: int = 1 << 20) -> DataFrame:
    """Split skeleton lines into typed columns plus ``reason`` (null for a good line)."""
    c = F.split(F.col("value"), S.COL_SEP, -1)
    n = F.size(c)
    sid, clk, conv, key, num = (_int_col(F.get(c, 0)), _int_col(F.get(c, 1)), _int_col(F.get(c, 2)),
                                F.when((n == len(S.SKELETON_COLUMNS)) & F.col("_line_ok"), F.get(c, 3)),
                                _int_col(F.get(c, 4)))
    entries = _entries(F.coalesce(F.get(c, 5), F.lit("")))
    df = lines.withColumn("_line_ok", _line_ok()).select(
        "value", FILE, RAW_SPLIT, sid.alias(S.SAMPLE_ID), clk.alias(S.CLICK), conv.alias(S.CONVERSION),
        key.alias(S.COMMON_KEY), num.alias(S.FEATURE_NUM), entries.alias(ENTRY), n.alias("ncols"), "_line_ok",
        LINE_BYTES)
    e, raw = F.col(ENTRY), lambda i: F.get(c, i)
    reason = (F.when(~F.col("_line_ok"), _line_reason(S.SKELETON_COLUMNS, max_line_bytes))
              .when(F.col("ncols") != len(S.SKELETON_COLUMNS),
                     F.format_string(f"expected {len(S.SKELETON_COLUMNS)} comma-separated columns, got %d", "ncols"))
              .when(F.col(S.SAMPLE_ID).isNull(), F.format_string("sample_id: not an integer: %s", _q(raw(0))))
              .when(~F.col(S.CLICK).isin(0, 1), F.format_string("click: expected 0 or 1, got %s", _q(raw(1))))
              .when(F.col(S.CLICK).isNull(), F.format_string("click: expected 0 or 1, got %s", _q(raw(1))))
              .when(~F.col(S.CONVERSION).isin(0, 1) | F.col(S.CONVERSION).isNull(),
                    F.format_string("conversion: expected 0 or 1, got %s", _q(raw(2))))
              .when((F.col(S.CLICK) == 0) & (F.col(S.CONVERSION) == 1), F.lit("conversion=1 with click=0"))
              .when(F.col(S.FEATURE_NUM).isNull(), F.format_string("feature_num: not an integer: %s", _q(raw(4))))
              .when(F.col(S.FEATURE_NUM) != F.size(e),
                    F.format_string("feature_num=%d but feature_list has %d entries", S.FEATURE_NUM, F.size(e)))
              .otherwise(_first_bad_entry_reason(e)))
    return df.withColumn(REASON, reason).drop("_line_ok", LINE_BYTES)


def parse_common(lines: DataFrame, max_line_bytes: int = 1 << 20) -> DataFrame:
    """Split common lines into typed columns plus ``reason`` (duplicate keys are checked in ``build_plan``)."""
    c = F.split(F.col("value"), S.COL_SEP, -1)
    num = _int_col(F.get(c, 1))
    entries = _entries(F.coalesce(F.get(c, 2), F.lit("")))
    key = F.when((F.size(c) == len(S.COMMON_COLUMNS)) & F.col("_line_ok"), F.get(c, 0))
    df = lines.withColumn("_line_ok", _line_ok()).select(
        "value", FILE, RAW_SPLIT, key.alias(S.COMMON_KEY), num.alias(S.FEATURE_NUM), entries.alias(ENTRY),
        F.size(c).alias("ncols"), "_line_ok", LINE_BYTES)
    e = F.col(ENTRY)
    reason = (F.when(~F.col("_line_ok"), _line_reason(S.COMMON_COLUMNS, max_line_bytes))
              .when(F.col("ncols") != len(S.COMMON_COLUMNS),
                     F.format_string(f"expected {len(S.COMMON_COLUMNS)} comma-separated columns, got %d", "ncols"))
              .when(F.col(S.FEATURE_NUM).isNull(), F.format_string("feature_num: not an integer: %s", _q(F.get(c, 1))))
              .when(F.col(S.FEATURE_NUM) != F.size(e),
                    F.format_string("feature_num=%d but feature_list has %d entries", S.FEATURE_NUM, F.size(e)))
              .otherwise(_first_bad_entry_reason(e)))
    return df.withColumn(REASON, reason).drop("_line_ok", LINE_BYTES)


# ----------------------------------------------------------------------------------------------- encoding

def _encode_field(ordered: Column, first: Column, index: int, offset: int, buckets: int,
                  k: int) -> tuple[Column, Column]:
    """One field -> (ids array<int> of length k, weights array<float> of length k); see FeatureLayout docs.

    ``ordered`` is the line's entries in natural struct order (field index, -value, id), ``first`` the 1-based
    position of the field's first entry (0 when absent): its top-k are the k entries from there that still belong
    to the field (ties in value: smaller feature id first, as in the plain-Python reference).
    """
    top = F.filter(F.slice(ordered, F.greatest(first, F.lit(1)), k), lambda e: e.f == F.lit(index))
    ids = F.transform(top, lambda e: (F.lit(offset + 1) + F.pmod(F.xxhash64(F.lit(index).cast("int"), e.id),
                                                                  F.lit(buckets - 1))).cast("int"))
    pad = F.lit(k) - F.size(top)
    ids = F.concat(ids, F.array_repeat(F.lit(offset).cast("int"), pad))
    if k == 1:
        wts = F.array(F.lit(1.0).cast("float"))
    else:
        total = F.aggregate(top, F.lit(0.0), lambda acc, e: acc + e.value)
        w = F.transform(top, lambda e: F.when(total > 0, e.value / total).otherwise(F.lit(1.0) / F.size(top)))
        wts = F.when(F.size(top) == 0, F.array(*([F.lit(1.0)] + [F.lit(0.0)] * (k - 1))).cast("array<float>")) \
               .otherwise(F.concat(w.cast("array<float>"), F.array_repeat(F.lit(0.0).cast("float"), pad)))
    return ids, wts


def encode_fields(df: DataFrame, entries: str, layout: FeatureLayout, fields: tuple, ids_col: str,
                  wts_col: str, user_col: str | None = None) -> DataFrame:
    """Add ``ids_col``/``wts_col``: the encoded slots of ``fields`` (a contiguous run of layout.fields), and with
    ``user_col`` the line's user key (``user_key``).

    One native sort per line groups the entries by field (a per-field ``filter`` + lambda-comparator sort over the
    whole list costs ~10x more: higher-order functions are interpreted); the sorted array is its own projection so
    it is computed once, not inlined into every field's expression.
    """
    srt = f"_{ids_col}_sorted"
    df = df.withColumn(srt, F.sort_array(F.col(entries)))
    field_of = F.col(srt).getField("f")                                        # array<int>, natively
    ids, wts = [], []
    for f in fields:
        i = layout.field_index(f)
        a, b = _encode_field(F.col(srt), F.array_position(field_of, F.lit(i)).cast("int"), i, layout.offsets[i],
                             layout.buckets[i], layout.max_len[i])
        ids.append(a)
        wts.append(b)
    df = df.withColumn(ids_col, F.concat(*ids)).withColumn(wts_col, F.concat(*wts))
    if user_col is not None:
        df = df.withColumn(user_col, user_key(F.col(srt), layout))
    return df.drop(srt)


def user_key(ordered: Column, layout: FeatureLayout) -> Column:
    """The line's user key from its entries in natural struct order (``encode_fields``' sorted array): the whole
    ``xxhash64(int index of field 101, long id)`` of its first field-101 entry (highest value, then smallest id,
    the entry the encoding keeps first), or ``schemas.dataset.UNKNOWN_USER`` without one. ``esmm.rawparse.user_keys``
    computes the same on Arrow batches."""
    i = layout.field_index(S.USER_FIELD)
    pos = F.array_position(ordered.getField("f"), F.lit(i))
    top = F.get(ordered, (pos - 1).cast("int"))
    return F.when(pos > 0, F.xxhash64(F.lit(i).cast("int"), top.getField("id"))) \
        .otherwise(F.lit(S.UNKNOWN_USER).cast("long"))


# ----------------------------------------------------------------------------------------------- assembly

def sample_tier(sample_id: Column, rates: tuple) -> Column:
    """Smallest tier t with u < rates[t], u = pmod(xxhash64(sample_id), 1e6) / 1e6; nested by construction."""
    u = F.pmod(F.xxhash64(sample_id), F.lit(HASH_MOD))
    expr = F.when(u < F.lit(int(round(rates[0] * HASH_MOD))), 0)
    for t, r in enumerate(rates[1:], start=1):
        expr = expr.when(u < F.lit(int(round(r * HASH_MOD))), t)
    return expr.otherwise(len(rates) - 1)


def sample_tier_py(sample_id: int, rates: tuple) -> int:
    """Plain-Python twin of ``sample_tier`` (for tests and docs)."""
    from esmm.features import SPARK_SEED, _signed, xxh64_long
    u = _signed(xxh64_long(sample_id & 0xFFFFFFFFFFFFFFFF, SPARK_SEED)) % HASH_MOD
    for t, r in enumerate(rates):
        if u < int(round(r * HASH_MOD)):
            return t
    return len(rates) - 1


# ----------------------------------------------------------------------------------------------- parsers

S_IDS, S_WTS, C_IDS, C_WTS = "s_ids", "s_wts", "c_ids", "c_wts"
_IDS_T, _WTS_T = "array<int>", "array<float>"
PARSED_SKELETON = (f"{RAW_SPLIT} string, {FILE} string, value string, {S.SAMPLE_ID} long, {S.CLICK} int, "
                   f"{S.CONVERSION} int, {S.COMMON_KEY} string, {S_IDS} {_IDS_T}, {S_WTS} {_WTS_T}, {REASON} string, "
                   f"{UNKNOWN} array<string>")
PARSED_COMMON = (f"{RAW_SPLIT} string, {FILE} string, value string, {S.COMMON_KEY} string, "
                 f"{C_IDS} {_IDS_T}, {C_WTS} {_WTS_T}, {S.USER_KEY} long, {REASON} string, {UNKNOWN} array<string>")


def _arrow_parser(kind: str, layout: FeatureLayout, keep_value: bool = False, max_line_bytes: int = 1 << 20):
    """The ``mapInArrow`` function of ``etl.parser: arrow``: raw line batches -> parsed rows (esmm/rawparse.py).

    Input columns: value, file, raw_split and optionally line_bytes (``_read_lines``). The raw line comes back only
    for bad lines unless ``keep_value``: most of the input's bytes do not travel back to the JVM (nor through the
    duplicate-key shuffle). Its bytes come back as they came in, valid UTF-8 or not.
    """
    fields = S.SKELETON_FIELDS if kind == "skeleton" else S.COMMON_FIELDS

    def run(batches):
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        from esmm import rawparse
        encoder = rawparse.SideEncoder(layout, fields)
        parse = rawparse.parse_skeleton if kind == "skeleton" else rawparse.parse_common
        chunk_bytes = rawparse.CHUNK_BYTES

        def as_lists(m: np.ndarray, typ) -> pa.Array:
            n, w = m.shape
            return pa.ListArray.from_arrays(pa.array(np.arange(0, n * w + 1, w, dtype=np.int32)),
                                            pa.array(m.ravel(), typ))

        for batch in batches:
            value = batch.column(0)
            ends = np.cumsum(pc.binary_length(value).to_numpy(zero_copy_only=False))  # chunks of ~chunk_bytes
            cuts = np.unique(np.r_[0, np.searchsorted(ends, np.arange(chunk_bytes, ends[-1] if len(ends) else 0,
                                                                      chunk_bytes)) + 1, len(value)])
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                chunk = batch.slice(lo, hi - lo)
                nbytes = pc.binary_length(chunk.column(0)).to_numpy(zero_copy_only=False)
                if chunk.num_columns > 3 and chunk.column(3).null_count < len(chunk):
                    cut = chunk.column(3)
                    nbytes = np.where(cut.is_valid().to_numpy(zero_copy_only=False),
                                      cut.fill_null(0).to_numpy(zero_copy_only=False), nbytes)
                out = parse(chunk.column(0), encoder, nbytes, max_line_bytes)
                raw = chunk.column(0)
                if not keep_value:
                    raw = raw.take(pa.array(np.arange(len(raw)), mask=~out["bad"]))
                cols = [chunk.column(2), chunk.column(1), raw]
                if kind == "skeleton":
                    cols += [pa.array(out[S.SAMPLE_ID], pa.int64()), pa.array(out[S.CLICK], pa.int32()),
                             pa.array(out[S.CONVERSION], pa.int32())]
                cols += [out[S.COMMON_KEY], as_lists(out["ids"], pa.int32()), as_lists(out["wts"], pa.float32())]
                if kind == "common":
                    cols.append(pa.array(out[S.USER_KEY], pa.int64()))
                cols += [pa.array(out["reason"], pa.string()), out["unknown"]]
                yield pa.RecordBatch.from_arrays(cols, names=names)

    names = [c.split(" ")[0] for c in (PARSED_SKELETON if kind == "skeleton" else PARSED_COMMON).split(", ")]
    return run


def parse_lines(lines: DataFrame, kind: str, parser: str, layout: FeatureLayout, keep_value: bool = False,
                max_line_bytes: int = 1 << 20) -> DataFrame:
    """Raw lines (``_read_lines``) -> one parsed row per line (PARSED_SKELETON / PARSED_COMMON).

    Good lines have ``reason`` null and their side's encoded slots (common lines also their ``user_key``); a bad
    line has its reason (its slots are meaningless). ``value`` (the raw line) is kept for bad lines only, unless
    ``keep_value``. ``unknown_fields`` lists the entries' unknown field names on lines that parse (null when none).
    Both parsers give the same rows (tests/test_etl.py checks it).
    """
    if LINE_BYTES not in lines.columns:
        lines = lines.withColumn(LINE_BYTES, F.lit(None).cast("int"))
    if parser == "arrow":
        schema = PARSED_SKELETON if kind == "skeleton" else PARSED_COMMON
        return lines.select("value", FILE, RAW_SPLIT, LINE_BYTES).mapInArrow(
            _arrow_parser(kind, layout, keep_value, max_line_bytes), schema)
    value = F.col("value") if keep_value else F.when(F.col(REASON).isNotNull(), F.col("value"))
    f = F.col(ENTRY).getField("f")                       # null for an entry whose field is unknown
    unknown = F.when(F.col(REASON).isNull() & (F.size(f) > F.size(F.array_compact(f))),
                     F.filter(F.col(ENTRY), lambda x: x.f.isNull()).getField("field")).alias(UNKNOWN)
    if kind == "skeleton":
        df = parse_skeleton(lines, max_line_bytes)
        df = encode_fields(df, ENTRY, layout, S.SKELETON_FIELDS, S_IDS, S_WTS)
        # try_cast: a bad line's click may be any long, and a failing cast (ANSI mode) would fail the whole job
        return df.select(RAW_SPLIT, FILE, value.alias("value"), S.SAMPLE_ID,
                         F.col(S.CLICK).try_cast("int").alias(S.CLICK),
                         F.col(S.CONVERSION).try_cast("int").alias(S.CONVERSION), S.COMMON_KEY, S_IDS, S_WTS, REASON,
                         unknown)
    df = encode_fields(parse_common(lines, max_line_bytes), ENTRY, layout, S.COMMON_FIELDS, C_IDS, C_WTS, S.USER_KEY)
    return df.select(RAW_SPLIT, FILE, value.alias("value"), S.COMMON_KEY, C_IDS, C_WTS, S.USER_KEY, REASON, unknown)


KEY_BYTES = 96        # a distinct (raw_split, common_feature_index) key as broadcast, about


def _small_keys(keys: DataFrame, cfg: Config, what: str) -> DataFrame | None:
    """``keys`` (distinct) hinted for a broadcast join when they fit ``etl.broadcast_common_mb``, else left to a
    shuffle join, or None when there are none: counted on the executors, never collected, so a common file that
    matches nothing (every skeleton line an orphan) at a billion lines costs a shuffle, not the driver's memory, and
    reaches the quarantine gate."""
    n = keys.count()
    if n == 0:
        return None
    small = n * KEY_BYTES / 2**20 <= cfg.etl.broadcast_common_mb
    log.info("%d distinct %s keys to quarantine: %s join for their raw text", n, what,
             "broadcast" if small else "shuffle")
    return F.broadcast(keys) if small else keys


def _reread_good_lines(spark: SparkSession, paths: dict, kind: str, parser: str, layout: FeatureLayout,
                       keys: DataFrame, max_line_bytes: int) -> DataFrame:
    """The good (parse-valid) raw lines of ``kind`` whose (raw_split, common_feature_index) is in ``keys``, with
    their raw text: the lines rejected after parsing (duplicate common keys, skeleton orphans), whose text the
    parse did not keep. Only runs when there are such lines; the key is cut out natively, so only the matching lines
    are parsed again. ``keys``: distinct keys, broadcast by the caller when they are few (``_small_keys``)."""
    key = F.substring_index(F.col("value"), S.COL_SEP, 1) if kind == "common" else \
        F.substring_index(F.substring_index(F.col("value"), S.COL_SEP, 4), S.COL_SEP, -1)
    hits = _read_lines(spark, paths, max_line_bytes).withColumn(S.COMMON_KEY, key) \
        .join(keys, on=[RAW_SPLIT, S.COMMON_KEY], how="left_semi").drop(S.COMMON_KEY)
    parsed = parse_lines(hits, kind, parser, layout, keep_value=True, max_line_bytes=max_line_bytes)
    return parsed.where(F.col(REASON).isNull()).select(RAW_SPLIT, FILE, S.COMMON_KEY, "value")


# ----------------------------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """The DataFrames of one ETL run. ``rows`` (on disk, so the heap does not grow with the data) and ``common``
    are persisted; ``release()`` frees them."""
    dataset: DataFrame        # good rows, DATASET_SCHEMA columns + raw_split
    quarantine: DataFrame     # QUARANTINE_SCHEMA
    rows: DataFrame           # one row per skeleton line read (good or quarantined)
    common: DataFrame         # one row per common line read

    def release(self) -> None:
        self.rows.unpersist()
        self.common.unpersist()


def build_plan(spark: SparkSession, cfg: Config, inputs: RawInputs) -> Plan:
    """Parse every raw line exactly once; dataset and quarantine are two filters of the same persisted rows.

    1. common lines: parse + encode, reject keys that appear on several lines, persist (raw text kept only for
       rejected lines);
    2. skeleton lines: parse + encode, left join to the good common keys (broadcast when they are small): a good
       line without a match is an orphan. These rows (the skeleton slots of good lines, the raw text of rejected
       ones) are persisted;
    3. dataset = rows without reason joined to their common slots; quarantine = rows with a reason + rejected
       common lines. Every skeleton line read lands in exactly one of the two (the left join keeps one row per
       line: good common keys are unique).
    """
    layout = FeatureLayout.from_config(cfg.features)
    keys = [RAW_SPLIT, S.COMMON_KEY]
    # A line whose raw text is kept is one the parse rejected; a rejected line without text was rejected later
    # (duplicate common key, orphan skeleton line): its text is read again only for the quarantine, and only if any.
    parse_bad, late = F.col("value").isNotNull(), F.col(REASON).isNotNull() & F.col("value").isNull()
    mlb = cfg.etl.max_line_bytes
    common = parse_lines(_read_lines(spark, inputs.common, mlb), "common", cfg.etl.parser, layout, max_line_bytes=mlb)
    dup = F.count(F.lit(1)).over(Window.partitionBy(*keys))
    common = common.withColumn("_lines", dup).withColumn(REASON, F.coalesce(F.col(REASON), F.when(
        F.col("_lines") > 1, F.format_string(DUPLICATE, S.COMMON_KEY, "_lines")))) \
        .persist(StorageLevel.MEMORY_AND_DISK)
    good_common = common.where(F.col(REASON).isNull()).select(*keys, C_IDS, C_WTS, S.USER_KEY,
                                                              F.lit(True).alias("_found"))
    n_good_common = good_common.count()
    width = sum(layout.max_len[layout.field_index(f)] for f in S.COMMON_FIELDS)
    est_mb = n_good_common * (width * 8 + 80) / 2**20
    if est_mb <= cfg.etl.broadcast_common_mb:
        good_common = F.broadcast(good_common)
    log.info("%d good common lines (~%.0f MB encoded): %s join", n_good_common, est_mb,
             "broadcast" if est_mb <= cfg.etl.broadcast_common_mb else "shuffle")

    skel = parse_lines(_read_lines(spark, inputs.skeleton, mlb), "skeleton", cfg.etl.parser, layout,
                       max_line_bytes=mlb)
    j = skel.join(good_common.select(*keys, "_found"), on=keys, how="left")
    reason = F.coalesce(F.col(REASON), F.when(F.col("_found").isNull(), F.format_string(ORPHAN, S.COMMON_KEY)))
    good = reason.isNull()
    rows = j.select(S.SAMPLE_ID, S.CLICK, S.CONVERSION, *keys, FILE, reason.alias(REASON),
                    F.when(good, F.col(S_IDS)).alias(S_IDS), F.when(good, F.col(S_WTS)).alias(S_WTS), "value",
                    UNKNOWN) \
        .withColumn(S.SAMPLE_TIER, sample_tier(F.col(S.SAMPLE_ID), cfg.etl.sampling_rates)) \
        .persist(StorageLevel.DISK_ONLY)

    # The common slots are joined again here rather than persisted with every row (41 of the 57 default slots).
    dataset = rows.where(F.col(REASON).isNull()).join(good_common, on=keys, how="inner").select(
        S.SAMPLE_ID, S.CLICK, S.CONVERSION, F.concat(C_IDS, S_IDS).alias(S.FEAT_IDS),
        F.concat(C_WTS, S_WTS).alias(S.FEAT_WTS), S.USER_KEY, S.SAMPLE_TIER, RAW_SPLIT)
    parts = [rows.where(parse_bad).select(F.lit("skeleton").alias(S.Q_KIND), REASON, FILE, "value"),
             common.where(parse_bad).select(F.lit("common").alias(S.Q_KIND), REASON, FILE, "value")]
    orphans = _small_keys(rows.where(late).select(*keys).distinct(), cfg, "orphan skeleton")
    if orphans is not None:
        lines = _reread_good_lines(spark, inputs.skeleton, "skeleton", cfg.etl.parser, layout, orphans, mlb)
        parts.append(lines.select(F.lit("skeleton").alias(S.Q_KIND), F.format_string(ORPHAN, S.COMMON_KEY).alias(REASON),
                                  FILE, "value"))
    dups = _small_keys(common.where(late).select(*keys, "_lines").distinct(), cfg, "duplicate common")
    if dups is not None:
        lines = _reread_good_lines(spark, inputs.common, "common", cfg.etl.parser, layout, dups.select(*keys), mlb)
        lines = lines.join(dups, on=keys).withColumn(REASON, F.format_string(DUPLICATE, S.COMMON_KEY, "_lines"))
        parts.append(lines.select(F.lit("common").alias(S.Q_KIND), REASON, FILE, "value"))
    q = parts[0]
    for part in parts[1:]:
        q = q.unionByName(part)
    # the line's bytes as read (cut at etl.max_line_bytes) in raw_bytes; as text in line, invalid UTF-8 shown as U+FFFD
    q = q.select(S.Q_KIND, F.col(REASON).alias(S.Q_REASON), F.col(FILE).alias(S.Q_FILE),
                 F.make_valid_utf8("value").alias(S.Q_LINE), F.col("value").cast("binary").alias(S.Q_RAW))
    return Plan(dataset, q, rows, common)


def assign_split(spark: SparkSession, good: DataFrame, mode: str, inputs: RawInputs) -> tuple[DataFrame, dict]:
    """Add the ``split`` column. files: the raw file's split. time: train = sample_id <= median (paper: first half)."""
    if mode == "auto":
        mode = "files" if "test" in inputs.skeleton else "time"
    if mode == "files":
        if "test" not in inputs.skeleton:
            raise EtlError("etl.split=files needs both sample_skeleton_train and sample_skeleton_test")
        return good.withColumn("split", F.col(RAW_SPLIT)), {"mode": "files"}
    # percentile_approx with accuracy 1e6: the rank error is at most 1e-6 of the rows (exact for < 1e6 rows).
    median = good.agg(F.percentile_approx(S.SAMPLE_ID, 0.5, 1_000_000)).first()[0]
    if median is None:
        raise EtlError("no valid rows to split")
    split = F.when(F.col(S.SAMPLE_ID) <= F.lit(median), F.lit(S.TRAIN)).otherwise(F.lit(S.TEST))
    return good.withColumn("split", split), {"mode": "time", "train_max_sample_id": int(median)}


# ------------------------------------------------------------------------------------------------ running

def _config_hash(cfg: Config) -> str:
    relevant = {"features": to_dict(cfg.features), "etl": to_dict(cfg.etl)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def run_etl(spark: SparkSession, cfg: Config, raw_dir: str | None = None, out: str | None = None,
            overwrite: bool = False) -> dict:
    """Run the ETL; returns the manifest. Idempotent: a committed output of the same inputs and config is kept; one
    of other inputs is refused unless ``overwrite`` (``esmm.outputs.Output``: lock, recovery, staging, commit)."""
    raw_dir = storage.resolve(raw_dir or cfg.paths.raw)
    out = storage.resolve(out or cfg.paths.dataset)
    t0 = time.time()
    storage.check_shared(spark, storage.parent(out))  # executors write the dataset: a local path must be shared
    inputs = find_inputs(spark, raw_dir)
    fingerprint = inputs.fingerprint(spark)
    chash = _config_hash(cfg)
    with Output(out, "dataset", {"inputs": fingerprint, "config_hash": chash}, "etl", overwrite,
                EtlOutputRefused) as o:
        if o.reusable:
            log.info("ETL output %s is up to date (same inputs and config): nothing to do", storage.display(out))
            return _read_manifest(out)
        o.refuse_other_inputs("a dataset")
        return _run_locked(spark, cfg, raw_dir, o, inputs, fingerprint, chash, t0)


def _run_locked(spark: SparkSession, cfg: Config, raw_dir: str, o: Output, inputs: RawInputs, fingerprint: list,
                chash: str, t0: float) -> dict:
    """The ETL proper, while this job holds the output's lock: stage, account, check, commit."""
    from esmm.outputs import read_commit
    tmp = o.stage()
    raw_mb = sum(x["bytes"] for x in fingerprint) / 2**20
    partitions = max(1, math.ceil(raw_mb / cfg.etl.mb_per_partition))
    log.info("ETL %s (%.0f MB, %s parser, %d shuffle partitions) -> %s (staging in %s)", storage.display(raw_dir),
             raw_mb, cfg.etl.parser, partitions, storage.display(o.out), storage.display(tmp))
    # The parser's memory is bounded in bytes: lines are cut at etl.max_line_bytes by the reader, and Arrow batches
    # to the Python workers at ARROW_BATCH_BYTES (or maxRecordsPerBatch lines, whichever comes first).
    saved = {k: spark.conf.get(k, None) for k in ("spark.sql.shuffle.partitions",
                                                  "spark.sql.execution.arrow.maxBytesPerBatch")}
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))
    spark.conf.set("spark.sql.execution.arrow.maxBytesPerBatch", str(ARROW_BATCH_BYTES))
    plan = None
    try:
        plan = build_plan(spark, cfg, inputs)
        data, split_info = assign_split(spark, plan.dataset, cfg.etl.split, inputs)
        n_files = _write_dataset(spark, cfg, data.drop(RAW_SPLIT), tmp)
        log.info("dataset written by the %s writer%s (%.1fs)", cfg.etl.writer,
                 f": {n_files} files" if n_files >= 0 else "", time.time() - t0)
        plan.quarantine.write.parquet(f"{tmp}/{S.QUARANTINE}")
        manifest = _account(spark, cfg, tmp, plan, split_info)
    finally:
        for k, v in saved.items():
            if v is None:
                spark.conf.unset(k)
            else:
                spark.conf.set(k, v)
        if plan is not None:
            plan.release()
    upstream = read_commit(raw_dir, verify=False)  # the generator's run (None for real Ali-CCP files)
    manifest.update({"inputs": fingerprint, "config_hash": chash, "seconds": round(time.time() - t0, 2),
                     "parser": cfg.etl.parser, "writer": cfg.etl.writer, "shuffle_partitions": partitions,
                     "run_id": o.run_id, "raw_run_id": upstream.get("run_id") if upstream else None})
    storage.write_json(storage.join(tmp, S.MANIFEST), manifest)
    try:
        _check_quarantine(cfg, manifest, tmp)
    except QuarantineGateError:
        o.keep_staging = True  # for inspection (the message names it); removed by the next run on this output
        raise
    o.commit()
    log.info("ETL done in %.1fs: %s", time.time() - t0, json.dumps(manifest["rows"]))
    return manifest


def _write_dataset(spark: SparkSession, cfg: Config, data: DataFrame, tmp: str) -> int:
    """The dataset rows -> ``tmp/{train,test}/sample_tier=<t>/part-*.parquet``; returns the number of files
    (-1 for Spark's writer, which does not report them).

    Row groups of about ``etl.row_group_mb`` (many per file, so readers shard by row group), at most
    ``etl.rows_per_file`` rows per file. ``feat_ids`` is written without dictionary encoding: hashed ids are
    near-unique per column chunk, so a dictionary only costs time and space; the other columns keep it.
    ``etl.writer: arrow`` (default) writes with pyarrow from the Python workers (esmm/arrow_write.py, ~3x cheaper);
    ``spark`` uses Spark's own Parquet writer, for filesystems that pyarrow.fs cannot reach from the executors.
    """
    block = cfg.etl.row_group_mb << 20
    n_files = -1
    if cfg.etl.writer == "spark":
        (data.write.partitionBy("split", S.SAMPLE_TIER)
         .option("parquet.block.size", block).option("maxRecordsPerFile", cfg.etl.rows_per_file)
         .option(f"parquet.enable.dictionary#{S.FEAT_IDS}.list.element", "false")
         .parquet(f"{tmp}/_data"))
    else:
        import pyarrow as pa

        from esmm.arrow_write import write_partitioned
        width = FeatureLayout.from_config(cfg.features).num_slots
        schema = pa.schema([
            pa.field(S.SAMPLE_ID, pa.int64(), False), pa.field(S.CLICK, pa.int32(), False),
            pa.field(S.CONVERSION, pa.int32(), False),
            pa.field(S.FEAT_IDS, pa.list_(pa.field("element", pa.int32(), False)), False),
            pa.field(S.FEAT_WTS, pa.list_(pa.field("element", pa.float32(), False)), False),
            pa.field(S.USER_KEY, pa.int64(), False)])
        n_files = len(write_partitioned(
            data, storage.arrow_uri(f"{tmp}/_data"), schema, ("split", S.SAMPLE_TIER),
            rows_per_file=cfg.etl.rows_per_file, row_group_bytes=block, row_bytes=16 + 8 * width + 24,
            dictionary=[S.SAMPLE_ID, S.CLICK, S.CONVERSION, f"{S.FEAT_WTS}.list.element", S.USER_KEY]))
    # both writers lay out _data/split=<s>/sample_tier=<t>/: each split directory moves into place
    for split in S.SPLITS:
        if storage.exists(f"{tmp}/_data/split={split}"):
            storage.rename(f"{tmp}/_data/split={split}", f"{tmp}/{split}")
    storage.delete(f"{tmp}/_data", recursive=True)
    return n_files


def _unknown_fields(parsed: DataFrame) -> tuple[int, dict]:
    """(entries with a field not in schemas/raw.py, {field: entries} of the UNKNOWN_TOP most frequent) over the
    lines that parse; one pass over the persisted rows, the distinct unknown fields aggregated on the executors."""
    with_unknown = parsed.where(F.col(UNKNOWN).isNotNull())
    total = with_unknown.select(F.sum(F.size(UNKNOWN))).first()[0] or 0
    if not total:
        return 0, {}
    top = (with_unknown.select(F.explode(UNKNOWN).alias("f")).groupBy("f").count()
           .orderBy(F.desc("count"), "f").limit(UNKNOWN_TOP).collect())
    return int(total), {r["f"]: r["count"] for r in top}


def _account(spark: SparkSession, cfg: Config, tmp: str, plan: Plan, split_info: dict) -> dict:
    """Counts from what was written (cheap Parquet reads) and the accounting identity."""
    rates = cfg.etl.sampling_rates
    read_skel = plan.rows.count()
    read_common = plan.common.count()
    rejected_common = plan.common.where(F.col(REASON).isNotNull()).count()
    q = spark.read.parquet(f"{tmp}/{S.QUARANTINE}")
    q_counts = {r[S.Q_KIND]: r["n"] for r in q.groupBy(S.Q_KIND).agg(F.count("*").alias("n")).collect()}
    reasons = q.groupBy(S.Q_KIND, F.regexp_replace(S.Q_REASON, r"[0-9a-f]{16}|'.*'|\".*\"|\d+", "N").alias("r")) \
               .count().orderBy(F.desc("count")).limit(20).collect()
    splits = {}
    for split in S.SPLITS:
        path = f"{tmp}/{split}"
        if not storage.exists(path):
            splits[split] = {"rows": 0, "clicks": 0, "conversions": 0, "tiers": {}}
            continue
        agg = (spark.read.parquet(path).groupBy(S.SAMPLE_TIER)
               .agg(F.count("*").alias("n"), F.sum(S.CLICK).alias("c"), F.sum(S.CONVERSION).alias("v")).collect())
        by_tier = {r[S.SAMPLE_TIER]: r for r in agg}
        subsets, cum = {}, [0, 0, 0]
        for t, rate in enumerate(rates):
            r = by_tier.get(t)
            if r is not None:
                cum = [cum[0] + r["n"], cum[1] + r["c"], cum[2] + r["v"]]
            subsets[str(rate)] = {"tier": t, "rows": cum[0], "clicks": cum[1], "conversions": cum[2]}
        splits[split] = {"rows": cum[0], "clicks": cum[1], "conversions": cum[2], "subsets": subsets}
    written = sum(s["rows"] for s in splits.values())
    unknown = {kind: _unknown_fields(df) for kind, df in (("skeleton", plan.rows), ("common", plan.common))}
    manifest = {
        "rows": {"skeleton_read": read_skel, "written": written, "skeleton_quarantined": q_counts.get("skeleton", 0),
                 "common_read": read_common, "common_quarantined": q_counts.get("common", 0)},
        "splits": splits, "split": split_info, "sampling_rates": list(rates),
        "quarantine_reasons": [{"kind": r[S.Q_KIND], "reason": r["r"], "count": r["count"]} for r in reasons],
        # entries whose field is not one of schemas/raw.py's (not encoded; their line is kept), and the top ids
        "unknown_fields": {kind: n for kind, (n, _) in unknown.items()},
        "unknown_field_ids": {kind: top for kind, (_, top) in unknown.items()},
        "layout": FeatureLayout.from_config(cfg.features).to_dict(),
        "schema": json.loads(S.DATASET_SCHEMA.json()), "config": to_dict(cfg), "version": 1,
    }
    rows = manifest["rows"]
    rows["quarantined_share"] = rows["skeleton_quarantined"] / max(rows["skeleton_read"], 1)
    if rows["skeleton_read"] != rows["written"] + rows["skeleton_quarantined"]:
        raise EtlError(f"accounting identity broken: read {rows['skeleton_read']} != written {rows['written']} + "
                       f"quarantined {rows['skeleton_quarantined']} (staging kept at {tmp})")
    if rows["common_quarantined"] != rejected_common:
        raise EtlError(f"common lines: {rejected_common} rejected but {rows['common_quarantined']} in the quarantine "
                       f"(did the input change during the run?) (staging kept at {tmp})")
    return manifest


def _check_quarantine(cfg: Config, manifest: dict, tmp: str) -> None:
    share = manifest["rows"]["quarantined_share"]
    if share > cfg.etl.max_quarantine_share:
        top = "; ".join(f"{r['count']}x {r['kind']}: {r['reason']}" for r in manifest["quarantine_reasons"][:3])
        raise QuarantineGateError(f"{share:.2%} of skeleton lines were quarantined (> etl.max_quarantine_share="
                                  f"{cfg.etl.max_quarantine_share:.2%}); top reasons: {top}. "
                                  f"Inspect {storage.display(tmp)}/{S.QUARANTINE} (output not committed)")


def _read_manifest(out: str) -> dict:
    from esmm.artifacts import read_manifest
    return read_manifest(out)


def summary_text(m: dict) -> str:
    """The manifest in a few lines: rows read = written + quarantined, per-split counts and rates, the layout."""
    r = m["rows"]
    lines = [f"rows read {r['skeleton_read']:,} = written {r['written']:,} + quarantined {r['skeleton_quarantined']:,}"
             f" | common lines {r['common_read']:,} (quarantined {r['common_quarantined']:,})"]
    for split, s in m["splits"].items():
        ctr = s["clicks"] / max(s["rows"], 1)
        cvr = s["conversions"] / max(s["clicks"], 1)
        lines.append(f"{split:5s}: {s['rows']:>10,} rows  CTR {ctr:6.2%}  CVR|click {cvr:6.2%}  subsets "
                     + " ".join(f"{k}:{v['rows']:,}" for k, v in s.get("subsets", {}).items()))
    lines.append(f"slots per row {m['layout']['num_slots']}, embedding rows {m['layout']['num_embeddings']:,}")
    return "\n".join(lines)
