"""What cluster to ask for: wall time and memory of the full Ali-CCP and of a 1B-row log, projected on paper from the
per-core rates measured on the 2-core machine (bench/RESULTS.md), for N executor cores and G GPUs.

    .venv/bin/python bench/projection.py [--cores 16,64,256] [--gpus 0,8] [--gpu-rate 300000] [--efficiency 0.7]

Every input is a figure recorded in bench/RESULTS.md (named next to it below) or an assumption the output labels as
such. The model: a Spark stage's time = its rows / (per-core rate x cores) (parse, join, score and the metrics'
passes are data-parallel; shuffles are included in the measured rates, which came from whole stages); training =
one epoch of every method's training impressions / (per-worker rate x workers x scaling efficiency), with workers =
cores (CPU) or GPUs; memory = the measured peaks per process, which do not grow with the rows (the driver's
collected and broadcast objects are bounded: DeLong by ``metrics.DELONG_BROADCAST_SCORES``, the common-feature
broadcast by ``etl.broadcast_common_mb``, the validation cut by a fixed histogram).
"""
from __future__ import annotations

import argparse
import sys

# --- measured (bench/RESULTS.md) -----------------------------------------------------------------------------------
# ETL: "ESMM vs BASE at 20M ... (2026-12-04)", 20M impressions in 251 s on local[2], quiet (the noisier
# 2026-11-29 run: 474 s)
ETL_ROWS_PER_CORE_S = 20_000_000 / 251.4 / 2
# Training: the same run, one process and one thread per model, 10.0M training impressions; seconds per model
TRAIN_S_PER_10M = {"ctr": 258, "base": 57, "aman": 128, "oversampling": 74, "unbias": 102, "division": 274,
                   "esmm_ns": 581, "esmm": 400}
# Scoring: the same run, 8 models + the reference CTR network over 10.0M test rows in 286 s on 2 cores
SCORE_MODEL_ROWS_PER_CORE_S = 9 * 10_000_000 / 286 / 2
# Metrics (AUC + DeLong + log-loss + GAUC, 5 tasks, shuffles sized to the table): "ESMM vs BASE at 20M ...
# (2026-12-04)", 9 runs x 9,994,202 test impressions in 360 s on 2 cores, quiet (the oracle's metrics, generated
# data only, are left out)
METRIC_MODEL_ROWS_PER_CORE_S = 9 * 9_994_202 / 360.1 / 2
# Peak memory per process at 20M (same run): ETL driver JVM 2.7 GB (with the 345k-line common table broadcast),
# Python workers 0.35 GB each, the training process 1.4 GB (conf/default.yaml's tables and Adam moments), scoring
# workers 1.0 GB each (2 models per pass)
MEM = {"etl_jvm_gb": 2.7, "py_worker_gb": 0.35, "train_gb": 1.4, "score_worker_gb": 1.0}

# --- the logs to size ----------------------------------------------------------------------------------------------
LOGS = {"full Ali-CCP": (42_300_135, 43_016_840),      # ../shared/ALI_CCP_FORMAT.md: train / test skeleton lines
        "1B-row log": (500_000_000, 500_000_000)}      # split in half by time, as the paper's protocol


def project(train: int, test: int, cores: int, gpus: int, gpu_rate: float, eff: float) -> dict:
    rows = train + test
    etl = rows / (ETL_ROWS_PER_CORE_S * cores)
    per_row = sum(TRAIN_S_PER_10M.values()) / 10_000_000        # one core, every method of Table 2, one epoch
    if gpus:
        # a GPU's rate is an assumption for ESMM; the other methods scale by their measured cost relative to ESMM
        esmm_row = TRAIN_S_PER_10M["esmm"] / 10_000_000
        train_s = train * per_row * (1 / esmm_row) / (gpu_rate * gpus * (eff if gpus > 1 else 1.0))
    else:
        train_s = train * per_row / (cores * (eff if cores > 1 else 1.0))
    models = len(TRAIN_S_PER_10M) + 1
    score = test * models / (SCORE_MODEL_ROWS_PER_CORE_S * cores)
    metrics = test * models / (METRIC_MODEL_ROWS_PER_CORE_S * cores)
    stages = {"ETL": etl, "training": train_s, "scoring": score, "metrics": metrics}
    return {**stages, "total": sum(stages.values()), "dominant": max(stages, key=stages.get)}


def _h(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cores", default="16,64,256", help="executor cores (CPU training: one Horovod worker each)")
    p.add_argument("--gpus", default="0,8", help="GPUs for training (0: train on the cores)")
    p.add_argument("--gpu-rate", type=float, default=300_000,
                   help="ASSUMED ESMM samples/s of one GPU at batch 1024 (not measured here: no GPU)")
    p.add_argument("--efficiency", type=float, default=0.7,
                   help="ASSUMED data-parallel scaling efficiency of Horovod beyond one worker (measured on this "
                        "2-core machine: 1.14x for 2 workers = 0.57, both sharing the cores)")
    a = p.parse_args(argv)
    cores = [int(x) for x in a.cores.split(",")]
    gpus = [int(x) for x in a.gpus.split(",")]
    print(f"command: bench/projection.py --cores {a.cores} --gpus {a.gpus} --gpu-rate {a.gpu_rate:g} "
          f"--efficiency {a.efficiency:g}\n")
    print(f"per-core rates (measured): ETL {ETL_ROWS_PER_CORE_S:,.0f} rows/s; training, every method of Table 2, "
          f"one epoch: {sum(TRAIN_S_PER_10M.values()) / 10:,.0f} s per 1M training impressions (ESMM alone "
          f"{TRAIN_S_PER_10M['esmm'] / 10:.0f} s); scoring {SCORE_MODEL_ROWS_PER_CORE_S:,.0f} model-rows/s; "
          f"metrics {METRIC_MODEL_ROWS_PER_CORE_S:,.0f} model-rows/s\n")
    doms = {}
    print("| log | cores | GPUs | global batch | ETL | training (8 methods) | scoring | metrics | total | dominant |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (train, test) in LOGS.items():
        for c in cores:
            for g in gpus:
                r = project(train, test, c, g, a.gpu_rate, a.efficiency)
                doms.setdefault("GPUs" if g else "CPUs", []).append(r["dominant"])
                print(f"| {name} | {c} | {g} | {1024 * (g or c):,} | {_h(r['ETL'])} | {_h(r['training'])} | {_h(r['scoring'])} | "
                      f"{_h(r['metrics'])} | {_h(r['total'])} | {r['dominant']} |")
    for kind, ds in doms.items():
        counts = {d: ds.count(d) for d in dict.fromkeys(ds)}
        print(f"\ntraining on {kind}: the longest stage is " + ", ".join(f"{d} in {k} of {len(ds)} rows"
                                                                         for d, k in counts.items()))
    print(f"\nmemory per process, whatever the log (measured peaks at 20M; the driver's collected and broadcast "
          f"objects are bounded): ETL driver JVM {MEM['etl_jvm_gb']} GB (of it up to etl.broadcast_common_mb for the "
          f"common table), Python worker {MEM['py_worker_gb']} GB per core in the ETL and {MEM['score_worker_gb']} GB "
          f"per core while scoring (evaluate.models_per_pass: 2), training process {MEM['train_gb']} GB per worker "
          f"(the model's tables, not the log)")
    print("\nglobal batch: train.batch_size (1024) is per Horovod worker, so data-parallel training multiplies the "
          "batch the paper's learning rate was set for; past a few dozen workers, keep the global batch by lowering "
          "train.batch_size (the per-worker rate then drops) or re-tune the learning rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
