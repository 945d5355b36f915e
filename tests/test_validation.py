"""The validation split, early stopping, the best model, TensorBoard events and the experiment's variant selection,
on the tiny generated dataset with real Petastorm readers, Horovod processes and Spark (no mocks)."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import schemas as S
from esmm.config import ConfigError, load_config
from esmm.data import _chunks, steps_per_epoch, subset_rows, tier_for_rate, train_stream
from esmm.artifacts import EXPORT, SUMMARY, load_export, read_manifest
from esmm.train import TENSORBOARD, choice_start, list_checkpoints, lr_at, train
from esmm.validation import Tracker, exact_auc, find_split, scores, train_rows

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "test.yaml"


def _cfg(**sets):
    return load_config(CONF, [f"{k}={v}" for k, v in sets.items()])


def _ids_and_tiers(ds: str):
    t = pads.dataset(f"{ds}/train", format="parquet", partitioning="hive").to_table(
        columns=[S.SAMPLE_ID, S.SAMPLE_TIER])
    return t[S.SAMPLE_ID].to_numpy(), t[S.SAMPLE_TIER].to_numpy()


def _params(path):
    model, _ = load_export(str(path))
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ the split

def test_the_cut_is_the_latest_share_of_the_train_split(tiny_dataset):
    _, ds = tiny_dataset
    m = read_manifest(ds)
    ids, tiers = _ids_and_tiers(ds)
    split = find_split(f"{ds}/train", m, 0.1)
    val = ids >= split["cut_sample_id"]
    assert val.sum() == split["rows"] == round(len(ids) * 0.1)          # the share, exactly
    assert ids[val].min() > ids[~val].max()                             # time-ordered: every validation row is later
    assert split["rows_by_tier"] == np.bincount(tiers[val], minlength=len(m["sampling_rates"])).tolist()
    for rate in m["sampling_rates"]:
        t = tier_for_rate(m, rate)
        assert train_rows(m, split, rate) == int(((tiers <= t) & ~val).sum())
    assert find_split(f"{ds}/train", m, 0.0) is None


@pytest.mark.parametrize("buckets,exact,stats", [(1 << 16, 1 << 20, True), (8, 5, True), (4, 1, False)])
def test_the_cut_in_fixed_memory_equals_a_full_sort(tmp_path, monkeypatch, buckets, exact, stats):
    """The histogram search against np.sort on ids with gaps, ties across tiers' boundaries and a dense tail; tiny
    HIST_BUCKETS/EXACT_ROWS force the narrowing passes, and files without statistics the range scan."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import esmm.validation as V
    monkeypatch.setattr(V, "HIST_BUCKETS", buckets)
    monkeypatch.setattr(V, "EXACT_ROWS", exact)
    monkeypatch.setattr(V, "SCAN_ROWS", 97)
    rng = np.random.default_rng(4)
    ids = np.unique(np.concatenate([rng.integers(0, 10**9, 3000), np.arange(10**9, 10**9 + 500)]))
    rng.shuffle(ids)
    tier = rng.integers(0, 3, len(ids))
    click = rng.integers(0, 2, len(ids))
    conv = click * rng.integers(0, 2, len(ids))
    for t in range(3):
        sel = tier == t
        d = tmp_path / "train" / f"{S.SAMPLE_TIER}={t}"
        d.mkdir(parents=True)
        pq.write_table(pa.table({S.SAMPLE_ID: ids[sel], S.CLICK: click[sel].astype(np.int32),
                                 S.CONVERSION: conv[sel].astype(np.int32)}), d / "part-0.parquet",
                       row_group_size=400, write_statistics=stats)
    manifest = {"splits": {S.TRAIN: {"rows": len(ids)}}, "sampling_rates": [0.1, 0.5, 1.0]}
    for share in (0.001, 0.1, 0.37):
        V._cache.clear()
        split = find_split(str(tmp_path / "train"), manifest, share)
        k = round(len(ids) * share)
        cut = np.sort(ids)[len(ids) - k]
        val = ids >= cut
        assert split["cut_sample_id"] == cut and split["rows"] == k
        assert split["rows_by_tier"] == np.bincount(tier[val], minlength=3).tolist()
        assert split["clicks"] == click[val].sum() and split["conversions"] == conv[val].sum()


@pytest.mark.parametrize("rate", [0.1, 1.0])
def test_validation_rows_never_reach_a_training_batch(tiny_dataset, rate):
    _, ds = tiny_dataset
    m = read_manifest(ds)
    cut = find_split(f"{ds}/train", m, 0.1)["cut_sample_id"]
    ids, tiers = _ids_and_tiers(ds)
    want = set(ids[(tiers <= tier_for_rate(m, rate)) & (ids < cut)].tolist())
    seen = []
    for rank in range(2):                                               # one pass of each rank's shard: exactly the
        seen += [c[S.SAMPLE_ID] for c in _chunks(f"{ds}/train", tier_for_rate(m, rate), rank, 2, seed=5,  # rows
                                                 workers=1, num_epochs=1, cut=cut)]                       # before it
    seen = np.concatenate(seen)
    assert len(seen) == len(want) and set(seen.tolist()) == want
    split = find_split(f"{ds}/train", m, 0.1)
    for rank in range(2):                                               # the endless stream, past one epoch
        stream = train_stream(f"{ds}/train", m, rate, rank, 2, 64, 100, seed=3, cut=cut)
        steps = 2 * steps_per_epoch(train_rows(m, split, rate), 64, 2)
        batch_ids = torch.cat([next(stream).sample_id for _ in range(steps)]).numpy()
        stream.close()
        assert batch_ids.max() < cut and set(batch_ids.tolist()) <= want


def test_config_checks():
    for bad, msg in ((["train.validation_share=1"], "validation_share"), (["train.validation_share=-0.1"], "share"),
                     (["train.patience=0"], "patience"), (["train.eval_every=0"], "eval_every"),
                     (["experiment.select_on=train"], "select_on"), (["train.best_by=loss"], "best_by"), (["train.choose_from=all"], "choose_from"),
                     (["train.lr_schedule=cosine"], "lr_schedule"), (["train.lr_final=1.5"], "lr_final"),
                     (["train.lr_decay_share=0"], "lr_decay_share"),
                     (["train.validation_share=0"], "experiment.select_on: validation needs a validation split")):
        with pytest.raises(ConfigError, match=msg):
            load_config(CONF, bad)
    cfg = load_config(CONF, ["train.validation_share=0", "experiment.select_on=test"])
    assert cfg.train.validation_share == 0 and cfg.experiment.select_on == "test"


# ------------------------------------------------------------------------------------------------ AUC, tracker

def test_exact_auc_with_ties_equals_sklearn():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for n in (2, 7, 500):
        y = rng.random(n) < 0.3
        y[0], y[-1] = True, False
        s = np.round(rng.random(n), 1)                                   # many ties
        assert math.isclose(exact_auc(s, y), roc_auc_score(y, s), rel_tol=0, abs_tol=1e-12)
    assert math.isnan(exact_auc(np.array([0.1, 0.2]), np.array([True, True])))
    assert math.isnan(exact_auc(np.array([np.nan, 0.2]), np.array([True, False])))


def _ev(auc, logloss):
    return {"auc": auc, "logloss": logloss, "calibration": 1.0}


def test_tracker_counts_evaluations_without_improvement():
    tr = Tracker(patience=2, best_by="auc")
    assert tr.update(1, _ev(0.6, 0.5)) and not tr.stop
    assert not tr.update(2, _ev(0.6, 0.4))                              # equal is not better
    assert tr.update(3, _ev(0.7, 0.45)) and tr.bad_evals == 0
    assert not tr.update(4, _ev(math.nan, 0.1)) and not tr.update(5, _ev(0.65, 0.3)) and tr.stop
    assert (tr.best_auc, tr.best_step) == (0.7, 3)
    again = Tracker(patience=2)
    again.load(json.loads(json.dumps(tr.state())))
    assert again.state() == tr.state() and again.stop and again.best_by == "auc"


def test_tracker_by_logloss_keeps_the_lowest_loss_not_the_highest_auc():
    tr = Tracker(patience=3)
    assert tr.best_by == "logloss"
    assert tr.update(1, _ev(0.60, 0.50))
    assert not tr.update(2, _ev(0.70, 0.55))                            # better ranking, worse level: not kept
    assert tr.update(3, _ev(0.65, 0.40))
    assert not tr.update(4, _ev(math.nan, 0.10))                        # one class: no AUC, never selected
    assert (tr.best_step, tr.best_auc, tr.best["logloss"], tr.bad_evals) == (3, 0.65, 0.40, 1)
    assert tr.evals[3] == {"step": 4, "auc": None, "logloss": 0.1, "calibration": 1.0}


def test_tracker_chooses_only_from_its_first_eligible_step():
    """Before ``from_step`` an evaluation is recorded but neither chosen nor counted: a better early score (0.1 at
    step 1) loses to the cool-down's best (0.3 at step 3), and two early evaluations do not use up a patience of 1."""
    tr = Tracker(patience=1, from_step=3)
    assert not tr.update(1, _ev(0.7, 0.10)) and not tr.update(2, _ev(0.7, 0.20))
    assert tr.best is None and tr.bad_evals == 0 and not tr.stop
    assert tr.update(3, _ev(0.6, 0.30)) and not tr.update(4, _ev(0.6, 0.35)) and tr.stop
    assert (tr.best_step, tr.best["logloss"]) == (3, 0.30)
    assert [e.get("eligible", True) for e in tr.evals] == [False, False, True, True]
    again = Tracker(patience=1)
    again.load(json.loads(json.dumps(tr.state())))
    assert again.from_step == 3 and again.state() == tr.state()
    old = tr.state()
    del old["from_step"]                                               # a checkpoint from before choose_from
    again.load(old)
    assert again.from_step == 0


def test_the_first_eligible_step_by_hand():
    t = _cfg().train
    assert t.choose_from == "cooldown"
    assert [choice_start(t, n) for n in (10, 1857, 9283, 1, 0)] == [8, 1486, 7427, 1, 0]   # ceil(0.8 n), at most n
    assert choice_start(_cfg(**{"train.choose_from": "any"}).train, 1857) == 0
    assert choice_start(_cfg(**{"train.lr_schedule": "constant"}).train, 1857) == 0
    assert choice_start(_cfg(**{"train.lr_decay_share": 1.0}).train, 1857) == 0


def test_validation_scores_by_hand():
    p, y = np.array([0.2, 0.8, 0.4, 0.4]), np.array([False, True, True, False])
    s = scores(p, y)
    assert s["auc"] == pytest.approx(0.875)                              # pairs: (0.8>0.2, 0.8>0.4, 0.4=0.4, 0.4>0.2)/4
    assert s["logloss"] == pytest.approx(-(math.log(0.8) + math.log(0.8) + math.log(0.4) + math.log(0.6)) / 4)
    assert s["calibration"] == pytest.approx(0.45 / 0.5)                # mean prediction / observed rate
    assert math.isnan(scores(p, np.zeros(4, bool))["calibration"]) and math.isnan(scores(p, np.zeros(4, bool))["auc"])
    assert scores(np.array([0.0, 1.0]), np.array([True, False]))["logloss"] == pytest.approx(-math.log(1e-7))


def test_the_linear_schedule_by_hand():
    t = _cfg().train
    assert (t.lr_schedule, t.lr_decay_share, t.lr_final) == ("linear", 0.2, 0.0)
    assert [lr_at(t, 0.01, s, 10) for s in (0, 5, 8, 9, 10)] == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.0])
    whole = _cfg(**{"train.lr_decay_share": 1.0, "train.lr_final": 0.5}).train
    assert [lr_at(whole, 0.01, s, 4) for s in (0, 1, 2, 4, 9)] == pytest.approx([0.01, 0.00875, 0.0075, 0.005, 0.005])
    const = _cfg(**{"train.lr_schedule": "constant"}).train
    assert {lr_at(const, 0.01, s, 4) for s in range(5)} == {0.01}


# ------------------------------------------------------------------------------------------------ training

def test_no_validation_trains_every_row_as_before(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    cfg = _cfg(**{"train.method": "esmm", "train.validation_share": 0, "experiment.select_on": "test"})
    s = train(cfg, ds, str(tmp_path / "run"))
    assert s["rows"] == subset_rows(read_manifest(ds), "train", 1.0)
    assert s["steps"] == steps_per_epoch(s["rows"], 256, 1)
    assert "validation" not in s and "stopped_early" not in s


def test_early_stop_at_the_expected_step_when_nothing_improves(tiny_dataset, tmp_path):
    """A learning rate far below float32's resolution leaves the weights as they are: every evaluation equals the
    first, so the run stops after 1 + patience evaluations."""
    _, ds = tiny_dataset
    cfg = _cfg(**{"train.method": "base", "train.lr": "1.0e-30", "train.eval_every": 2, "train.patience": 3,
                  "train.epochs": 3, "train.choose_from": "any"})
    s = train(cfg, ds, str(tmp_path / "run"))
    v = s["validation"]
    assert s["stopped_early"] and s["steps"] == 2 * (1 + 3) < 3 * s["steps_per_epoch"]
    assert [e["step"] for e in v["evals"]] == [2, 4, 6, 8] and len({e["auc"] for e in v["evals"]}) == 1
    assert v["best_step"] == 2 and v["metric"] == "cvr_auc_clicked" and v["metric_defined"]
    assert json.loads((tmp_path / "run" / SUMMARY).read_text())["steps"] == 8
    assert (tmp_path / "run" / EXPORT).exists()


def _early_stopping_cfg(**more):
    """BASE evaluated every 2 steps (and at the end of each epoch) with patience 2, at a constant lr, the export chosen
    by AUC: on the tiny dataset its validation CVR AUC peaks within the first epoch and then drops, so the run stops
    early, with the best model some steps back (the stream and the evaluations are deterministic: the same steps every
    time)."""
    return _cfg(**{"train.method": "base", "train.lr": 0.01, "train.eval_every": 2, "train.patience": 2,
                   "train.epochs": 3, "train.best_by": "auc", "train.lr_schedule": "constant", **more})


def test_early_stop_exports_the_best_evaluation_weights(tiny_dataset, tmp_path):
    _, ds = tiny_dataset
    s = train(_early_stopping_cfg(), ds, str(tmp_path / "run"))
    v = s["validation"]
    assert s["stopped_early"] and s["steps"] < 3 * s["steps_per_epoch"]
    assert v["best_step"] == v["evals"][-3]["step"] and v["best_auc"] == max(e["auc"] for e in v["evals"])
    assert 1 < v["best_step"] and all(e["auc"] <= v["best_auc"] for e in v["evals"][-2:])
    # the weights at the best step, from a run of the same stream that checkpoints every step and is cut right after
    again = train(_early_stopping_cfg(**{"train.checkpoint_every": 1}), ds, str(tmp_path / "again"),
                  stop_at_step=v["best_step"] + 1)
    assert again["steps"] == v["best_step"] + 1
    (step, path), = [c for c in list_checkpoints(str(tmp_path / "again")) if c[0] == v["best_step"]]
    at_best = torch.load(path, weights_only=True)["model"]
    exported = _params(tmp_path / "run" / EXPORT)
    assert all(torch.equal(exported[k], at_best[k]) for k in exported)
    (_, newest), (older_step, older) = list_checkpoints(str(tmp_path / "again"))
    assert newest == path and older_step == v["best_step"] - 1
    before = torch.load(older, weights_only=True)["model"]
    assert not all(torch.equal(exported[k], before[k]) for k in exported)  # a step apart the weights differ


def test_the_default_export_holds_the_lowest_validation_logloss_of_the_cool_down(tiny_dataset, tmp_path):
    """The candidates are the evaluations from the cool-down's start on (ceil(0.8 x steps)); earlier ones are
    recorded, marked, and never chosen."""
    _, ds = tiny_dataset
    cfg = _cfg(**{"train.method": "base", "train.lr": 0.01, "train.eval_every": 1, "train.patience": 100,
                  "train.epochs": 2})
    s = train(cfg, ds, str(tmp_path / "run"))
    v = s["validation"]
    assert v["choose_from"] == "cooldown" and v["from_step"] == math.ceil(0.8 * s["steps"] - 1e-9) > 1
    early = [e for e in v["evals"] if e["step"] < v["from_step"]]
    scored = [e for e in v["evals"] if e["auc"] is not None and e["step"] >= v["from_step"]]
    assert early and all(e["eligible"] is False for e in early) and len(scored) >= 2
    assert v["best_by"] == "logloss" and v["best"] == min(scored, key=lambda e: e["logloss"])
    assert s["exported_step"] == v["best_step"] >= v["from_step"]
    assert v["best_auc"] == v["best"]["auc"] and all(e["calibration"] > 0 for e in scored)
    model, _ = load_export(str(tmp_path / "run" / EXPORT))             # the export scores what the summary says
    from esmm.validation import evaluate
    again = evaluate(model, "base", f"{ds}/train", v["cut_sample_id"], int(read_manifest(ds)["layout"]["num_slots"]))
    assert again == pytest.approx({k: v["best"][k] for k in ("auc", "logloss", "calibration")})


def test_resume_with_validation_equals_uninterrupted(tiny_dataset, tmp_path):
    """Cut at the step the run stops early, just before its decision: the newest checkpoint is one evaluation past
    the best one, so the resumed run stops at the same step with the same export only with the checkpoint's tracker
    (patience counter, best AUC and step) and best weights."""
    _, ds = tiny_dataset
    cfg = _early_stopping_cfg(**{"train.checkpoint_every": 1})
    full = train(cfg, ds, str(tmp_path / "full"))
    stop, best = full["steps"], full["validation"]["best_step"]
    part = train(cfg, ds, str(tmp_path / "cut"), stop_at_step=stop)     # "crash" after the step, before the decision
    assert part["steps"] == stop and not part["stopped_early"] and not (tmp_path / "cut" / EXPORT).exists()
    ckpt = torch.load(list_checkpoints(str(tmp_path / "cut"))[0][1], weights_only=True)
    assert ckpt["step"] == stop - 1 and ckpt["validation"]["best"]["step"] == best < stop - 1
    assert ckpt["validation"]["bad_evals"] == 1 and "best_model" in ckpt   # patience 2: one more bad one stops it
    resumed = train(cfg, ds, str(tmp_path / "cut"))
    assert resumed["steps"] == stop and resumed["stopped_early"] and resumed["steps_this_run"] == 1
    assert resumed["validation"] == full["validation"]
    pf, pr = _params(tmp_path / "full" / EXPORT), _params(tmp_path / "cut" / EXPORT)
    assert all(torch.equal(pf[k], pr[k]) for k in pf)


def test_tensorboard_events_hold_every_scalar_at_its_steps(tiny_dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, ds = tiny_dataset
    cfg = _cfg(**{"train.method": "esmm", "train.eval_every": 4, "train.log_every": 3, "train.patience": 100})
    s = train(cfg, ds, str(tmp_path / "run"))
    ea = EventAccumulator(str(tmp_path / "run" / TENSORBOARD))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/ctr", "train/ctcvr", "train/samples_per_s", "train/lr", "validation/auc",
            "validation/logloss", "validation/calibration", "validation/best_auc", "validation/best_logloss"} <= tags
    total = s["steps"]
    logged = [x for x in range(1, total + 1) if x % 3 == 0 or x == total]
    assert [e.step for e in ea.Scalars("train/loss")] == logged
    assert [round(e.value, 4) for e in ea.Scalars("train/loss")] == [round(h["loss"], 4) for h in s["history"]]
    lr = [lr_at(cfg.train, 0.001, e.step - 1, total) for e in ea.Scalars("train/lr")]   # the logged step's rate
    assert [e.value for e in ea.Scalars("train/lr")] == pytest.approx(lr) and lr[0] > lr[-1]
    evals = s["validation"]["evals"]
    assert [x["step"] for x in evals] == [x for x in range(1, total + 1) if x % 4 == 0 or x == total]
    assert [e.step for e in ea.Scalars("validation/auc")] == [x["step"] for x in evals]
    assert [e.value for e in ea.Scalars("validation/auc")] == pytest.approx([x["auc"] for x in evals])
    assert [e.value for e in ea.Scalars("validation/logloss")] == pytest.approx([x["logloss"] for x in evals])


# test_two_horovod_ranks_stop_early_at_the_same_step: in tests/test_train_faults.py, on the 2-rank horovodrun launch its scenarios share


# ------------------------------------------------------------------------------------------------ experiment

@pytest.mark.slow
def test_select_on_validation_and_on_test(spark, tiny_dataset, tmp_path):
    """One real experiment (AMAN at two rates, OVERSAMPLING at two factors), reported under both rules: each picks
    its variants by its own criterion and says so in Table 2's caption and table2.json."""
    from esmm import report as R
    from esmm.experiment import run_experiment, write_reports
    _, ds = tiny_dataset
    sets = ["experiment.methods=[aman, oversampling, esmm]", "experiment.aman_rates=[0.1, 1.0]",
            "experiment.oversampling_ks=[2, 10]", "experiment.figure_rates=[1.0]"]
    exp = str(tmp_path / "exp")
    out = run_experiment(spark, load_config(CONF, sets), ds, exp, None)
    unit = json.loads(Path(exp, "metrics", "r0-rate1.0.json").read_text())
    val = unit["validation"]
    assert set(val) == {"ctr", "aman[rate=0.1]", "aman[rate=1.0]", "oversampling[k=2]", "oversampling[k=10]", "esmm"}
    assert all(isinstance(v, float) for v in val.values())
    for name, v in val.items():                                         # the trainings' own best validation AUCs
        d = os.path.join(exp, "runs", "r0-rate1.0", name.replace("[", "-").replace("]", "").replace("=", ""))
        assert json.loads(Path(d, SUMMARY).read_text())["validation"]["best_auc"] == v

    def by_validation(m):
        return max((n for n in val if n.startswith(m + "[")), key=lambda n: val[n])

    test_cvr = {r[S.RUN_ID]: r["auc"] for r in unit["metrics"] if r["task"] == "cvr"}

    def by_test(m):
        return max((n for n in test_cvr if n.startswith(m + "[")), key=lambda n: test_cvr[n])

    assert out["select_on"] == "validation"
    assert {m: out["chosen"][1.0][m] for m in ("aman", "oversampling")} == {m: by_validation(m) for m in
                                                                             ("aman", "oversampling")}
    caption = Path(exp, "table2.md").read_text().splitlines()[0]
    assert "experiment.select_on=validation" in caption
    split = find_split(f"{ds}/train", read_manifest(ds), 0.05)
    assert f"({train_rows(read_manifest(ds), split, 1.0):,} training impressions, {split['rows']:,} validation)" \
        in caption
    table = json.loads(Path(exp, "table2.json").read_text())
    assert table["select_on"] == "validation" and table["validation_auc"]["1.0"]["aman"] == {
        n: val[n] for n in ("aman[rate=0.1]", "aman[rate=1.0]")}
    assert [r["variant"] for r in table["table2"]][:2] == [by_validation("aman"), by_validation("oversampling")]

    # a second run of the same experiment reuses it as it is: same report, no file rewritten
    files = {p: p.stat().st_mtime_ns for p in Path(exp).rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    again = run_experiment(spark, load_config(CONF, sets), ds, exp, None)
    assert again.get("reused") and again["text"] == out["text"] and again["chosen"] == out["chosen"]
    assert {p: p.stat().st_mtime_ns for p in Path(exp).rglob("*") if p.is_file()
            and not p.name.endswith(".lock")} == files
    from esmm.config import ConfigError
    from esmm.experiment import train_runs
    with pytest.raises(ConfigError, match=r"--train escm2_ips: not a run of this experiment \(its runs: aman"):
        train_runs(None, load_config(CONF, sets), ds, exp, ["escm2_ips"])
    assert train_runs(None, load_config(CONF, sets), ds, exp, ["esmm"])[0]["method"] == "esmm"   # finished: reused

    cfg_test = load_config(CONF, sets + ["experiment.select_on=test"])
    os.makedirs(tmp_path / "on_test")
    rep = write_reports([unit], cfg_test, str(tmp_path / "on_test"), [1.0], 1.0, None)
    assert rep["select_on"] == "test"
    assert {m: rep["chosen"][1.0][m] for m in ("aman", "oversampling")} == {m: by_test(m) for m in
                                                                             ("aman", "oversampling")}
    assert "experiment.select_on=test" in Path(tmp_path, "on_test", "table2.md").read_text().splitlines()[0]
    assert R.pick_variants(R.summarize([unit], 1.0), ("aman",))["aman"] == by_test("aman")
