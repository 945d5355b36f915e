"""When does ESMM help? ESMM minus BASE over the generator's two couplings between clicks and conversions.

    .venv/bin/python bench/esmm_map.py [--impressions 2000000] [--biases 0,1,2] [--affinities 0,0.2,0.6]
                                       [--repeats 1] [--workdir /tmp/esmm-bench-map]

For each (``generate.selection_bias``, ``generate.shared_affinity``) cell (conf/demo.yaml otherwise, one fixed size):
generate -> ETL -> train the reference CTR network, BASE and ESMM (1 process) -> evaluate, with the paired DeLong
test of ESMM against BASE on the same test rows (``esmm.report``). ``selection_bias`` (lambda) makes the clicked
population a biased sample (attractive-but-poor items); ``shared_affinity`` (w_S) is how much of the conversion
propensity comes from the user-item affinity that also drives clicks, i.e. how much ESMM's shared embeddings can
transfer (generator docstring). Prints one row per cell: ESMM - BASE in AUC points with its 95% CI on CVR over
clicked impressions, CTCVR, and CVR over all impressions (entire space, against the would-have-converted outcome),
plus the oracle's CVR AUC and the clicked/all mean-pCVR ratio the generator reports.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TASKS = ("cvr", "ctcvr", "cvr_entire")


def run_cell(spark, bias: float, affinity: float, args) -> dict:
    from esmm.config import load_config
    from esmm.etl import run_etl
    from esmm.experiment import run_experiment
    from esmm.generator import GROUND_TRUTH_DIR, generate
    base = os.path.join(args.workdir, f"bias{bias}-aff{affinity}")
    cfg = load_config(os.path.join(ROOT, "conf", "demo.yaml"), [
        f"generate.selection_bias={bias}", f"generate.shared_affinity={affinity}",
        f"generate.impressions={args.impressions}", f"experiment.repeats={args.repeats}",
        f"paths.raw={base}/raw", f"paths.dataset={base}/dataset", f"paths.runs={base}/runs",
        "experiment.methods=[base, esmm]", "experiment.figure_rates=[1.0]"])
    t0 = time.time()
    gen = generate(spark, cfg)
    run_etl(spark, cfg)
    rep = run_experiment(spark, cfg, cfg.paths.dataset, os.path.join(base, "exp"),
                         os.path.join(cfg.paths.raw, GROUND_TRUTH_DIR))
    table = {r["model"]: r for r in rep["table2"]}
    diffs = {s["task"]: s for s in rep["significance"] if s["competitor"] == "BASE"}
    return {"bias": bias, "affinity": affinity, "seconds": time.time() - t0, "diffs": diffs,
            "oracle_cvr": table["ORACLE (true probabilities)"]["cvr_auc"],
            "oracle_cvr_entire": table["ORACLE (true probabilities)"]["cvr_entire_auc"],
            "esmm": {t: table["ESMM"][f"{t}_auc"] for t in TASKS}, "base": {t: table["BASE"][f"{t}_auc"] for t in TASKS},
            "generated": gen if isinstance(gen, dict) else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impressions", type=int, default=2_000_000)
    p.add_argument("--biases", default="0,1,2")
    p.add_argument("--affinities", default="0,0.2,0.6")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/esmm-bench-map")
    p.add_argument("--json", default="", help="also write the cells to this JSON file")
    args = p.parse_args()
    from esmm.cli import setup_logging
    from esmm.config import load_config
    from esmm.spark import get_spark
    setup_logging("WARNING")
    spark = get_spark(load_config(os.path.join(ROOT, "conf", "demo.yaml")).spark, "bench-esmm-map")
    t0 = time.time()
    cells = [run_cell(spark, float(b), float(a), args)
             for b in args.biases.split(",") for a in args.affinities.split(",")]
    print(f"\n{args.impressions:,} impressions per cell (conf/demo.yaml), {args.repeats} repeat(s), "
          f"{time.time() - t0:.0f}s in all")
    print("ESMM - BASE, AUC points [95% CI over seeds and test rows] (detectable difference, 80% power); "
          "* = ESMM higher or lower by that CI and the paired DeLong test (p < 0.05"
          + (", every repeat)" if args.repeats > 1 else ")"))
    head = f"{'lambda':>6s} {'w_S':>5s} | " + " | ".join(f"{t:^31s}" for t in TASKS) + " | oracle CVR / all"
    print(head + "\n" + "-" * len(head))
    for c in cells:
        parts = []
        for t in TASKS:
            d = c["diffs"].get(t)
            if d is None:
                parts.append(f"{'-':^31s}")
                continue
            star = "*" if d["verdict"] != "unresolved" else " "
            parts.append(f"{d['diff']:+6.2f} [{d['ci_total_low']:+6.2f},{d['ci_total_high']:+6.2f}]{star} "
                         f"({d['mde']:.2f})")
        print(f"{c['bias']:6.1f} {c['affinity']:5.2f} | " + " | ".join(parts)
              + f" | {c['oracle_cvr']:.1f} / {c['oracle_cvr_entire']:.1f}")
    print("\nWhat the numbers say (esmm.report.claims):")
    from esmm.report import claims
    for c in cells:
        for line in claims([c["diffs"][t] for t in TASKS if t in c["diffs"]]):
            print(f"- lambda {c['bias']:g}, w_S {c['affinity']:g}: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(cells, f, indent=2, default=float)


if __name__ == "__main__":
    main()
