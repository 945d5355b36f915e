"""MLflow run tracking for experiments and evaluations (``tracking.mlflow_uri``; off when empty).

Every training already writes TensorBoard event files from rank 0 under its run directory (esmm/train.py), so
``tensorboard --logdir <runs>`` shows all methods side by side without any service. MLflow is the optional second
channel, for teams that keep their runs in one store:

- ``tracking.mlflow_uri`` empty (default): nothing is logged and ``mlflow`` is never imported.
- a path (``data/mlruns``, ``/shared/mlruns``, ``file:///...``): MLflow's file store there. MLflow 3 keeps the file
  store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; we set that for file URIs only,
  as the store needs no server and no database (``mlflow ui --backend-store-uri <path>`` reads it).
- any other URI (``http://host:5000``, ``databricks``, ``sqlite:///...``): passed to MLflow as it is.

What one MLflow run holds (one per experiment directory or evaluation directory):

- params: the resolved config, flattened (``train.lr``, ``features.buckets.101``, ...);
- metrics: every numeric cell of Table 2 (``esmm.cvr_auc``, ``esmm.cvr_ci95``, ...) or of the evaluation's metric
  rows (``<run_id>.<task>.auc``);
- artifacts: Table 2 (md/csv/json), the significance table, Figure 3 (png/csv), or the evaluation's metrics.json;
- tags: the output directory, its ``_ESMM_OUTPUT`` run id, the command line.

A re-run of the same output directory logs into the same MLflow run (its id is kept in ``<out>/_MLFLOW_RUN``), so a
resumed experiment does not leave a second, partial run behind. The package pinned is ``mlflow-skinny``
(requirements.txt): the client without the server's dependencies; it moved none of the stack's pins.

Tracking runs after the results are on disk: when the store cannot be reached the job fails (exit code 1) with a
message saying where the results are, and a re-run (which reuses every finished result) only logs.
"""
from __future__ import annotations

import logging
import math
import os
import re
import sys

log = logging.getLogger(__name__)
RUN_FILE = "_MLFLOW_RUN"
_KEY_BAD = re.compile(r"[^0-9A-Za-z_\-.]+")


class TrackingError(RuntimeError):
    """The results are written, but logging them to MLflow failed."""


def resolve_uri(uri: str) -> str:
    """A tracking URI for MLflow: paths become ``file://`` URIs of their absolute path."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and not re.match(r"^[A-Za-z]:[\\/]", uri):
        return uri
    from esmm import storage
    return storage.resolve(uri)


def flatten(obj, prefix: str = "") -> dict:
    """``{"train": {"lr": 0.001}}`` -> ``{"train.lr": 0.001}``; lists stay values."""
    out = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def metric_key(*parts) -> str:
    """A metric name MLflow accepts: ``ORACLE (true probabilities)`` -> ``ORACLE_true_probabilities``."""
    return ".".join(_KEY_BAD.sub("_", str(p)).strip("_") for p in parts if str(p))


def table2_metrics(rows: list[dict]) -> dict:
    """Every finite numeric cell of Table 2, keyed ``<variant or model>.<column>``."""
    out = {}
    for r in rows:
        name = r.get("variant") or r.get("model")
        for col, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and col != "repeats":
                out[metric_key(name, col)] = float(v)
    return out


def evaluation_metrics(rows: list[dict]) -> dict:
    """``<run_id>.<task>.<metric>`` of the evaluation's metric rows (AUC, logloss, calibration, n, ...)."""
    out = {}
    for r in rows:
        for col, v in r.items():
            if col in ("run_id", "task", "method") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                out[metric_key(r["run_id"], r["task"], col)] = float(v)
    return out


def _mlflow(uri: str):
    try:
        import mlflow
    except ImportError as e:  # not installed: say how to get it
        raise TrackingError("tracking.mlflow_uri is set but the mlflow package is not installed: pip install "
                            "mlflow-skinny (requirements.txt pins it)") from e
    resolved = resolve_uri(uri)
    if resolved.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(resolved)
    return mlflow, resolved


def _previous_run(out: str, uri: str) -> str | None:
    from esmm import storage
    try:
        rec = storage.read_json(storage.join(out, RUN_FILE))
    except (OSError, ValueError):
        return None
    return rec.get("run_id") if rec.get("uri") == uri else None


def log_run(tracking, out: str, name: str, config: dict, metrics: dict, artifacts: list[str],
            tags: dict | None = None) -> str | None:
    """Log one MLflow run for the output directory ``out``; returns its MLflow run id (None when tracking is off).

    ``tracking``: a ``TrackingConfig``. Re-logging the same ``out`` to the same store continues the run recorded
    in ``<out>/_MLFLOW_RUN`` (params that are already there must keep their values; they do for a re-run)."""
    if not tracking.mlflow_uri:
        return None
    from esmm import storage
    from esmm.outputs import read_marker
    try:
        mlflow, uri = _mlflow(tracking.mlflow_uri)
        mlflow.set_experiment(tracking.mlflow_experiment)
        previous = _previous_run(out, uri)
        if previous is not None:
            try:
                mlflow.get_run(previous)
            except Exception:  # noqa: BLE001  (deleted from the store: start a new run)
                previous = None
        marker = read_marker(out) or {}
        all_tags = {"esmm.output": storage.resolve(out), "esmm.output_run_id": str(marker.get("run_id", "")),
                    "esmm.command": " ".join(sys.argv)[:5000], **(tags or {})}
        with mlflow.start_run(run_id=previous, run_name=None if previous else name) as run:
            if previous is None:
                params = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                          for k, v in flatten(config).items()}
                items = sorted(params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                    mlflow.log_params(dict(items[i:i + 100]))
            mlflow.set_tags(all_tags)
            if metrics:
                mlflow.log_metrics(metrics)
            for path in artifacts:
                if storage.isfile(path):
                    _log_artifact(mlflow, path)
            run_id = run.info.run_id
        storage.write_json(storage.join(out, RUN_FILE), {"uri": uri, "run_id": run_id,
                                                         "experiment": tracking.mlflow_experiment})
        log.info("logged to MLflow %s: experiment %r, run %s", uri, tracking.mlflow_experiment, run_id)
        return run_id
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TrackingError(f"the results are in {out}, but logging them to MLflow at {tracking.mlflow_uri} failed: "
                            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                            f"a re-run reuses the results and only logs") from e


def _log_artifact(mlflow, path: str) -> None:
    """MLflow logs artifacts from local files: a remote one is copied to a temporary file first."""
    import tempfile

    from esmm import storage
    local = storage.local_path(path)
    if local is not None:
        mlflow.log_artifact(local)
        return
    with tempfile.TemporaryDirectory(prefix="esmm-artifact-") as d:
        tmp = os.path.join(d, storage.basename(path))
        with open(tmp, "wb") as f:
            f.write(storage.read_bytes(path))
        mlflow.log_artifact(tmp)


def log_experiment(cfg, report: dict, exp_dir: str) -> str | None:
    """Table 2 / Figure 3 of an experiment (``run_experiment``'s report) as one MLflow run."""
    from esmm.config import to_dict
    return log_run(cfg.tracking, exp_dir, f"experiment {_name(exp_dir)}", to_dict(cfg),
                   table2_metrics(report["table2"]), list(report["paths"].values()),
                   {"esmm.job": "experiment"})


def _name(out: str) -> str:
    from esmm import storage
    return storage.basename(out)


def log_evaluation(cfg, result: dict, out: str) -> str | None:
    """An evaluation's metrics (``evaluate_runs``' result) as one MLflow run."""
    from esmm.config import to_dict
    return log_run(cfg.tracking, out, f"evaluation {_name(out)}", to_dict(cfg),
                   evaluation_metrics(result["metrics"]), [f"{out.rstrip('/')}/metrics.json"],
                   {"esmm.job": "evaluate"})
