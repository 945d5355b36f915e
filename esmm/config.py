"""Typed, validated configuration: frozen dataclasses loaded from YAML, overridable from the command line.

    cfg = load_config("conf/demo.yaml", overrides=["train.batch_size=4096"])
    cfg.train.batch_size  # -> 4096
    to_dict(cfg)          # the resolved config, stored with every output

Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from schemas.raw import ALL_FIELDS, HISTORY_FIELDS


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    shuffle_partitions: int = 200
    driver_memory: str = "4g"
    app_name: str = "esmm-spark"

    def validate(self, key: str) -> None:
        _check(self.shuffle_partitions >= 1, f"{key}.shuffle_partitions", "must be >= 1")


@dataclass(frozen=True)
class PathsConfig:
    raw: str = "data/raw"            # generator output / ETL input (the four Ali-CCP files)
    dataset: str = "data/dataset"    # ETL output
    runs: str = "data/runs"          # checkpoints, model exports, predictions, reports

    def validate(self, key: str) -> None:
        pass


@dataclass(frozen=True)
class GeneratorConfig:
    """Knobs of the synthetic Ali-CCP log (model documented in esmm/generator.py)."""
    impressions: int = 20_000_000         # total over train + test files
    impressions_per_key: float = 58.0     # mean impressions sharing one common_feature_index
    users: int = 50_000
    items: int = 200_000
    categories: int = 2_000
    shops: int = 20_000
    brands: int = 10_000
    intentions: int = 5_000
    latent_dim: int = 8
    history_len: int = 120                # mean entries per *_14 history field (common lines ~ 4x this)
    ctr: float = 0.04                     # target click-through rate
    cvr: float = 0.007                    # target post-click conversion rate
    selection_bias: float = 1.0           # 0 = clicks carry no information about conversion propensity
    shared_affinity: float | None = None  # weight of the click affinity A_S in logit pCVR; None = 0.2 x selection_bias
    partitions: int = 64
    seed: int = 2018
    single_files: bool = True             # merge Spark part files into the four single files (local paths only)

    def validate(self, key: str) -> None:
        for name in ("impressions", "users", "items", "categories", "shops", "brands", "intentions",
                     "latent_dim", "history_len", "partitions"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(self.impressions_per_key >= 1, f"{key}.impressions_per_key", "must be >= 1")
        _check(0 < self.ctr < 1, f"{key}.ctr", f"must be in (0, 1), got {self.ctr}")
        _check(0 < self.cvr < 1, f"{key}.cvr", f"must be in (0, 1), got {self.cvr}")
        _check(self.selection_bias >= 0, f"{key}.selection_bias", "must be >= 0")
        _check(self.shared_affinity is None or math.isfinite(self.shared_affinity), f"{key}.shared_affinity",
               f"must be a finite number or null, got {self.shared_affinity}")
        _check(self.latent_dim >= 2, f"{key}.latent_dim", "must be >= 2 (shared and conversion-only dims)")


def _default_buckets() -> dict[str, int]:
    big = {"101": 200_000, "205": 400_000, "207": 100_000, "216": 50_000, "109_14": 20_000, "110_14": 100_000,
           "127_14": 50_000, "150_14": 20_000, "508": 200_000, "509": 200_000, "702": 200_000, "853": 200_000,
           "206": 20_000, "210": 20_000}
    return {f: big.get(f, 1_000) for f in ALL_FIELDS}


def _default_max_len() -> dict[str, int]:
    lens = {f: 1 for f in ALL_FIELDS}
    lens.update({f: 8 for f in HISTORY_FIELDS})
    lens.update({"210": 3, "508": 2, "509": 2, "702": 2, "853": 2})
    return lens


@dataclass(frozen=True)
class FeaturesConfig:
    """Per-field hash bucket counts and kept values (top-K by value) for the processed dataset."""
    buckets: dict = field(default_factory=_default_buckets)   # field -> bucket count (bucket 0 = missing/padding)
    max_len: dict = field(default_factory=_default_max_len)   # field -> slots kept (top-K by feature_value)

    def validate(self, key: str) -> None:
        for name in ("buckets", "max_len"):
            table = getattr(self, name)
            unknown = set(table) - set(ALL_FIELDS)
            _check(not unknown, f"{key}.{name}", f"unknown field(s) {sorted(unknown)}; fields are {list(ALL_FIELDS)}")
            missing = set(ALL_FIELDS) - set(table)
            _check(not missing, f"{key}.{name}", f"missing field(s) {sorted(missing)}")
            for f, v in table.items():
                _check(isinstance(v, int) and not isinstance(v, bool), f"{key}.{name}.{f}", f"expected int, got {v!r}")
        for f, v in self.buckets.items():
            _check(v >= 2, f"{key}.buckets.{f}", f"must be >= 2 (bucket 0 is reserved), got {v}")
        for f, v in self.max_len.items():
            _check(1 <= v <= 1000, f"{key}.max_len.{f}", f"must be in [1, 1000], got {v}")
        _check(sum(self.buckets.values()) < 2**31, f"{key}.buckets", "total id space must fit in int32")


@dataclass(frozen=True)
class EtlConfig:
    sampling_rates: tuple = (0.01, 0.1, 0.2, 0.5, 1.0)  # nested training subsets; last must be 1.0
    max_quarantine_share: float = 0.01                  # fail when more of the skeleton lines are rejected
    row_group_mb: int = 8                               # Parquet row-group size (many per file, for sharding)
    rows_per_file: int = 2_000_000                      # cap on rows per Parquet file
    split: str = "auto"    # auto: train/test files when both exist, else time split of the train file at its median
    parser: str = "arrow"  # arrow: vectorized Arrow/NumPy batches (esmm/rawparse.py); native: Spark SQL expressions
    writer: str = "arrow"  # arrow: pyarrow in the Python workers (esmm/arrow_write.py); spark: Spark's Parquet writer
    broadcast_common_mb: int = 256  # broadcast the encoded common lines to the join when they are at most this big
    mb_per_partition: int = 32      # shuffle partitions of the join/write: one per this much raw text (at least 1)
    max_line_bytes: int = 1 << 20   # longer raw lines are quarantined, keeping their first this-many bytes

    def validate(self, key: str) -> None:
        r = self.sampling_rates
        _check(len(r) >= 1 and all(isinstance(x, (int, float)) for x in r), f"{key}.sampling_rates", "non-empty list of numbers")
        _check(all(0 < a < b for a, b in zip(r, r[1:])) and r[0] > 0, f"{key}.sampling_rates", f"must be strictly increasing and > 0, got {list(r)}")
        _check(r[-1] == 1.0, f"{key}.sampling_rates", f"the last rate must be 1.0, got {r[-1]}")
        _check(0 <= self.max_quarantine_share <= 1, f"{key}.max_quarantine_share", "must be in [0, 1]")
        _check(self.row_group_mb >= 1, f"{key}.row_group_mb", "must be >= 1")
        _check(self.rows_per_file >= 1000, f"{key}.rows_per_file", "must be >= 1000")
        _check(self.split in ("auto", "files", "time"), f"{key}.split", f"must be auto|files|time, got {self.split!r}")
        _check(self.parser in ("arrow", "native"), f"{key}.parser", f"must be arrow|native, got {self.parser!r}")
        _check(self.writer in ("arrow", "spark"), f"{key}.writer", f"must be arrow|spark, got {self.writer!r}")
        _check(self.broadcast_common_mb >= 0, f"{key}.broadcast_common_mb", "must be >= 0 (0: never broadcast)")
        _check(self.mb_per_partition >= 1, f"{key}.mb_per_partition", "must be >= 1")
        _check(1024 <= self.max_line_bytes < 1 << 31, f"{key}.max_line_bytes", "must be in [1024, 2^31)")


@dataclass(frozen=True)
class ModelConfig:
    embedding_dim: int = 18          # paper: 18
    hidden: tuple = (200, 80)        # paper: 360 x 200 x 80 x 2 (a 2-way softmax == one sigmoid logit)
    experts: int = 4                 # MMoE: experts under the towers (4 as MMLRec's Ali-CCP benchmark)
    expert_hidden: tuple = (200,)    # MMoE: each expert (F*D) -> 200, the paper's first layer
    tower_hidden: tuple = (80,)      # MMoE: each task tower 200 -> 80 -> 1, the paper's remaining layers

    def validate(self, key: str) -> None:
        _check(self.embedding_dim >= 1, f"{key}.embedding_dim", "must be >= 1")
        _check(self.experts >= 1, f"{key}.experts", "must be >= 1")
        for name in ("hidden", "expert_hidden", "tower_hidden"):
            v = getattr(self, name)
            _check(len(v) >= 1 and all(isinstance(h, int) and h >= 1 for h in v), f"{key}.{name}",
                   "a non-empty list of positive ints")


def _method_names() -> tuple:
    """The registered methods (esmm.methods, imported when a config is validated: the registry is the one list)."""
    from esmm.methods import METHODS
    return tuple(METHODS)


@dataclass(frozen=True)
class TrainConfig:
    method: str = "esmm"
    sampling_rate: float = 1.0       # which nested subset of the train split to read
    epochs: int = 1
    batch_size: int = 1024           # per worker
    lr: float = 0.001                # paper: Adam; lr scaled by world size when scale_lr
    scale_lr: bool = False           # multiply lr by the number of workers (linear scaling rule)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    lr_schedule: str = "linear"      # "linear": lr, then falls linearly over the run's last lr_decay_share of steps to
                                     # lr x lr_final; "constant": the paper's plain Adam (its level drifts with the
                                     # last steps' noise)
    lr_decay_share: float = 0.2      # the linear schedule's cool-down: this share of the run's steps, at its end
    lr_final: float = 0.0            # the linear schedule's last lr as a share of lr
    aman_rate: float = 0.1           # AMAN: share of un-clicked rows kept as negatives
    oversampling_k: int = 3          # OVERSAMPLING: converted rows repeated k times
    unbias_min_ctr: float = 0.01     # UNBIAS: pCTR clipped below at this before 1/pCTR
    escm2_cf_weight: float = 0.5     # ESCM2: weight of the counterfactual CVR risk (PaddleRec config_bigdata.yaml)
    escm2_ctcvr_weight: float = 0.5  # ESCM2: weight of the CTCVR loss (PaddleRec config_bigdata.yaml; CTR's is 1)
    escm2_max_weight: float = 15.0   # ESCM2: inverse-propensity weights o/pCTR clipped at this (the authors' code:
                                     # PaddleRec counterfact_dr, clip(IPS, -15, 15), "online trick")
    aitm_alpha: float = 0.6          # AITM: weight of the behavioural calibrator (the authors' code, --weight 0.6)
    workers: int = 1                 # Horovod processes (spark launcher)
    threads: int = 1                 # torch threads per worker
    shuffle_buffer: int = 20_000     # rows
    reader_workers: int = 1          # petastorm reader threads (1 = deterministic row-group order)
    prefetch: int = 4                # batches made ahead in a background thread (reader's Arrow -> numpy, shuffle,
                                     # batching off the training thread); 0 = made in the training thread. Same
                                     # batches, same order either way
    checkpoint_every: int = 500      # steps
    log_every: int = 50              # steps
    seed: int = 7
    ctr_model: str = ""              # reference CTR export (needed by unbias); empty = <runs>/ctr/model.pt
    validation_share: float = 0.05   # the latest share of the train split (by sample_id) held out for validation;
                                     # 0 = no validation, no early stopping (every train row is trained on)
    eval_every: int = 1000           # steps between validation evaluations (also at the end of every epoch)
    patience: int = 5                # stop after this many evaluations without a better validation score
    best_by: str = "logloss"         # the evaluation the export holds: "logloss" (lowest validation log-loss: ranking
                                     # and level) or "auc" (highest validation AUC, blind to the level)
    choose_from: str = "cooldown"    # the evaluations the export may hold (and early stopping counts): "cooldown"
                                     # (once the linear schedule's rate falls; every one under a constant rate) or
                                     # "any" (every evaluation)

    def validate(self, key: str) -> None:
        names = _method_names()
        _check(self.method in names, f"{key}.method", f"must be one of {names}, got {self.method!r}")
        _check(0 < self.sampling_rate <= 1, f"{key}.sampling_rate", "must be in (0, 1]")
        for name in ("epochs", "batch_size", "workers", "threads", "checkpoint_every", "log_every", "oversampling_k",
                     "reader_workers", "eval_every", "patience"):
            _check(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1")
        _check(math.isfinite(self.lr) and self.lr > 0, f"{key}.lr", f"must be a finite number > 0, got {self.lr}")
        for name in ("beta1", "beta2"):  # Adam's moment decay rates: 1 never forgets (and divides by 1 - beta^t = 0)
            v = getattr(self, name)
            _check(0 <= v < 1, f"{key}.{name}", f"must be in [0, 1), got {v}")
        _check(math.isfinite(self.eps) and self.eps > 0, f"{key}.eps", f"must be a finite number > 0, got {self.eps}")
        _check(0 < self.aman_rate <= 1, f"{key}.aman_rate", "must be in (0, 1]")
        _check(0 < self.unbias_min_ctr < 1, f"{key}.unbias_min_ctr", "must be in (0, 1)")
        _check(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", "must be >= 0")
        _check(self.prefetch >= 0, f"{key}.prefetch", "must be >= 0 (0 = no background thread)")
        _check(0 <= self.validation_share < 1, f"{key}.validation_share",
               f"must be in [0, 1) (0 = no validation split), got {self.validation_share}")
        for name in ("escm2_cf_weight", "escm2_ctcvr_weight", "aitm_alpha"):
            v = getattr(self, name)
            _check(math.isfinite(v) and v >= 0, f"{key}.{name}", f"must be a finite number >= 0, got {v}")
        _check(self.lr_schedule in LR_SCHEDULES, f"{key}.lr_schedule",
               f"must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        _check(0 <= self.lr_final <= 1, f"{key}.lr_final", f"must be in [0, 1], got {self.lr_final}")
        _check(0 < self.lr_decay_share <= 1, f"{key}.lr_decay_share", f"must be in (0, 1], got {self.lr_decay_share}")
        _check(self.best_by in BEST_BY, f"{key}.best_by", f"must be one of {list(BEST_BY)}, got {self.best_by!r}")
        _check(self.choose_from in CHOOSE_FROM, f"{key}.choose_from",
               f"must be one of {list(CHOOSE_FROM)}, got {self.choose_from!r}")
        _check(math.isfinite(self.escm2_max_weight) and self.escm2_max_weight >= 1, f"{key}.escm2_max_weight",
               f"must be a finite number >= 1 (a weight o/pCTR is never below 1), got {self.escm2_max_weight}")


EXPORT_MODES = ("auto", "path", "broadcast")
LR_SCHEDULES = ("linear", "constant")
BEST_BY = ("logloss", "auc")
CHOOSE_FROM = ("cooldown", "any")


@dataclass(frozen=True)
class EvaluateConfig:
    """Scoring (esmm/evaluate.py): models are scored in passes of ``models_per_pass``; a Python worker holds at most
    ``models_per_pass`` + 1 models (the pass's and the reference CTR network)."""
    models_per_pass: int = 2         # models scored per pass over the test split (each pass reads it once)
    exports: str = "auto"            # path: workers read the export files (shared path); broadcast: the driver ships
                                     # the bytes; auto: path on a local[...] master, else broadcast
    threads: int = 1                 # torch threads per scoring task: Spark runs one task per core already (2 threads
                                     # per task on local[2] scored 1.6-1.8x slower, bench/RESULTS.md)

    def validate(self, key: str) -> None:
        _check(self.models_per_pass >= 1, f"{key}.models_per_pass", "must be >= 1")
        _check(self.threads >= 1, f"{key}.threads", "must be >= 1")
        _check(self.exports in EXPORT_MODES, f"{key}.exports", f"must be one of {'|'.join(EXPORT_MODES)}, "
               f"got {self.exports!r}")


SELECT_ON = ("validation", "test")


@dataclass(frozen=True)
class ExperimentConfig:
    methods: tuple = ("base", "aman", "oversampling", "unbias", "division", "esmm_ns", "esmm")
    repeats: int = 10                            # paper: 10
    aman_rates: tuple = (0.1, 0.2, 0.5, 1.0)     # paper's search grid
    oversampling_ks: tuple = (2, 3, 5, 10)       # paper's search grid
    figure_rates: tuple = ()                     # empty = every etl.sampling_rates entry
    figure_methods: tuple = ()                   # trained at the figure rates below Table 2's; empty = all methods
    select_on: str = "validation"                # AMAN's rate / OVERSAMPLING's k by validation AUC; test = the paper's
    parallel_runs: int = 1                       # runs of a unit trained side by side, each in its own Spark task
                                                 # with one worker (needs train.workers 1); 1 = one after another
    units_per_evaluation: int = 1                # units trained, scored and measured together (one pass over the
                                                 # test split for all their runs); 1 = each unit on its own

    def validate(self, key: str) -> None:
        names = _method_names()
        bad = [m for m in self.methods if m not in names]
        _check(not bad, f"{key}.methods", f"unknown method(s) {bad}; choose from {names}")
        _check(self.repeats >= 1, f"{key}.repeats", "must be >= 1")
        _check(len(self.aman_rates) >= 1 and all(0 < r <= 1 for r in self.aman_rates), f"{key}.aman_rates",
               f"a non-empty list of rates in (0, 1], got {list(self.aman_rates)}")
        _check(len(self.oversampling_ks) >= 1 and all(isinstance(k, int) and k >= 1 for k in self.oversampling_ks),
               f"{key}.oversampling_ks", f"a non-empty list of integers >= 1, got {list(self.oversampling_ks)}")
        bad = [m for m in self.figure_methods if m not in self.methods]
        _check(not bad, f"{key}.figure_methods", f"{bad} not in experiment.methods {list(self.methods)}")
        _check(self.select_on in SELECT_ON, f"{key}.select_on", f"must be one of {'|'.join(SELECT_ON)}, "
               f"got {self.select_on!r}")
        _check(self.parallel_runs >= 1, f"{key}.parallel_runs", f"must be >= 1, got {self.parallel_runs}")
        _check(self.units_per_evaluation >= 1, f"{key}.units_per_evaluation",
               f"must be >= 1, got {self.units_per_evaluation}")


@dataclass(frozen=True)
class TrackingConfig:
    """Run tracking besides the TensorBoard event files every training writes (esmm/tracking.py)."""
    mlflow_uri: str = ""             # empty = no MLflow; a path = MLflow's file store there; else any tracking URI
    mlflow_experiment: str = "esmm-spark"   # the MLflow experiment the runs are logged under

    def validate(self, key: str) -> None:
        _check(bool(self.mlflow_experiment.strip()), f"{key}.mlflow_experiment", "must not be empty")


@dataclass(frozen=True)
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    generate: GeneratorConfig = field(default_factory=GeneratorConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    etl: EtlConfig = field(default_factory=EtlConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, key: str = "") -> None:
        rates = self.etl.sampling_rates
        _check(self.train.sampling_rate in rates, "train.sampling_rate",
               f"{self.train.sampling_rate} is not one of etl.sampling_rates {list(rates)}")
        bad = [r for r in self.experiment.figure_rates if r not in rates]
        _check(not bad, "experiment.figure_rates", f"{bad} not in etl.sampling_rates {list(rates)}")
        _check(self.experiment.select_on != "validation" or self.train.validation_share > 0, "experiment.select_on",
               "validation needs a validation split (train.validation_share > 0); use experiment.select_on=test "
               "with train.validation_share=0")
        _check(self.experiment.parallel_runs == 1 or self.train.workers == 1, "experiment.parallel_runs",
               f"{self.experiment.parallel_runs} runs side by side train each run with one worker, but train.workers "
               f"is {self.train.workers}: set one of them to 1")


# Keys earlier versions accepted, with what replaced them (named in the unknown-key error).
RENAMED = {"escm2_min_ctr": "it was replaced by train.escm2_max_weight (= 1 / escm2_min_ctr; default 15, the ESCM2 "
                            "authors' clip of o/pCTR)"}


# --------------------------------------------------------------------------------------------- building

def _build(cls: type, data: Any, key: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{key or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hint = f"; {RENAMED[unknown[0]]}" if unknown[0] in RENAMED else ""
        raise ConfigError(f"{key + '.' if key else ''}{unknown[0]}: unknown key{hint} (known: {sorted(names)})")
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        kwargs[name] = _coerce(hints[name], value, sub)
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v.validate(f"{key}.{f.name}" if key else f.name)
    obj.validate(key)
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if type(None) in args:  # "X | None": null, or an X
        return None if value is None else _coerce(next(a for a in args if a is not type(None)), value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is tuple:
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        return tuple(value)
    if tp is dict:
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return {str(k): v for k, v in value.items()}
    raise TypeError(f"unsupported config type {tp} at {key}")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.batch_size=4096"`` -> ``("train.batch_size", 4096)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.batch_size=4096")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML; None = built-in defaults), apply ``key=value`` overrides, validate, return a Config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(data, k, v)
    return _build(Config, merge_defaults_for_tables(data), "")


def merge_defaults_for_tables(data: dict) -> dict:
    """Per-field tables in YAML may list only the fields they change; fill in the rest from the defaults."""
    feats = data.get("features")
    if isinstance(feats, dict):
        feats = dict(feats)
        if isinstance(feats.get("buckets"), dict):
            feats["buckets"] = {**_default_buckets(), **{str(k): v for k, v in feats["buckets"].items()}}
        if isinstance(feats.get("max_len"), dict):
            feats["max_len"] = {**_default_max_len(), **{str(k): v for k, v in feats["max_len"].items()}}
        data = {**data, "features": feats}
    return data


def from_dict(data: dict) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. read back from a manifest or checkpoint). A config stored by
    an earlier version is upgraded: ``train.escm2_min_ctr`` (a propensity floor) becomes ``escm2_max_weight`` =
    1 / floor, the same clip."""
    train = data.get("train")
    if isinstance(train, dict) and "escm2_min_ctr" in train:
        train = dict(train)
        train.setdefault("escm2_max_weight", 1.0 / float(train.pop("escm2_min_ctr")))
        data = {**data, "train": train}
    return _build(Config, data, "")


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain JSON/YAML-serializable data."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out

