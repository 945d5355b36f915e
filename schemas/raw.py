"""The raw Ali-CCP log layout (see ../shared/ALI_CCP_FORMAT.md).

Two line kinds, no header, top level separated by ``,``::

    sample_skeleton_*:  sample_id,click,conversion,common_feature_index,feature_num,feature_list
    common_features_*:  common_feature_index,feature_num,feature_list

``feature_list`` entries are separated by ``\\x01``; each entry is ``field_id\\x02feature_id\\x03feature_value``.
"""
from __future__ import annotations

from pyspark.sql.types import (DoubleType, IntegerType, LongType, StringType, StructField, StructType)

COL_SEP = ","
ENTRY_SEP = "\x01"
ID_SEP = "\x02"
VALUE_SEP = "\x03"

# File names of the public release; the ETL also accepts Spark-written directories of part files with these names.
SKELETON_FILE = "sample_skeleton_{split}.csv"
COMMON_FILE = "common_features_{split}.csv"
RAW_SPLITS = ("train", "test")

# Skeleton columns, in line order.
SAMPLE_ID = "sample_id"
CLICK = "click"
CONVERSION = "conversion"
COMMON_KEY = "common_feature_index"
FEATURE_NUM = "feature_num"
FEATURE_LIST = "feature_list"
SKELETON_COLUMNS = (SAMPLE_ID, CLICK, CONVERSION, COMMON_KEY, FEATURE_NUM, FEATURE_LIST)
COMMON_COLUMNS = (COMMON_KEY, FEATURE_NUM, FEATURE_LIST)
COMMON_KEY_HEX_LEN = 16

# The 23 fields, grouped by where they appear. The order here is the slot order of the processed dataset.
USER_FIELDS = ("101", "121", "122", "124", "125", "126", "127", "128", "129")
HISTORY_FIELDS = ("109_14", "110_14", "127_14", "150_14")  # multi-valued, value = count
COMMON_FIELDS = USER_FIELDS + HISTORY_FIELDS
ITEM_FIELDS = ("205", "206", "207", "210", "216")  # 210 (intention node) can be multi-valued
COMBINATION_FIELDS = ("508", "509", "702", "853")  # history x item attribute
CONTEXT_FIELDS = ("301",)
SKELETON_FIELDS = ITEM_FIELDS + COMBINATION_FIELDS + CONTEXT_FIELDS
ALL_FIELDS = COMMON_FIELDS + SKELETON_FIELDS
assert len(ALL_FIELDS) == 23 and len(set(ALL_FIELDS)) == 23

# Combination field -> (history field, item field) it crosses.
COMBINATIONS = {"508": ("109_14", "206"), "509": ("110_14", "207"), "702": ("127_14", "216"), "853": ("150_14", "210")}

# Spark types of the parsed (not yet hashed) values; the raw text itself is read with spark.read.text.
SKELETON_TYPES = StructType([
    StructField(SAMPLE_ID, LongType(), False),
    StructField(CLICK, IntegerType(), False),
    StructField(CONVERSION, IntegerType(), False),
    StructField(COMMON_KEY, StringType(), False),
    StructField(FEATURE_NUM, IntegerType(), False),
    StructField(FEATURE_LIST, StringType(), False),
])
COMMON_TYPES = StructType([
    StructField(COMMON_KEY, StringType(), False),
    StructField(FEATURE_NUM, IntegerType(), False),
    StructField(FEATURE_LIST, StringType(), False),
])
# One parsed feature entry.
ENTRY_TYPE = StructType([
    StructField("field", StringType()),
    StructField("id", LongType()),
    StructField("value", DoubleType()),
])
