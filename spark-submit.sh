#!/usr/bin/env bash
# Run any job under jobs/ with the project's venv:
#   ./spark-submit.sh jobs/etl.py --conf conf/demo.yaml [--set key=value ...]
# Master: --master URL (first argument) or SPARK_MASTER; default local[*]. For a cluster master (yarn, k8s://,
# spark://) the code (the package's wheel, see pyproject.toml), the configs (--files) and a packed venv (--archives, venv-pack)
# are shipped with the job, and the executors' Python is the packed venv's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
MASTER="${SPARK_MASTER:-local[*]}"
if [ "${1:-}" = "--master" ]; then MASTER="$2"; shift 2; fi
JOB="${1:?usage: ./spark-submit.sh [--master URL] jobs/<job>.py [job args]}"; shift
[ -f "$JOB" ] || { echo "spark-submit.sh: no such job: $JOB" >&2; exit 2; }

bash "$ROOT/scripts/install.sh"
VENV="$ROOT/.venv"
SUBMIT="$VENV/bin/spark-submit"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
EXTRA=(--conf spark.ui.showConsoleProgress=false --driver-memory "${SPARK_DRIVER_MEMORY:-2g}"
       --driver-java-options "-Dlog4j2.configurationFile=file:$ROOT/conf/log4j2.properties")

case "$MASTER" in
  local*)
    export PYSPARK_PYTHON="$VENV/bin/python" PYSPARK_DRIVER_PYTHON="$VENV/bin/python"
    exec "$SUBMIT" --master "$MASTER" "${EXTRA[@]}" "$JOB" "$@" ;;
  *)
    BUILD="$ROOT/dist"; mkdir -p "$BUILD"
    # the code: the package's wheel (pyproject.toml), built on every submit (seconds, pure Python) and shipped under a
    # .zip name, as PySpark puts only .zip/.egg/.jar py-files on the executors' Python path (a wheel is a zip with the
    # packages at its root). Built aside and renamed, so a concurrent submit never ships half a file.
    # One build at a time (setuptools builds in the tree: build/, *.egg-info), from a clean build/ (a killed build
    # must not leave modules behind that the next wheel would ship).
    (
      if command -v flock >/dev/null; then flock 8; fi
      WHEELS="$BUILD/wheel.$$"
      rm -rf "$WHEELS" "$ROOT/build" "$ROOT"/*.egg-info
      "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w "$WHEELS" "$ROOT" >&2 \
        || { echo "spark-submit.sh: building the esmm-spark wheel failed" >&2; exit 1; }
      WHEEL=$(ls "$WHEELS"/esmm_spark-*.whl)
      cp -f "$WHEEL" "$BUILD/esmm.zip.$$" && mv -f "$BUILD/esmm.zip.$$" "$BUILD/esmm.zip"
      mv -f "$WHEEL" "$BUILD/" && rm -rf "$WHEELS" "$ROOT/build" "$ROOT"/*.egg-info
    ) 8>"$BUILD/.wheel.lock"
    # the venv, packed once per requirements/install version (delete dist/venv.tar.gz to force a repack). Left out,
    # as the driver and every executor unpack it: pyspark's jars (the executors' JVMs are the cluster's Spark), torch's
    # C++ headers and the packages' own test suites (0.7 GB and 17k files of 2.0 GB and 37k)
    PACK_OPTS=(--exclude 'lib/python3*/site-packages/pyspark/jars/*' --exclude 'lib/python3*/site-packages/torch/include/*'
               --exclude 'lib/python3*/site-packages/*/tests/*' --compress-level 1)
    KEY="$(cat "$ROOT/requirements.txt" "$ROOT/scripts/install.sh" <(echo "${PACK_OPTS[*]}") | md5sum | cut -c1-12)"
    if [ "$(cat "$BUILD/venv.tar.gz.key" 2>/dev/null)" != "$KEY" ] || [ ! -f "$BUILD/venv.tar.gz" ]; then
      (
        if command -v flock >/dev/null; then flock 9; fi  # one packer at a time
        if [ "$(cat "$BUILD/venv.tar.gz.key" 2>/dev/null)" != "$KEY" ] || [ ! -f "$BUILD/venv.tar.gz" ]; then
          echo "spark-submit.sh: packing $VENV -> $BUILD/venv.tar.gz (once per requirements version)" >&2
          rm -f "$BUILD/venv.tar.gz.key"
          "$VENV/bin/venv-pack" -p "$VENV" -o "$BUILD/venv.tar.gz.tmp" --format tar.gz "${PACK_OPTS[@]}" --force -q
          mv -f "$BUILD/venv.tar.gz.tmp" "$BUILD/venv.tar.gz"
          echo "$KEY" >"$BUILD/venv.tar.gz.key"
        fi
      ) 9>"$BUILD/.pack.lock"
    fi
    CONFS=$(ls "$ROOT"/conf/*.yaml "$ROOT"/conf/log4j2.properties | paste -sd, -)
    # the driver runs this venv's Python; the executors the packed one, unpacked in their work dirs
    export PYSPARK_DRIVER_PYTHON="$VENV/bin/python" PYSPARK_PYTHON=./environment/bin/python
    case "$MASTER" in
      spark://127.*|spark://localhost[:/]*)  # a cluster on this machine (scripts/local-cluster.sh): loopback only
        export SPARK_LOCAL_IP=127.0.0.1
        EXTRA+=(--conf spark.driver.host=127.0.0.1 --conf spark.driver.bindAddress=127.0.0.1) ;;
    esac
    exec "$SUBMIT" --master "$MASTER" "${EXTRA[@]}" \
      --py-files "$BUILD/esmm.zip" --files "$CONFS" --archives "$BUILD/venv.tar.gz#environment" \
      --conf spark.pyspark.driver.python="$VENV/bin/python" \
      --conf spark.pyspark.python=./environment/bin/python \
      --conf spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python \
      --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON=./environment/bin/python \
      "$JOB" "$@" ;;
esac
