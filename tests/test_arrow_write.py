"""The pyarrow partitioned writer behind the ETL's dataset output (esmm/arrow_write.py), on a real local[2] Spark."""
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import functions as F

from esmm.arrow_write import write_partitioned

SCHEMA = pa.schema([pa.field("id", pa.int64(), False), pa.field("y", pa.int32(), False),
                    pa.field("v", pa.list_(pa.field("element", pa.float32(), False)), False)])


def test_partitions_files_row_groups_sums_and_commit(spark, tmp_path):
    out = tmp_path / "out"
    stray = out / "part=1" / "part-99999-0-dead.parquet"       # what a failed task attempt would leave behind
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"partial")
    df = spark.range(0, 5000, numPartitions=2).select(
        F.col("id"), (F.col("id") % 3 == 0).cast("int").alias("y"),
        F.array(F.col("id").cast("float"), F.lit(0.5).cast("float")).alias("v"), (F.col("id") % 2).alias("part"))
    files = write_partitioned(df, str(out), SCHEMA, ("part",), sum_cols=("y",), rows_per_file=1200,
                              row_group_bytes=100 * 300, row_bytes=100)
    assert not stray.exists()
    assert sum(f["rows"] for f in files) == 5000
    assert all(f["rows"] <= 1200 for f in files) and len(files) == 8   # 2 tasks x 2 parts x (1200 + 50)
    # y = 1 on multiples of 3: 1667 of 0..4999, 834 of them even (multiples of 6)
    by_part = {}
    for f in files:
        by_part[f["parts"]["part"]] = by_part.get(f["parts"]["part"], 0) + f["sums"]["y"]
    assert by_part == {0: 834, 1: 833}
    on_disk = sorted(str(p) for p in out.rglob("*.parquet"))
    assert on_disk == sorted(f["path"] for f in files)
    metas = [pq.ParquetFile(f["path"]).metadata for f in files]
    groups = [m.row_group(i).num_rows for m in metas for i in range(m.num_row_groups)]
    assert max(m.num_row_groups for m in metas) == 2 and max(groups) == 1024   # row groups capped at 1024 rows
    back = spark.read.parquet(str(out)).orderBy("id").collect()
    assert len(back) == 5000 and back[7]["v"] == [7.0, 0.5] and back[7]["part"] == 1 and back[6]["y"] == 1
