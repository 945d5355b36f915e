"""The files one stage writes and later stages read, in one place: the dataset manifest (ETL -> training, scoring,
prediction, experiments), the model export (training -> scoring, prediction, portable export) and the small JSON
records (training summaries, unit metrics, reports).

- Manifest: ``<dataset>/manifest.json``, written by the ETL (``esmm.etl``) into its staging directory. Read here
  from a local path or any URL pyarrow opens (``hdfs://``, ``s3://``, ``file://``), or through a Spark session's
  Hadoop filesystem (``spark=``, for paths only the JVM can reach, as the ETL's own up-to-date check does).
- Model export: ``<run>/model.pt``, ``{"format", "method", "state_dict", "config", "layout", "run_id",
  "dataset_fingerprint"}``, saved atomically (temporary file, fsync, rename) and loaded with ``weights_only=True``.
  The network is rebuilt from the method's registry entry (``esmm.methods``) and the stored model config.
- JSON records: ``esmm.storage.write_json`` (re-exported here as ``write_json``), the only JSON writer.
"""
from __future__ import annotations

import torch

from esmm import storage
from esmm.features import FeatureLayout
from esmm.outputs import find_committed
from schemas.dataset import MANIFEST

write_json = storage.write_json  # the one JSON writer (esmm.storage), under its name here

EXPORT = "model.pt"             # a training run's model export
SUMMARY = "train_summary.json"  # a training run's summary (the export and the summary mark it finished)
EXPORT_FORMAT = 1


class ArtifactError(RuntimeError):
    """A stage's input artifact is missing or unreadable (run the upstream job first); exit code 1."""


# ------------------------------------------------------------------------------------------------ manifest

def read_manifest(dataset: str, spark=None) -> dict:
    """The ETL manifest of the committed dataset ``dataset`` (any path or URL ``esmm.storage`` reaches). Its
    ``run_id`` is the dataset's committed run id, which readers pin (``esmm.outputs.check_pinned``)."""
    where = find_committed(dataset)
    if where is None:
        path = storage.join(dataset, MANIFEST)
        if not storage.exists(path):
            raise ArtifactError(f"no dataset manifest at {storage.display(path)}: run jobs/etl.py first")
        raise ArtifactError(f"the dataset {storage.display(dataset)} is not committed (an ETL is writing it, was "
                            f"interrupted, or an older version built it): run jobs/etl.py (--overwrite) first")
    return storage.read_json(storage.join(where, MANIFEST))


def layout_from_manifest(manifest: dict) -> FeatureLayout:
    lay = manifest["layout"]
    return FeatureLayout(tuple(lay["fields"]), tuple(lay["buckets"]), tuple(lay["max_len"]))


# ------------------------------------------------------------------------------------------------ model export

atomic_save = storage.save_torch  # torch.save, atomic on local files (esmm.storage)


def export_model(model: torch.nn.Module, method: str, cfg, layout: FeatureLayout, path: str,
                 identity: dict | None = None) -> None:
    """``identity``: ``run_id`` and ``dataset_fingerprint`` of the run (extra keys; ``load_export_blob`` ignores them)."""
    from esmm.config import to_dict
    atomic_save({"format": EXPORT_FORMAT, "method": method, "state_dict": model.state_dict(),
                 "config": to_dict(cfg), "layout": layout.to_dict(), **(identity or {})}, path)


def load_export(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, export dict) from a ``model.pt``; safe to load (``weights_only=True``)."""
    if not storage.isfile(path):
        raise ArtifactError(f"no model export at {storage.display(path)}")
    blob = storage.load_torch(path, map_location=device)
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
