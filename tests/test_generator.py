"""The synthetic Ali-CCP generator: format (parsed by hand), grouping/ids, ground truth, rates, determinism,
idempotent output, and that the selection bias is real."""
import dataclasses
import glob
import json
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from esmm import generator as G
from schemas import raw as R
from schemas.dataset import GROUND_TRUTH_SCHEMA

FILES = [R.SKELETON_FILE.format(split=s) for s in R.RAW_SPLITS] + [R.COMMON_FILE.format(split=s) for s in R.RAW_SPLITS]
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@pytest.fixture(scope="module")
def gen(spark, cfg, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gen") / "raw")
    summary = G.generate(spark, cfg, out)
    return out, summary


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _lines(out, name):
    return _read(os.path.join(out, name)).decode("ascii").split("\n")[:-1]


def _entries(feature_list):
    """Plain-Python parse of a feature_list: [(field, feature_id, value_text)]."""
    out = []
    for e in feature_list.split(R.ENTRY_SEP):
        field, rest = e.split(R.ID_SEP)
        fid, val = rest.split(R.VALUE_SEP)
        out.append((field, int(fid), val))
    return out


def _truth(out):
    return pq.read_table(os.path.join(out, G.GROUND_TRUTH_DIR)).sort_by("sample_id")


def test_files_layout_and_marker(gen, cfg):
    out, summary = gen
    for name in FILES:
        data = _read(os.path.join(out, name))
        assert data and data.endswith(b"\n") and b"\r" not in data
    marker = json.load(open(os.path.join(out, G.MARKER)))
    from esmm.config import to_dict
    assert marker["generate"] == to_dict(cfg.generate)
    assert marker["impressions"] == cfg.generate.impressions == summary["impressions"]
    assert set(marker["splits"]) == set(R.RAW_SPLITS)
    assert not glob.glob(out + ".tmp-*")                                      # staging renamed away
    assert summary["mean_common_entries"] > 9 + 2 * cfg.generate.history_len   # histories dominate common lines


def test_lines_parse_by_hand(gen, cfg):
    out, _ = gen
    bases = G.field_bases(cfg.generate)
    skel = _lines(out, "sample_skeleton_train.csv")
    common = _lines(out, "common_features_train.csv")
    # one skeleton line and one common line, parsed by hand
    cols = skel[0].split(",")
    assert len(cols) == 6
    sid, click, conv, key, num, fl = cols
    assert int(sid) == 1 and click in "01" and conv in "01" and HEX16.match(key)
    assert int(num) == len(fl.split("\x01"))
    cols = common[0].split(",")
    assert len(cols) == 3 and cols[0] == key and int(cols[1]) == len(cols[2].split("\x01"))
    # every line of the split
    hist = {}
    for line in common:
        k, num, fl = line.split(",")
        assert HEX16.match(k)
        ent = _entries(fl)
        assert int(num) == len(ent)
        fields = [f for f, _, _ in ent]
        assert set(fields) <= set(R.COMMON_FIELDS)
        for f in R.USER_FIELDS:
            assert fields.count(f) == 1
        for f, fid, v in ent:
            assert 0 <= fid - bases[f] < G.field_cardinalities(cfg.generate)[f]
            if f in R.HISTORY_FIELDS:
                assert re.fullmatch(r"[1-9][0-9]*\.0", v)          # counts
            else:
                assert v == "1.0"
        hist[k] = {(f, fid - bases[f]): float(v) for f, fid, v in ent if f in R.HISTORY_FIELDS}
    n_combo = 0
    for line in skel:
        sid, click, conv, k, num, fl = line.split(",")
        ent = _entries(fl)
        assert int(num) == len(ent)
        assert (click, conv) in {("0", "0"), ("1", "0"), ("1", "1")}
        fields = [f for f, _, _ in ent]
        assert set(fields) <= set(R.SKELETON_FIELDS)
        for f in ("205", "206", "207", "216", "301"):
            assert fields.count(f) == 1
        assert 1 <= fields.count("210") <= 3
        local = {}
        for f, fid, v in ent:
            assert 0 <= fid - bases[f] < G.field_cardinalities(cfg.generate)[f]
            local.setdefault(f, []).append((fid - bases[f], v))
        # combination fields: present exactly when the item attribute is in the history, value = history count
        for combo, (hf, itf) in R.COMBINATIONS.items():
            expect = sorted((a, hist[k][(hf, a)]) for a, _ in local[itf] if (hf, a) in hist[k])
            got = sorted((a, float(v)) for a, v in local.get(combo, []))
            assert got == expect
            n_combo += len(got)
        assert all(v == "1.0" for f in R.ITEM_FIELDS + R.CONTEXT_FIELDS for _, v in local[f])
    assert n_combo > len(skel)  # combinations are common, not a corner case


def test_grouping_ids_and_splits(gen, cfg):
    out, summary = gen
    sids, keys_seen, split_keys = [], set(), {}
    for split in R.RAW_SPLITS:
        common_keys = [line.split(",", 1)[0] for line in _lines(out, R.COMMON_FILE.format(split=split))]
        assert len(set(common_keys)) == len(common_keys)        # one common line per key
        skel_keys, prev = [], None
        for line in _lines(out, R.SKELETON_FILE.format(split=split)):
            sid, _, _, k, _ = line.split(",", 4)
            sids.append(int(sid))
            if k != prev:                                       # grouped: a key's lines are consecutive
                assert k not in keys_seen
                keys_seen.add(k)
                skel_keys.append(k)
                prev = k
        assert skel_keys == common_keys                         # same keys, same (time) order, same split
        split_keys[split] = skel_keys
        assert summary["splits"][split]["keys"] == len(common_keys)
    assert sids == list(range(1, len(sids) + 1))                # contiguous and increasing, train then test
    assert abs(len(split_keys["train"]) - len(split_keys["test"])) <= 1
    n = len(sids) / len(keys_seen)
    assert 0.8 * cfg.generate.impressions_per_key < n < 1.2 * cfg.generate.impressions_per_key


def test_ground_truth_matches_skeleton(gen, cfg):
    out, summary = gen
    t = _truth(out)
    assert [(f.name, str(f.type)) for f in t.schema] == \
        [(f.name, {"LongType()": "int64", "FloatType()": "float", "IntegerType()": "int32"}[repr(f.dataType)])
         for f in GROUND_TRUTH_SCHEMA.fields]
    gt = {c: t.column(c).to_numpy() for c in t.column_names}
    rows = [line.split(",", 3)[:3] for s in R.RAW_SPLITS for line in _lines(out, R.SKELETON_FILE.format(split=s))]
    skel = np.array(rows, dtype=np.int64)
    assert len(gt["sample_id"]) == len(skel) == cfg.generate.impressions
    assert (gt["sample_id"] == skel[:, 0]).all()
    assert (gt["click"] == skel[:, 1]).all() and (gt["conversion"] == skel[:, 2]).all()
    assert (gt["conversion"] == (gt["click"] & gt["would_convert"])).all()
    assert ((gt["true_ctr"] > 0) & (gt["true_ctr"] < 1) & (gt["true_cvr"] > 0) & (gt["true_cvr"] < 1)).all()
    assert summary["clicks"] == gt["click"].sum() and summary["conversions"] == gt["conversion"].sum()
    # rates near the targets (6000 impressions: loose tolerances)
    g = cfg.generate
    assert abs(gt["true_ctr"].mean() - g.ctr) < 0.02
    assert abs(gt["click"].mean() - g.ctr) < 0.03
    post_click = (gt["true_ctr"] * gt["true_cvr"]).sum() / gt["true_ctr"].sum()
    assert abs(post_click - g.cvr) < 0.03
    assert abs(gt["conversion"].sum() / gt["click"].sum() - g.cvr) < 0.06


def test_determinism_directory_form_idempotence(gen, spark, cfg, tmp_path):
    out, _ = gen
    again = str(tmp_path / "again")
    G.generate(spark, cfg, again)
    for name in FILES:
        assert _read(os.path.join(out, name)) == _read(os.path.join(again, name)), name
    assert _truth(out).equals(_truth(again))
    # re-run on the same config: kept; other config: refused unless overwrite
    assert G.generate(spark, cfg, again)["skipped"]
    other = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, seed=cfg.generate.seed + 1,
                                                                  single_files=False))
    with pytest.raises(G.GeneratorError, match="built from other inputs .what differs: generate"):
        G.generate(spark, other, again)
    s = G.generate(spark, other, again, overwrite=True)
    assert not s["skipped"] and s["files"][FILES[0]] == "directory"
    # Spark directory form: the part files, in order, are the lines; a different seed gives different data
    for name in FILES:
        parts = sorted(glob.glob(os.path.join(again, name, "part-*")))
        assert parts
        data = b"".join(_read(p) for p in parts)
        assert data != _read(os.path.join(out, name))
        first = data.split(b"\n", 1)[0].decode()
        assert len(first.split(",")) == (6 if name.startswith("sample") else 3)


def test_refuses_foreign_directory_even_with_overwrite(spark, cfg, tmp_path):
    from esmm.outputs import OutputError
    foreign = tmp_path / "x"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not ours")
    for overwrite in (False, True):
        with pytest.raises(OutputError, match=r"x exists and was not created by esmm-spark"):
            G.generate(spark, cfg, str(foreign), overwrite=overwrite)
    assert (foreign / "precious.txt").read_text() == "not ours"
    assert not list(tmp_path.glob("x.tmp-*")) and not (tmp_path / "x.lock").exists()


def test_job_entry_point_reuses_output(gen, spark):
    from jobs.generate import main
    out, _ = gen
    s = main(["--conf", "conf/test.yaml", "--out", out])
    assert s["skipped"] and s["impressions"] > 0


def test_plan_keys_and_blocks(cfg):
    g = dataclasses.replace(cfg.generate, impressions=100_003, impressions_per_key=7.0, partitions=5)
    plan = G.make_plan(g)
    assert sum(plan.impressions.values()) == 100_003
    sid = 1
    for b in plan.blocks:
        assert b.sid0 == sid and b.key1 > b.key0 and b.key1 - b.key0 <= G.MAX_KEYS_PER_BLOCK
        sid += b.impressions
    assert plan.blocks_of("train")[-1].key1 == plan.blocks_of("test")[0].key0 == plan.keys["train"]
    keys = G.common_key_hex(np.arange(200_000), 5)
    assert len(set(keys.tolist())) == 200_000 and all(HEX16.match(k.decode()) for k in keys[:100])
    assert (G.common_key_hex(np.arange(10), 6) != G.common_key_hex(np.arange(10), 5)).all()


def _simulate(g, blocks=6):
    world = G.build_world(g)
    ic = G.calibrate(g, world)
    sims = [G.simulate_block(g, world, 0, 256, 256 * 30, (9, b), "truth", ic) for b in range(blocks)]
    cat = {k: np.concatenate([s[k] for s in sims]) for k in ("pctr", "pcvr", "click", "would", "item")}
    cat["quality"] = world.item_quality[cat["item"]]
    return cat


def test_selection_bias_is_real_and_knob_controls_it(cfg):
    base = dataclasses.replace(cfg.generate, ctr=0.04, cvr=0.01, users=3000, items=20_000, categories=300,
                               shops=2000, brands=1000, intentions=500, history_len=20)
    ratio, auc = {}, {}
    for lam in (0.0, 1.0):
        s = _simulate(dataclasses.replace(base, selection_bias=lam))
        # expected pCVR over clicked impressions vs over all impressions (no Bernoulli noise: weights = pCTR)
        ratio[lam] = (s["pctr"] * s["pcvr"]).sum() / s["pctr"].sum() / s["pcvr"].mean()
        auc[lam] = (roc_auc_score(s["click"], s["pctr"]), roc_auc_score(s["would"], s["pcvr"]))
        if lam == 1.0:  # attractive-but-poor: clicked impressions show lower item quality
            assert s["quality"][s["click"]].mean() < s["quality"].mean() - 0.2
        assert abs(s["pctr"].mean() - 0.04) < 0.01
    assert abs(ratio[1.0] - 1) > 0.1, ratio
    assert abs(ratio[0.0] - 1) < 0.05, ratio
    assert abs(ratio[1.0] - 1) > 3 * abs(ratio[0.0] - 1), ratio
    for a in auc.values():  # oracle AUCs: room for methods to differ
        assert 0.6 < a[0] < 0.95 and 0.6 < a[1] < 0.95, auc


def _logit(p):
    return np.log(p) - np.log1p(-p)


def test_shared_affinity_knob_default_is_the_old_coupling_and_it_couples_the_logits(cfg):
    base = dataclasses.replace(cfg.generate, ctr=0.04, cvr=0.01, users=3000, items=20_000, categories=300,
                               shops=2000, brands=1000, intentions=500, history_len=20, selection_bias=1.0)
    default = _simulate(base, blocks=3)
    explicit = _simulate(dataclasses.replace(base, shared_affinity=0.2), blocks=3)  # 0.2 x lambda, spelled out
    np.testing.assert_array_equal(default["pcvr"], explicit["pcvr"])
    np.testing.assert_array_equal(default["click"], explicit["click"])
    assert G.shared_affinity(base) == pytest.approx(0.2)
    assert G.shared_affinity(dataclasses.replace(base, selection_bias=2.0)) == pytest.approx(0.4)
    # only the conversion side moves; a strong shared affinity ties logit pCVR to logit pCTR
    corr = {}
    for w in (0.0, 1.5):
        s = _simulate(dataclasses.replace(base, selection_bias=0.0, shared_affinity=w), blocks=3)
        np.testing.assert_array_equal(s["pctr"], _simulate(dataclasses.replace(base, selection_bias=0.0), 3)["pctr"])
        corr[w] = np.corrcoef(_logit(s["pctr"]), _logit(s["pcvr"]))[0, 1]
    assert abs(corr[0.0]) < 0.1 and corr[1.5] > corr[0.0] + 0.25, corr
