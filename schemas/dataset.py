"""The processed Parquet layout that training and evaluation stream.

One row per impression::

    sample_id   long      increasing in time
    click       int       0/1
    conversion  int       0/1 (conversion=1 implies click=1)
    feat_ids    array<int>    fixed length L = sum of the fields' max_len; slot ranges per field in ALL_FIELDS order.
                              Values are *global* hashed ids: field offset + bucket, bucket 0 = "missing/padding".
    feat_wts    array<float>  same length; weights for pooling. Single-valued fields: 1.0. Multi-valued fields:
                              top-K entries by value, weights = value / sum(kept values) (a weighted mean).
                              Padding slots: id = field offset (bucket 0), weight 0. A field absent from the line:
                              first slot id = field offset with weight 1 (a learned "missing" embedding).
    user_key    long      the user of the impression, for per-user metrics (GAUC): the full 64-bit hash of field
                          101's raw user id, ``xxhash64(int field_index("101") = 0, long id)`` with Spark's seed 42,
                          i.e. the hash the feature encoding reduces modulo the bucket count, before the modulo (so
                          two ids share a key with probability ~2^-64, not ~1/buckets). Field 101 is on the common
                          features line; with several 101 entries the one the encoding keeps first (highest value,
                          then smallest id). A line without field 101 gets ``UNKNOWN_USER`` = 0, which per-user
                          metrics leave out. Datasets written before this column existed lack it (then no GAUC).
    sample_tier int       partition column: the smallest sampling-rate tier the row belongs to (nested subsets).

Layout on disk: ``<dataset>/{train,test}/sample_tier=<t>/part-*.parquet``, ``<dataset>/quarantine/``,
``<dataset>/manifest.json``. The subset at sampling rate ``rates[t]`` is ``sample_tier <= t``.
"""
from __future__ import annotations

from pyspark.sql.types import (ArrayType, BinaryType, FloatType, IntegerType, LongType, StringType, StructField,
                               StructType)

from schemas.raw import CLICK, CONVERSION, SAMPLE_ID

FEAT_IDS = "feat_ids"
FEAT_WTS = "feat_wts"
USER_KEY = "user_key"
USER_FIELD = "101"      # the raw field holding the user id
UNKNOWN_USER = 0        # user_key of an impression whose common line has no field 101
SAMPLE_TIER = "sample_tier"
TRAIN = "train"
TEST = "test"
SPLITS = (TRAIN, TEST)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine"

DATASET_SCHEMA = StructType([
    StructField(SAMPLE_ID, LongType(), False),
    StructField(CLICK, IntegerType(), False),
    StructField(CONVERSION, IntegerType(), False),
    StructField(FEAT_IDS, ArrayType(IntegerType(), False), False),
    StructField(FEAT_WTS, ArrayType(FloatType(), False), False),
    StructField(USER_KEY, LongType(), False),
    StructField(SAMPLE_TIER, IntegerType(), False),
])
# Columns a trainer reads (the partition column comes from the path).
TRAIN_COLUMNS = (SAMPLE_ID, CLICK, CONVERSION, FEAT_IDS, FEAT_WTS)

# Quarantine: every rejected raw line, with why and where.
Q_KIND = "kind"          # "skeleton" | "common"
Q_REASON = "reason"
Q_FILE = "file"
Q_LINE = "line"          # the line as text; invalid UTF-8 shown as U+FFFD (the first etl.max_line_bytes bytes)
Q_RAW = "raw_bytes"      # the same line's exact bytes (what `line` shows, before any U+FFFD substitution)
QUARANTINE_SCHEMA = StructType([
    StructField(Q_KIND, StringType(), False),
    StructField(Q_REASON, StringType(), False),
    StructField(Q_FILE, StringType(), True),
    StructField(Q_LINE, StringType(), True),
    StructField(Q_RAW, BinaryType(), True),
])

# Ground truth written by the generator, keyed by sample_id.
TRUE_CTR = "true_ctr"
TRUE_CVR = "true_cvr"
WOULD_CONVERT = "would_convert"
GROUND_TRUTH_SCHEMA = StructType([
    StructField(SAMPLE_ID, LongType(), False),
    StructField(TRUE_CTR, FloatType(), False),
    StructField(TRUE_CVR, FloatType(), False),
    StructField(WOULD_CONVERT, IntegerType(), False),
    StructField(CLICK, IntegerType(), False),
    StructField(CONVERSION, IntegerType(), False),
])

# Predictions written by the evaluation job (long format: one row per sample and method). user_key is the test row's
# (null when the dataset predates the column: GAUC is then omitted).
P_CTR = "p_ctr"
P_CVR = "p_cvr"
P_CTCVR = "p_ctcvr"
METHOD = "method"
RUN_ID = "run_id"
PREDICTION_SCHEMA = StructType([
    StructField(SAMPLE_ID, LongType(), False),
    StructField(CLICK, IntegerType(), False),
    StructField(CONVERSION, IntegerType(), False),
    StructField(P_CTR, FloatType(), False),
    StructField(P_CVR, FloatType(), False),
    StructField(P_CTCVR, FloatType(), False),
    StructField(METHOD, StringType(), False),
    StructField(RUN_ID, StringType(), False),
    StructField(USER_KEY, LongType(), True),
])
