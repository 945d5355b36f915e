#!/usr/bin/env bash
# A real Spark standalone cluster on this machine, from the venv's pinned pyspark: one master and two 1-core workers,
# all bound to 127.0.0.1, for trying the cluster path of ./spark-submit.sh (packed venv, --py-files, executors'
# Python, Horovod workers in executor tasks) without a cluster.
#
#   scripts/local-cluster.sh start     # prints the master URL (also in <run dir>/master-url) once both workers registered
#   ./spark-submit.sh --master "$(cat data/local-cluster/master-url)" jobs/pipeline.py --conf conf/test.yaml ...
#   scripts/local-cluster.sh status
#   scripts/local-cluster.sh stop      # stops the daemons and every process left in the workers' work dirs
#
# Settings (environment):
#   ESMM_CLUSTER_DIR           run directory: pids, logs, work dirs, master-url, webui-url (default data/local-cluster)
#   ESMM_CLUSTER_WORKERS       number of workers, 1 core each (default 2)
#   ESMM_CLUSTER_WORKER_MEMORY memory each worker offers to executors (default 3g)
#   ESMM_CLUSTER_PORT          master RPC port (default: a free port)
#   ESMM_CLUSTER_WEBUI_PORT    master web UI port, also the JSON status endpoint (default: a free port)
#   ESMM_CLUSTER_TIMEOUT       seconds to wait for the workers to register (default 90)
#   SPARK_DAEMON_MEMORY        heap of the master and worker JVMs (default 512m)
#   ESMM_CLUSTER_PRIVATE       a directory each worker sees as its own empty tmpfs (a mount namespace per worker,
#                              `unshare -m`, root only): the workers' scratch (SPARK_LOCAL_DIRS) lives there, so two
#                              workers cannot see each other's local files, as on separate hosts. Submit with
#                              SPARK_SUBMIT_OPTS=-Dspark.shuffle.readHostLocalDisk=false: executors of one host
#                              read each other's shuffle files from disk, which private scratch forbids
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
HOST=127.0.0.1
RUN="${ESMM_CLUSTER_DIR:-$ROOT/data/local-cluster}"
WORKERS="${ESMM_CLUSTER_WORKERS:-2}"
WORKER_MEMORY="${ESMM_CLUSTER_WORKER_MEMORY:-3g}"
TIMEOUT="${ESMM_CLUSTER_TIMEOUT:-90}"
export SPARK_DAEMON_MEMORY="${SPARK_DAEMON_MEMORY:-512m}"
# the daemons and everything they start (executors, Python workers) bind to loopback only
export SPARK_LOCAL_IP=$HOST SPARK_LOCAL_HOSTNAME=localhost SPARK_PUBLIC_DNS=$HOST
SETSID=$(command -v setsid || true)  # own session: a Ctrl-C in the starting terminal does not reach the daemons

die() { echo "local-cluster: ERROR: $*" >&2; exit 1; }
usage() { echo "usage: scripts/local-cluster.sh start|stop|status" >&2; exit 2; }

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# pid of a daemon we started, if that process is still ours (guards against a recycled pid)
alive_pid() {
  local f="$RUN/pids/$1.pid" pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  ps -p "$pid" -o args= 2>/dev/null | grep -q "org.apache.spark.deploy" || return 1
  echo "$pid"
}

# processes whose working directory is inside the workers' work dirs: executors, their Python and Horovod workers
# (Linux /proc; elsewhere the executors exit by themselves when their worker is gone)
work_pids() {
  local work pid cwd
  [ -d "$RUN/work" ] || return 0
  work="$(cd "$RUN/work" && pwd -P)"
  for pid in $(ls /proc 2>/dev/null | grep -E '^[0-9]+$'); do
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || continue
    case "$cwd" in "$work"/worker-*/app-*) [ "$pid" != $$ ] && [ "$pid" != "$PPID" ] && echo "$pid" ;; esac
  done
}

show_log() {  # the errors of a daemon's log (or its end)
  grep -m 8 -E "ERROR|Exception|Caused by" "$1" >&2 || tail -n 20 "$1" >&2 || true
}

kill_and_wait() {  # kill_and_wait PID...: SIGTERM, up to 15 s, then SIGKILL
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  for _ in $(seq 150); do
    local left=0 p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left=1; done
    [ $left = 0 ] && return 0
    sleep 0.1
  done
  kill -9 "$@" 2>/dev/null || true
}

master_json() {  # the master's status as JSON, or nothing
  [ -f "$RUN/webui-url" ] || return 1
  "$PY" - "$(cat "$RUN/webui-url")/json/" <<'EOF' 2>/dev/null
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
EOF
}

alive_workers() {
  master_json | "$PY" -c 'import json, sys; print(json.load(sys.stdin).get("aliveworkers", 0))' 2>/dev/null || echo 0
}

stop() {
  local pids=() p name
  for name in master $(for i in $(seq "$WORKERS"); do echo "worker-$i"; done) $(ls "$RUN/pids" 2>/dev/null | sed -n 's/\.pid$//p'); do
    p=$(alive_pid "$name") && pids+=("$p")
  done
  # shellcheck disable=SC2046
  set -- $(printf '%s\n' "${pids[@]}" | sort -u)
  kill_and_wait "$@"
  kill_and_wait $(work_pids)
  rm -rf "$RUN/pids" "$RUN/local" "$RUN/master-url" "$RUN/webui-url"
  # the executors' unpacked venvs are big; their logs (work/app-*/N/std{out,err}) stay until the next start
  [ -d "$RUN/work" ] && find "$RUN/work" -mindepth 4 -maxdepth 4 -name environment -exec rm -rf {} + 2>/dev/null || true
  echo "local-cluster: stopped${1:+ (pids $*)}"
}

status() {
  local name p up=0
  for name in master $(for i in $(seq "$WORKERS"); do echo "worker-$i"; done); do
    if p=$(alive_pid "$name"); then echo "$name: running (pid $p)"; up=1; else echo "$name: not running"; fi
  done
  [ $up = 1 ] || { echo "local-cluster: not running ($RUN)"; return 3; }
  echo "cluster: $(cat "$RUN/master-url" 2>/dev/null)  web UI: $(cat "$RUN/webui-url" 2>/dev/null)  alive workers: $(alive_workers)"
}

start() {
  [ -x "$PY" ] || bash "$ROOT/scripts/install.sh"
  command -v java >/dev/null || die "java not found (Spark needs Java 17)"
  SPARK_HOME="$("$PY" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')" || die "pyspark is not installed in $VENV"
  export SPARK_HOME
  if alive_pid master >/dev/null; then
    die "already running (master $(cat "$RUN/master-url" 2>/dev/null)); run 'scripts/local-cluster.sh stop' first"
  fi
  mkdir -p "$RUN"
  RUN="$(cd "$RUN" && pwd -P)"
  rm -rf "$RUN/pids" "$RUN/logs" "$RUN/work" "$RUN/local" "$RUN/master-url" "$RUN/webui-url"
  mkdir -p "$RUN/pids" "$RUN/logs" "$RUN/work"
  # from here on a failed start leaves nothing running
  trap 'rc=$?; if [ $rc != 0 ]; then echo "local-cluster: start failed, stopping what was started" >&2; stop >&2; fi' EXIT

  local port webui url
  port="${ESMM_CLUSTER_PORT:-$(free_port)}"
  webui="${ESMM_CLUSTER_WEBUI_PORT:-$(free_port)}"
  url="spark://$HOST:$port"
  echo "http://$HOST:$webui" >"$RUN/webui-url"
  # no fallback to the next port when one is taken: the workers are given exactly this one
  ( cd "$RUN" && SPARK_MASTER_OPTS="${SPARK_MASTER_OPTS:-} -Dspark.port.maxRetries=0" exec $SETSID "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master \
      --host "$HOST" --port "$port" --webui-port "$webui" >"$RUN/logs/master.log" 2>&1 </dev/null ) &
  echo $! >"$RUN/pids/master.pid"

  local t0=$SECONDS
  until master_json >/dev/null; do
    alive_pid master >/dev/null || { show_log "$RUN/logs/master.log"; die "the master exited (log: $RUN/logs/master.log)"; }
    [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || { show_log "$RUN/logs/master.log"; die "the master did not answer on http://$HOST:$webui/json/ within ${TIMEOUT}s"; }
    sleep 0.5
  done

  local i private="${ESMM_CLUSTER_PRIVATE:-}" wrap=()
  if [ -n "$private" ]; then
    command -v unshare >/dev/null || die "ESMM_CLUSTER_PRIVATE needs unshare (util-linux)"
    mkdir -p "$private"
    private="$(cd "$private" && pwd -P)"
    # its own mount namespace and an empty tmpfs over $private: the worker, its executors and their Python and
    # Horovod processes see only their own files there
    unshare -m --propagation private true 2>/dev/null || die "ESMM_CLUSTER_PRIVATE: unshare -m is not permitted here (needs root)"
    wrap=(unshare -m --propagation private sh -c 'mount -t tmpfs -o size=2g esmm-scratch "$0" && mkdir -p "$0/local" && exec "$@"' "$private")
  fi
  for i in $(seq "$WORKERS"); do
    mkdir -p "$RUN/work/worker-$i" "$RUN/local/worker-$i"
    local scratch="$RUN/local/worker-$i"
    [ -n "$private" ] && scratch="$private/local"
    ( cd "$RUN" && SPARK_LOCAL_DIRS="$scratch" exec $SETSID "${wrap[@]}" "$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
        --host "$HOST" --cores 1 --memory "$WORKER_MEMORY" --webui-port "$(free_port)" \
        --work-dir "$RUN/work/worker-$i" "$url" >"$RUN/logs/worker-$i.log" 2>&1 </dev/null ) &
    echo $! >"$RUN/pids/worker-$i.pid"
  done

  local n=0
  while :; do
    n=$(alive_workers)
    [ "$n" -ge "$WORKERS" ] && break
    alive_pid master >/dev/null || { show_log "$RUN/logs/master.log"; die "the master exited (log: $RUN/logs/master.log)"; }
    for i in $(seq "$WORKERS"); do
      alive_pid "worker-$i" >/dev/null || { show_log "$RUN/logs/worker-$i.log"; die "worker-$i exited (log: $RUN/logs/worker-$i.log)"; }
    done
    [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || die "only $n of $WORKERS workers registered with $url within ${TIMEOUT}s (logs: $RUN/logs/)"
    sleep 0.5
  done
  echo "$url" >"$RUN/master-url"
  trap - EXIT
  echo "local-cluster: $WORKERS workers x 1 core x $WORKER_MEMORY registered in $((SECONDS - t0))s; web UI http://$HOST:$webui; run dir $RUN" >&2
  echo "$url"
}

case "${1:-}" in
  start) start ;;
  stop) [ -d "$RUN" ] && RUN="$(cd "$RUN" && pwd -P)"; stop ;;
  status) [ -d "$RUN" ] && RUN="$(cd "$RUN" && pwd -P)"; status ;;
  *) usage ;;
esac
