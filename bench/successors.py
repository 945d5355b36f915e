"""The study the successors' papers could not run: does a method debias pCVR over the entire space?

For each generated world (``generate.selection_bias`` in ``--biases``: 0 = clicks say nothing about conversion
propensity, larger = the clicked population's CVR differs more from the unclicked one's), the whole pipeline runs
(generate -> ETL -> ``--repeats`` x every method -> Spark evaluation) and, per method, with a 95% t-interval over
the repeats (the DeLong half-width with one repeat):

- CVR AUC on clicked test impressions (what the papers report),
- entire-space CVR AUC (p_cvr against the generator's would-convert outcome of EVERY test impression),
- CTCVR AUC,
- ECE of pCVR against the true pCVR over all test impressions (``esmm.metrics.calibration_error``) and the mean
  pCVR / mean true pCVR ratio (> 1: overestimates, ESCM2's "inherent estimation bias"), as every seed's value,

with the oracle (the true probabilities) as the ceiling; then the paired comparisons of every method against BASE and
against ESMM (``esmm.report.significance_summary``: per-repeat differences on the same test rows, t-interval, DeLong
p per repeat, the smallest detectable difference), the per-seed ECE difference to ESMM, and the sentences that state
the results, written by code from those tables (``claims``). Writes ``<out>/successors.{md,json,png}`` and
``successors-claims.md`` (the sentences alone, for the README) and prints the table and the command. Every world's directories are the jobs' own (resumable: a re-run reuses finished outputs).

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


def _units(world: dict) -> list[dict]:
    mdir = os.path.join(world["exp"], "metrics")
    return [json.load(open(os.path.join(mdir, f))) for f in sorted(os.listdir(mdir))
            if f.startswith("r") and f.endswith(".json")]


def _value(row: dict, key: str) -> float:
    if key == "ratio":
        return row["mean_pred"] / row["mean_true"]
    return row["ece"] * 100 if key == "ece" else row["auc"] * 100


def collect(world: dict, methods: tuple) -> dict:
    """One world: ``table`` {method: {(task, key): (mean, t half-width, per-repeat values, mean DeLong half-width)}}
    plus the oracle row; ``vs_base`` and ``vs_esmm``: paired comparisons (``esmm.report.significance_summary``
    rows, method minus BASE / method minus ESMM, every repeat scoring the same test rows); ``ece_vs_esmm``: the
    per-seed ECE difference to ESMM with its t-interval."""
    from esmm import report as R
    units = _units(world)
    table = {}
    for m in methods:
        cols = {}
        for task, key, _ in COLUMNS:
            vals, hws = [], []
            for u in units:
                row = next((r for r in u["metrics"] if r["run_id"] == m and r["task"] == task), None)
                if row is None:
                    continue
                vals.append(_value(row, key))
                rec = u.get("delong", {}).get(task)
                if key == "auc" and rec and m in rec["models"]:
                    i = rec["models"].index(m)
                    hws.append(R.Z95 * math.sqrt(max(rec["cov"][i][i], 0)) * 100)
            mean = sum(vals) / len(vals) if vals else math.nan
            cols[(task, key)] = (mean, t_halfwidth(vals), vals, sum(hws) / len(hws) if hws else math.nan)
        table[m] = cols
    oracle_path = os.path.join(world["exp"], "metrics", "oracle.json")
    if os.path.exists(oracle_path):
        rows = json.load(open(oracle_path))
        rows = rows["rows"] if isinstance(rows, dict) else rows   # {"identity", "rows"} since oracle identities
        cols = {}
        for task, key, _ in COLUMNS:
            r = next((r for r in rows if r["task"] == task), None)
            v = (r["auc"] * 100 if key == "auc" else 0.0 if key == "ece" else 1.0) if r else math.nan
            cols[(task, key)] = (v, math.nan, [v], math.nan)
        table["oracle"] = cols
    out = {"table": table, "vs_base": [], "vs_esmm": [], "ece_vs_esmm": []}
    for ref, key in (("base", "vs_base"), ("esmm", "vs_esmm")):
        for m in methods:
            if m != ref and ref in methods:
                comps = R.comparisons(units, {1.0: {ref: ref, m: m}}, reference=m)
                out[key] += [{"method": m, **s} for s in R.significance_summary(comps, 1.0)]
    if "esmm" in methods:
        for m in methods:
            if m != "esmm":
                a, b = table[m][("cvr_entire", "ece")][2], table["esmm"][("cvr_entire", "ece")][2]
                d = [x - y for x, y in zip(a, b)]
                out["ece_vs_esmm"].append({"method": m, "diff": sum(d) / len(d), "halfwidth": t_halfwidth(d),
                                           "lower": sum(x < 0 for x in d), "n": len(d), "per_seed": d})
    return out


def _per_seed(vals: list[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in vals)


def markdown(results: dict, methods: tuple) -> str:
    from esmm import report as R
    from esmm.report import label
    lines = []
    for bias, world in results.items():
        table = world["table"]
        lines += [f"### selection_bias = {bias:g}", "",
                  "| method | " + " | ".join(c for *_, c in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for m in list(methods) + ["oracle"]:
            if m not in table:
                continue
            cells = []
            for task, key, _ in COLUMNS:
                mean, hw, vals, dl = table[m][(task, key)]
                if key == "auc":
                    cells.append(f"{mean:.2f}" + ("" if math.isnan(hw) else f" ± {hw:.2f}")
                                 + ("" if math.isnan(dl) else f" (±{dl:.2f})"))
                elif m == "oracle":
                    cells.append(f"{mean:.3f}")
                else:  # non-negative or a ratio: every seed's value, not an interval that runs below zero
                    cells.append(f"{mean:.3f}: " + _per_seed(vals, "{:.3f}"))
            lines.append(f"| {label(m) if m != 'oracle' else 'ORACLE (true probabilities)'} | " + " | ".join(cells)
                         + " |")
        lines += ["", "AUC: mean ± 95% t-interval over the repeats (training randomness), (±h) the mean 95% DeLong "
                  "half-width of one run (test-set sampling). ECE and mean pCVR / true: the mean, then every seed's "
                  "value.", ""]
        for key, ref in (("vs_base", "BASE"), ("vs_esmm", "ESMM")):
            rows = [dict(r, competitor=ref) for r in world[key]]
            if not rows:
                continue
            lines += [f"Each method minus {ref} (paired: same test rows in every repeat):", "",
                      "| method | task | difference (AUC points) | 95% CI, seeds | 95% CI, seeds and test rows | "
                      "p (DeLong) | significant in | detectable (80% power) |", "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {label(r['method'])} | {R.TASK_TITLES[r['task']]} | {r['diff']:+.2f} | "
                             f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}] | [{r['ci_total_low']:+.2f}, "
                             f"{r['ci_total_high']:+.2f}] | {R._p(r)} | {r['significant']}/{r['repeats']} | "
                             f"{r['mde']:.2f} |")
            lines.append("")
        if world["ece_vs_esmm"]:
            lines += ["pCVR ECE minus ESMM's (pp, paired by seed):", "",
                      "| method | difference | 95% t-interval | lower than ESMM in | per seed |", "|---|---|---|---|---|"]
            for r in world["ece_vs_esmm"]:
                hw = r["halfwidth"]
                lines.append(f"| {label(r['method'])} | {r['diff']:+.3f} | "
                             + ("-" if math.isnan(hw) else f"[{r['diff'] - hw:+.3f}, {r['diff'] + hw:+.3f}]")
                             + f" | {r['lower']} of {r['n']} seeds | {_per_seed(r['per_seed'], '{:+.3f}')} |")
            lines.append("")
        lines += ["What the numbers say (written from the tables by `esmm.report.claims` and `claims` below):", ""]
        lines += [f"- {c}" for c in claims(world)]
        lines.append("")
    return "\n".join(lines)


def claims(world: dict) -> list[str]:
    """Sentences from one world's paired tables: every method against BASE on the entire-space CVR, every successor
    against ESMM on clicked and entire-space CVR, and ECE against ESMM."""
    from esmm import report as R
    from esmm.report import label
    out = []
    for key, tasks in (("vs_base", ("cvr_entire",)), ("vs_esmm", ("cvr", "cvr_entire"))):
        for r in world[key]:
            if r["task"] in tasks and not (key == "vs_esmm" and r["method"] == "base"):
                out += R.claims([dict(r, competitor="BASE" if key == "vs_base" else "ESMM")], label(r["method"]))
    for r in world["ece_vs_esmm"]:
        hw = r["halfwidth"]
        if r["method"] == "base" or math.isnan(hw):
            continue
        lo, hi = r["diff"] - hw, r["diff"] + hw
        verdict = ("lower than ESMM's" if hi < 0 else "higher than ESMM's" if lo > 0 else
                   f"not resolved at {r['n']} seeds")
        out.append(f"{label(r['method'])} vs ESMM, pCVR ECE: {r['diff']:+.3f} pp (95% t-interval [{lo:+.3f}, "
                   f"{hi:+.3f}]; lower in {r['lower']} of {r['n']} seeds): {verdict}.")
    return out


def figure(results: dict, methods: tuple, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esmm.report import label
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4))
    biases = sorted(results)
    for ax, (task, key, title) in zip(axes, COLUMNS):
        for m in list(methods) + ["oracle"]:
            pts = [(b, *results[b]["table"][m][(task, key)][:2]) for b in biases if m in results[b]["table"]]
            if not pts:
                continue
            xs, ys, hs = zip(*pts)
            # AUC: the t-interval; ECE and the level are per-seed spreads, drawn as min-max
            if key == "auc":
                err = [0 if math.isnan(h) else h for h in hs]
            else:
                vals = [results[b]["table"][m][(task, key)][2] for b in biases if m in results[b]["table"]]
                err = [[y - min(v) for y, v in zip(ys, vals)], [max(v) - y for y, v in zip(ys, vals)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
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
    report = (f"Successors vs ground truth ({len(results)} of {len(args.biases)} worlds): {args.repeats} repeat(s) "
              f"per world; ECE in percentage points of pCVR.\ncommand: {command}\n\n{text}")
    with open(os.path.join(args.out, "successors.md"), "w") as f:
        f.write(report)
    with open(os.path.join(args.out, "successors.json"), "w") as f:
        json.dump({"command": command, "worlds": worlds, "seconds": round(time.time() - t0, 1),
                   "results": {str(b): {"table": {m: {f"{t}.{k}": v for (t, k), v in cols.items()}
                                                  for m, cols in w["table"].items()},
                                        **{k: v for k, v in w.items() if k != "table"}}
                               for b, w in results.items()}}, f, indent=2, default=float)
    with open(os.path.join(args.out, "successors-claims.md"), "w") as f:   # the README's headline: sentences only
        f.write(f"{len(results)} world(s), {args.repeats} repeat(s) each (`{command}`):\n\n" + "\n".join(
            f"- selection_bias {b:g}: {c}" for b, w in results.items() for c in claims(w)) + "\n")
    figure(results, tuple(args.methods), os.path.join(args.out, "successors.png"))
    return report


if __name__ == "__main__":
    main()
