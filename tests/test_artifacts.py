"""esmm/artifacts.py: one reader of the dataset manifest (local, URL, Spark's filesystem), the model export's round
trip, and clear errors for missing inputs."""
import os

import pytest
import torch

from esmm.artifacts import (EXPORT, ArtifactError, export_model, layout_from_manifest, load_export, load_export_blob,
                            read_manifest)
from esmm.config import load_config
from esmm.methods import METHODS, build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_manifest_reader_for_every_path_kind(spark, tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    local = read_manifest(ds)
    assert read_manifest(f"file://{ds}") == local == read_manifest(ds, spark)
    assert layout_from_manifest(local).num_slots == local["layout"]["num_slots"]
    for how in ({}, {"spark": spark}):
        with pytest.raises(ArtifactError, match=r"no dataset manifest at .*nothing/manifest.json: run jobs/etl.py"):
            read_manifest(str(tmp_path / "nothing"), **how)


@pytest.mark.parametrize("method", METHODS)
def test_export_round_trip_rebuilds_every_method(tiny_dataset, tmp_path, method):
    _, ds = tiny_dataset
    cfg = load_config(os.path.join(ROOT, "conf", "test.yaml"), [f"train.method={method}"])
    layout = layout_from_manifest(read_manifest(ds))
    model = build_model(method, layout, cfg.model)
    path = str(tmp_path / EXPORT)
    export_model(model, method, cfg, layout, path, {"run_id": "r1"})
    loaded, blob = load_export(path)
    assert blob["method"] == method and blob["run_id"] == "r1" and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    blob["format"] = 99
    with pytest.raises(ArtifactError, match="unsupported model export format 99"):
        load_export_blob(blob)
    with pytest.raises(ArtifactError, match="no model export at"):
        load_export(str(tmp_path / "missing.pt"))
