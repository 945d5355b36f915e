"""Raw Ali-CCP log -> the processed Parquet dataset (layout in schemas/dataset.py).

Pipeline (all Spark-native expressions, no Python UDFs; the join is a distributed shuffle join):

1. read the skeleton and common text files (``spark.read.text``), split each line into its columns and its
   ``feature_list`` into (field, id, value) structs with ``try_cast`` so bad numbers become nulls, not task failures;
2. validate every line and give each bad one a reason naming the column/field (``_skeleton_reason``/``_common_reason``);
3. encode the good lines' fields: per field, top-K entries by value, hashed into the field's bucket range with the
   one hash of ``esmm.features`` (Spark's ``xxhash64``), padded to fixed length; common lines are encoded once per
   key and joined to their impressions on (raw file split, common_feature_index);
4. assign the train/test split (raw files, or the time split at the median sample_id) and the nested sampling tier
   (a hash of sample_id; the subset at rate ``rates[t]`` is ``sample_tier <= t``, read by partition pruning);
5. write dataset and quarantine into a temporary directory, check rows read == rows written + rows quarantined,
   write the manifest, then move the directory into place in one rename (outputs appear atomically).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

import schemas as S
from esmm import spark as sparkfs
from esmm.config import Config, to_dict
from esmm.features import FeatureLayout

log = logging.getLogger(__name__)

HASH_MOD = 1_000_000  # sampling tiers use pmod(xxhash64(sample_id), HASH_MOD) / HASH_MOD as a uniform draw
ENTRY = "entries"
RAW_SPLIT = "raw_split"
FILE = "file"
REASON = "reason"


class EtlError(RuntimeError):
    """The ETL refused its input or its output; the message says which file/threshold/path and why."""


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
                fs, p = sparkfs._fs(spark, path)
                summary = fs.getContentSummary(p)
                mtime = max(st.getModificationTime() for st in fs.listStatus(p))
                out.append({"kind": kind, "split": split, "path": path, "bytes": int(summary.getLength()),
                            "mtime": int(mtime)})
        return out


def find_inputs(spark: SparkSession, raw_dir: str) -> RawInputs:
    """The Ali-CCP files under ``raw_dir`` (plain files or Spark part-file directories of the same names)."""
    skel, common = {}, {}
    for split in S.RAW_SPLITS:
        sp = f"{raw_dir}/{S.SKELETON_FILE.format(split=split)}"
        cp = f"{raw_dir}/{S.COMMON_FILE.format(split=split)}"
        if sparkfs.exists(spark, sp):
            if not sparkfs.exists(spark, cp):
                raise EtlError(f"{sp} has no matching common features file: expected {cp}")
            skel[split], common[split] = sp, cp
    if "train" not in skel:
        raise EtlError(f"no {S.SKELETON_FILE.format(split='train')} under {raw_dir} "
                       f"(run jobs/generate.py, or point paths.raw at the Ali-CCP files)")
    return RawInputs(skel, common)


def _read_lines(spark: SparkSession, paths: dict) -> DataFrame:
    frames = [spark.read.text(p).select(F.col("value"), F.col("_metadata.file_path").alias(FILE),
                                        F.lit(split).alias(RAW_SPLIT))
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
        fid = F.substring_index(rest, S.VALUE_SEP, 1).try_cast("long")
        val = F.substring_index(rest, S.VALUE_SEP, -1).try_cast("double")
        well_formed = (F.size(F.split(e, f"[{S.ID_SEP}{S.VALUE_SEP}]")) == 3) & \
            (F.instr(e, S.ID_SEP) < F.instr(e, S.VALUE_SEP))
        return F.struct(F.element_at(_field_index(), field).alias("f"), (-val).alias("nv"), fid.alias("id"),
                        val.alias("value"), field.alias("field"), e.alias("raw"),
                        (well_formed & fid.isNotNull() & val.isNotNull()).alias("ok"))

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
    return text.try_cast("long")


def parse_skeleton(lines: DataFrame) -> DataFrame:
    """Split skeleton lines into typed columns plus ``reason`` (null for a good line)."""
    c = F.split(F.col("value"), S.COL_SEP, -1)
    n = F.size(c)
    sid, clk, conv, key, num = (_int_col(F.get(c, 0)), _int_col(F.get(c, 1)), _int_col(F.get(c, 2)),
                                F.get(c, 3), _int_col(F.get(c, 4)))
    entries = _entries(F.coalesce(F.get(c, 5), F.lit("")))
    df = lines.select("value", FILE, RAW_SPLIT, sid.alias(S.SAMPLE_ID), clk.alias(S.CLICK),
                      conv.alias(S.CONVERSION), key.alias(S.COMMON_KEY), num.alias(S.FEATURE_NUM),
                      entries.alias(ENTRY), n.alias("ncols"))
    e, raw = F.col(ENTRY), lambda i: F.get(c, i)
    reason = (F.when(F.col("ncols") != len(S.SKELETON_COLUMNS),
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
    return df.withColumn(REASON, reason)


def parse_common(lines: DataFrame) -> DataFrame:
    """Split common lines into typed columns plus ``reason``; a key seen on several lines is rejected on all."""
    from pyspark.sql.window import Window
    c = F.split(F.col("value"), S.COL_SEP, -1)
    num = _int_col(F.get(c, 1))
    entries = _entries(F.coalesce(F.get(c, 2), F.lit("")))
    df = lines.select("value", FILE, RAW_SPLIT, F.get(c, 0).alias(S.COMMON_KEY), num.alias(S.FEATURE_NUM),
                      entries.alias(ENTRY), F.size(c).alias("ncols"))
    dup = F.count(F.lit(1)).over(Window.partitionBy(RAW_SPLIT, S.COMMON_KEY))
    e = F.col(ENTRY)
    reason = (F.when(F.col("ncols") != len(S.COMMON_COLUMNS),
                     F.format_string(f"expected {len(S.COMMON_COLUMNS)} comma-separated columns, got %d", "ncols"))
              .when(F.col(S.FEATURE_NUM).isNull(), F.format_string("feature_num: not an integer: %s", _q(F.get(c, 1))))
              .when(F.col(S.FEATURE_NUM) != F.size(e),
                    F.format_string("feature_num=%d but feature_list has %d entries", S.FEATURE_NUM, F.size(e)))
              .when(dup > 1, F.format_string("common_feature_index %s appears on %d lines", S.COMMON_KEY, dup))
              .otherwise(_first_bad_entry_reason(e)))
    return df.withColumn(REASON, reason)


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
                  wts_col: str) -> DataFrame:
    """Add ``ids_col``/``wts_col``: the encoded slots of ``fields`` (a contiguous run of layout.fields).

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
    return df.withColumn(ids_col, F.concat(*ids)).withColumn(wts_col, F.concat(*wts)).drop(srt)


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


@dataclass
class Plan:
    """The lazily built DataFrames of one ETL run."""
    dataset: DataFrame        # good rows, DATASET_SCHEMA columns + split
    quarantine: DataFrame     # QUARANTINE_SCHEMA
    skeleton_lines: DataFrame
    common_lines: DataFrame


def build_plan(spark: SparkSession, cfg: Config, inputs: RawInputs) -> Plan:
    """Dataset and quarantine as two lazy queries over the same parsed lines.

    Both sides are encoded *before* the join, so the shuffle carries only compact id/weight arrays (not the raw
    line and its parsed entries). Good skeleton lines either find their key among the good common lines (inner
    join -> dataset) or not (anti join -> quarantine), so every line read lands in exactly one of the two.
    """
    layout = FeatureLayout.from_config(cfg.features)
    skel_lines, common_lines = _read_lines(spark, inputs.skeleton), _read_lines(spark, inputs.common)
    skel, common = parse_skeleton(skel_lines), parse_common(common_lines)
    keys = [RAW_SPLIT, S.COMMON_KEY]

    good_common = common.where(F.col(REASON).isNull())
    encoded_common = encode_fields(good_common.select(*keys, ENTRY), ENTRY, layout, S.COMMON_FIELDS,
                                   "c_ids", "c_wts").drop(ENTRY)

    good_skel = skel.where(F.col(REASON).isNull())
    encoded_skel = encode_fields(
        good_skel.select(*keys, S.SAMPLE_ID, F.col(S.CLICK).cast("int").alias(S.CLICK),
                         F.col(S.CONVERSION).cast("int").alias(S.CONVERSION), ENTRY),
        ENTRY, layout, S.SKELETON_FIELDS, "s_ids", "s_wts").drop(ENTRY)
    good = encoded_skel.join(encoded_common, on=keys, how="inner").select(
        S.SAMPLE_ID, S.CLICK, S.CONVERSION, F.concat("c_ids", "s_ids").alias(S.FEAT_IDS),
        F.concat("c_wts", "s_wts").alias(S.FEAT_WTS), RAW_SPLIT)
    good = good.withColumn(S.SAMPLE_TIER, sample_tier(F.col(S.SAMPLE_ID), cfg.etl.sampling_rates))

    orphans = good_skel.select(*keys, FILE, "value").join(good_common.select(*keys), on=keys, how="left_anti") \
        .withColumn(REASON, F.format_string("common_feature_index %s: no valid common features line in the "
                                            "matching common_features file", S.COMMON_KEY))
    quarantined = [
        skel.where(F.col(REASON).isNotNull()).select(F.lit("skeleton").alias(S.Q_KIND), REASON, FILE, "value"),
        orphans.select(F.lit("skeleton").alias(S.Q_KIND), REASON, FILE, "value"),
        common.where(F.col(REASON).isNotNull()).select(F.lit("common").alias(S.Q_KIND), REASON, FILE, "value"),
    ]
    q = quarantined[0].unionByName(quarantined[1]).unionByName(quarantined[2])
    q = q.select(S.Q_KIND, F.col(REASON).alias(S.Q_REASON), F.col(FILE).alias(S.Q_FILE), F.col("value").alias(S.Q_LINE))
    return Plan(good, q, skel_lines, common_lines)


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
    """Run the ETL; returns the manifest. Idempotent: an existing output from the same inputs and config is kept."""
    raw_dir = raw_dir or cfg.paths.raw
    out = (out or cfg.paths.dataset).rstrip("/")
    t0 = time.time()
    inputs = find_inputs(spark, raw_dir)
    fingerprint = inputs.fingerprint(spark)
    chash = _config_hash(cfg)
    existing = _read_manifest(spark, out)
    if existing is not None and not overwrite:
        if existing.get("inputs") == fingerprint and existing.get("config_hash") == chash:
            log.info("ETL output %s is up to date (same inputs and config): nothing to do", out)
            return existing
        raise EtlError(f"{out} exists and was built from other inputs or config; pass --overwrite to replace it")

    tmp = f"{out}.tmp-{uuid.uuid4().hex[:8]}"
    log.info("ETL %s -> %s (staging in %s)", raw_dir, out, tmp)
    plan = build_plan(spark, cfg, inputs)
    data, split_info = assign_split(spark, plan.dataset, cfg.etl.split, inputs)
    block = cfg.etl.row_group_mb * 1024 * 1024
    (data.drop(RAW_SPLIT).write.partitionBy("split", S.SAMPLE_TIER)
     .option("parquet.block.size", block).option("maxRecordsPerFile", cfg.etl.rows_per_file)
     .parquet(f"{tmp}/_data"))
    log.info("dataset written (%.1fs)", time.time() - t0)
    plan.quarantine.write.parquet(f"{tmp}/{S.QUARANTINE}")
    for split in S.SPLITS:
        src = f"{tmp}/_data/split={split}"
        if sparkfs.exists(spark, src):
            sparkfs.rename(spark, src, f"{tmp}/{split}")
    sparkfs.delete(spark, f"{tmp}/_data")

    manifest = _account(spark, cfg, tmp, plan, split_info)
    manifest.update({"inputs": fingerprint, "config_hash": chash, "seconds": round(time.time() - t0, 2)})
    sparkfs.write_text(spark, f"{tmp}/{S.MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True))
    _check_quarantine(cfg, manifest, tmp)
    sparkfs.commit_dir(spark, tmp, out, replace=existing is not None)
    log.info("ETL done in %.1fs: %s", time.time() - t0, json.dumps(manifest["rows"]))
    return manifest


def _account(spark: SparkSession, cfg: Config, tmp: str, plan: Plan, split_info: dict) -> dict:
    """Counts from what was written (cheap Parquet reads) and the accounting identity."""
    rates = cfg.etl.sampling_rates
    read_skel = plan.skeleton_lines.count()
    read_common = plan.common_lines.count()
    q = spark.read.parquet(f"{tmp}/{S.QUARANTINE}")
    q_counts = {r[S.Q_KIND]: r["n"] for r in q.groupBy(S.Q_KIND).agg(F.count("*").alias("n")).collect()}
    reasons = q.groupBy(S.Q_KIND, F.regexp_replace(S.Q_REASON, r"[0-9a-f]{16}|'.*'|\".*\"|\d+", "N").alias("r")) \
               .count().orderBy(F.desc("count")).limit(20).collect()
    splits = {}
    for split in S.SPLITS:
        path = f"{tmp}/{split}"
        if not sparkfs.exists(spark, path):
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
    manifest = {
        "rows": {"skeleton_read": read_skel, "written": written, "skeleton_quarantined": q_counts.get("skeleton", 0),
                 "common_read": read_common, "common_quarantined": q_counts.get("common", 0)},
        "splits": splits, "split": split_info, "sampling_rates": list(rates),
        "quarantine_reasons": [{"kind": r[S.Q_KIND], "reason": r["r"], "count": r["count"]} for r in reasons],
        "layout": FeatureLayout.from_config(cfg.features).to_dict(),
        "schema": json.loads(S.DATASET_SCHEMA.json()), "config": to_dict(cfg), "version": 1,
    }
    rows = manifest["rows"]
    rows["quarantined_share"] = rows["skeleton_quarantined"] / max(rows["skeleton_read"], 1)
    if rows["skeleton_read"] != rows["written"] + rows["skeleton_quarantined"]:
        raise EtlError(f"accounting identity broken: read {rows['skeleton_read']} != written {rows['written']} + "
                       f"quarantined {rows['skeleton_quarantined']} (staging kept at {tmp})")
    return manifest


def _check_quarantine(cfg: Config, manifest: dict, tmp: str) -> None:
    share = manifest["rows"]["quarantined_share"]
    if share > cfg.etl.max_quarantine_share:
        top = "; ".join(f"{r['count']}x {r['kind']}: {r['reason']}" for r in manifest["quarantine_reasons"][:3])
        raise EtlError(f"{share:.2%} of skeleton lines were quarantined (> etl.max_quarantine_share="
                       f"{cfg.etl.max_quarantine_share:.2%}); top reasons: {top}. "
                       f"Inspect {tmp}/{S.QUARANTINE} (output not committed)")


def _read_manifest(spark: SparkSession, out: str) -> dict | None:
    path = f"{out}/{S.MANIFEST}"
    if not sparkfs.exists(spark, path):
        if sparkfs.exists(spark, out):
            raise EtlError(f"{out} exists but has no {S.MANIFEST} (not an ETL output?); remove it or choose another path")
        return None
    return json.loads(sparkfs.read_text(spark, path))


def read_manifest(spark: SparkSession, dataset: str) -> dict:
    m = _read_manifest(spark, dataset.rstrip("/"))
    if m is None:
        raise EtlError(f"no dataset at {dataset}: run jobs/etl.py first")
    return m
