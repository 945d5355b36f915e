"""Experiments: the paper's Table 2 (methods x repeats) and Figure 3 (methods x training sampling rates).

A *unit* is one (repeat, sampling rate): train the reference CTR network and every method variant (AMAN rates,
OVERSAMPLING factors) in one Horovod launch, score them all in one Spark job, compute the metrics, and persist them
to ``<exp>/metrics/<unit>.json`` (atomically) as soon as the unit finishes. A re-run skips finished units and
finished trainings, so a crashed experiment resumes where it stopped.

Selection of AMAN's rate and OVERSAMPLING's factor: as in the paper, the variant with the best mean CVR AUC over the
repeats is reported (on the test split, as the paper did: there is no separate validation split in its protocol).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

import schemas as S
from esmm.config import Config, to_dict
from esmm.evaluate import ScoredRun, score_to_parquet
from esmm.metrics import entire_space_cvr_metrics, oracle_metrics, task_metrics
from esmm.train import EXPORT, launch, read_manifest

log = logging.getLogger(__name__)
TASKS = ("ctr", "cvr", "ctcvr", "cvr_entire")


@dataclass(frozen=True)
class RunSpec:
    repeat: int
    rate: float
    method: str
    variant: str = ""          # "rate=0.2" (AMAN) / "k=3" (OVERSAMPLING)

    @property
    def name(self) -> str:
        return self.method + (f"[{self.variant}]" if self.variant else "")

    @property
    def unit(self) -> str:
        return f"r{self.repeat}-rate{self.rate}"

    def run_dir(self, exp_dir: str) -> str:
        return os.path.join(exp_dir, "runs", self.unit, self.name.replace("[", "-").replace("]", "").replace("=", ""))


def unit_specs(cfg: Config, repeat: int, rate: float) -> list[RunSpec]:
    """The reference CTR network first (UNBIAS/DIVISION and the CTCVR protocol need it), then every variant."""
    specs = [RunSpec(repeat, rate, "ctr")]
    for m in cfg.experiment.methods:
        if m == "aman":
            specs += [RunSpec(repeat, rate, m, f"rate={r}") for r in cfg.experiment.aman_rates]
        elif m == "oversampling":
            specs += [RunSpec(repeat, rate, m, f"k={k}") for k in cfg.experiment.oversampling_ks]
        elif m != "ctr":
            specs.append(RunSpec(repeat, rate, m))
    return specs


def config_for(cfg: Config, spec: RunSpec, exp_dir: str) -> Config:
    train = dataclasses.replace(cfg.train, method=spec.method, seed=cfg.train.seed + 1000 * spec.repeat,
                                sampling_rate=spec.rate,
                                ctr_model=os.path.join(RunSpec(spec.repeat, spec.rate, "ctr").run_dir(exp_dir), EXPORT))
    if spec.variant.startswith("rate="):
        train = dataclasses.replace(train, aman_rate=float(spec.variant[5:]))
    if spec.variant.startswith("k="):
        train = dataclasses.replace(train, oversampling_k=int(spec.variant[2:]))
    return dataclasses.replace(cfg, train=train)


# ------------------------------------------------------------------------------------------------ one unit

def run_unit(spark: SparkSession, cfg: Config, dataset: str, exp_dir: str, repeat: int, rate: float,
             truth_path: str | None) -> dict:
    """Train, score and measure one (repeat, rate); returns and persists the unit's metrics."""
    specs = unit_specs(cfg, repeat, rate)
    out_path = os.path.join(exp_dir, "metrics", f"{specs[0].unit}.json")
    if os.path.exists(out_path):
        log.info("unit %s already measured: skipping", specs[0].unit)
        with open(out_path) as f:
            return json.load(f)
    jobs = [(config_for(cfg, s, exp_dir), dataset, s.run_dir(exp_dir)) for s in specs]
    summaries = launch(jobs, cfg.train.workers, spark)
    ref = ScoredRun("ctr", specs[0].name, os.path.join(specs[0].run_dir(exp_dir), EXPORT))
    runs = [ScoredRun(s.method, s.name, os.path.join(s.run_dir(exp_dir), EXPORT)) for s in specs]
    width = read_manifest(dataset)["layout"]["num_slots"]
    pred_path = os.path.join(exp_dir, "predictions", specs[0].unit)
    info = score_to_parquet(spark, dataset, runs, ref, pred_path, width, cfg.train.threads)
    pred = spark.read.parquet(pred_path)
    rows = task_metrics(pred, group_cols=(S.RUN_ID,), on_one_class="nan")
    if truth_path:
        truth = spark.read.parquet(truth_path)
        rows += entire_space_cvr_metrics(pred, truth, group_cols=(S.RUN_ID,), on_one_class="nan")
    result = {"unit": specs[0].unit, "repeat": repeat, "rate": rate, "metrics": rows,
              "division_clipped": info["division_clipped"],
              "train": [{k: v for k, v in s.items() if k != "history"} for s in summaries]}
    _atomic_json(out_path, result)
    return result


def _atomic_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


def oracle(spark: SparkSession, dataset: str, truth_path: str, exp_dir: str) -> list[dict]:
    path = os.path.join(exp_dir, "metrics", "oracle.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    test = spark.read.parquet(os.path.join(dataset, S.TEST)).select(S.SAMPLE_ID, S.CLICK, S.CONVERSION)
    truth = spark.read.parquet(truth_path).select(S.SAMPLE_ID, S.TRUE_CTR, S.TRUE_CVR, S.WOULD_CONVERT)
    rows = oracle_metrics(test.join(truth, S.SAMPLE_ID), on_one_class="nan")
    _atomic_json(path, rows)
    return rows


# ------------------------------------------------------------------------------------------------ tables

def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def summarize(units: list[dict], rate: float) -> dict:
    """{run name: {task: (mean, std, n)}} over the repeats at one sampling rate."""
    by: dict = {}
    for u in units:
        if u["rate"] != rate:
            continue
        for r in u["metrics"]:
            by.setdefault(r[S.RUN_ID], {}).setdefault(r["task"], []).append(r["auc"])
    return {name: {t: (*_mean_std(v), len(v)) for t, v in tasks.items()} for name, tasks in by.items()}


def pick_variants(summary: dict, methods: tuple) -> dict:
    """{method: run name}: the best-CVR-AUC variant of AMAN/OVERSAMPLING, the only one of the others."""
    chosen = {}
    for m in ("ctr",) + tuple(methods):
        names = [n for n in summary if n == m or n.startswith(m + "[")]
        if names:
            chosen[m] = max(names, key=lambda n: _nan_low(summary[n].get("cvr", (float("nan"),))[0]))
    return chosen


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


def table2(units: list[dict], cfg: Config, rate: float, oracle_rows: list[dict] | None) -> list[dict]:
    summary = summarize(units, rate)
    chosen = pick_variants(summary, cfg.experiment.methods)
    rows = []
    for m in cfg.experiment.methods:
        if m not in chosen:
            continue
        s = summary[chosen[m]]
        row = {"model": m.upper().replace("_", "-"), "variant": chosen[m], "repeats": s.get("cvr", (0, 0, 0))[2]}
        for t in TASKS:
            mean, sd, _ = s.get(t, (float("nan"), float("nan"), 0))
            row[f"{t}_auc"], row[f"{t}_std"] = mean * 100, sd * 100
        rows.append(row)
    if oracle_rows:
        row = {"model": "ORACLE (true probabilities)", "variant": "", "repeats": 1}
        for t in TASKS:
            vals = [r["auc"] for r in oracle_rows if r["task"] == t]
            row[f"{t}_auc"], row[f"{t}_std"] = (vals[0] * 100 if vals else float("nan")), 0.0
        rows.append(row)
    return rows


def table2_markdown(rows: list[dict]) -> str:
    head = "| model | CVR AUC % | CTCVR AUC % | CTR AUC % | entire-space CVR AUC % | chosen |\n|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        cell = lambda t: f"{r[t + '_auc']:.2f} ± {r[t + '_std']:.2f}"  # noqa: E731
        lines.append(f"| {r['model']} | {cell('cvr')} | {cell('ctcvr')} | {cell('ctr')} | {cell('cvr_entire')} | "
                     f"{r['variant'] if '[' in r['variant'] else ''} |")
    return "\n".join(lines)


def figure3(units: list[dict], cfg: Config, rates: list[float], path_png: str, path_csv: str) -> list[dict]:
    """AUC (CVR, CTCVR) against the training sampling rate per method, with std error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = []
    for rate in rates:
        summary = summarize(units, rate)
        for m, name in pick_variants(summary, cfg.experiment.methods).items():
            if m == "ctr":
                continue
            for t in ("cvr", "ctcvr"):
                mean, sd, n = summary[name].get(t, (float("nan"), float("nan"), 0))
                points.append({"method": m, "variant": name, "rate": rate, "task": t, "auc": mean * 100,
                               "std": sd * 100, "repeats": n})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, t, title in zip(axes, ("cvr", "ctcvr"), ("CVR task (clicked impressions)", "CTCVR task (all impressions)")):
        for m in cfg.experiment.methods:
            pts = sorted((p for p in points if p["method"] == m and p["task"] == t), key=lambda p: p["rate"])
            if pts:
                ax.errorbar([p["rate"] * 100 for p in pts], [p["auc"] for p in pts], yerr=[p["std"] for p in pts],
                            marker="o", capsize=3, label=m.upper().replace("_", "-"))
        ax.set_xscale("log")
        ax.set_xticks([r * 100 for r in rates], [f"{r * 100:g}%" for r in rates])
        ax.minorticks_off()
        ax.set_xlabel("training set sampling rate")
        ax.set_ylabel("AUC (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
    with open(path_csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(points[0]) if points else ["method"])
        w.writeheader()
        w.writerows(points)
    return points


# ------------------------------------------------------------------------------------------------ driver

def run_experiment(spark: SparkSession, cfg: Config, dataset: str, exp_dir: str, truth_path: str | None,
                   table_rate: float | None = None) -> dict:
    """Run (or resume) every unit, then write Table 2 and Figure 3 under ``exp_dir``; returns the report paths."""
    rates = list(cfg.experiment.figure_rates or cfg.etl.sampling_rates)
    table_rate = table_rate if table_rate is not None else max(rates)
    if table_rate not in rates:
        rates.append(table_rate)
    manifest = read_manifest(dataset)
    for r in rates:
        if str(r) not in manifest["splits"][S.TRAIN]["subsets"]:
            raise ValueError(f"sampling rate {r} is not in the dataset (ETL rates {manifest['sampling_rates']})")
    os.makedirs(exp_dir, exist_ok=True)
    units = []
    total = cfg.experiment.repeats * len(rates)
    for repeat in range(cfg.experiment.repeats):
        for rate in sorted(rates):
            log.info("experiment unit %d/%d: repeat %d, sampling rate %s", len(units) + 1, total, repeat, rate)
            units.append(run_unit(spark, cfg, dataset, exp_dir, repeat, rate, truth_path))
    oracle_rows = oracle(spark, dataset, truth_path, exp_dir) if truth_path else None
    return write_reports(units, cfg, exp_dir, sorted(rates), table_rate, oracle_rows)


def write_reports(units, cfg, exp_dir, rates, table_rate, oracle_rows) -> dict:
    rows = table2(units, cfg, table_rate, oracle_rows)
    md = table2_markdown(rows)
    paths = {k: os.path.join(exp_dir, v) for k, v in (("md", "table2.md"), ("csv", "table2.csv"),
                                                       ("json", "table2.json"), ("png", "figure3.png"),
                                                       ("fig_csv", "figure3.csv"))}
    with open(paths["md"], "w") as f:
        f.write(f"Table 2 reproduction: AUC % (mean ± std over {cfg.experiment.repeats} repeats), "
                f"training sampling rate {table_rate}\n\n{md}\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    clipped = sum(u.get("division_clipped", 0) for u in units)
    _atomic_json(paths["json"], {"table2": rows, "rate": table_rate, "division_clipped": clipped,
                                 "oracle": oracle_rows, "config": to_dict(cfg)})
    figure3(units, cfg, rates, paths["png"], paths["fig_csv"])
    return {"table2": rows, "markdown": md, "paths": paths}
