"""jobs/predict.py: any split or a raw log scored in Spark equals the package's in-process scores; raw lines are
quarantined the ETL's way (read = scored + quarantined); outputs are atomic, idempotent, and refuse what they must."""
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import schemas as S
from esmm.batch import Batch
from esmm.config import load_config
from esmm.etl import QuarantineGateError
from esmm.methods import predict as predict_batch
from esmm.outputs import COMMIT, MARKER, STAGING, SUCCESS, OutputError
from esmm.predict import PREDICTIONS, SUMMARY, PredictError, PredictOutputRefused, predict
from esmm.artifacts import EXPORT, load_export
from esmm.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf", "test.yaml")


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    _, ds = tiny_dataset
    root = tmp_path_factory.mktemp("predict-runs")
    for m in ("ctr", "base", "esmm"):
        train(load_config(CONF, [f"train.method={m}"]), ds, str(root / m))
    return root


def _rows(ds, splits):
    t = pa.concat_tables([pq.read_table(os.path.join(ds, s)).select(
        [S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS]) for s in splits])
    t = t.sort_by(S.SAMPLE_ID)
    return t[S.SAMPLE_ID].to_numpy(), Batch.from_numpy(
        np.stack(t[S.FEAT_IDS].to_numpy(zero_copy_only=False)), np.stack(t[S.FEAT_WTS].to_numpy(zero_copy_only=False)),
        t[S.CLICK].to_numpy(), t[S.CONVERSION].to_numpy())


def _read(out):
    return pq.read_table(os.path.join(out, PREDICTIONS)).to_pandas().sort_values(S.SAMPLE_ID)


def test_dataset_split_scores_equal_the_package_and_rerun_is_idempotent(spark, tiny_dataset, runs, tmp_path):
    _, ds = tiny_dataset
    cfg = load_config(CONF)
    out = str(tmp_path / "p")
    summary = predict(spark, cfg, str(runs / "esmm"), out, dataset=ds, split="test")
    got = _read(out)
    assert list(got.columns) == [S.SAMPLE_ID, "split", S.P_CTR, S.P_CVR, S.P_CTCVR] and set(got["split"]) == {"test"}
    sid, batch = _rows(ds, [S.TEST])
    assert got[S.SAMPLE_ID].tolist() == sid.tolist() and summary["rows"]["scored"] == len(sid)
    want = predict_batch("esmm", load_export(str(runs / "esmm" / EXPORT))[0], batch)
    for col in (S.P_CTR, S.P_CVR):  # float32 in both; the Spark path scores other batch boundaries
        np.testing.assert_allclose(got[col], want[col].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[S.P_CTCVR], got[S.P_CTR] * got[S.P_CVR], rtol=1e-6)
    assert sorted(os.listdir(out)) == sorted([MARKER, SUCCESS, COMMIT, STAGING, PREDICTIONS, SUMMARY])
    assert json.load(open(os.path.join(out, SUMMARY)))["model"]["method"] == "esmm"

    # the same model and inputs: kept as is; other inputs: refused, then replaced with overwrite
    stamp = os.stat(os.path.join(out, SUCCESS)).st_mtime_ns
    assert predict(spark, cfg, str(runs / "esmm"), out, dataset=ds, split="test") == summary
    assert os.stat(os.path.join(out, SUCCESS)).st_mtime_ns == stamp
    with pytest.raises(PredictOutputRefused, match="built from other inputs"):
        predict(spark, cfg, str(runs / "esmm"), out, dataset=ds, split="train")
    predict(spark, cfg, str(runs / "esmm"), out, dataset=ds, split="train", rate=0.5, overwrite=True)
    manifest = json.load(open(os.path.join(ds, S.MANIFEST)))
    assert len(_read(out)) == manifest["splits"][S.TRAIN]["subsets"]["0.5"]["rows"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]


def test_single_task_methods_take_the_reference_ctr(spark, tiny_dataset, runs, tmp_path):
    _, ds = tiny_dataset
    cfg = load_config(CONF)
    with pytest.raises(PredictError, match="reference CTR network"):
        predict(spark, cfg, str(runs / "base"), str(tmp_path / "x"), dataset=ds)
    with pytest.raises(PredictError, match="must be a reference CTR network's run"):
        predict(spark, cfg, str(runs / "base"), str(tmp_path / "x"), ctr=str(runs / "esmm"), dataset=ds)
    assert not os.path.exists(tmp_path / "x")
    out = str(tmp_path / "base")
    predict(spark, cfg, str(runs / "base"), out, ctr=str(runs / "ctr"), dataset=ds)
    got = _read(out)
    _, batch = _rows(ds, [S.TEST])
    p_ctr = predict_batch("ctr", load_export(str(runs / "ctr" / EXPORT))[0], batch)[S.P_CTR].numpy()
    p_cvr = predict_batch("base", load_export(str(runs / "base" / EXPORT))[0], batch)[S.P_CVR].numpy()
    np.testing.assert_allclose(got[S.P_CTR], p_ctr, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[S.P_CVR], p_cvr, rtol=1e-5, atol=1e-7)


def test_raw_log_is_parsed_like_the_etl_and_bad_lines_are_quarantined(spark, tiny_dataset, runs, tmp_path):
    raw, ds = tiny_dataset
    cfg = load_config(CONF)
    out = str(tmp_path / "raw")
    summary = predict(spark, cfg, str(runs / "esmm"), out, raw=raw)
    from_raw = _read(out)
    predict(spark, cfg, str(runs / "esmm"), str(tmp_path / "all"), dataset=ds, split="all")
    from_dataset = _read(str(tmp_path / "all"))
    # the raw log is the dataset's source: the same rows, the same encoding, the same scores
    assert from_raw[S.SAMPLE_ID].tolist() == from_dataset[S.SAMPLE_ID].tolist()
    assert set(from_raw["split"]) <= {"train", "test"} and set(from_dataset["split"]) == {"train", "test"}
    np.testing.assert_allclose(from_raw[[S.P_CTR, S.P_CVR]], from_dataset[[S.P_CTR, S.P_CVR]], rtol=1e-6)
    r = summary["rows"]
    assert r["skeleton_read"] == r["scored"] + r["skeleton_quarantined"] and r["skeleton_quarantined"] == 0

    # a dirty copy: one line with a bad click, one truncated line -> quarantined with reasons, nothing lost
    dirty = tmp_path / "dirty"
    shutil.copytree(raw, dirty)
    skel = dirty / S.SKELETON_FILE.format(split="test")
    target = skel / "part-zz-dirty.csv" if skel.is_dir() else skel
    good = next(line for line in open(next(p for p in (sorted(skel.iterdir()) if skel.is_dir() else [skel])
                                            if p.is_file() and not p.name.startswith(("_", "."))), "rb"))
    fields = good.rstrip(b"\n").split(b",")
    bad = [b",".join([b"999999901", b"x"] + fields[2:]), b"999999902,0,0"]
    with open(target, "ab") as f:
        f.write(b"\n".join(bad) + b"\n")
    out2 = str(tmp_path / "dirty-out")
    s2 = predict(spark, cfg, str(runs / "esmm"), out2, raw=str(dirty))
    r2 = s2["rows"]
    assert r2["skeleton_read"] == r["skeleton_read"] + 2 and r2["skeleton_quarantined"] == 2
    assert r2["scored"] == r["scored"]
    q = pq.read_table(os.path.join(out2, S.QUARANTINE)).to_pandas()
    assert len(q) == 2 and q[S.Q_LINE].str.startswith("99999990").all() and q[S.Q_REASON].str.len().min() > 5
    # the data-quality gate: nothing committed
    strict = load_config(CONF, ["etl.max_quarantine_share=0.0001"])
    with pytest.raises(QuarantineGateError, match="quarantined"):
        predict(spark, strict, str(runs / "esmm"), str(tmp_path / "gated"), raw=str(dirty))
    assert not os.path.exists(tmp_path / "gated")


def test_layout_mismatch_and_foreign_outputs_are_refused(spark, tiny_dataset, runs, tmp_path):
    _, ds = tiny_dataset
    cfg = load_config(CONF)
    blob = torch.load(str(runs / "esmm" / EXPORT), weights_only=True)
    blob["layout"]["buckets"] = [b * 2 for b in blob["layout"]["buckets"]]
    other = tmp_path / "other"
    other.mkdir()
    torch.save(blob, str(other / EXPORT))
    with pytest.raises(PredictError, match=r"trained on another feature layout than the dataset .* buckets"):
        predict(spark, cfg, str(other), str(tmp_path / "p"), dataset=ds)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    with pytest.raises(OutputError, match="mine exists and was not created by esmm-spark"):
        predict(spark, cfg, str(runs / "esmm"), str(foreign), dataset=ds, overwrite=True)
    assert (foreign / "data.csv").read_text() == "1,2"
    with pytest.raises(PredictError, match="no model export"):
        predict(spark, cfg, str(tmp_path / "nothing"), str(tmp_path / "p"), dataset=ds)
