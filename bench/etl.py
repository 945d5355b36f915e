"""ETL benchmark: the Spark-native ETL (local[1], local[2]) against a single-threaded plain-Python reference parser.

    .venv/bin/python bench/etl.py                                  # 1M and 4M impressions, local[1] and local[2]
    .venv/bin/python bench/etl.py --sizes 50000 --reference-rows 20000 --workdir /tmp/esmm-bench-etl-small

In one run, side by side:

1. raw logs of each size are generated once (esmm.generator, default GeneratorConfig with ``impressions``
   overridden, local[2]) and cached in ``<workdir>/raw-<size>-seed<seed>`` (reused while the generate config matches);
2. ``esmm.etl.run_etl`` runs for each size under local[1] and local[2], each in a fresh Python process with a fresh
   JVM (so heap/RSS peaks are per run), driver memory 4g, into a fresh output directory; measured: wall seconds of
   ``run_etl``, skeleton rows/s, the driver JVM heap (sampled used, the peak live set after GC, the pool peaks), the
   RSS of the JVM and of the Python driver, and the Spark jobs/stages (REST API of the Spark UI) for a phase breakdown;
3. two plain-Python reference parsers, the kind public Ali-CCP preprocessing scripts use, run single-threaded on the
   smallest size (capped by ``--reference-rows``; the full-size time is then extrapolated and marked so): read the
   common features file into a dict keyed by common_feature_index, split every skeleton line with str.split and a
   precompiled regex, keep ALL multi-valued values, apply the ETL's hashing + top-K encoding, write Parquet with
   pyarrow in chunks.  ``naive`` calls ``esmm.features.encode_line_features`` on (common + skeleton) entries of every
   line; ``tuned`` encodes each common line once when loading it and memoizes the hash (a strong Python baseline);
4. prints the table, the ratios against the targets, the Spark phase breakdown, and checks that the Spark output and
   both references agree (same feat_ids/feat_wts for the same sample_id) on a sample of rows.

Everything measured is also written to ``<workdir>/results.json``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

from jvm_memory import live_heap_after_new_gcs  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

MB = 1024 * 1024


# ============================================================================================ shared helpers

# the target: rows/s per Spark core at least 5x the best single-process reference's rows/s
TARGET_X = 5.0


def _cfg(size: int, seed: int):
    """Default config with ``generate.impressions`` (and seed) overridden."""
    from dataclasses import replace

    from esmm.config import Config, GeneratorConfig
    return Config(generate=replace(GeneratorConfig(), impressions=size, seed=seed))


def _raw_dir(workdir: str, size: int, seed: int) -> str:
    return os.path.join(workdir, f"raw-{size}-seed{seed}")


def _raw_is_cached(raw: str, cfg) -> bool:
    from esmm.config import to_dict
    from esmm.generator import MARKER
    try:
        with open(os.path.join(raw, MARKER)) as f:
            return json.load(f).get("generate") == to_dict(cfg.generate)
    except (OSError, ValueError):
        return False


CODE_FILES = ("esmm/etl.py", "esmm/features.py", "esmm/generator.py", "schemas/raw.py", "schemas/dataset.py")


def _code_digest() -> dict:
    """sha256 (12 hex) of the code under test, so a run can tell when someone changed it mid-run."""
    import hashlib
    out = {}
    for f in CODE_FILES:
        try:
            with open(os.path.join(ROOT, f), "rb") as fh:
                out[f] = hashlib.sha256(fh.read()).hexdigest()[:12]
        except OSError:
            out[f] = None
    return out


def _git_state() -> dict:
    def git(*args):
        p = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", *CODE_FILES)
    return {"head": head, "modified": [ln[3:] for ln in (dirty or "").splitlines()]}


def _maxrss_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def _spark_session(master: str, shuffle_partitions: int, local_dir: str, app: str, ui: bool = True,
                   driver_memory: str = "4g"):
    from pyspark.sql import SparkSession
    os.makedirs(local_dir, exist_ok=True)
    b = (SparkSession.builder.master(master).appName(app)
         .config("spark.driver.memory", driver_memory)
         .config("spark.sql.shuffle.partitions", str(shuffle_partitions))  # run_etl sets its own for the ETL
         .config("spark.local.dir", local_dir)
         .config("spark.sql.warehouse.dir", os.path.join(local_dir, "wh"))
         .config("spark.ui.showConsoleProgress", "false")
         .config("spark.ui.enabled", "true" if ui else "false")
         .config("spark.ui.port", "0"))  # a free port: others may run Spark on this machine
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


class Sampler(threading.Thread):
    """Samples, every ``interval`` s: RSS of this process and of its children (the JVM), and, given a SparkSession,
    the driver JVM's heap in use and the heap left after the latest GC (the live set). Cheap: a few py4j calls."""

    def __init__(self, spark=None, interval: float = 0.25):
        super().__init__(daemon=True)
        import psutil
        self.proc = psutil.Process(os.getpid())
        self.interval = interval
        self.stop_event = threading.Event()
        self.peak = {"self_rss": 0, "children_rss": 0, "heap_used": 0, "heap_after_gc": 0, "heap_committed": 0}
        self.samples = 0
        self.spark = spark
        self.cpu0 = self._cpu()
        self.load0 = os.getloadavg()[0]
        self.t0 = time.time()
        if spark is not None:
            mf = spark._jvm.java.lang.management.ManagementFactory
            self.mem = mf.getMemoryMXBean()
            self.gcs = list(mf.getGarbageCollectorMXBeans())
            all_pools = list(mf.getMemoryPoolMXBeans())
            self.pools = [p for p in all_pools if str(p.getType()) == "Heap memory"]
            self.code_pools = [p for p in all_pools if str(p.getName()).startswith("CodeHeap")]
            self.heap_pool_names = {str(p.getName()) for p in self.pools}
            self.seen_gc = {}
            for p in self.pools:
                p.resetPeakUsage()
            self.gc0 = self._gc_totals()

    def _cpu(self) -> tuple:
        """(CPU s of this process, of its children: the JVM and its Python workers, of the JVM's JIT compiler
        threads) so far, user + system."""
        own = sum(self.proc.cpu_times()[:2])
        kids = jit = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for c in self.proc.children(recursive=True):
            try:
                kids += sum(c.cpu_times()[:2])
                if c.name() != "java":
                    continue
                for t in os.listdir(f"/proc/{c.pid}/task"):
                    try:
                        with open(f"/proc/{c.pid}/task/{t}/comm") as f:
                            if "CompilerThre" not in f.read():
                                continue
                        with open(f"/proc/{c.pid}/task/{t}/stat") as f:
                            st = f.read().rsplit(")", 1)[1].split()
                        jit += (int(st[11]) + int(st[12])) / tick
                    except (OSError, IndexError, ValueError):
                        pass   # a thread that ended; its CPU is lost to this count (compiler threads persist)
            except Exception:
                pass
        return own, kids, jit

    def _gc_totals(self) -> tuple:
        return (sum(int(g.getCollectionCount()) for g in self.gcs), sum(int(g.getCollectionTime()) for g in self.gcs))

    def _tick(self) -> None:
        pk = self.peak
        try:
            pk["self_rss"] = max(pk["self_rss"], self.proc.memory_info().rss)
            pk["children_rss"] = max(pk["children_rss"], sum(c.memory_info().rss
                                                             for c in self.proc.children(recursive=True)))
        except Exception:  # a child exiting between listing and reading
            pass
        if self.spark is None:
            return
        heap = self.mem.getHeapMemoryUsage()
        pk["heap_used"] = max(pk["heap_used"], int(heap.getUsed()))
        pk["heap_committed"] = max(pk["heap_committed"], int(heap.getCommitted()))
        live = live_heap_after_new_gcs(self.gcs, self.seen_gc, self.heap_pool_names)
        if live is not None:
            pk["heap_after_gc"] = max(pk["heap_after_gc"], live)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._tick()
                self.samples += 1
            except Exception:
                pass
            self.stop_event.wait(self.interval)

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        try:
            self._tick()
        except Exception:
            pass
        cpu = self._cpu()
        if self.spark is None:
            for k in ("heap_used", "heap_after_gc", "heap_committed"):
                self.peak.pop(k)
        out = {k + "_mb": round(v / MB, 1) for k, v in self.peak.items()}
        out["cpu_s"] = round(cpu[0] - self.cpu0[0] + cpu[1] - self.cpu0[1], 2)
        out["python_cpu_s"] = round(cpu[0] - self.cpu0[0], 2)
        out["jit_cpu_s"] = round(cpu[2] - self.cpu0[2], 2)
        out["wall_s"] = round(time.time() - self.t0, 2)
        out["loadavg_1m"] = [round(self.load0, 2), round(os.getloadavg()[0], 2)]
        out["python_maxrss_mb"] = round(_maxrss_mb(), 1)
        out["samples"] = self.samples
        if self.spark is not None:
            out["heap_pool_peaks_mb"] = {str(p.getName()): round(int(p.getPeakUsage().getUsed()) / MB, 1)
                                         for p in self.pools}
            out["heap_pool_peaks_sum_mb"] = round(sum(out["heap_pool_peaks_mb"].values()), 1)
            # JIT code cache: when it fills up HotSpot stops compiling and Spark's generated code runs interpreted
            out["code_cache_mb"] = {str(p.getName()): [round(int(p.getPeakUsage().getUsed()) / MB, 1),
                                                       round(int(p.getUsage().getMax()) / MB, 1)]
                                    for p in self.code_pools}
            out["heap_max_mb"] = round(int(self.spark._jvm.java.lang.Runtime.getRuntime().maxMemory()) / MB, 1)
            n, ms = self._gc_totals()
            out["gc_count"], out["gc_seconds"] = n - self.gc0[0], round((ms - self.gc0[1]) / 1000.0, 2)
        return out


# ============================================================================================ child: generate

def child_generate(a) -> dict:
    from esmm.generator import generate
    cfg = _cfg(a.size, a.seed)
    spark = _spark_session("local[2]", 8, os.path.join(a.workdir, "spark-local"), "bench-etl-generate", ui=False)
    t0 = time.time()
    s = generate(spark, cfg, a.raw, overwrite=True)
    spark.stop()
    return {"seconds": round(time.time() - t0, 1), "impressions": s["impressions"], "keys": s["keys"],
            "mean_common_entries": s["mean_common_entries"], "mean_skeleton_entries": s["mean_skeleton_entries"]}


# ============================================================================================ child: Spark ETL

def _stage_report(spark, t_start: float, t_end: float) -> dict:
    """The ETL's SQL executions, jobs and stages (Spark UI REST API): wall seconds per query, task/CPU/GC seconds and
    input/shuffle/output MB per stage; the rest of run_etl's wall time is driver-side (planning, listing, renames)."""
    sc = spark.sparkContext
    base = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}"
    try:
        get = lambda path: json.load(urllib.request.urlopen(base + path, timeout=30))  # noqa: E731
        sqls, jobs, stages = get("/sql?details=false&length=100000"), get("/jobs"), get("/stages")
    except Exception as e:  # the UI is a convenience, not the measurement
        return {"error": f"{type(e).__name__}: {e}"}

    def ts(s):
        return datetime.datetime.strptime(s.replace("GMT", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()

    by_stage = {s["stageId"]: s for s in stages if s.get("status") == "COMPLETE"}
    by_job = {j["jobId"]: j for j in jobs}
    out, intervals, n_parquet = [], [], 0
    for q in sorted(sqls, key=lambda q: q["id"]):
        a = ts(q["submissionTime"])
        b = a + q["duration"] / 1000.0
        if b < t_start - 1 or a > t_end + 1:
            continue
        intervals.append((a, b))
        desc = re.sub(r" at .*/", " at ", q["description"])
        if desc.startswith("parquet at"):
            desc += " (dataset)" if n_parquet == 0 else " (quarantine)" if n_parquet == 1 else ""
            n_parquet += 1
        st = [by_stage[i] for jid in sorted(q.get("successJobIds", []) + q.get("failedJobIds", []))
              if jid in by_job for i in by_job[jid]["stageIds"] if i in by_stage]
        out.append({
            "query": q["id"], "what": desc, "wall_s": round(b - a, 2), "jobs": len(q.get("successJobIds", [])),
            "task_s": round(sum(s["executorRunTime"] for s in st) / 1000.0, 2),
            "cpu_s": round(sum(s["executorCpuTime"] for s in st) / 1e9, 2),
            "gc_s": round(sum(s["jvmGcTime"] for s in st) / 1000.0, 2),
            "stages": [{"id": s["stageId"], "tasks": s["numTasks"], "task_s": round(s["executorRunTime"] / 1000.0, 2),
                        "cpu_s": round(s["executorCpuTime"] / 1e9, 2),
                        "in_mb": round(s["inputBytes"] / MB, 1), "shuffle_read_mb": round(s["shuffleReadBytes"] / MB, 1),
                        "shuffle_write_mb": round(s["shuffleWriteBytes"] / MB, 1),
                        "out_mb": round(s["outputBytes"] / MB, 1), "spill_mb": round(s["diskBytesSpilled"] / MB, 1),
                        "peak_exec_mb": round(s.get("peakExecutionMemory", 0) / MB, 1)}
                       for s in sorted(st, key=lambda s: s["stageId"])]})
    covered, end = 0.0, float("-inf")  # union of the query intervals
    for a, b in sorted(intervals):
        a = max(a, end)
        if b > a:
            covered += b - a
        end = max(end, b)
    return {"queries": out, "queries_wall_s": round(covered, 2), "driver_only_s": round(t_end - t_start - covered, 2)}


def child_spark(a) -> dict:
    code = _code_digest()
    from dataclasses import replace

    from esmm.etl import run_etl
    cfg = _cfg(a.size, a.seed)
    cfg = replace(cfg, etl=replace(cfg.etl, parser=a.parser))
    t_boot = time.time()
    spark = _spark_session(f"local[{a.cores}]", 8, os.path.join(a.workdir, "spark-local"),
                           f"bench-etl-{a.size}-local{a.cores}-{a.parser}", driver_memory=a.driver_memory)
    boot = time.time() - t_boot
    shutil.rmtree(a.out, ignore_errors=True)  # a fresh output directory every time
    sampler = Sampler(spark, a.sample_interval)
    sampler.start()
    t0 = time.time()
    manifest = run_etl(spark, cfg, a.raw, a.out, overwrite=True)
    t1 = time.time()
    mem = sampler.finish()
    # What the driver JVM still holds once the job is done: heap in use after a full collection (the sampled
    # "after GC" figures above include young collections, which leave dead old-generation objects counted).
    runtime = spark._jvm.java.lang.Runtime.getRuntime()
    for _ in range(2):
        spark._jvm.java.lang.System.gc()
    mem["heap_after_full_gc_mb"] = round((int(runtime.totalMemory()) - int(runtime.freeMemory())) / MB, 1)
    stages = _stage_report(spark, t0, t1)
    spark.stop()
    rows = manifest["rows"]
    heap = "" if a.driver_memory == "4g" else f" heap {a.driver_memory}"
    return {"engine": f"spark local[{a.cores}] {a.parser}{heap}", "parser": a.parser, "cores": a.cores,
            "size": a.size, "driver_memory": a.driver_memory,
            "seconds": round(t1 - t0, 2),
            "session_start_s": round(boot, 2), "rows": rows["skeleton_read"], "rows_written": rows["written"],
            "quarantined": rows["skeleton_quarantined"], "common_lines": rows["common_read"],
            "rows_per_s": rows["skeleton_read"] / (t1 - t0), "shuffle_partitions": manifest["shuffle_partitions"],
            "memory": mem, "stages": stages, "out": a.out, "code": code}


# ============================================================================================ child: Python reference

_ENTRY = re.compile("([^\x01\x02]*)\x02([^\x01\x03]*)\x03([^\x01]*)")  # field ^B id ^C value, entries split by ^A


def _parse_entries(feature_list: str) -> list:
    """'f^Bid^Cv^Af^Bid^Cv...' -> [(field, int id, float value), ...], every entry kept (multi-valued fields too)."""
    return [(f, int(i), float(v)) for f, i, v in _ENTRY.findall(feature_list)]


class _Tuned:
    """Per-field encoding equal to ``encode_line_features`` restricted to a set of fields, with a memoized hash."""

    def __init__(self, layout, fields):
        from esmm.features import bucket_of
        self.bucket_of = bucket_of
        self.layout = layout
        self.slots = [(layout.field_index(f), f) for f in fields]
        self.memo: dict = {}

    def encode(self, entries: list) -> tuple:
        lay, memo = self.layout, self.memo
        by_field: dict = {}
        for f, fid, v in entries:
            by_field.setdefault(f, []).append((v, fid))
        ids, wts = [], []
        for i, f in self.slots:
            k, off = lay.max_len[i], lay.offsets[i]
            vals = by_field.get(f)
            if not vals:
                ids += [off] * k
                wts += [1.0] + [0.0] * (k - 1)
                continue
            if len(vals) > 1:
                vals = sorted(vals, key=lambda t: (-t[0], t[1]))[:k]
            b = []
            for _, fid in vals:
                g = memo.get((i, fid))
                if g is None:
                    g = memo[(i, fid)] = off + self.bucket_of(i, fid, lay.buckets[i])
                b.append(g)
            if k == 1:
                w = [1.0]
            else:
                total = sum(v for v, _ in vals)
                w = [v / total for v, _ in vals] if total > 0 else [1.0 / len(vals)] * len(vals)
            ids += b + [off] * (k - len(b))
            wts += w + [0.0] * (k - len(b))
        return ids, wts


def child_reference(a) -> dict:
    import psutil
    import pyarrow as pa
    import pyarrow.parquet as pq

    code = _code_digest()
    import schemas as S
    from esmm.features import FeatureLayout, encode_line_features
    cfg = _cfg(a.size, a.seed)
    layout = FeatureLayout.from_config(cfg.features)
    proc = psutil.Process(os.getpid())
    tuned = a.variant == "tuned"
    enc_common, enc_skel = _Tuned(layout, S.COMMON_FIELDS), _Tuned(layout, S.SKELETON_FIELDS)
    schema = pa.schema([pa.field(S.SAMPLE_ID, pa.int64()), pa.field(S.CLICK, pa.int32()),
                        pa.field(S.CONVERSION, pa.int32()), pa.field(S.FEAT_IDS, pa.list_(pa.int32())),
                        pa.field(S.FEAT_WTS, pa.list_(pa.float32()))])
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    sampler = Sampler(None, a.sample_interval)
    sampler.start()
    budget = a.rows if a.rows > 0 else float("inf")
    res = {"engine": f"python reference ({a.variant})", "cores": 1, "size": a.size, "variant": a.variant,
           "splits": {}, "dropped": 0, "code": code}
    rows = 0
    t_all = time.time()
    for split in S.RAW_SPLITS:
        if rows >= budget:
            break
        rss0 = proc.memory_info().rss
        # 1. the common features file -> dict keyed by common_feature_index
        t0 = time.time()
        common, n_entries = {}, 0
        with open(os.path.join(a.raw, S.COMMON_FILE.format(split=split)), encoding="utf-8") as f:
            for line in f:
                key, num, fl = line.rstrip("\n").split(",", 2)
                ent = _parse_entries(fl)
                if len(ent) != int(num):
                    continue
                n_entries += len(ent)
                common[key] = enc_common.encode(ent) if tuned else ent
        load_s = time.time() - t0
        rss_dict = proc.memory_info().rss - rss0
        # 2. skeleton lines -> encoded rows, written in chunks
        t0 = time.time()
        cols = ([], [], [], [], [])
        writer = pq.ParquetWriter(os.path.join(a.out, f"{split}.parquet"), schema)

        def flush():
            if cols[0]:
                writer.write_table(pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(cols, schema)],
                                                        schema=schema))
                for c in cols:
                    c.clear()

        n_split = 0
        with open(os.path.join(a.raw, S.SKELETON_FILE.format(split=split)), encoding="utf-8") as f:
            for line in f:
                if rows >= budget:
                    break
                sid, clk, conv, key, num, fl = line.rstrip("\n").split(",", 5)
                rows += 1
                ent = _parse_entries(fl)
                c = common.get(key)
                if c is None or len(ent) != int(num) or (clk == "0" and conv == "1"):
                    res["dropped"] += 1
                    continue
                if tuned:
                    s_ids, s_wts = enc_skel.encode(ent)
                    ids, wts = c[0] + s_ids, c[1] + s_wts
                else:
                    ids, wts = encode_line_features(layout, c + ent)
                cols[0].append(int(sid))
                cols[1].append(int(clk))
                cols[2].append(int(conv))
                cols[3].append(ids)
                cols[4].append(wts)
                n_split += 1
                if len(cols[0]) >= a.chunk_rows:
                    flush()
        flush()
        writer.close()
        res["splits"][split] = {
            "common_keys": len(common), "common_entries": n_entries, "load_common_s": round(load_s, 2),
            "dict_rss_mb": round(rss_dict / MB, 1),
            "dict_bytes_per_entry": round(rss_dict / max(n_entries, 1), 1),
            "dict_bytes_per_key": round(rss_dict / max(len(common), 1), 1),
            "skeleton_rows": n_split, "process_s": round(time.time() - t0, 2),
            "common_bytes": os.path.getsize(os.path.join(a.raw, S.COMMON_FILE.format(split=split)))}
        del common
    res["seconds_measured"] = round(time.time() - t_all, 2)
    res["rows_measured"] = rows
    res["memory"] = sampler.finish()
    return res


# ============================================================================================ parent

def _child(kind: str, a, result: str, **kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--result", result, "--workdir", a.workdir,
           "--seed", str(a.seed), "--sample-interval", str(a.sample_interval)]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    if not a.pin:
        cmd.append("--no-pin")
    if os.path.exists(result):
        os.remove(result)
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(result[:-len(".json")] + ".log", "w") as f:  # the child's (and its JVM's) console output
        f.write(p.stdout)
    if p.returncode != 0 or not os.path.exists(result):
        tail = "\n".join(p.stdout.splitlines()[-40:])
        raise SystemExit(f"bench child {kind} {kw} failed (rc {p.returncode}):\n{tail}")
    with open(result) as f:
        out = json.load(f)
    out["process_s"] = round(time.time() - t0, 1)
    return out


def _input_stats(raw: str) -> dict:
    import schemas as S
    out = {}
    for split in S.RAW_SPLITS:
        for name in (S.SKELETON_FILE.format(split=split), S.COMMON_FILE.format(split=split)):
            p = os.path.join(raw, name)
            if os.path.exists(p):
                out[name] = os.path.getsize(p)
    return out


def _extrapolate(ref: dict, raw_bytes: dict, total_rows: int) -> dict:
    """Full-size seconds of a reference run: measured when complete, else load(all common) + rows / per-row rate."""
    import schemas as S
    sp = ref["splits"]
    proc_s = sum(s["process_s"] for s in sp.values())
    load_s = sum(s["load_common_s"] for s in sp.values())
    measured = ref["rows_measured"]
    busy = ref["memory"]["cpu_s"] / max(ref["memory"]["wall_s"], 1e-9)  # CPU share of the wall time (contention)
    if measured >= total_rows:
        return {"seconds": proc_s + load_s, "extrapolated": False, "rows": measured, "cpu_s": ref["memory"]["cpu_s"]}
    loaded_bytes = sum(s["common_bytes"] for s in sp.values())
    all_common = sum(v for k, v in raw_bytes.items() if k.startswith(S.COMMON_FILE.split("{")[0]))
    est = load_s * all_common / loaded_bytes + total_rows * proc_s / max(measured, 1)
    return {"seconds": est, "extrapolated": True, "rows": total_rows, "measured_rows": measured,
            "measured_s": proc_s + load_s, "cpu_s": est * busy}


def _agreement(spark_out: str, ref_outs: dict, n: int, seed: int) -> dict:
    """Same feat_ids / feat_wts (float32) for the same sample_id: Spark vs each reference, on n sampled rows."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    import schemas as S
    def read(d):  # a reference's Parquet file(s), or another Spark ETL output (train/ and test/ directories)
        if not os.path.exists(os.path.join(d, S.MANIFEST)):
            return pq.read_table(d)
        import pyarrow as pa
        return pa.concat_tables(ds.dataset(os.path.join(d, sp), format="parquet", partitioning="hive").to_table(
            columns=[S.SAMPLE_ID, S.FEAT_IDS, S.FEAT_WTS]) for sp in S.SPLITS if os.path.isdir(os.path.join(d, sp)))

    refs = {name: read(d) for name, d in ref_outs.items()}
    common_ids = None
    for t in refs.values():
        ids = set(t.column(S.SAMPLE_ID).to_pylist())
        common_ids = ids if common_ids is None else common_ids & ids
    rng = random.Random(seed)
    sample = sorted(rng.sample(sorted(common_ids), min(n, len(common_ids))))
    want = {}
    for split in S.SPLITS:
        path = os.path.join(spark_out, split)
        if not os.path.isdir(path):
            continue
        t = ds.dataset(path, format="parquet", partitioning="hive").to_table(
            columns=[S.SAMPLE_ID, S.FEAT_IDS, S.FEAT_WTS], filter=pc.field(S.SAMPLE_ID).isin(sample))
        for sid, ids, wts in zip(*(t.column(c).to_pylist() for c in (S.SAMPLE_ID, S.FEAT_IDS, S.FEAT_WTS))):
            want[sid] = (ids, wts)
    out = {"sampled": len(sample), "found_in_spark": len(want)}
    for name, t in refs.items():
        t = t.filter(pc.field(S.SAMPLE_ID).isin(sample))
        bad_ids = bad_wts = 0
        max_err = 0.0
        first_bad = None
        for sid, ids, wts in zip(*(t.column(c).to_pylist() for c in (S.SAMPLE_ID, S.FEAT_IDS, S.FEAT_WTS))):
            if sid not in want:
                continue
            sids, swts = want[sid]
            if ids != sids:
                bad_ids += 1
                first_bad = first_bad or sid
            err = float(np.max(np.abs(np.asarray(wts, np.float32) - np.asarray(swts, np.float32)))) \
                if len(wts) == len(swts) else float("inf")
            max_err = max(max_err, err)
            if err > 1e-6:
                bad_wts += 1
                first_bad = first_bad or sid
        out[name] = {"rows": t.num_rows, "feat_ids_mismatch": bad_ids, "feat_wts_mismatch": bad_wts,
                     "max_abs_wt_diff": max_err, "first_mismatch_sample_id": first_bad}
    out["ok"] = (len(want) == len(sample) and len(sample) > 0
                 and all(v["feat_ids_mismatch"] == 0 and v["feat_wts_mismatch"] == 0
                         for k, v in out.items() if isinstance(v, dict)))
    return out


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


def report(R: dict) -> str:
    L = []
    L.append(f"ETL benchmark  {R['date']}  host {R['machine']['host']}  {R['machine']['cpus']} CPUs  "
             f"{R['machine']['mem_gb']} GB RAM  python {R['machine']['python']}  spark {R['machine']['spark']}")
    L.append(f"command: {R['command']}")
    L.append("CPU affinity: " + ("each spark local[N] run (its JVM and Python workers included) pinned to N cores, "
                                 "each python reference to 1" if R["args"].get("pin", True) else "none (--no-pin)"))
    c = R.get("code", {})
    g = c.get("git", {})
    L.append(f"code: git {g.get('head')}" + (f" with local changes to {', '.join(g['modified'])}" if g.get("modified") else "")
             + f"; esmm/etl.py sha256 {c.get('files', {}).get('esmm/etl.py')}")
    if c.get("changed_during_run"):
        L.append(f"WARNING: {', '.join(c['changed_during_run'])} changed during the run: the rows below measured "
                 f"different code; run again (or from a snapshot: git archive HEAD | tar -x -C DIR)")
    for size, g in R["inputs"].items():
        how = "cached" if g["cached"] else "generated in %.0fs" % g.get("seconds", 0)
        L.append(f"input {int(size):,} impressions: {g['keys']:,} common keys, entries/line common "
                 f"{g['mean_common_entries']:.0f} skeleton {g['mean_skeleton_entries']:.1f}, "
                 f"{g['bytes'] / MB:,.0f} MB of text ({how})")
    L.append("")
    hdr = (f"{'size':>10} | {'engine':<30} | {'seconds':>8} | {'rows/s':>9} | {'rows/s/core':>11} | "
           f"{'CPU s':>7} | {'rows/CPU-s':>10} | {'JVM heap used / live-after-GC MB':>32} | {'JVM RSS MB':>10} | "
           f"{'py RSS MB':>9} | {'load':>9}")
    L.append(hdr)
    L.append("-" * len(hdr))
    for r in R["runs"]:
        m = r["memory"]
        if r["engine"].startswith("spark"):
            heap = f"{m['heap_used_mb']:,.0f} / {m['heap_after_gc_mb']:,.0f}"
            jrss = f"{m['children_rss_mb']:,.0f}"
        else:
            heap, jrss = "-", "-"
        secs = f"{r['seconds']:.1f}" + ("*" if r.get("extrapolated") else "")
        cpu_s = r.get("cpu_s", m["cpu_s"])
        load = "%.1f-%.1f" % tuple(m["loadavg_1m"])
        L.append(f"{r['size']:>10,} | {r['engine']:<30} | {secs:>8} | {_fmt_rate(r['rows_per_s']):>9} | "
                 f"{_fmt_rate(r['rows_per_s'] / r['cores']):>11} | {cpu_s:>7.1f} | {_fmt_rate(r['rows'] / cpu_s):>10} | "
                 f"{heap:>32} | {jrss:>10} | {m['python_maxrss_mb']:>9,.0f} | {load:>9}")
    if any(r.get("extrapolated") for r in R["runs"]):
        L.append("* extrapolated to the full size: measured on the first rows of the train file (see below), "
                 "time = load(all common files, scaled by bytes) + rows / measured per-row rate")
    L.append("")
    for r in R["runs"]:
        if r["engine"].startswith("python"):
            for n, (split, s) in enumerate(r["splits"].items()):
                grew = (f"RSS +{s['dict_rss_mb']:,.0f} MB ({s['dict_bytes_per_entry']:.0f} B/entry, "
                        f"{s['dict_bytes_per_key'] / 1024:,.1f} KiB/key)" if n == 0 else
                        "(RSS growth not measurable: reuses the memory freed by the previous split's dict)")
                L.append(f"{r['engine']}: {split}: dict of {s['common_keys']:,} common lines / "
                         f"{s['common_entries']:,} entries loaded in {s['load_common_s']:.1f}s, {grew}; "
                         f"{s['skeleton_rows']:,} skeleton rows in {s['process_s']:.1f}s "
                         f"({s['skeleton_rows'] / max(s['process_s'], 1e-9):,.0f} rows/s excl. load); peak RSS "
                         f"{r['memory']['python_maxrss_mb']:,.0f} MB")
    L.append("")
    L.append("ratios:")
    for line in R["ratios"]:
        L.append("  " + line)
    L.append("")
    L.append("Spark phase breakdown per SQL query of run_etl (wall s | task s | CPU s | GC s; then per stage: "
             "tasks, task s, MB in / shuffle read / shuffle write / out / spilled):")
    for r in R["runs"]:
        if not r["engine"].startswith("spark"):
            continue
        st = r["stages"]
        if "error" in st:
            L.append(f"  {r['size']:,} {r['engine']}: (no stage data: {st['error']})")
            continue
        L.append(f"  {r['size']:,} {r['engine']}: run_etl {r['seconds']:.1f}s = queries {st['queries_wall_s']:.1f}s + "
                 f"driver-only {st['driver_only_s']:.1f}s (plan building, file listing, renames); session start "
                 f"{r['session_start_s']:.1f}s (not counted); JVM GC {r['memory'].get('gc_count', 0)} collections "
                 f"{r['memory'].get('gc_seconds', 0):.1f}s")
        for q in st["queries"]:
            if q["wall_s"] < 0.02 * r["seconds"]:
                continue
            stg = "; ".join(f"s{s['id']} {s['tasks']}t {s['task_s']:.0f}s {s['in_mb']:.0f}/{s['shuffle_read_mb']:.0f}/"
                            f"{s['shuffle_write_mb']:.0f}/{s['out_mb']:.0f}/{s['spill_mb']:.0f}"
                            for s in q["stages"] if s["task_s"] >= 0.5)
            L.append(f"      {q['what']:<30} {q['wall_s']:7.1f} | {q['task_s']:7.1f} | {q['cpu_s']:7.1f} | {q['gc_s']:5.1f}"
                     f"   {stg}")
    L.append("")
    ag = R.get("agreement")
    if ag:
        L.append(f"agreement Spark ({ag['spark']}) vs references on {ag['sampled']} sampled sample_ids "
                 f"(found in Spark output: {ag['found_in_spark']}): {'OK' if ag['ok'] else 'MISMATCH'}")
        for k, v in ag.items():
            if isinstance(v, dict):
                L.append(f"  {k}: feat_ids mismatches {v['feat_ids_mismatch']}, feat_wts mismatches "
                         f"{v['feat_wts_mismatch']}, max |wt diff| {v['max_abs_wt_diff']:.2e}"
                         + (f", first mismatch sample_id {v['first_mismatch_sample_id']}"
                            if v["first_mismatch_sample_id"] else ""))
    return "\n".join(L)


def _ratios(R: dict) -> list:
    runs = R["runs"]
    out = []
    def median_runs(rs):  # (size, cores) -> the median run by rows/s (the middle one of an odd count)
        by = {}
        for r in rs:
            by.setdefault((r["size"], r["cores"]), []).append(r)
        return {k: sorted(v, key=lambda r: r["rows_per_s"])[(len(v) - 1) // 2] for k, v in by.items()}

    spark = median_runs(r for r in runs if r["engine"].startswith("spark") and r["parser"] == "arrow"
                        and r.get("driver_memory", "4g") == "4g")
    small_heap = [r for r in runs if r["engine"].startswith("spark") and r.get("driver_memory", "4g") != "4g"]
    native = median_runs(r for r in runs if r["engine"].startswith("spark") and r["parser"] == "native")
    for (size, c), r in sorted(spark.items()):
        n = sum(1 for x in runs if x["engine"].startswith("spark") and x["parser"] == "arrow" and x["size"] == size
                and x["cores"] == c and x.get("driver_memory", "4g") == "4g")
        if n > 1:
            out.append(f"{size:,} local[{c}]: {n} runs, the median is {r['engine']} ({r['rows_per_s']:,.0f} rows/s)")
    refs = [r for r in runs if r["engine"].startswith("python")]
    sizes = sorted({s for s, _ in spark})
    cores = sorted({c for _, c in spark})
    if refs:
        # The references' per-row cost does not depend on the log size (their dict load is extrapolated by bytes),
        # so the rate measured on the smallest size is the comparison for every size.
        best = max(refs, key=lambda r: r["rows_per_s"])
        ref_cpu = best["rows"] / best["cpu_s"]
        for s in sizes:
            for c in cores:
                r = spark.get((s, c))
                if not r:
                    continue
                m = r["memory"]
                x = (r["rows_per_s"] / c) / best["rows_per_s"]
                y = (r["rows"] / m["cpu_s"]) / ref_cpu
                z = (r["rows"] / (m["cpu_s"] - m["jit_cpu_s"])) / ref_cpu
                out.append(f"{s:,} spark local[{c}]: rows/s per Spark core / python reference ({best['variant']}) "
                           f"rows/s = {x:.1f}x (target >= {TARGET_X:g}x: {'met' if x >= TARGET_X else 'MISSED'}); "
                           f"per CPU-second of "
                           f"all processes (JVM, Python workers, driver; local[{c}] kept {m['cpu_s'] / r['seconds']:.1f}"
                           f" cores busy) {r['rows'] / m['cpu_s']:,.0f} vs {ref_cpu:,.0f} rows/CPU-s = {y:.1f}x; "
                           f"without the JIT compiler threads ({m['jit_cpu_s']:.0f} CPU-s) {z:.1f}x")
        for ref in refs:
            if ref is best:
                continue
            r = spark.get((best["size"], max(cores)))
            if r:
                out.append(f"  (vs the {ref['variant']} reference: {best['size']:,} spark local[{max(cores)}] per core "
                           f"{(r['rows_per_s'] / max(cores)) / ref['rows_per_s']:.1f}x)")
    for key, n in sorted(native.items()):
        if key in spark:
            r = spark[key]
            out.append(f"parser A/B at {key[0]:,} local[{key[1]}]: arrow {r['rows_per_s']:,.0f} rows/s vs native "
                       f"{n['rows_per_s']:,.0f} rows/s = {r['rows_per_s'] / n['rows_per_s']:.2f}x; per CPU-s "
                       f"{(r['rows'] / r['memory']['cpu_s']) / (n['rows'] / n['memory']['cpu_s']):.2f}x")
    if 1 in cores and len(cores) > 1:
        for s in sizes:
            hi = max(cores)
            if (s, 1) in spark and (s, hi) in spark:
                x = spark[(s, hi)]["rows_per_s"] / spark[(s, 1)]["rows_per_s"]
                out.append(f"scaling local[{hi}] / local[1] at {s:,}: {x:.2f}x (target near {hi}x; "
                           f"parallel efficiency {x / hi:.0%})")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        for c in cores:
            if (lo, c) in spark and (hi, c) in spark:
                ml, mh = spark[(lo, c)]["memory"], spark[(hi, c)]["memory"]
                out.append(f"driver memory local[{c}] {hi:,} vs {lo:,} ({hi / lo:.0f}x data): JVM live heap after GC "
                           f"{mh['heap_after_gc_mb']:,.0f} vs {ml['heap_after_gc_mb']:,.0f} MB "
                           f"({mh['heap_after_gc_mb'] / max(ml['heap_after_gc_mb'], 1):.2f}x), heap used "
                           f"{mh['heap_used_mb']:,.0f} vs {ml['heap_used_mb']:,.0f} MB, JVM RSS "
                           f"{mh['children_rss_mb']:,.0f} vs {ml['children_rss_mb']:,.0f} MB "
                           f"({mh['children_rss_mb'] / max(ml['children_rss_mb'], 1):.2f}x), python driver RSS "
                           f"{mh['python_maxrss_mb']:,.0f} vs {ml['python_maxrss_mb']:,.0f} MB")
    for r in spark.values():
        out.append(f"driver JVM heap in use after a full GC once run_etl returned, {r['size']:,} local[{r['cores']}]: "
                   f"{r['memory'].get('heap_after_full_gc_mb', float('nan')):,.0f} MB")
    for r in small_heap:
        big = spark.get((r["size"], 1))
        out.append(f"small heap: {r['size']:,} local[1] with spark.driver.memory={r['driver_memory']}: completed in "
                   f"{r['seconds']:.1f}s (GC {r['memory']['gc_seconds']:.1f}s)"
                   + (f" vs {big['seconds']:.1f}s with 4g" if big else ""))
    for f in R.get("heap_check_failures", []):
        out.append(f"small heap: {f['size']:,} local[1] FAILED: {f['error'][-300:]}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,4000000", help="impressions per generated raw log, comma-separated")
    p.add_argument("--cores", default="1,2", help="Spark local[N] core counts, comma-separated")
    p.add_argument("--workdir", default="/tmp/esmm-bench-etl", help="raw-log cache, outputs, results.json")
    p.add_argument("--reference-rows", type=int, default=200_000,
                   help="cap on skeleton rows the Python references process (0 = all); beyond it rows/s is "
                        "extrapolated")
    p.add_argument("--reference", default="tuned,naive", help="reference variants to run (tuned, naive; '' = none)")
    p.add_argument("--naive-rows", type=int, default=50_000,
                   help="separate, smaller cap for the slow naive reference (0 = same as --reference-rows)")
    p.add_argument("--parsers", default="arrow,native",
                   help="etl.parser values to run: arrow at every size, native (the slow A/B) at the smallest only")
    p.add_argument("--seed", type=int, default=None, help="generator seed (default: GeneratorConfig's)")
    p.add_argument("--check-rows", type=int, default=500, help="sampled rows for the Spark/reference agreement check")
    p.add_argument("--sample-interval", type=float, default=0.25, help="memory sampling period, seconds")
    p.add_argument("--keep-outputs", action="store_true", help="keep the ETL outputs (default: delete after the run)")
    # internal: one measurement in a fresh process
    p.add_argument("--child", choices=("generate", "spark", "reference"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--variant", default="tuned", help=argparse.SUPPRESS)
    p.add_argument("--chunk-rows", type=int, default=50_000, help=argparse.SUPPRESS)
    p.add_argument("--parser", default="arrow", help=argparse.SUPPRESS)
    p.add_argument("--driver-memory", default="4g", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every Spark configuration this many times; ratios use the median run (shared machines "
                        "vary by +-20%% from run to run)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin runs to cores (default: a local[N] run, its JVM and Python workers included, "
                        "runs on N cores via CPU affinity, and the references on 1, so 'per core' means one core)")
    p.add_argument("--heap-check", default="1g",
                   help="also run every size on local[1] with this spark.driver.memory ('' = skip): the ETL must "
                        "not need a heap that grows with the data")
    a = p.parse_args(argv)
    if a.seed is None:
        from esmm.config import GeneratorConfig
        a.seed = GeneratorConfig().seed

    if a.child:
        import logging
        logging.basicConfig(level=logging.WARNING)
        fn = {"generate": child_generate, "spark": child_spark, "reference": child_reference}[a.child]
        if a.child == "spark":
            a.cores = int(a.cores)
        if a.pin and a.child != "generate" and hasattr(os, "sched_setaffinity"):
            # inherited by the JVM this process starts and by the JVM's Python workers
            n = a.cores if a.child == "spark" else 1
            os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
        out = fn(a)
        with open(a.result, "w") as f:
            json.dump(out, f, indent=1)
        return out

    import psutil
    import pyspark
    sizes = [int(s) for s in a.sizes.split(",") if s]
    cores = [int(c) for c in a.cores.split(",") if c]
    variants = [v for v in a.reference.split(",") if v]
    os.makedirs(a.workdir, exist_ok=True)
    res_dir = os.path.join(a.workdir, "results")
    os.makedirs(res_dir, exist_ok=True)
    R = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
         "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT) else sys.executable,
                              os.path.relpath(os.path.abspath(__file__), ROOT)] + sys.argv[1:] if argv is None
                             else ["bench/etl.py"] + list(argv)),
         "machine": {"host": platform.node(), "cpus": os.cpu_count(), "mem_gb": round(psutil.virtual_memory().total / 1024**3),
                     "python": platform.python_version(), "spark": pyspark.__version__,
                     "cpu_model": _cpu_model()},
         "args": vars(a), "inputs": {}, "runs": [], "code": {"files": _code_digest(), "git": _git_state()}}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # 1. raw logs, generated once per size
    for size in sizes:
        raw = _raw_dir(a.workdir, size, a.seed)
        cfg = _cfg(size, a.seed)
        cached = _raw_is_cached(raw, cfg)
        info = {"cached": cached, "raw": raw}
        if not cached:
            log(f"generating {size:,} impressions -> {raw}")
            info.update(_child("generate", a, os.path.join(res_dir, f"gen-{size}.json"), size=size, raw=raw))
        with open(os.path.join(raw, "_GENERATED.json")) as f:
            g = json.load(f)
        info.update({k: g[k] for k in ("keys", "mean_common_entries", "mean_skeleton_entries", "impressions")})
        info["files"] = _input_stats(raw)
        info["bytes"] = sum(info["files"].values())
        R["inputs"][str(size)] = info
        log(f"input {size:,}: {info['bytes'] / MB:,.0f} MB ({'cached' if cached else 'generated'})")

    # 2. Spark ETL per size and core count, each in a fresh process (fresh JVM)
    # (run_etl sizes the shuffle partitions itself: one per etl.mb_per_partition of raw text)
    parsers = [x for x in a.parsers.split(",") if x]
    # Repeats are interleaved (all configurations once, then again), so slow drifts of the machine hit all alike.
    plan = [(size, parser, k, c) for size in sizes for parser in parsers if parser == "arrow" or size == min(sizes)
            for k in range(a.repeat) for c in cores]
    for size, parser, k, c in plan:
        out = os.path.join(a.workdir, f"out-{size}-local{c}-{parser}")
        log(f"spark ETL {size:,} local[{c}] parser={parser}" + (f" (run {k + 1}/{a.repeat})" if a.repeat > 1 else ""))
        r = _child("spark", a, os.path.join(res_dir, f"spark-{size}-{c}-{parser}-{k}.json"), size=size, cores=c,
                   raw=_raw_dir(a.workdir, size, a.seed), out=out, parser=parser)
        if a.repeat > 1:
            r["engine"] += f" #{k + 1}"
        R["runs"].append(r)
        log(f"  {r['seconds']:.1f}s, {r['rows_per_s']:,.0f} rows/s, CPU {r['memory']['cpu_s']:.0f}s (JIT "
            f"{r['memory']['jit_cpu_s']:.0f}s), JVM heap used {r['memory']['heap_used_mb']:,.0f} MB (live after "
            f"GC {r['memory']['heap_after_gc_mb']:,.0f}), JVM RSS {r['memory']['children_rss_mb']:,.0f} MB")

    # 2b. the same job with a small driver heap, at every size
    if a.heap_check:
        for size in sizes:
            out = os.path.join(a.workdir, f"out-{size}-heapcheck")
            log(f"spark ETL {size:,} local[1] parser=arrow, spark.driver.memory={a.heap_check}")
            try:
                r = _child("spark", a, os.path.join(res_dir, f"spark-{size}-heapcheck.json"), size=size, cores=1,
                           raw=_raw_dir(a.workdir, size, a.seed), out=out, parser="arrow",
                           driver_memory=a.heap_check)
            except SystemExit as e:
                R.setdefault("heap_check_failures", []).append({"size": size, "error": str(e)[-2000:]})
                log(f"  FAILED with a {a.heap_check} heap")
                continue
            R["runs"].append(r)
            log(f"  {r['seconds']:.1f}s with a {a.heap_check} heap, GC {r['memory']['gc_seconds']:.1f}s")

    # 3. plain-Python references on the smallest size
    ref_outs = {}
    small = min(sizes)
    total_rows = R["inputs"][str(small)]["impressions"]
    for v in variants:
        cap = a.naive_rows if (v == "naive" and a.naive_rows) else a.reference_rows
        out = os.path.join(a.workdir, f"ref-{small}-{v}")
        log(f"python reference ({v}) on {small:,}" + (f", capped at {cap:,} rows" if cap else ""))
        r = _child("reference", a, os.path.join(res_dir, f"ref-{small}-{v}.json"), size=small, variant=v,
                   raw=_raw_dir(a.workdir, small, a.seed), out=out, rows=cap)
        r.update(_extrapolate(r, R["inputs"][str(small)]["files"], total_rows))
        r["rows_per_s"] = r["rows"] / r["seconds"]
        R["runs"].append(r)
        ref_outs[f"python reference ({v})"] = out
        log(f"  {r['rows_per_s']:,.0f} rows/s{' (extrapolated)' if r['extrapolated'] else ''}, "
            f"peak RSS {r['memory']['python_maxrss_mb']:,.0f} MB")

    # 4. agreement on sampled rows, ratios, table
    if ref_outs:
        spark_out = os.path.join(a.workdir, f"out-{small}-local{max(cores)}-{parsers[0]}")
        others = {f"spark local[{max(cores)}] {p}": os.path.join(a.workdir, f"out-{small}-local{max(cores)}-{p}")
                  for p in parsers[1:]}
        R["agreement"] = {"spark": f"{small:,} local[{max(cores)}] {parsers[0]}",
                          **_agreement(spark_out, {**ref_outs, **others}, a.check_rows, a.seed)}
    changed = sorted({f for r in R["runs"] for f, h in r.get("code", {}).items() if h != R["code"]["files"].get(f)}
                     | {f for f, h in _code_digest().items() if h != R["code"]["files"].get(f)})
    R["code"]["changed_during_run"] = changed
    R["ratios"] = _ratios(R)
    text = report(R)
    R["report"] = text
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)
    print()
    print(text)
    if not a.keep_outputs:
        for r in R["runs"]:
            shutil.rmtree(r.get("out") or "", ignore_errors=True)
        for d in ref_outs.values():
            shutil.rmtree(d, ignore_errors=True)
    return R


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
