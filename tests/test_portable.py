"""The portable export (esmm/portable.py): TorchScript + contract JSON, loaded by a Python that cannot import esmm."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import schemas as S
from esmm.batch import Batch
from esmm.config import load_config
from esmm.features import FeatureLayout
from esmm.methods import HEAD_SINGLE, METHODS, build_model, predict, scores
from esmm.portable import CONTRACT, OUTPUTS, TORCHSCRIPT, export_portable, export_portable_from
from esmm.artifacts import EXPORT, SUMMARY, export_model, load_export, read_manifest
from esmm.train import train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "test.yaml"
ATOL = 1e-6   # observed: 0 (the scripted module runs the same kernels as the eager network)

# Runs in `python -I` with cwd = tmp_path: no PYTHONPATH, no cwd on sys.path, so only torch and numpy are importable.
# Checks the contract's hashing spec by reimplementing it from the text (generic reference XXH64 over bytes), then
# scores every job's rows and saves the three outputs.
ISOLATED = r'''
import hashlib, json, struct, sys
for pkg in ("esmm", "schemas"):
    try:
        __import__(pkg)
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"{pkg} is importable: the test is not isolated")
import numpy as np, torch
torch.set_num_threads(1)
M = (1 << 64) - 1

def xxh64(data, seed, P1, P2, P3, P4, P5):  # the reference XXH64 for inputs shorter than 32 bytes
    rotl = lambda x, r: ((x << r) | (x >> (64 - r))) & M
    h, i = (seed + P5 + len(data)) & M, 0
    while i + 8 <= len(data):
        h ^= rotl(int.from_bytes(data[i:i + 8], "little") * P2 & M, 31) * P1 & M
        h, i = (rotl(h, 27) * P1 + P4) & M, i + 8
    if i + 4 <= len(data):
        h ^= int.from_bytes(data[i:i + 4], "little") * P1 & M
        h, i = (rotl(h, 23) * P2 + P3) & M, i + 4
    for b in data[i:]:
        h = rotl(h ^ (b * P5 & M), 11) * P1 & M
    h = (h ^ (h >> 33)) * P2 & M
    h = (h ^ (h >> 29)) * P3 & M
    return h ^ (h >> 32)

for job in json.load(open(sys.argv[1])):
    spec = json.load(open(job["dir"] + "/model.portable.json"))
    path = job["dir"] + "/" + spec["files"]["torchscript"]
    data = open(path, "rb").read()
    assert hashlib.sha256(data).hexdigest() == spec["files"]["sha256"] and len(data) == spec["files"]["bytes"]
    hs = spec["hashing"]
    P = [int(hs["primes"][k], 16) for k in ("P1", "P2", "P3", "P4", "P5")]
    assert xxh64(b"", 0, *P) == 0xEF46DB3751D8E999          # the published XXH64 vector of the empty input
    lay = spec["layout"]
    for v in hs["test_vectors"]:
        f = v["field_index"]
        h = xxh64(struct.pack("<q", v["feature_id"]), xxh64(struct.pack("<i", f), hs["seed"], *P), *P)
        h = h - (1 << 64) if h >> 63 else h
        n = lay["buckets"][f] - 1
        bucket = 1 + h % n                                   # Python's % is already the non-negative pmod
        assert (h, bucket, lay["offsets"][f] + bucket) == (v["xxhash64"], v["bucket"], v["id"]), v
        assert int(v["xxhash64_hex"], 16) == h % (1 << 64), v
    extra = {"portable.json": ""}
    module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
    embedded = json.loads(extra["portable.json"])
    assert embedded == {k: v for k, v in spec.items() if k != "files"}
    for rows in job["rows"]:
        ids, wts = np.load(rows["ids"]), np.load(rows["wts"])
        assert ids.shape[1] == lay["num_slots"] == spec["inputs"]["feat_ids"]["shape"][1]
        with torch.inference_mode():
            out = module(torch.from_numpy(ids), torch.from_numpy(wts))
        np.save(rows["out"], torch.stack(out).numpy())
print("ok", len(hs["test_vectors"]))
'''


def score_isolated(tmp_path: Path, jobs: list) -> str:
    """Run ISOLATED on ``jobs`` ([{"dir", "rows": [{"ids", "wts", "out"}]}]) in a Python that cannot import esmm."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(spec)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def save_rows(tmp_path: Path, name: str, ids: np.ndarray, wts: np.ndarray) -> dict:
    rows = {k: str(tmp_path / f"{name}.{k}.npy") for k in ("ids", "wts", "out")}
    np.save(rows["ids"], ids)
    np.save(rows["wts"], wts)
    return rows


def random_rows(layout: FeatureLayout, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows: every slot an id of its field (bucket 0 included), weights in [0, 1) with some padding zeros."""
    rng = np.random.default_rng(seed)
    lo = np.repeat(layout.offsets, layout.max_len)
    hi = lo + np.repeat(layout.buckets, layout.max_len)
    ids = rng.integers(lo, hi, size=(n, layout.num_slots), dtype=np.int64)
    wts = rng.random((n, layout.num_slots), dtype=np.float32) * (rng.random((n, layout.num_slots)) > 0.2)
    return ids, wts.astype(np.float32)


def check_outputs(method: str, got: np.ndarray, want: dict) -> float:
    """``got`` (3, B) from the portable module vs ``predict``'s dict; returns the largest difference."""
    worst = 0.0
    assert got.dtype == np.float32
    for i, name in enumerate(OUTPUTS):
        if name in want:
            ref = want[name].numpy()
            np.testing.assert_allclose(got[i], ref, rtol=0, atol=ATOL, err_msg=f"{method} {name}")
            worst = max(worst, float(np.abs(got[i] - ref).max(initial=0.0)))
        else:
            assert np.isnan(got[i]).all(), f"{method} {name} should be NaN"
    return worst


def spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights far from the init (whose outputs are all ~0.5), so a wrong slot or field order shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_every_method_scores_like_predict_without_the_package(tmp_path):
    cfg = load_config(CONF)
    layout = FeatureLayout.from_config(cfg.features)
    jobs, models, seconds = [], {}, {}
    for k, method in enumerate(METHODS):
        model = build_model(method, layout, cfg.model).train()  # as the training loop leaves it
        spread_weights(model, k)
        start = time.perf_counter()
        spec = export_portable(model, method, cfg, layout, str(tmp_path / method), {"run_id": f"run-{method}"})
        seconds[method] = time.perf_counter() - start
        assert model.training                                    # the trained model itself is left as it was
        assert spec["method"] == method and spec["run_id"] == f"run-{method}"
        assert spec["layout"]["num_slots"] == layout.num_slots and spec["layout"]["offsets"] == list(layout.offsets)
        assert [p["slot_start"] for p in spec["layout"]["per_field"]] == list(layout.slot_starts)
        rows = []
        for n in (0, 1, 37, 300):
            ids, wts = random_rows(layout, n, seed=100 * k + n)
            if n == 37:
                ids = ids.astype(np.int32)                       # the dataset's own dtype is accepted too
            rows.append(save_rows(tmp_path, f"{method}-{n}", ids, wts))
        jobs.append({"dir": str(tmp_path / method), "rows": rows})
        models[method] = model.eval()
    assert score_isolated(tmp_path, jobs).startswith("ok")
    worst = 0.0
    for method, job in zip(METHODS, jobs):
        for rows in job["rows"]:
            got = np.load(rows["out"])
            ids, wts = np.load(rows["ids"]), np.load(rows["wts"])
            assert got.shape == (3, len(ids))
            want = predict(method, models[method], Batch.from_numpy(ids, wts, np.zeros(len(ids)), np.zeros(len(ids))))
            if METHODS[method].head != HEAD_SINGLE:  # a multi-task network's three scores, as evaluation combines them
                want = dict(zip(OUTPUTS, scores(method, want, None)[:3]))
            worst = max(worst, check_outputs(method, got, want))
    print(f"max |portable - predict| = {worst:.3g}; export seconds: "
          + ", ".join(f"{m} {s:.3f}" for m, s in seconds.items()))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_wrong_shapes_are_refused(tmp_path):
    cfg = load_config(CONF)
    layout = FeatureLayout.from_config(cfg.features)
    export_portable(build_model("base", layout, cfg.model), "base", cfg, layout, str(tmp_path))
    module = torch.jit.load(str(tmp_path / TORCHSCRIPT))
    L = layout.num_slots
    with pytest.raises(Exception, match=f"shape \\(B, {L}\\)"):
        module(torch.zeros(2, L - 1, dtype=torch.long), torch.ones(2, L - 1))
    with pytest.raises(Exception, match="feat_wts must have the shape"):
        module(torch.zeros(2, L, dtype=torch.long), torch.ones(3, L))


def test_training_writes_the_portable_export(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    run = tmp_path / "run"
    cfg = load_config(CONF, ["train.method=esmm_ns"])
    summary = train(cfg, ds, str(run))
    spec = json.loads((run / CONTRACT).read_text())
    lay = read_manifest(ds)["layout"]
    assert spec["run_id"] == summary["run_id"] == json.loads((run / SUMMARY).read_text())["run_id"]
    assert spec["dataset_fingerprint"] == summary["dataset_fingerprint"] and spec["method"] == "esmm_ns"
    assert all(spec["layout"][k] == lay[k] for k in ("fields", "buckets", "max_len"))
    assert not [p for p in os.listdir(run) if ".tmp-" in p]
    # an existing run's export gives the same contract
    again = export_portable_from(str(run / EXPORT), str(tmp_path / "again"))
    assert {k: v for k, v in again.items() if k != "files"} == {k: v for k, v in spec.items() if k != "files"}
    # real rows of the test split, as the dataset stores them (int32 ids)
    table = pq.read_table(os.path.join(ds, S.TEST), columns=[S.FEAT_IDS, S.FEAT_WTS]).slice(0, 500)
    ids = np.stack(table.column(S.FEAT_IDS).to_numpy(zero_copy_only=False)).astype(np.int32)
    wts = np.stack(table.column(S.FEAT_WTS).to_numpy(zero_copy_only=False)).astype(np.float32)
    rows = save_rows(tmp_path, "test-split", ids, wts)
    score_isolated(tmp_path, [{"dir": str(run), "rows": [rows]}])
    model, _ = load_export(str(run / EXPORT))
    want = predict("esmm_ns", model, Batch.from_numpy(ids, wts, np.zeros(len(ids)), np.zeros(len(ids))))
    check_outputs("esmm_ns", np.load(rows["out"]), want)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")  # exporter
@pytest.mark.parametrize("method", ["esmm_ns", "base", "division"])
def test_optional_onnx_export_scores_like_predict(tmp_path, method):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from esmm.portable import export_onnx
    cfg = load_config(CONF)
    layout = FeatureLayout.from_config(cfg.features)
    model = build_model(method, layout, cfg.model)
    spread_weights(model, 7)
    export_model(model, method, cfg, layout, str(tmp_path / EXPORT), {"run_id": "r"})
    path = export_onnx(str(tmp_path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["esmm.portable"])["method"] == method
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    for n in (1, 7, 300):
        ids, wts = random_rows(layout, n, seed=n)
        got = np.stack(session.run(None, {"feat_ids": ids, "feat_wts": wts}))
        want = predict(method, model.eval(), Batch.from_numpy(ids, wts, np.zeros(n), np.zeros(n)))
        check_outputs(method, got, want)
