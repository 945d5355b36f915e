"""Experiment reports: Table 2 with uncertainty and significance, ESMM against each competitor, Figure 3.

Inputs are the unit records of ``esmm.experiment`` (one per (repeat, sampling rate)); each holds the global AUCs of
its runs and, per task, the DeLong covariance of those AUCs (``esmm.metrics.delong``: the runs of a unit are scored
on the same test rows, so their AUCs are correlated and the covariance is what a paired test needs).

Two kinds of uncertainty, reported side by side because they answer different questions:

* **test-set sampling, per run** (DeLong): how far one trained model's AUC could move on another test set of the
  same size. ``(±h)`` after an AUC is the 95% half-width of that interval (mean over repeats). ESMM minus a
  competitor is tested per unit with the paired DeLong test: difference, 95% CI, two-sided p-value.
* **training randomness, across repeats**: ``mean ± std`` over the repeats (different seeds and shuffles, same
  data), as the paper reports. With one repeat the std is 0 and only the DeLong interval says anything.

Marks in Table 2: a competitor's cell carries ``*`` when ESMM's AUC is significantly higher (DeLong, p < 0.05) in
every repeat, ``†`` when ESMM's is significantly lower in every repeat; no mark otherwise (not significant, or not in
every repeat). The significance table gives the numbers behind each mark.

GAUC (``esmm.metrics.gauc_wide``: the impression-weighted mean of per-user AUCs over the users with both classes)
gets three more Table 2 columns, CVR, CTCVR and CTR, as ``mean ± std`` over the repeats, without an interval (DeLong
covers the global AUC only); a line under the table gives the number of users each is averaged over, or says why
GAUC is missing (units measured on a dataset without ``user_key``).

Figure 3 plots AUC against the number of training impressions (the ETL's nested sampling tiers), with error bars at
the 95% level: a t-interval of the mean over repeats when there are at least two, else the DeLong interval of the
single run; a third panel plots ESMM's gain over BASE with the same rule applied to the per-unit differences.
"""
from __future__ import annotations

import csv
import math

import numpy as np

import schemas as S

TASKS = ("ctr", "cvr", "ctcvr", "cvr_entire")
GAUC_TASKS = ("cvr", "ctcvr", "ctr")                 # in Table 2's column order
SIG_TASKS = ("cvr", "ctcvr", "cvr_entire")           # where ESMM's claims live
TASK_TITLES = {"ctr": "CTR", "cvr": "CVR (clicked)", "ctcvr": "CTCVR", "cvr_entire": "entire-space CVR"}
REFERENCE = "esmm"
ALPHA = 0.05
Z95 = 1.959963984540054
SIG_HIGHER, SIG_LOWER = "*", "†"


def label(method: str) -> str:
    """The method's name in tables and figures (``Method.title``: ESMM-NS, ESCM2-IPS, ...)."""
    from esmm.methods import METHODS
    return METHODS[method].title if method in METHODS else method.upper().replace("_", "-")


# ------------------------------------------------------------------------------------------------ DeLong records

def delong_record(result, aliases: dict | None = None) -> dict:
    """JSON form of a ``metrics.DeLongResult`` (what a unit record stores per task); ``aliases`` maps runs that share
    another run's scores (e.g. the reference network's pCTR) to that run."""
    return {"models": list(result.models), "auc": [float(a) for a in result.auc],
            "cov": [[float(c) for c in row] for row in np.asarray(result.cov)],
            "positives": int(result.positives), "negatives": int(result.negatives), "aliases": dict(aliases or {})}


def _index(rec: dict, name: str) -> int | None:
    name = rec.get("aliases", {}).get(name, name)
    return rec["models"].index(name) if name in rec["models"] else None


def _half_width(rec: dict | None, name: str) -> float:
    i = _index(rec, name) if rec else None
    if i is None:
        return math.nan
    v = rec["cov"][i][i]
    return Z95 * math.sqrt(v) if v == v and v >= 0 else math.nan


def compare(rec: dict, a: str, b: str) -> dict:
    """Paired DeLong test of AUC(a) - AUC(b) from a unit's stored record: diff, se, 95% CI, z, two-sided p."""
    i, j = _index(rec, a), _index(rec, b)
    c = rec["cov"]
    diff = rec["auc"][i] - rec["auc"][j]
    var = c[i][i] + c[j][j] - 2 * c[i][j]
    se = math.sqrt(var) if var > 0 else 0.0
    if se == 0.0:
        z, p = 0.0, (1.0 if diff == 0 else 0.0)
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2))
    return {"diff": diff, "se": se, "ci_low": diff - Z95 * se, "ci_high": diff + Z95 * se, "z": z, "p_value": p}


# ------------------------------------------------------------------------------------------------ summaries

def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _t95(n: int) -> float:
    """Two-sided 95% Student-t quantile with n - 1 degrees of freedom."""
    from scipy.stats import t
    return float(t.ppf(0.975, n - 1))


def summarize(units: list[dict], rate: float) -> dict:
    """{run name: {task: (mean, std, n, mean DeLong 95% half-width)}} over the repeats at one sampling rate."""
    by: dict = {}
    for u in units:
        if u["rate"] != rate:
            continue
        for r in u["metrics"]:
            hw = _half_width(u.get("delong", {}).get(r["task"]), r[S.RUN_ID])
            by.setdefault(r[S.RUN_ID], {}).setdefault(r["task"], []).append((r["auc"], hw))
    out = {}
    for name, tasks in by.items():
        out[name] = {}
        for t, vals in tasks.items():
            mean, sd = _mean_std([a for a, _ in vals])
            hws = [h for _, h in vals if not math.isnan(h)]
            out[name][t] = (mean, sd, len(vals), sum(hws) / len(hws) if hws else math.nan)
    return out


def summarize_gauc(units: list[dict], rate: float) -> dict:
    """{run name: {task: (mean GAUC, std, repeats, users)}} over the repeats at one sampling rate, from the GAUC keys
    of the units' metric rows (``esmm.metrics.protocol_metrics``); runs and tasks without GAUC are absent."""
    by: dict = {}
    for u in units:
        if u["rate"] != rate:
            continue
        for r in u["metrics"]:
            if r.get("gauc") is not None:
                by.setdefault(r[S.RUN_ID], {}).setdefault(r["task"], []).append((r["gauc"], r.get("gauc_users", 0)))
    out = {}
    for name, tasks in by.items():
        out[name] = {}
        for t, vals in tasks.items():
            mean, sd = _mean_std([g for g, _ in vals])
            out[name][t] = (mean, sd, len(vals), max(n for _, n in vals))
    return out


def pick_variants(summary: dict, methods: tuple) -> dict:
    """{method: run name}: the best-CVR-AUC variant of AMAN/OVERSAMPLING (the paper's protocol), the only one of the
    others."""
    chosen = {}
    for m in ("ctr",) + tuple(methods):
        names = [n for n in summary if n == m or n.startswith(m + "[")]
        if names:
            chosen[m] = max(names, key=lambda n: _nan_low(summary[n].get("cvr", (math.nan,))[0]))
    return chosen


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def comparisons(units: list[dict], chosen_by_rate: dict, reference: str = REFERENCE) -> list[dict]:
    """Per unit and task: the paired DeLong test of the reference (ESMM) against every other chosen method."""
    rows = []
    for u in sorted(units, key=lambda u: (u["rate"], u["repeat"])):
        chosen = chosen_by_rate.get(u["rate"], {})
        if reference not in chosen:
            continue
        for task in SIG_TASKS:
            rec = u.get("delong", {}).get(task)
            if not rec or _index(rec, chosen[reference]) is None:
                continue
            for m, name in chosen.items():
                if m in (reference, "ctr") or _index(rec, name) is None:
                    continue
                c = compare(rec, chosen[reference], name)
                rows.append({"unit": u["unit"], "repeat": u["repeat"], "rate": u["rate"], "task": task,
                             "competitor": label(m), "variant": name,
                             **{k: c[k] * 100 if k in ("diff", "se", "ci_low", "ci_high") else c[k] for k in c}})
    return rows


def _sig_mark(rows: list[dict]) -> str:
    """'*' when the reference is significantly higher in every repeat, '†' when significantly lower in every one."""
    if not rows:
        return ""
    if all(r["p_value"] < ALPHA and r["diff"] > 0 for r in rows):
        return SIG_HIGHER
    if all(r["p_value"] < ALPHA and r["diff"] < 0 for r in rows):
        return SIG_LOWER
    return ""


# ------------------------------------------------------------------------------------------------ Table 2

def table2(units: list[dict], methods: tuple, rate: float, oracle_rows: list[dict] | None) -> list[dict]:
    """Rows of Table 2 at ``rate``: per task mean, std over repeats, DeLong half-width, significance mark."""
    summary = summarize(units, rate)
    gsummary = summarize_gauc(units, rate)
    chosen = pick_variants(summary, methods)
    comps = comparisons(units, {rate: chosen})
    rows = []
    for m in methods:
        if m not in chosen:
            continue
        s = summary[chosen[m]]
        row = {"model": label(m), "variant": chosen[m], "repeats": s.get("cvr", (0, 0, 0))[2]}
        for t in TASKS:
            mean, sd, _, hw = s.get(t, (math.nan, math.nan, 0, math.nan))
            row[f"{t}_auc"], row[f"{t}_std"], row[f"{t}_ci95"] = mean * 100, sd * 100, hw * 100
            row[f"{t}_sig"] = _sig_mark([c for c in comps if c["task"] == t and c["variant"] == chosen[m]])
        for t in GAUC_TASKS:
            mean, sd, _, users = gsummary.get(chosen[m], {}).get(t, (math.nan, math.nan, 0, 0))
            row[f"{t}_gauc"], row[f"{t}_gauc_std"], row[f"{t}_gauc_users"] = mean * 100, sd * 100, users
        rows.append(row)
    if oracle_rows:
        row = {"model": "ORACLE (true probabilities)", "variant": "", "repeats": 1}
        for t in TASKS:
            r = next((r for r in oracle_rows if r["task"] == t), None)
            row[f"{t}_auc"] = r["auc"] * 100 if r else math.nan
            row[f"{t}_std"] = 0.0
            row[f"{t}_ci95"] = Z95 * r["auc_se"] * 100 if r and r.get("auc_se") is not None else math.nan
            row[f"{t}_sig"] = ""
        for t in GAUC_TASKS:
            r = next((r for r in oracle_rows if r["task"] == t and r.get("gauc") is not None), None)
            row[f"{t}_gauc"] = r["gauc"] * 100 if r else math.nan
            row[f"{t}_gauc_std"] = 0.0 if r else math.nan
            row[f"{t}_gauc_users"] = r.get("gauc_users", 0) if r else 0
        rows.append(row)
    return rows


def _has_gauc(rows: list[dict]) -> bool:
    return any(not math.isnan(r.get(f"{t}_gauc", math.nan)) for r in rows for t in GAUC_TASKS)


def table2_markdown(rows: list[dict]) -> str:
    """Table 2 as markdown, and under it the GAUC line: its users per task, or why GAUC is missing."""
    gauc = _has_gauc(rows)
    cols = ["model", "CVR AUC %", "CTCVR AUC %", "CTR AUC %", "entire-space CVR AUC %"]
    cols += ["CVR GAUC %", "CTCVR GAUC %", "CTR GAUC %"] if gauc else []
    lines = ["| " + " | ".join(cols + ["chosen"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        def cell(t):  # one repeat: no spread over repeats to show, only the run's DeLong interval
            text = f"{r[t + '_auc']:.2f}" + (f" ± {r[t + '_std']:.2f}" if r.get("repeats", 1) > 1 else "")
            if not math.isnan(r.get(t + "_ci95", math.nan)):
                text += f" (±{r[t + '_ci95']:.2f})"
            mark = r.get(t + "_sig", "")
            return text + (f" {mark}" if mark else "")

        def gcell(t):
            v = r.get(f"{t}_gauc", math.nan)
            if math.isnan(v):
                return "–"
            return f"{v:.2f}" + (f" ± {r[t + '_gauc_std']:.2f}" if r.get("repeats", 1) > 1 else "")
        cells = [r["model"], cell("cvr"), cell("ctcvr"), cell("ctr"), cell("cvr_entire")]
        cells += [gcell(t) for t in GAUC_TASKS] if gauc else []
        lines.append("| " + " | ".join(cells + [r["variant"] if "[" in r["variant"] else ""]) + " |")
    return "\n".join(lines) + "\n\n" + gauc_note(rows)


def gauc_note(rows: list[dict]) -> str:
    """The one line under Table 2 about GAUC: what it is and over how many users, or why it is omitted."""
    if not _has_gauc(rows):
        return ("GAUC omitted: the predictions carry no user_key (a dataset written before user keys; re-run the ETL "
                "with --overwrite to get it).")
    users = {t: max((r.get(f"{t}_gauc_users", 0) for r in rows), default=0) for t in GAUC_TASKS}
    return ("GAUC %: impression-weighted mean of per-user AUCs over the users with both classes in the task's test "
            "impressions (" + ", ".join(f"{TASK_TITLES[t]}: {users[t]:,} users" for t in GAUC_TASKS if users[t])
            + "), mean ± std over the repeats; users with one class only and unknown users are left out.")


TABLE2_LEGEND = ("AUC % as mean ± std over the repeats (the value of the run with one repeat), (±h) the 95% DeLong "
                 "half-width of one run's AUC (test-set sampling, mean over repeats). `*`: ESMM is significantly higher than this method (paired DeLong "
                 "test, p < 0.05) in every repeat; `†`: significantly lower in every repeat; no mark: not "
                 "significant in every repeat.")


Z80 = 0.8416212335729143     # one-sided 80% normal quantile: the power the detectable difference is stated at


def _t(q: float, df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(q, df))


def paired(diffs: list[float], ses: list[float], p_values: list[float]) -> dict:
    """One paired comparison over repeats (AUC points; the same test rows in every repeat, only the seed differs):

    - ``diff``: the mean per-repeat difference; ``ci_low``/``ci_high``: its 95% interval, a t-interval over the
      repeats' differences (training randomness) with at least 2 repeats, the DeLong interval of the one run otherwise
      (test-set sampling);
    - ``ci_total``: a 95% interval that covers both, mean ± sqrt(h_seeds² + h_test²) with h_seeds the t-interval's
      half-width and h_test = 1.96 sqrt(mean(se²)): the repeats average the training noise down, not the test-set
      sampling (every repeat scores the same test rows);
    - ``mde``: the smallest difference the study detects with 80% power at the 5% level, (t_0.975 + t_0.80) s / sqrt(n)
      over repeats, (1.96 + 0.84) se with one repeat, and the larger of that and the test-set term;
    - ``higher``: in how many repeats the difference is positive; ``significant``: in how many DeLong's p < 0.05;
      ``p_value_max``: the largest per-repeat p; ``p_values``: all of them;
    - ``verdict``: "higher" / "lower" when ``ci_total`` excludes 0 and DeLong agrees in every repeat, else
      "unresolved"."""
    n = len(diffs)
    mean, sd = _mean_std(diffs)
    se2 = sum(x * x for x in ses) / n if ses else 0.0
    if n >= 2:
        h = _t(0.975, n - 1) * sd / math.sqrt(n)
        lo, hi = mean - h, mean + h
        mde = max((_t(0.975, n - 1) + _t(0.80, n - 1)) * sd / math.sqrt(n), (Z95 + Z80) * math.sqrt(se2))
    else:
        lo, hi = mean - Z95 * ses[0], mean + Z95 * ses[0]
        mde = (Z95 + Z80) * ses[0]
    h_seeds = _t(0.975, n - 1) * sd / math.sqrt(n) if n >= 2 else 0.0
    total = math.sqrt(h_seeds * h_seeds + Z95 * Z95 * se2)
    sig_up = sum(p < ALPHA and d > 0 for p, d in zip(p_values, diffs))
    sig_down = sum(p < ALPHA and d < 0 for p, d in zip(p_values, diffs))
    verdict = ("higher" if mean - total > 0 and sig_up == n else "lower" if mean + total < 0 and sig_down == n
               else "unresolved")
    return {"repeats": n, "diff": mean, "sd": sd, "ci_low": lo, "ci_high": hi, "ci_total_low": mean - total,
            "ci_total_high": mean + total, "mde": mde, "higher": sum(d > 0 for d in diffs),
            "significant": sum(p < ALPHA for p in p_values), "p_value_max": max(p_values),
            "p_values": list(p_values), "verdict": verdict}


def significance_summary(comps: list[dict], rate: float) -> list[dict]:
    """The reference (ESMM) minus each competitor at ``rate``, per task: ``paired`` over the repeats' DeLong
    comparisons (``comparisons``), plus ``esmm_higher``: in how many repeats the reference is significantly higher."""
    out = []
    keys = []
    for c in comps:
        if c["rate"] == rate and (c["competitor"], c["task"]) not in keys:
            keys.append((c["competitor"], c["task"]))
    for comp, task in keys:
        rs = [c for c in comps if c["rate"] == rate and c["competitor"] == comp and c["task"] == task]
        pr = paired([r["diff"] for r in rs], [r["se"] for r in rs], [r["p_value"] for r in rs])
        out.append({"competitor": comp, "task": task, **pr,
                    "esmm_higher": sum(r["p_value"] < ALPHA and r["diff"] > 0 for r in rs)})
    return out


def significance_markdown(summary: list[dict], reference: str = "ESMM") -> str:
    lines = [f"| {reference} minus | task | difference (AUC points) | 95% CI | 95% CI, seeds and test rows | "
             "p (DeLong) | significant in | detectable (80% power) |", "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['competitor']} | {TASK_TITLES[s['task']]} | {s['diff']:+.2f} | "
                     f"[{s['ci_low']:+.2f}, {s['ci_high']:+.2f}] | [{s['ci_total_low']:+.2f}, "
                     f"{s['ci_total_high']:+.2f}] | {_p(s)} | {s['significant']}/{s['repeats']} repeats | "
                     f"{s['mde']:.2f} |")
    return "\n".join(lines)


def _p(s: dict) -> str:
    p = f"{s['p_value_max']:.2g}" if s['p_value_max'] > 0 else "< 1e-300"   # erfc underflows past z ~ 38
    return p if s["repeats"] == 1 or p.startswith("<") else f"≤ {p}"


SIGNIFICANCE_LEGEND = ("Paired on the same test rows. With one repeat the CI and p are that run's DeLong test (test-set "
                       "sampling only: one seed says nothing about training randomness); with more, the difference is "
                       "the mean over repeats, the first CI a t-interval over the repeats' differences (training "
                       "randomness only: every repeat scores the same test rows), the second adds the mean DeLong "
                       "variance (both), and p is the largest per-repeat DeLong p-value. Detectable: the difference "
                       "this study finds with 80% power at the 5% level.")


def claims(summary: list[dict], reference: str = "ESMM", what: str = "") -> list[str]:
    """One sentence per comparison, written from ``summary`` (``significance_summary`` rows) alone: the verdict
    ("higher"/"lower" only when the interval over seeds and test rows excludes 0 and DeLong agrees in every
    repeat; otherwise "not resolved", with the difference the study could have detected), the difference, its
    interval and "k of n repeats". Nothing in it is typed by hand."""
    out = []
    for s in summary:
        head = f"{what}{reference} vs {s['competitor']}, {TASK_TITLES[s['task']]}: {s['diff']:+.2f} AUC points " \
               f"(95% CI [{s['ci_total_low']:+.2f}, {s['ci_total_high']:+.2f}]"
        reps = f"higher in {s['higher']} of {s['repeats']} repeat{'s' if s['repeats'] != 1 else ''}, " \
               f"DeLong p < 0.05 in {s['significant']} of {s['repeats']}"
        if s["verdict"] == "higher":
            out.append(f"{head}; {reps}): {reference} is higher.")
        elif s["verdict"] == "lower":
            out.append(f"{head}; {reps}): {reference} is lower.")
        else:
            out.append(f"{head}; {reps}): not resolved; this study detects differences of about "
                       f"{s['mde']:.2f} points or more.")
    return out


def claims_markdown(summary: list[dict], reference: str = "ESMM", what: str = "") -> str:
    return "\n".join(f"- {c}" for c in claims(summary, reference, what))


# ------------------------------------------------------------------------------------------------ Figure 3

def _interval(values: list[float], delong_hws: list[float]) -> tuple[float, float]:
    """(mean, 95% half-width): t-interval over repeats when there are >= 2, else the run's DeLong half-width."""
    mean, sd = _mean_std(values)
    if len(values) >= 2:
        return mean, _t95(len(values)) * sd / math.sqrt(len(values))
    hws = [h for h in delong_hws if not math.isnan(h)]
    return mean, (hws[0] if hws else math.nan)


def figure3_points(units: list[dict], methods: tuple, rates: list[float], train_rows: dict) -> list[dict]:
    """Points of Figure 3: per (method, rate, task) mean AUC and 95% half-width, plus ESMM-minus-BASE gains."""
    points = []
    for rate in rates:
        us = [u for u in units if u["rate"] == rate]
        chosen = pick_variants(summarize(units, rate), methods)
        for m, name in chosen.items():
            if m == "ctr":
                continue
            for t in ("cvr", "ctcvr", "cvr_entire"):
                vals, hws = [], []
                for u in us:
                    a = next((r["auc"] for r in u["metrics"] if r[S.RUN_ID] == name and r["task"] == t), None)
                    if a is not None and not math.isnan(a):
                        vals.append(a * 100)
                        hws.append(_half_width(u.get("delong", {}).get(t), name) * 100)
                if vals:
                    mean, hw = _interval(vals, hws)
                    points.append({"series": label(m), "variant": name, "rate": rate,
                                   "train_impressions": train_rows.get(rate), "task": t, "auc": mean,
                                   "ci95": hw, "repeats": len(vals)})
        if "esmm" in chosen and "base" in chosen:
            comps = [c for c in comparisons(us, {rate: chosen}) if c["competitor"] == "BASE"]
            for t in SIG_TASKS:
                cs = [c for c in comps if c["task"] == t]
                if cs:
                    mean, hw = _interval([c["diff"] for c in cs], [Z95 * c["se"] for c in cs])
                    points.append({"series": "ESMM - BASE", "variant": "", "rate": rate,
                                   "train_impressions": train_rows.get(rate), "task": t, "auc": mean, "ci95": hw,
                                   "repeats": len(cs)})
    return points


def plot_figure3(points: list[dict], path_png: str, path_csv: str, title: str = "") -> None:
    """Three panels: CVR AUC and CTCVR AUC against training impressions, and ESMM's gain over BASE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gain = [p for p in points if p["series"] == "ESMM - BASE"]
    fig, axes = plt.subplots(1, 3 if gain else 2, figsize=(16 if gain else 11, 4.4))
    xs = sorted({p["train_impressions"] for p in points if p["train_impressions"]})
    for ax, t, name in zip(axes, ("cvr", "ctcvr"), ("CVR task (clicked impressions)", "CTCVR task (all impressions)")):
        series = list(dict.fromkeys(p["series"] for p in points if p["series"] != "ESMM - BASE"))
        for s in series:
            pts = sorted((p for p in points if p["series"] == s and p["task"] == t), key=lambda p: p["rate"])
            if pts:
                ax.errorbar([p["train_impressions"] for p in pts], [p["auc"] for p in pts],
                            yerr=[0 if math.isnan(p["ci95"]) else p["ci95"] for p in pts], marker="o", capsize=3,
                            label=s)
        ax.set_ylabel("AUC (%)")
        ax.set_title(name)
    if gain:
        ax = axes[2]
        for t, mk in zip(SIG_TASKS, ("o", "s", "^")):
            pts = sorted((p for p in gain if p["task"] == t), key=lambda p: p["rate"])
            if pts:
                ax.errorbar([p["train_impressions"] for p in pts], [p["auc"] for p in pts],
                            yerr=[0 if math.isnan(p["ci95"]) else p["ci95"] for p in pts], marker=mk, capsize=3,
                            label=TASK_TITLES[t])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel("AUC points")
        ax.set_title("ESMM minus BASE")
    for ax in axes:
        ax.set_xscale("log")
        if xs:
            ax.set_xticks(xs, [_short(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("training impressions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    import io

    from esmm import storage
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path_png, png.getvalue())
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=list(points[0]) if points else ["series"])
    w.writeheader()
    w.writerows(points)
    storage.write_text(path_csv, f.getvalue())


def _short(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)
