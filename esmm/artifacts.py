"""The files one stage writes and later stages read, in one place: the dataset manifest (ETL -> training, scoring,
prediction, experiments), the model export (training -> scoring, prediction, portable export) and the small JSON
records (training summaries, unit metrics, reports).

- Manifest: ``<dataset>/manifest.json``, written by the ETL (``esmm.etl``) into its staging directory. Read here
  from a local path or any URL pyarrow opens (``hdfs://``, ``s3://``, ``file://``), or through a Spark session's
  Hadoop filesystem (``spark=``, for paths only the JVM can reach, as the ETL's own up-to-date check does).
- Model export: ``<run>/model.pt``, ``{"format", "method", "state_dict", "config", "layout", "run_id",
  "dataset_fingerprint"}``, saved atomically (temporary file, fsync, rename) and loaded with ``weights_only=True``.
  The network is rebuilt from the method's registry entry (``esmm.methods``) and the stored model config.
- JSON records: ``esmm.outputs.atomic_write_json`` (re-exported here as ``write_json``), the only JSON writer.
"""
from __future__ import annotations

import json
import os

import torch

from esmm.features import FeatureLayout
from esmm.outputs import atomic_write_json

write_json = atomic_write_json  # the one JSON writer (esmm.outputs), under its name here
from schemas.dataset import MANIFEST

EXPORT = "model.pt"             # a training run's model export
SUMMARY = "train_summary.json"  # a training run's summary (the export and the summary mark it finished)
EXPORT_FORMAT = 1


class ArtifactError(RuntimeError):
    """A stage's input artifact is missing or unreadable (run the upstream job first); exit code 1."""


# ------------------------------------------------------------------------------------------------ manifest

def read_manifest(dataset: str, spark=None) -> dict:
    """The ETL manifest of ``dataset``: a local path or a URL pyarrow can open, or (``spark`` given) any path the
    session's Hadoop filesystem reaches."""
    path = f"{dataset.rstrip('/')}/{MANIFEST}"
    missing = f"no dataset manifest at {path}: run jobs/etl.py first"
    if spark is not None:
        from esmm import spark as sparkfs
        if not sparkfs.exists(spark, path):
            raise ArtifactError(missing)
        return json.loads(sparkfs.read_text(spark, path))
    if "://" in dataset:
        import pyarrow.fs as pafs
        fs, inner = pafs.FileSystem.from_uri(path)
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            raise ArtifactError(missing)
        with fs.open_input_stream(inner) as f:
            return json.loads(f.read())
    if not os.path.exists(path):
        raise ArtifactError(missing)
    with open(path) as f:
        return json.load(f)


def layout_from_manifest(manifest: dict) -> FeatureLayout:
    lay = manifest["layout"]
    return FeatureLayout(tuple(lay["fields"]), tuple(lay["buckets"]), tuple(lay["max_len"]))


# ------------------------------------------------------------------------------------------------ model export

def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename: readers never see a partial file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_model(model: torch.nn.Module, method: str, cfg, layout: FeatureLayout, path: str,
                 identity: dict | None = None) -> None:
    """``identity``: ``run_id`` and ``dataset_fingerprint`` of the run (extra keys; ``load_export_blob`` ignores them)."""
    from esmm.config import to_dict
    atomic_save({"format": EXPORT_FORMAT, "method": method, "state_dict": model.state_dict(),
                 "config": to_dict(cfg), "layout": layout.to_dict(), **(identity or {})}, path)


def load_export(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, export dict) from a ``model.pt``; safe to load (``weights_only=True``)."""
    if not os.path.exists(path):
        raise ArtifactError(f"no model export at {path}")
    blob = torch.load(path, map_location=device, weights_only=True)
    return load_export_blob(blob).to(device), blob


def load_export_blob(blob: dict) -> torch.nn.Module:
    """The model (eval mode) of an already loaded export dict."""
    from esmm.config import from_dict
    from esmm.methods import build_model
    if blob.get("format") != EXPORT_FORMAT:
        raise ArtifactError(f"unsupported model export format {blob.get('format')!r} (expected {EXPORT_FORMAT})")
    lay = blob["layout"]
    layout = FeatureLayout(tuple(lay["fields"]), tuple(lay["buckets"]), tuple(lay["max_len"]))
    model = build_model(blob["method"], layout, from_dict(blob["config"]).model)
    model.load_state_dict(blob["state_dict"])
    return model.eval()
