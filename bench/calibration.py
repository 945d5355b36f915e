"""Calibrated exports: the mean level of exported pCVR per seed, before and after the fix, on the demo's 4M world.

    .venv/bin/python bench/calibration.py [--repeats 5] [--workdir /tmp/esmm-bench-calibration]
        [--compare schedule|choice|none] [--conf conf/demo.yaml] [--set key=value ...]

One generated world (``--conf``, conf/demo.yaml by default: 4M impressions, 2M test), one ETL, then the same
experiment (the reference CTR network, BASE and ESMM, one epoch, ``--repeats`` seeds) twice on the same dataset.
``--compare schedule`` (the default):

- ``before``: ``train.lr_schedule=constant`` and ``train.best_by=auc`` (the paper's constant-rate Adam, the export the
  highest-validation-AUC snapshot: what every run did before),
- ``after``: the defaults (the rate decays linearly to 0 over the run, the export the lowest-validation-log-loss
  snapshot among the cool-down's evaluations).

``--compare choice``: ``before`` is ``train.choose_from=any`` (every evaluation a candidate, early stopping counting
all of them), ``after`` the default ``cooldown``. ``--compare none``: the defaults only (one setting, no AUC change),
e.g. to read the levels of more methods (``--set "experiment.methods=[base, esmm, escm2_ips, escm2_dr]"``); every
method but BASE is judged over all impressions. Every table also gives each model's entire-space level over its
clicked level, next to that of a constant calibrated on the clicked test rows (from the oracle's metrics). ``--set`` overrides come after the workdir's paths, so
``--set paths.raw=... --set paths.dataset=...`` reuses a world generated before (generate and ETL are idempotent).

Per seed and setting it reports the level of pCVR:

- ESMM over all test impressions: mean pCVR / mean true pCVR (the generator's ground truth; ``cvr_entire`` metrics),
- BASE over the clicked test impressions it is trained for: mean pCVR / observed conversion rate (``cvr`` metrics;
  over all impressions BASE is off by the world's selection bias by design),

the exported step and its validation log-loss and calibration, and the AUCs. Seeds are paired (repeat k of both
settings has the same initial weights, shuffle order and test rows), so the AUC change is the mean of the per-seed
differences with a 95% t-interval. Writes ``<workdir>/calibration.{json,md}`` and prints the table.
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

COMPARES = {"schedule": {"before": ["train.lr_schedule=constant", "train.best_by=auc"], "after": []},
            "choice": {"before": ["train.choose_from=any"], "after": []},
            "none": {"after": []}}
TASKS = ("cvr", "ctcvr", "cvr_entire")
GOAL = (0.9, 1.1)


def t_interval(xs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval (NaN bounds with fewer than 2 values)."""
    from statistics import mean, stdev

    from scipy.stats import t as student_t
    m = mean(xs)
    if len(xs) < 2:
        return m, math.nan, math.nan
    h = float(student_t.ppf(0.975, len(xs) - 1) * stdev(xs) / math.sqrt(len(xs)))
    return m, m - h, m + h


def unit_rows(exp: str) -> dict:
    """{repeat: {"metrics": {(run, task): row}, "train": {method: summary}}} of an experiment's units."""
    mdir = os.path.join(exp, "metrics")
    out = {}
    for f in sorted(os.listdir(mdir)):
        if f.startswith("r") and f.endswith(".json"):
            u = json.load(open(os.path.join(mdir, f)))
            out[u["repeat"]] = {"metrics": {(r["run_id"], r["task"]): r for r in u["metrics"]},
                                "train": {s["method"]: s for s in u["train"]}}
    return out


CLICKED_GOAL = ("base",)   # judged on the clicked impressions it trains on; every other method over all impressions


def levels(unit: dict, method: str) -> dict:
    """The method's level judged against the goal, its clicked level and its entire-space level."""
    ce = unit["metrics"][(method, "cvr_entire")]
    out = {"clicked_level": unit["metrics"][(method, "cvr")]["calibration"],
           "entire_level": ce["mean_pred"] / ce["mean_true"]}
    return {"level": out["clicked_level" if method in CLICKED_GOAL else "entire_level"], **out}


def methods_of(units: dict) -> list[str]:
    """The compared methods (the reference CTR network left out), BASE first, in the units' order otherwise."""
    names = [m for u in units.values() for m in u["train"] if m != "ctr"]
    return sorted(dict.fromkeys(names), key=lambda m: (m != "base", names.index(m)))


def constant_level(exp: str) -> float | None:
    """The entire-space level of a constant pCVR calibrated on the clicked test rows: the oracle's mean true pCVR
    over the clicked test rows / over all test rows (metrics/oracle.json). What a model that learned nothing of how
    pCVR differs between clicked and unclicked impressions would score; 1 means the world has no selection bias."""
    path = os.path.join(exp, "metrics", "oracle.json")
    if not os.path.exists(path):
        return None
    rows = {r["task"]: r for r in json.load(open(path))["rows"]}
    mean_true = lambda r: r["calibration"] * r["positives"] / r["n"]  # noqa: E731  (calibration = mean / rate)
    return mean_true(rows["cvr"]) / mean_true(rows["cvr_entire"])


def per_seed(units: dict) -> list[dict]:
    rows = []
    for rep, u in sorted(units.items()):
        for m in methods_of(units):
            v = u["train"][m].get("validation") or {}
            best = v.get("best") or {}
            rows.append({"repeat": rep, "method": m, **levels(u, m), "exported_step": u["train"][m].get(
                "exported_step", v.get("best_step")), "steps": u["train"][m]["steps"],
                "val_logloss": best.get("logloss"), "val_calibration": best.get("calibration"),
                **{f"{t}_auc": u["metrics"][(m, t)]["auc"] * 100 for t in TASKS}})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workdir", default="/tmp/esmm-bench-calibration")
    p.add_argument("--set", action="append", default=[], help="extra config overrides for both settings")
    p.add_argument("--compare", choices=sorted(COMPARES), default="schedule")
    p.add_argument("--conf", default=os.path.join(ROOT, "conf", "demo.yaml"))
    args = p.parse_args(argv)
    from esmm.cli import setup_logging
    from esmm.config import load_config
    from esmm.etl import run_etl
    from esmm.experiment import run_experiment
    from esmm.generator import GROUND_TRUTH_DIR, generate
    from esmm.spark import get_spark
    setup_logging("WARNING")
    command = "bench/calibration.py " + " ".join(sys.argv[1:] if argv is None else argv)
    w = args.workdir
    common = [f"paths.raw={w}/raw", f"paths.dataset={w}/dataset", f"paths.runs={w}/runs",
              "experiment.methods=[base, esmm]", f"experiment.repeats={args.repeats}",
              "experiment.figure_rates=[1.0]", "experiment.figure_methods=[]"] + list(args.set)
    conf = args.conf
    cfg = load_config(conf, common)
    spark = get_spark(cfg.spark, "bench-calibration")
    t0 = time.time()
    generate(spark, cfg)
    run_etl(spark, cfg)
    seconds, rows = {}, {}
    for name, sets in COMPARES[args.compare].items():
        t1 = time.time()
        exp = os.path.join(w, f"exp-{args.compare}-{name}")
        run_experiment(spark, load_config(conf, common + sets), cfg.paths.dataset, exp,
                       os.path.join(cfg.paths.raw, GROUND_TRUTH_DIR))
        seconds[name] = round(time.time() - t1, 1)
        rows[name] = per_seed(unit_rows(exp))
        const = constant_level(exp)
    report = markdown(rows, args.repeats, const)
    out = {"command": command, "compare": {args.compare: COMPARES[args.compare]}, "constant_level": const, "seconds": {**seconds, "total": round(time.time() - t0, 1)}, "per_seed": rows,
           "summary": summary(rows)}
    with open(os.path.join(w, "calibration.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    text = f"command: {command}\nsettings: {COMPARES[args.compare]}\n{out['seconds']}\n\n{report}"
    with open(os.path.join(w, "calibration.md"), "w") as f:
        f.write(text)
    print(text)
    return out


def summary(rows: dict) -> dict:
    """Per method: the level's range per setting, whether every seed is in the goal band, and the paired AUC change
    (after - before, AUC points) per task with its t-interval and how many seeds it is positive in."""
    out = {}
    for m in dict.fromkeys(r["method"] for rs in rows.values() for r in rs):
        by = {s: {r["repeat"]: r for r in rows[s] if r["method"] == m} for s in rows}
        reps = sorted(set.intersection(*(set(v) for v in by.values())))
        d = {"levels": {s: [by[s][k]["level"] for k in reps] for s in by},
             "extrapolation": {s: [by[s][k]["entire_level"] / by[s][k]["clicked_level"] for k in reps] for s in by}}
        d["in_goal"] = {s: all(GOAL[0] <= x <= GOAL[1] for x in d["levels"][s]) for s in by}
        for t in TASKS if "before" in by else ():
            diffs = [by["after"][k][f"{t}_auc"] - by["before"][k][f"{t}_auc"] for k in reps]
            mean, lo, hi = t_interval(diffs)
            d[f"{t}_auc_change"] = {"mean": mean, "ci": [lo, hi], "positive": sum(x > 0 for x in diffs),
                                    "n": len(diffs), "per_seed": diffs}
        out[m] = d
    return out


def markdown(rows: dict, repeats: int, const: float | None = None) -> str:
    s = summary(rows)
    lines = ["| setting | method | seed | level | clicked level | entire-space level | exported step / steps | "
             "val log-loss | val calibration | CVR AUC % | CTCVR AUC % | entire-space CVR AUC % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        for r in sorted(rs, key=lambda r: (r["method"], r["repeat"])):
            lines.append(f"| {name} | {r['method'].upper()} | {r['repeat']} | {r['level']:.3f} | "
                         f"{r['clicked_level']:.3f} | {r['entire_level']:.3f} | "
                         f"{r['exported_step']} / {r['steps']} | {_f(r['val_logloss'], 5)} | "
                         f"{_f(r['val_calibration'], 3)} | {r['cvr_auc']:.2f} | {r['ctcvr_auc']:.2f} | "
                         f"{r['cvr_entire_auc']:.2f} |")
    lines += ["", "Level: mean pCVR / mean true pCVR over all test impressions (ESMM and every method but BASE); BASE's "
              "mean pCVR / observed "
              "conversion rate over the clicked test impressions (clicked level: that ratio for either method; "
              "entire-space level: mean pCVR / mean true pCVR over all test impressions). Goal: every seed in "
              f"[{GOAL[0]}, {GOAL[1]}].", "",
              "| method | " + " | ".join(f"level range {x}" for x in rows) + " | every seed in the goal "
              + " / ".join(rows) + " | " + " | ".join(f"entire / clicked level {x}" for x in rows)
              + (" | CVR AUC change | CTCVR AUC change | entire-space CVR AUC change |" if "before" in rows else " |"),
              "|---" * (1 + 2 * len(rows) + 1 + 3 * ("before" in rows)) + "|"]
    for m, d in s.items():
        cells = []
        for t in TASKS if "before" in rows else ():
            c = d[f"{t}_auc_change"]
            cells.append(f"{c['mean']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}], higher in {c['positive']} of "
                         f"{c['n']}")
        lv, ex = d["levels"], d["extrapolation"]
        lines.append((f"| {m.upper()} | " + " | ".join(f"{min(lv[x]):.3f} - {max(lv[x]):.3f}" for x in rows) + " | "
                      + " / ".join(_yes(d["in_goal"][x]) for x in rows) + " | "
                      + " | ".join(f"{min(ex[x]):.3f} - {max(ex[x]):.3f}" for x in rows) + " | "
                      + "".join(c + " | " for c in cells)).rstrip())
    lines += ["", (f"AUC change: after - before in AUC points, mean over the {repeats} paired seeds with a 95% "
                   "t-interval of the per-seed differences, and in how many seeds it is positive. "
                   if "before" in rows else "") + "Entire / clicked level: a model's "
              "entire-space level over its clicked level, how its pCVR level carries from the clicked test rows to "
              "all of them (1: the selection bias corrected at the level; "
              + ("a constant calibrated on the clicked test rows scores "
                 f"{const:.3f} in this world, the oracle's mean true pCVR over the clicked test rows / over all)."
                 if const is not None else "no oracle metrics to compare with).")]
    return "\n".join(lines)


def _f(x, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _yes(b: bool) -> str:
    return "yes" if b else "no"


if __name__ == "__main__":
    main()
