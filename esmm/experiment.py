"""Experiments: the paper's Table 2 (methods x repeats) and Figure 3 (methods x training sampling rates).

A *unit* is one (repeat, sampling rate): train the reference CTR network and every method variant (AMAN rates,
OVERSAMPLING factors) in one Horovod launch, score them all in one Spark job, compute the metrics, and persist them
to ``<exp>/metrics/<unit>.json`` (atomically) as soon as the unit finishes. A re-run skips finished units and
finished trainings, so a crashed experiment resumes where it stopped.

The unit at Table 2's rate trains every method of ``experiment.methods``; the units at the other Figure 3 rates
train ``experiment.figure_methods`` (empty = all), so a scaling study of a few methods stays affordable.

Each unit also stores, per task, the DeLong covariance of its runs' AUCs (``esmm.metrics.delong``: every run of a unit
is scored on the same test rows), from which the reports derive each AUC's 95% interval and the paired test of ESMM
against every competitor (``esmm.report``).

Selection of AMAN's rate and OVERSAMPLING's factor (``experiment.select_on``):

- ``validation`` (default): the variant whose exported models have the best validation AUC (``esmm.validation``: the
  CVR AUC on the clicked impressions of the held-out latest part of the train split), mean over the repeats at each
  sampling rate. The test split plays no part in the choice, so the reported test AUCs are honest estimates.
- ``test``: the paper's protocol: the variant with the best mean test CVR AUC is reported (the paper has no
  validation split and chose on test, which flatters the chosen variant slightly).

Either way every variant is trained, scored and kept in the unit records; the choice is made when the reports are
written (so switching ``select_on`` re-reports without training), and Table 2's caption and ``table2.json`` say
which rule chose and the validation AUC of every variant.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time
from dataclasses import dataclass

from pyspark.sql import SparkSession

import schemas as S
from esmm import report as R
from esmm import storage
from esmm import validation as V
from esmm.config import Config, to_dict
from esmm.evaluate import OWN_CTR_METHODS, ScoredRun, score_to_parquet
from esmm.methods import METHODS, REFERENCE_CTR, get_method
from esmm.metrics import ORACLE_RUN, oracle_protocol_metrics, protocol_metrics
from esmm.outputs import OutputRefused
from esmm.artifacts import EXPORT, read_manifest, write_json
from esmm.train import launch

log = logging.getLogger(__name__)


class ExperimentError(RuntimeError):
    """The experiment directory holds results of another dataset or config; the message says what to do."""


class ExperimentOutputRefused(ExperimentError, OutputRefused):
    """A finished unit was measured with another config or dataset build; ``--overwrite`` starts over (exit code 4)."""


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
        return storage.join(exp_dir, "runs", self.unit, self.name.replace("[", "-").replace("]", "").replace("=", ""))


def unit_methods(cfg: Config, rate: float, table_rate: float) -> tuple:
    """The methods a unit trains: all of ``experiment.methods`` at Table 2's rate, ``figure_methods`` elsewhere."""
    if rate == table_rate or not cfg.experiment.figure_methods:
        return tuple(cfg.experiment.methods)
    return tuple(m for m in cfg.experiment.methods if m in cfg.experiment.figure_methods)


def unit_specs(cfg: Config, repeat: int, rate: float, methods: tuple | None = None) -> list[RunSpec]:
    """The reference CTR network first (UNBIAS/DIVISION and the CTCVR protocol need it), then every variant."""
    specs = [RunSpec(repeat, rate, REFERENCE_CTR)]
    for m in (cfg.experiment.methods if methods is None else methods):
        grid = get_method(m).grid
        if grid is not None:
            specs += [RunSpec(repeat, rate, m, f"{grid.label}={v}") for v in getattr(cfg.experiment, grid.values)]
        elif m != REFERENCE_CTR:
            specs.append(RunSpec(repeat, rate, m))
    return specs


def config_for(cfg: Config, spec: RunSpec, exp_dir: str) -> Config:
    train = dataclasses.replace(cfg.train, method=spec.method, seed=cfg.train.seed + 1000 * spec.repeat,
                                sampling_rate=spec.rate,
                                ctr_model=storage.join(RunSpec(spec.repeat, spec.rate, REFERENCE_CTR).run_dir(exp_dir),
                                                       EXPORT))
    grid = get_method(spec.method).grid
    if spec.variant and grid is not None:
        value = float(spec.variant.split("=", 1)[1])
        if isinstance(getattr(cfg.train, grid.key), int):  # the train config's type of the key (float rate, int k)
            if not value.is_integer():
                raise ExperimentError(f"{spec.name}: {grid.key} must be an integer, got {value}")
            value = int(value)
        train = dataclasses.replace(train, **{grid.key: value})
        train.validate("train")
    return dataclasses.replace(cfg, train=train)


# ------------------------------------------------------------------------------------------------ one unit

def run_units(spark: SparkSession, cfg: Config, dataset: str, exp_dir: str, units: list, truth_path: str | None
              ) -> list[dict]:
    """Train, score and measure several units ([(repeat, rate, methods)]) together; returns and persists each unit's
    metrics (``<exp>/metrics/<unit>.json``, the same record a unit measured alone gets).

    Units already measured are read back. The others' runs train in one launch (with ``experiment.parallel_runs``
    the small units' runs fill the gaps beside the large ones), are scored in one ``score_to_parquet`` over the test
    split (each run against its own unit's reference CTR network) and measured by one ``protocol_metrics``: the test
    split is read, pivoted and sorted once for all of them instead of once per unit. Each unit's record is then cut
    out of the joint result: its rows, and per task the block of the DeLong covariance that its runs index (DeLong's
    covariance of two AUCs depends on those two models only, so the block equals a pass over the unit alone)."""
    states = []
    for repeat, rate, methods in units:
        specs = unit_specs(cfg, repeat, rate, methods)
        unit = specs[0].unit
        out_path = storage.join(exp_dir, "metrics", f"{unit}.json")
        identity = unit_identity(cfg, dataset, specs, exp_dir)
        done = None
        if storage.exists(out_path):
            done = storage.read_json(out_path)
            if done.get("identity") != identity:
                raise ExperimentOutputRefused(f"unit {unit} in {exp_dir} was measured with another config, method "
                                              f"list or dataset build than this run's; pass --overwrite to start the "
                                              f"experiment over, or choose another --exp")
            log.info("unit %s already measured: skipping", unit)
        states.append({"unit": unit, "repeat": repeat, "rate": rate, "specs": specs, "out": out_path,
                       "identity": identity, "done": done})
    todo = [st for st in states if st["done"] is None]
    if todo:
        _measure(spark, cfg, dataset, exp_dir, todo, truth_path)
    return [st["done"] for st in states]


def _measure(spark: SparkSession, cfg: Config, dataset: str, exp_dir: str, todo: list, truth_path: str | None) -> None:
    together = len(todo) > 1
    label = (lambda st, s: f"{st['unit']}/{s.name}") if together else (lambda st, s: s.name)
    jobs = [(config_for(cfg, s, exp_dir), dataset, s.run_dir(exp_dir)) for st in todo for s in st["specs"]]
    t0 = time.time()
    summaries = launch(jobs, cfg.train.workers, spark, parallel=cfg.experiment.parallel_runs)
    t1 = time.time()
    runs, refs, methods = [], {}, {}
    for st in todo:
        ctr = st["specs"][0]
        ref = ScoredRun(REFERENCE_CTR, label(st, ctr), storage.join(ctr.run_dir(exp_dir), EXPORT))
        for s in st["specs"]:
            runs.append(ScoredRun(s.method, label(st, s), storage.join(s.run_dir(exp_dir), EXPORT)))
            refs[label(st, s)] = ref
            methods[label(st, s)] = s.method
    width = read_manifest(dataset)["layout"]["num_slots"]
    pred_path = storage.join(exp_dir, "predictions", "+".join(st["unit"] for st in todo))
    if together:
        log.info("scoring and measuring %d units together (%d runs): %s", len(todo), len(runs),
                 ", ".join(st["unit"] for st in todo))
    info = score_to_parquet(spark, dataset, runs, refs, pred_path, width, cfg.evaluate.threads, cfg.evaluate)
    t2 = time.time()
    pred = spark.read.parquet(pred_path)
    truth = spark.read.parquet(truth_path) if truth_path else None
    oracle_path, oracle_identity, oracle_done = (_oracle_state(dataset, truth_path, exp_dir) if truth_path
                                                 else (None, None, []))
    rows, dl, aliases = protocol_metrics(pred, truth, methods, own_ctr=OWN_CTR_METHODS,
                                         refs={r: ref.run_id for r, ref in refs.items()}, oracle=oracle_done is None)
    if oracle_done is None:  # the true probabilities measured in the same passes (one column more, no pass of their own)
        write_json(oracle_path, {"identity": oracle_identity, "rows": oracle_rows_of(rows)})
    t3 = time.time()
    summaries = iter(summaries)   # in the jobs' order: unit by unit, run by run
    for st in todo:
        mine = {label(st, s): s.name for s in st["specs"]}
        delong = {}
        for t, res in dl.items():
            models = [m for m in res.models if m in mine]
            if models:
                own = {mine[a]: mine[b] for a, b in (aliases.get(t) or {}).items() if a in mine}
                delong[t] = R.delong_record(res.take(models, mine.get), own)
        summ = [next(summaries) for _ in st["specs"]]
        result = {"unit": st["unit"], "repeat": st["repeat"], "rate": st["rate"], "identity": st["identity"],
                  "run_ids": {s.name: _run_id(s.run_dir(exp_dir)) for s in st["specs"]},
                  "metrics": [{**r, S.RUN_ID: mine[r[S.RUN_ID]]} for r in rows if r[S.RUN_ID] in mine],
                  "delong": delong,
                  "division_clipped": sum(info["clipped_by_run"].get(r, 0) for r in mine),
                  # wall seconds of this run of the unit (training includes runs resumed or skipped as already
                  # done); units measured together share theirs (evaluated_with names them)
                  "seconds": {"train": round(t1 - t0, 1), "score": round(t2 - t1, 1), "metrics": round(t3 - t2, 1)},
                  "evaluated_with": [o["unit"] for o in todo],
                  "train": [{k: v for k, v in x.items() if k != "history"} for x in summ],
                  # the validation AUC of each run's exported evaluation (None without a validation split): what
                  # select_on=validation compares
                  "validation": {s.name: (x.get("validation") or {}).get("best_auc")
                                 for s, x in zip(st["specs"], summ)}}
        write_json(st["out"], result)
        st["done"] = result


def unit_identity(cfg: Config, dataset: str, specs: list, exp_dir: str) -> str:
    """What a unit's metrics depend on: the dataset build and every run's model/train config."""
    from esmm.outputs import dataset_fingerprint, fingerprint
    runs = {}
    for s in specs:
        c = config_for(cfg, s, exp_dir)
        runs[s.name] = {"model": to_dict(c.model), "train": to_dict(c.train)}
    return fingerprint({"dataset": dataset_fingerprint(read_manifest(dataset)), "runs": runs})


def _run_id(run_dir: str) -> str | None:
    from esmm.outputs import read_marker
    rec = read_marker(run_dir)
    return rec.get("run_id") if rec else None


def truth_identity(truth_path: str) -> str:
    """The ground truth's identity: the committed run id of the generated log holding it (its path otherwise)."""
    from esmm.outputs import read_commit
    rec = read_commit(storage.parent(truth_path), verify=False)
    return (rec or {}).get("run_id") or storage.resolve(truth_path)


def _oracle_state(dataset: str, truth_path: str, exp_dir: str) -> tuple[str, dict, list | None]:
    """(path of ``metrics/oracle.json``, the identity its rows must carry, the rows when already computed from the
    same dataset build and ground truth, else None)."""
    path = storage.join(exp_dir, "metrics", "oracle.json")
    identity = {"dataset_run_id": read_manifest(dataset)["run_id"], "truth": truth_identity(truth_path)}
    if storage.exists(path):
        done = storage.read_json(path)
        if isinstance(done, dict) and done.get("identity") == identity:
            return path, identity, done["rows"]
    return path, identity, None


def oracle_rows_of(rows: list[dict]) -> list[dict]:
    """``protocol_metrics(oracle=True)``'s oracle rows in ``oracle.json``'s form (``method`` "oracle", no run id)."""
    return [{S.METHOD: "oracle", **{k: v for k, v in r.items() if k != S.RUN_ID}} for r in rows
            if r[S.RUN_ID] == ORACLE_RUN]


def oracle(spark: SparkSession, dataset: str, truth_path: str, exp_dir: str) -> list[dict]:
    """The oracle rows (true probabilities as scores), reused only when computed from the same dataset build and
    ground truth. The first evaluation of an experiment measures them in its own passes (``_measure``); this pass
    of their own runs only when that did not happen (every unit was already measured)."""
    path, identity, rows = _oracle_state(dataset, truth_path, exp_dir)
    if rows is not None:
        return rows
    test = spark.read.parquet(storage.join(dataset, S.TEST)).drop(S.FEAT_IDS, S.FEAT_WTS, S.SAMPLE_TIER)  # + user_key
    truth = spark.read.parquet(truth_path).select(S.SAMPLE_ID, S.TRUE_CTR, S.TRUE_CVR, S.WOULD_CONVERT)
    rows = oracle_protocol_metrics(test.join(truth, S.SAMPLE_ID))
    write_json(path, {"identity": identity, "rows": rows})
    return rows


# ------------------------------------------------------------------------------------------------ driver

def run_experiment(spark: SparkSession, cfg: Config, dataset: str, exp_dir: str, truth_path: str | None,
                   table_rate: float | None = None, overwrite: bool = False) -> dict:
    """Run (or resume) every unit, then write Table 2 and Figure 3 under ``exp_dir``; returns the report paths.

    ``exp_dir`` is an experiment directory this project owns, written by one job at a time (``<exp_dir>.lock``).
    Finished units and trainings are reused only when they were built from the same dataset build and config
    (else :class:`ExperimentError`); ``overwrite`` removes an owned ``exp_dir`` first and starts over. A committed
    experiment whose units, ground truth and report settings are all the same is reused as it is: nothing is
    rewritten (a scheduler's second run changes nothing)."""
    from esmm.outputs import Output
    dataset, exp_dir = storage.resolve(dataset), storage.resolve(exp_dir)
    truth_path = storage.resolve(truth_path) if truth_path else None
    storage.check_shared(spark, storage.parent(exp_dir))  # executors train and write predictions under it
    with Output(exp_dir, "experiment", {}, "experiment", overwrite, ExperimentOutputRefused) as o:
        o.claim()
        plan = _plan(cfg, dataset, table_rate)
        fp = reports_fingerprint(cfg, dataset, exp_dir, truth_path, plan)
        if o.committed is not None and o.committed.get("reports_fingerprint") == fp:
            log.info("%s is committed with the same units, ground truth and report settings: reused as it is",
                     storage.display(exp_dir))
            return stored_report(exp_dir)
        if o.committed is not None:
            o.uncommit()  # the reports are rewritten in place: committed again once they all are
        report = _run_experiment(spark, cfg, dataset, exp_dir, truth_path, plan)
        o.commit_in_place({"reports_fingerprint": fp})
    return report


def train_runs(spark: SparkSession | None, cfg: Config, dataset: str, exp_dir: str, names: list[str],
               table_rate: float | None = None) -> list[dict]:
    """Train only the runs of the experiment's plan named in ``names`` (a run name such as ``ctr``, ``esmm`` or
    ``aman[rate=0.2]``, or a method for all its variants), in every unit, into the directories the experiment reads
    them from; no scoring, no reports. A scheduler runs one such task per method (the reference CTR network first),
    then the experiment itself, which finds them finished. The experiment's lock is held only while its directory is
    claimed, so several of these run at once (each run directory has its own lock)."""
    from esmm.outputs import Output
    dataset, exp_dir = storage.resolve(dataset), storage.resolve(exp_dir)
    if spark is not None:
        storage.check_shared(spark, storage.parent(exp_dir))
    with Output(exp_dir, "experiment", {}, "experiment", False, ExperimentOutputRefused) as o:
        o.claim()
    plan = _plan(cfg, dataset, table_rate)
    specs = [s for repeat, rate, methods in plan["units"] for s in unit_specs(cfg, repeat, rate, methods)
             if s.name in names or s.method in names]
    known = sorted({s.name for repeat, rate, methods in plan["units"] for s in unit_specs(cfg, repeat, rate, methods)})
    missing = [n for n in names if not any(n in (s.name, s.method) for s in specs)]
    if missing:
        from esmm.config import ConfigError
        raise ConfigError(f"--train {', '.join(missing)}: not a run of this experiment (its runs: {', '.join(known)})")
    log.info("training %d run(s) of %s: %s", len(specs), storage.display(exp_dir),
             ", ".join(f"{s.unit}/{s.name}" for s in specs))
    return launch([(config_for(cfg, s, exp_dir), dataset, s.run_dir(exp_dir)) for s in specs], cfg.train.workers,
                  spark, parallel=cfg.experiment.parallel_runs)


def _plan(cfg: Config, dataset: str, table_rate: float | None) -> dict:
    """The experiment's units, (repeat, rate, methods) in the order they run, and Table 2's rate."""
    rates = list(cfg.experiment.figure_rates or cfg.etl.sampling_rates)
    table_rate = table_rate if table_rate is not None else max(rates)
    if table_rate not in rates:
        rates.append(table_rate)
    manifest = read_manifest(dataset)
    subsets = manifest["splits"][S.TRAIN]["subsets"]
    for r in rates:
        if str(r) not in subsets:
            raise ValueError(f"sampling rate {r} is not in the dataset (ETL rates {manifest['sampling_rates']})")
    units = [(repeat, rate, unit_methods(cfg, rate, table_rate)) for repeat in range(cfg.experiment.repeats)
             for rate in sorted(rates)]
    return {"rates": sorted(rates), "table_rate": table_rate, "units": units}


def reports_fingerprint(cfg: Config, dataset: str, exp_dir: str, truth_path: str | None, plan: dict) -> str:
    """What the reports depend on: every unit's identity, the dataset build, the ground truth and the config."""
    from esmm.outputs import fingerprint
    return fingerprint({"units": [unit_identity(cfg, dataset, unit_specs(cfg, r, rate, m), exp_dir)
                                  for r, rate, m in plan["units"]],
                        "dataset_run_id": read_manifest(dataset)["run_id"],
                        "truth": truth_identity(truth_path) if truth_path else None,
                        "config": to_dict(cfg), "table_rate": plan["table_rate"]})


def stored_report(exp_dir: str) -> dict:
    """The report of a committed experiment, read back (what ``write_reports`` returned when it wrote it)."""
    names = (("md", "table2.md"), ("csv", "table2.csv"), ("json", "table2.json"), ("sig_csv", "significance.csv"),
             ("png", "figure3.png"), ("fig_csv", "figure3.csv"))
    paths = {k: storage.join(exp_dir, v) for k, v in names}
    data = storage.read_json(paths["json"])
    return {"table2": data["table2"], "significance": data["significance"], "text": storage.read_text(paths["md"]),
            "paths": {k: storage.display(v) for k, v in paths.items()}, "select_on": data["select_on"],
            "chosen": {float(k): v for k, v in data["chosen"].items()}, "reused": True}


def _run_experiment(spark: SparkSession, cfg: Config, dataset: str, exp_dir: str, truth_path: str | None,
                    plan: dict) -> dict:
    rates, table_rate = plan["rates"], plan["table_rate"]
    manifest = read_manifest(dataset)
    subsets = manifest["splits"][S.TRAIN]["subsets"]
    units = []
    total = len(plan["units"])
    step = cfg.experiment.units_per_evaluation
    for i in range(0, total, step):
        group = plan["units"][i:i + step]
        for j, (repeat, rate, methods) in enumerate(group):
            log.info("experiment unit %d/%d: repeat %d, sampling rate %s (%s training impressions), methods %s",
                     i + j + 1, total, repeat, rate, f"{subsets[str(rate)]['rows']:,}", ", ".join(methods))
        units += run_units(spark, cfg, dataset, exp_dir, group, truth_path)
    oracle_rows = oracle(spark, dataset, truth_path, exp_dir) if truth_path else None
    train_rows = {r: subsets[str(r)]["rows"] for r in rates}
    split = V.find_split(storage.join(dataset, S.TRAIN), manifest, cfg.train.validation_share)
    if split is not None:  # the impressions trained on: the subsets' rows before the validation cut
        train_rows = {r: V.train_rows(manifest, split, r) for r in rates}
    return write_reports(units, cfg, exp_dir, rates, table_rate, oracle_rows, train_rows,
                         validation_rows=split["rows"] if split is not None else None)


SEARCHED = tuple(n for n, m in METHODS.items() if m.grid is not None)   # the methods whose variants are chosen


def validation_choices(units: list[dict], methods: tuple, rates) -> dict:
    """{rate: {method: {"chosen": run name, "validation_auc": {run name: mean best validation AUC}}}} for AMAN and
    OVERSAMPLING: the variant with the highest mean (over the repeats at that rate) of its trainings' best validation
    AUC; a variant without one (no validation split, undefined AUC) ranks last, ties go to the first in grid order
    (the order the unit records list them)."""
    out = {}
    for rate in rates:
        us = [u for u in units if u["rate"] == rate]
        per = {}
        for m in SEARCHED:
            if m not in methods:
                continue
            names = list(dict.fromkeys(n for u in us for n in (u.get("validation") or {}) if n.startswith(m + "[")))
            if not names:
                continue
            aucs = {}
            for n in names:
                vals = [u["validation"][n] for u in us if (u.get("validation") or {}).get(n) is not None]
                aucs[n] = sum(vals) / len(vals) if vals else None
            chosen = max(names, key=lambda n: -1.0 if aucs[n] is None else aucs[n])
            per[m] = {"chosen": chosen, "validation_auc": aucs}
        out[rate] = per
    return out


def keep_chosen(units: list[dict], choices: dict) -> list[dict]:
    """The units with the metrics of every AMAN/OVERSAMPLING variant that was not chosen at its rate removed, so the
    reports (which pick the best remaining variant) report the chosen one; DeLong records are kept whole (they are
    indexed by run name)."""
    out = []
    for u in units:
        per = choices.get(u["rate"], {})
        drop = {n for m, c in per.items() for n in c["validation_auc"] if n != c["chosen"]}
        out.append({**u, "metrics": [r for r in u["metrics"] if r[S.RUN_ID] not in drop]})
    return out


def selection_note(select_on: str, methods: tuple) -> str:
    """The line of Table 2's caption that says how AMAN's rate and OVERSAMPLING's k were chosen ('' without them)."""
    searched = [R.label(m) for m in SEARCHED if m in methods]
    if not searched:
        return ""
    what = " and ".join(f"{R.label(m)}'s {get_method(m).grid.label}" for m in SEARCHED if m in methods)
    if select_on == "validation":
        return (f"{what} chosen on the validation split: the best mean validation CVR AUC of the trainings "
                f"(experiment.select_on=validation; the test split plays no part in the choice).")
    return (f"{what} chosen on the test split, the paper's protocol: the best mean test CVR AUC "
            f"(experiment.select_on=test; optimistic for the chosen variant).")


def write_reports(units, cfg, exp_dir, rates, table_rate, oracle_rows, train_rows=None,
                  validation_rows: int | None = None) -> dict:
    """Table 2 (md/csv/json), the ESMM-vs-competitor tests (significance.{md,csv}) and Figure 3 (png/csv).
    ``train_rows``: impressions trained on per rate; ``validation_rows``: the validation part's (None: no split)."""
    methods = tuple(cfg.experiment.methods)
    select_on = cfg.experiment.select_on
    choices = validation_choices(units, methods, rates)
    if select_on == "validation":
        units = keep_chosen(units, choices)
    rows = R.table2(units, methods, table_rate, oracle_rows)
    md = R.table2_markdown(rows)
    chosen = {r: R.pick_variants(R.summarize(units, r), methods) for r in rates}
    comps = R.comparisons(units, chosen)
    sig = R.significance_summary(comps, table_rate)
    sig_md = R.significance_markdown(sig) if sig else ""
    paths = {k: storage.join(exp_dir, v) for k, v in (("md", "table2.md"), ("csv", "table2.csv"),
                                                       ("json", "table2.json"), ("sig_csv", "significance.csv"),
                                                       ("png", "figure3.png"), ("fig_csv", "figure3.csv"))}
    note = selection_note(select_on, methods)
    text = (f"Table 2 reproduction: AUC %, {cfg.experiment.repeats} repeat(s), training sampling rate {table_rate}"
            + (f" ({train_rows[table_rate]:,} training impressions" if train_rows else "")
            + (f", {validation_rows:,} validation" if train_rows and validation_rows else "")
            + (")" if train_rows else "")
            + (f". {note}" if note else "") + f"\n\n{md}\n\n{R.TABLE2_LEGEND}\n")
    if sig_md:
        text += f"\nESMM minus each competitor (AUC points, rate {table_rate}):\n\n{sig_md}\n\n{R.SIGNIFICANCE_LEGEND}\n"
        text += (f"\nWhat the numbers say (written from the tables by esmm.report.claims; rate {table_rate}):\n\n"
                 f"{R.claims_markdown(sig)}\n")
        for r in rates:  # Figure 3's other rates: ESMM against BASE
            base = [x for x in R.significance_summary(comps, r) if x["competitor"] == "BASE"] if r != table_rate else []
            where = f"at rate {r}" + (f" ({train_rows[r]:,} training impressions)" if train_rows else "")
            text += "".join(f"- {where}: {c}\n" for c in R.claims(base))
    storage.write_text(paths["md"], text)
    for key, table in (("csv", rows), ("sig_csv", comps)):
        f = io.StringIO(newline="")
        w = csv.DictWriter(f, fieldnames=list(table[0]) if table else ["model"])
        w.writeheader()
        w.writerows(table)
        storage.write_text(paths[key], f.getvalue())
    clipped = sum(u.get("division_clipped", 0) for u in units)
    write_json(paths["json"], {"table2": rows, "significance": sig, "comparisons": comps, "rate": table_rate,
                                 "select_on": select_on, "selection_note": note,
                                 "chosen": {str(r): c for r, c in chosen.items()},
                                 "validation_auc": {str(r): {m: c["validation_auc"] for m, c in per.items()}
                                                    for r, per in choices.items()},
                                 "train_impressions": train_rows, "validation_impressions": validation_rows,
                                 "division_clipped": clipped,
                                 "oracle": oracle_rows, "config": to_dict(cfg)})
    points = R.figure3_points(units, methods, rates, train_rows or {r: r for r in rates})
    R.plot_figure3(points, paths["png"], paths["fig_csv"],
                   title=f"{cfg.experiment.repeats} repeat(s); error bars: 95% "
                         + ("t-interval over repeats" if cfg.experiment.repeats > 1 else "DeLong interval"))
    return {"table2": rows, "markdown": md, "significance": sig,
            "paths": {k: storage.display(v) for k, v in paths.items()}, "text": text,
            "select_on": select_on, "chosen": chosen}
