"""Does the generator's sample selection bias show up in models? BASE vs ESMM with the bias knob off and on.

    .venv/bin/python bench/selection_bias.py [--impressions 400000] [--biases 0,1] [--workdir /tmp/esmm-bench-bias]

For each value of ``generate.selection_bias`` (conf/demo.yaml otherwise): generate -> ETL -> train the reference CTR
network, BASE and ESMM (1 process) -> evaluate. Prints, per bias, the oracle AUCs and each model's CVR AUC over
clicked test impressions and over *all* test impressions (against the would-have-converted outcome), and the gap to
the oracle on each. GENERATOR.md's expectation: BASE, trained on clicks only, loses more to the oracle over all
impressions than over the clicked ones, and that extra loss shrinks when the bias is turned off.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_one(spark, bias: float, args) -> dict:
    from esmm.config import load_config
    from esmm.etl import run_etl
    from esmm.experiment import run_experiment
    from esmm.generator import GROUND_TRUTH_DIR, generate
    base = os.path.join(args.workdir, f"bias{bias}")
    cfg = load_config(os.path.join(ROOT, "conf", "demo.yaml"), [
        f"generate.selection_bias={bias}", f"generate.impressions={args.impressions}",
        f"paths.raw={base}/raw", f"paths.dataset={base}/dataset", f"paths.runs={base}/runs",
        "train.workers=1", "experiment.methods=[base, esmm]", "experiment.figure_rates=[1.0]"])
    generate(spark, cfg)
    run_etl(spark, cfg)
    rep = run_experiment(spark, cfg, cfg.paths.dataset, os.path.join(base, "exp"),
                         os.path.join(cfg.paths.raw, GROUND_TRUTH_DIR))
    return {r["model"]: r for r in rep["table2"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impressions", type=int, default=400_000)
    p.add_argument("--biases", default="0,1")
    p.add_argument("--workdir", default="/tmp/esmm-bench-bias")
    args = p.parse_args()
    from esmm.cli import setup_logging
    from esmm.config import load_config
    from esmm.spark import get_spark
    setup_logging("WARNING")
    spark = get_spark(load_config(os.path.join(ROOT, "conf", "demo.yaml")).spark, "bench-selection-bias")
    t0 = time.time()
    rows = {float(b): run_one(spark, float(b), args) for b in args.biases.split(",")}
    print(f"\n{args.impressions:,} impressions per setting (conf/demo.yaml), 1 repeat, {time.time() - t0:.0f}s")
    print(f"{'bias':>4s} {'model':8s} {'CVR AUC clicked':>16s} {'gap to oracle':>14s} {'CVR AUC all':>12s} "
          f"{'gap to oracle':>14s} {'extra gap all-clicked':>22s}")
    for bias, table in rows.items():
        oracle = table["ORACLE (true probabilities)"]
        for m in ("BASE", "ESMM"):
            r = table[m]
            g_click = oracle["cvr_auc"] - r["cvr_auc"]
            g_all = oracle["cvr_entire_auc"] - r["cvr_entire_auc"]
            print(f"{bias:4.1f} {m:8s} {r['cvr_auc']:16.2f} {g_click:14.2f} {r['cvr_entire_auc']:12.2f} "
                  f"{g_all:14.2f} {g_all - g_click:22.2f}")
        print(f"{bias:4.1f} {'oracle':8s} {oracle['cvr_auc']:16.2f} {'':14s} {oracle['cvr_entire_auc']:12.2f}")


if __name__ == "__main__":
    main()
