#!/usr/bin/env bash
# make demo: the main job end to end on a local Spark (generate -> ETL -> train all methods -> evaluate -> Table 2).
set -euo pipefail
cd "$(dirname "$0")/.."
CONF="${1:-conf/demo.yaml}"; shift || true
exec ./spark-submit.sh --master "${SPARK_MASTER:-local[2]}" jobs/pipeline.py --conf "$CONF" "$@"
