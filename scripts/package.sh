#!/usr/bin/env bash
# What a cluster master needs besides the job: the code as dist/esmm.zip (the package's wheel, see pyproject.toml)
# and the venv as dist/venv.tar.gz (venv-pack), for --py-files and --archives. spark-submit.sh calls it for every
# non-local master; a scheduler (examples/airflow/esmm_pipeline.py) runs it once per DAG run. Prints the two paths.
# --code-only: the code alone (the executors have the venv, ESMM_EXECUTOR_VENV); prints its path.
set -euo pipefail
CODE_ONLY=0; [ "${1:-}" = "--code-only" ] && CODE_ONLY=1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
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
    || { echo "package.sh: building the esmm-spark wheel failed" >&2; exit 1; }
  WHEEL=$(ls "$WHEELS"/esmm_spark-*.whl)
  cp -f "$WHEEL" "$BUILD/esmm.zip.$$" && mv -f "$BUILD/esmm.zip.$$" "$BUILD/esmm.zip"
  mv -f "$WHEEL" "$BUILD/" && rm -rf "$WHEELS" "$ROOT/build" "$ROOT"/*.egg-info
) 8>"$BUILD/.wheel.lock"
if [ "$CODE_ONLY" = 1 ]; then echo "$BUILD/esmm.zip"; exit 0; fi
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
      echo "package.sh: packing $VENV -> $BUILD/venv.tar.gz (once per requirements version)" >&2
      rm -f "$BUILD/venv.tar.gz.key"
      "$VENV/bin/venv-pack" -p "$VENV" -o "$BUILD/venv.tar.gz.tmp" --format tar.gz "${PACK_OPTS[@]}" --force -q
      mv -f "$BUILD/venv.tar.gz.tmp" "$BUILD/venv.tar.gz"
      echo "$KEY" >"$BUILD/venv.tar.gz.key"
    fi
  ) 9>"$BUILD/.pack.lock"
fi
echo "$BUILD/esmm.zip"
echo "$BUILD/venv.tar.gz"
