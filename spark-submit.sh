#!/usr/bin/env bash
# Run any job under jobs/ with the project's venv:
#   ./spark-submit.sh jobs/etl.py --conf conf/demo.yaml [--set key=value ...]
# Master: --master URL (first argument) or SPARK_MASTER; default local[*]. For a cluster master (yarn, k8s://,
# spark://) the code (the package's wheel, see pyproject.toml), the configs (--files) and a packed venv (--archives, venv-pack)
# are shipped with the job, and the executors' Python is the packed venv's; with ESMM_EXECUTOR_VENV=DIR (a venv of
# this requirements.txt at DIR on every node: a shared filesystem, an image) nothing is packed or unpacked and the
# executors' Python is DIR/bin/python.
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
    BUILD="$ROOT/dist"
    CONFS=$(ls "$ROOT"/conf/*.yaml "$ROOT"/conf/log4j2.properties | paste -sd, -)
    if [ -n "${ESMM_EXECUTOR_VENV:-}" ]; then
      # a venv already on every node at this path: ship the code only, nothing to pack or unpack
      case "$ESMM_EXECUTOR_VENV" in /*) ;; *) echo "spark-submit.sh: ESMM_EXECUTOR_VENV must be an absolute path, got $ESMM_EXECUTOR_VENV" >&2; exit 2 ;; esac
      [ -x "$ESMM_EXECUTOR_VENV/bin/python" ] || echo "spark-submit.sh: warning: no $ESMM_EXECUTOR_VENV/bin/python on this machine (it must exist on every node)" >&2
      bash "$ROOT/scripts/package.sh" --code-only >/dev/null   # the code as dist/esmm.zip
      PYEXEC="$ESMM_EXECUTOR_VENV/bin/python"; ARCHIVES=()
    else
      bash "$ROOT/scripts/package.sh" >/dev/null   # the code as dist/esmm.zip, the venv as dist/venv.tar.gz
      # the executors run the packed venv's Python, unpacked in their work dirs
      PYEXEC=./environment/bin/python; ARCHIVES=(--archives "$BUILD/venv.tar.gz#environment")
    fi
    # the driver runs this venv's Python
    export PYSPARK_DRIVER_PYTHON="$VENV/bin/python" PYSPARK_PYTHON="$PYEXEC"
    case "$MASTER" in
      spark://127.*|spark://localhost[:/]*)  # a cluster on this machine (scripts/local-cluster.sh): loopback only
        export SPARK_LOCAL_IP=127.0.0.1
        EXTRA+=(--conf spark.driver.host=127.0.0.1 --conf spark.driver.bindAddress=127.0.0.1) ;;
    esac
    exec "$SUBMIT" --master "$MASTER" "${EXTRA[@]}" \
      --py-files "$BUILD/esmm.zip" --files "$CONFS" ${ARCHIVES[@]+"${ARCHIVES[@]}"} \
      --conf spark.pyspark.driver.python="$VENV/bin/python" \
      --conf spark.pyspark.python="$PYEXEC" \
      --conf spark.executorEnv.PYSPARK_PYTHON="$PYEXEC" \
      --conf spark.yarn.appMasterEnv.PYSPARK_PYTHON="$PYEXEC" \
      "$JOB" "$@" ;;
esac
