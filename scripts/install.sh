#!/usr/bin/env bash
# One-step set-up: creates .venv (if needed), installs the pinned stack and Horovod 0.28.1.
# Horovod is built once from the PyPI sdist with the C++17 patch (torch >= 2.1 headers need it) into a wheel
# cache outside the repo, keyed by the horovod, torch and python versions, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

HOROVOD_VERSION=0.28.1
TORCH_VERSION=$(sed -n 's/^torch==//p' requirements.txt)
PY=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
CACHE=${ESMM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/esmm-spark/wheels}

die() { echo "install: ERROR: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "$PY not found. Install Python 3.11 (petastorm needs distutils, gone in 3.12)."
command -v java >/dev/null || die "java not found. Install Java 17 (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)."
java -version 2>&1 | grep -qE 'version "17' || echo "install: WARNING: Spark 4.0 is tested with Java 17; found: $(java -version 2>&1 | head -1)" >&2
command -v g++ >/dev/null || die "g++ not found (needed once to build Horovod). Install it: apt-get install g++ cmake make."
command -v make >/dev/null || die "make not found. Install it: apt-get install make."

# The scheduler's environment (examples/airflow, tests/test_airflow.py): Airflow in its own venv, as it pins its own
# dependencies. ESMM_AIRFLOW=0 leaves it out.
AF_VENV=${AIRFLOW_VENV:-.venv-airflow}
if [ "${ESMM_AIRFLOW:-1}" != 0 ]; then
  af_stamp="$AF_VENV/.installed-$(cat requirements-airflow.txt | md5sum | cut -c1-12)"
  if [ ! -f "$af_stamp" ]; then
    echo "install: Airflow into $AF_VENV (requirements-airflow.txt, about a minute)"
    [ -x "$AF_VENV/bin/python" ] || "$PY" -m venv "$AF_VENV"
    "$AF_VENV/bin/python" -m pip install -q --upgrade "pip<25" >/dev/null
    "$AF_VENV/bin/python" -m pip install -q -r requirements-airflow.txt || die "installing Airflow failed (see above)."
    touch "$af_stamp"
  fi
fi

stamp="$VENV/.installed-$(cat requirements.txt scripts/install.sh | md5sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip<25" >/dev/null
"$VENV/bin/python" -m pip install -q -r requirements.txt

tag="horovod-${HOROVOD_VERSION}-torch${TORCH_VERSION}-py$("$VENV/bin/python" -c 'import sys;print("%d%d"%sys.version_info[:2])')"
wheeldir="$CACHE/$tag"
if ! ls "$wheeldir"/horovod-*.whl >/dev/null 2>&1; then
  CMAKE=$(command -v cmake || true)
  [ -n "$CMAKE" ] || die "cmake not found (needed once to build Horovod). Install it: apt-get install cmake."
  echo "install: building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (once, ~3 min on 2 cores) -> $wheeldir"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work"/horovod-*.tar.gz -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  mkdir -p "$wheeldir.tmp"
  GPU_OPS=""
  if command -v nvcc >/dev/null && "$VENV/bin/python" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    GPU_OPS=NCCL
  fi
  env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo ${GPU_OPS:+HOROVOD_GPU_OPERATIONS=$GPU_OPS} \
      MAKEFLAGS=-j"$(nproc)" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
      "$VENV/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir "$src" -w "$wheeldir.tmp" \
      || die "Horovod build failed (see output above)."
  rm -rf "$wheeldir" && mv "$wheeldir.tmp" "$wheeldir"
fi
"$VENV/bin/python" -m pip install -q --no-deps "$wheeldir"/horovod-*.whl

check=$("$VENV/bin/horovodrun" --check-build 2>&1)
echo "$check" | grep -q '\[X\] PyTorch' || die "Horovod was built without PyTorch support:
$check"
echo "$check" | grep -q '\[X\] Gloo' || die "Horovod was built without Gloo support:
$check"
touch "$stamp"
echo "install: ok ($VENV, horovod wheel from $wheeldir)"
