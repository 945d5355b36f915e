"""The study the successors' papers could not run: does a method debias pCVR over the entire space?

For each generated world (``generate.selection_bias`` in ``--biases``: 0 = clicks say nothing about conversion
propensity, larger = the clicked population's CVR differs more from the unclicked one's), the whole pipeline runs
(generate -> ETL -> ``--repeats`` x every method -> Spark evaluation) and, per method, with a 95% t-interval over
the repeats (the DeLong half-width with one repeat):

- CVR AUC on clicked test impressions (what the papers report),
- entire-space CVR AUC (p_cvr against the generator's would-convert outcome of EVERY test impression),
- CTCVR AUC,
- ECE of pCVR against the true pCVR over all test impressions (``esmm.metrics.calibration_error``) and the mean
  pCVR / mean true pCVR ratio (> 1: overestimates, ESCM2's "inherent estimation bias"),

with the oracle (the true probabilities) as the ceiling. Writes ``<out>/successors.{md,json,png}`` and prints the
table and the command. Every world's directories are the jobs' own (resumable: a re-run reuses finished outputs).

    .venv/bin/python bench/successors.py --conf conf/demo.yaml --repeats 3 --biases 0 1 2 --out bench/out/successors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("base", "esmm", "escm2_ips", "escm2_dr", "aitm", "mmoe")
COLUMNS = (("cvr", "auc", "CVR AUC % (clicked)"), ("cvr_entire", "auc", "entire-space CVR AUC %"),
           ("ctcvr", "auc", "CTCVR AUC %"), ("cvr_entire", "ece", "pCVR ECE (pp)"),
           ("cvr_entire", "ratio", "mean pCVR / true"))


def t_halfwidth(values: list[float]) -> float:
    """95% t-interval half-width of the mean (NaN with fewer than 2 values)."""
    from statistics import stdev

    from scipy.stats import t as student_t
    if len(values) < 2:
        return math.nan
    return float(student_t.ppf(0.975, len(values) - 1) * stdev(values) / math.sqrt(len(values)))


def run_world(spark, args, bias: float) -> dict:
    from esmm.config import load_config
    from esmm.etl import run_etl
    from esmm.experiment import run_experiment
    from esmm.generator import GROUND_TRUTH_DIR, generate
    base = os.path.join(args.out, f"bias{bias:g}")
    sets = list(args.set) + [f"generate.selection_bias={bias}", f"paths.raw={base}/raw",
                             f"paths.dataset={base}/dataset", f"paths.runs={base}/runs",
                             f"experiment.methods=[{', '.join(args.methods)}]", f"experiment.repeats={args.repeats}",
                             "experiment.figure_rates=[1.0]", "experiment.figure_methods=[]"]
    if args.impressions:
        sets.append(f"generate.impressions={args.impressions}")
    cfg = load_config(args.conf, sets)
    t0 = time.time()
    generate(spark, cfg)
    run_etl(spark, cfg)
    exp = os.path.join(base, "runs", "experiment")
    run_experiment(spark, cfg, cfg.paths.dataset, exp, os.path.join(cfg.paths.raw, GROUND_TRUTH_DIR), 1.0)
    return {"bias": bias, "exp": exp, "seconds": round(time.time() - t0, 1), "sets": sets}


def collect(world: dict, methods: tuple) -> dict:
    """{method: {column: (mean, halfwidth, values)}} over the world's units, plus the oracle row."""
    mdir = os.path.join(world["exp"], "metrics")
    units = [json.load(open(os.path.join(mdir, f))) for f in sorted(os.listdir(mdir))
             if f.startswith("r") and f.endswith(".json")]
    out = {}
    for m in methods:
        cols = {}
        for task, key, _ in COLUMNS:
            vals, hws = [], []
            for u in units:
                row = next((r for r in u["metrics"] if r["run_id"] == m and r["task"] == task), None)
                if row is None:
                    continue
                if key == "ratio":
                    vals.append(row["mean_pred"] / row["mean_true"])
                elif key == "ece":
                    vals.append(row["ece"] * 100)
                else:
                    vals.append(row["auc"] * 100)
                    rec = u.get("delong", {}).get(task)
                    if rec and m in rec["models"]:
                        i = rec["models"].index(m)
                        hws.append(1.959963984540054 * math.sqrt(max(rec["cov"][i][i], 0)) * 100)
            mean = sum(vals) / len(vals) if vals else math.nan
            hw = t_halfwidth(vals) if len(vals) > 1 else (hws[0] if hws else math.nan)
            cols[(task, key)] = (mean, hw, vals)
        out[m] = cols
    oracle_path = os.path.join(mdir, "oracle.json")
    if os.path.exists(oracle_path):
        rows = json.load(open(oracle_path))
        cols = {}
        for task, key, _ in COLUMNS:
            r = next((r for r in rows if r["task"] == task), None)
            v = (r["auc"] * 100 if key == "auc" else 0.0 if key == "ece" else 1.0) if r else math.nan
            cols[(task, key)] = (v, math.nan, [v])
        out["oracle"] = cols
    return out


def markdown(results: dict, methods: tuple) -> str:
    from esmm.report import label
    lines = []
    for bias, table in results.items():
        lines += [f"selection_bias = {bias:g}", "",
                  "| method | " + " | ".join(c for *_, c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for m in list(methods) + ["oracle"]:
            if m not in table:
                continue
            cells = []
            for task, key, _ in COLUMNS:
                mean, hw, _ = table[m][(task, key)]
                fmt = "{:.3f}" if key in ("ece", "ratio") else "{:.2f}"
                cells.append(fmt.format(mean) + ("" if math.isnan(hw) else f" ± {fmt.format(hw)}"))
            lines.append(f"| {label(m) if m != 'oracle' else 'ORACLE (true probabilities)'} | " + " | ".join(cells)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def figure(results: dict, methods: tuple, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esmm.report import label
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4))
    biases = sorted(results)
    for ax, (task, key, title) in zip(axes, COLUMNS):
        for m in list(methods) + ["oracle"]:
            pts = [(b, *results[b][m][(task, key)][:2]) for b in biases if m in results[b]]
            if not pts:
                continue
            xs, ys, hs = zip(*pts)
            ax.errorbar(xs, ys, yerr=[0 if math.isnan(h) else h for h in hs], marker="o", capsize=3,
                        label=label(m) if m != "oracle" else "ORACLE", linestyle="--" if m == "oracle" else "-")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("generate.selection_bias")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", default=os.path.join(ROOT, "conf", "demo.yaml"))
    p.add_argument("--set", action="append", default=[], help="extra config overrides for every world")
    p.add_argument("--biases", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impressions", type=int, default=None, help="default: the config's generate.impressions")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out", "successors"))
    args = p.parse_args(argv)
    from esmm.cli import setup_logging
    from esmm.config import load_config
    from esmm.spark import get_spark
    setup_logging("INFO")
    spark = get_spark(load_config(args.conf, args.set).spark, "esmm-successors")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    command = "bench/successors.py " + " ".join(sys.argv[1:] if argv is None else argv)
    worlds, results = [], {}
    for b in args.biases:  # the report is rewritten after every world, so a long study shows its progress
        worlds.append(run_world(spark, args, b))
        results[b] = collect(worlds[-1], tuple(args.methods))
        report = write(args, command, worlds, results, t0)
    print(report)
    print(f"total {time.time() - t0:.0f}s; reports in {args.out}/successors.{{md,json,png}}")
    return results


def write(args, command: str, worlds: list, results: dict, t0: float) -> str:
    text = markdown(results, tuple(args.methods))
    report = (f"Successors vs ground truth ({len(results)} of {len(args.biases)} worlds): {args.repeats} repeat(s) per world, mean ± 95% t-interval over the "
              f"repeats (one repeat: the DeLong half-width); ECE in percentage points of pCVR.\n"
              f"command: {command}\n\n{text}")
    with open(os.path.join(args.out, "successors.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "successors.json"), "w") as f:
        json.dump({"command": command, "worlds": worlds, "seconds": round(time.time() - t0, 1),
                   "results": {str(b): {m: {f"{t}.{k}": v for (t, k), v in cols.items()} for m, cols in tab.items()}
                               for b, tab in results.items()}}, f, indent=2, default=float)
    figure(results, tuple(args.methods), os.path.join(args.out, "successors.png"))
    return report


if __name__ == "__main__":
    main()
