"""Experiment reports from hand-made unit records: the paired test, Table 2's intervals and marks, Figure 3's points."""
import math
import os

import pytest

from esmm import report as R


def _unit(repeat, rate, aucs: dict, cov: dict, positives=100, negatives=900):
    """A unit record: ``aucs`` {task: {run: auc}}, ``cov`` {task: KxK list in sorted run order}."""
    metrics, delong = [], {}
    for task, by_run in aucs.items():
        names = sorted(by_run)
        metrics += [{"run_id": n, "task": task, "auc": by_run[n]} for n in names]
        delong[task] = {"models": names, "auc": [by_run[n] for n in names], "cov": cov[task],
                        "positives": positives, "negatives": negatives}
    return {"unit": f"r{repeat}-rate{rate}", "repeat": repeat, "rate": rate, "metrics": metrics, "delong": delong}


def test_compare_hand_computed():
    rec = {"models": ["a", "b"], "auc": [0.70, 0.65], "cov": [[4e-4, 2e-4], [2e-4, 5e-4]]}
    c = R.compare(rec, "a", "b")
    # var = 4e-4 + 5e-4 - 2 * 2e-4 = 5e-4, se = 0.0223607, z = 0.05 / se = 2.23607, p = erfc(z / sqrt 2) = 0.025347
    assert c["diff"] == pytest.approx(0.05)
    assert c["se"] == pytest.approx(0.0223607, rel=1e-5)
    assert c["z"] == pytest.approx(2.236068, rel=1e-6)
    assert c["p_value"] == pytest.approx(0.025347, rel=1e-4)
    assert (c["ci_low"], c["ci_high"]) == pytest.approx((0.0061739, 0.0938261), abs=1e-7)   # 0.05 -+ 1.96 se
    back = R.compare(rec, "b", "a")
    assert back["diff"] == pytest.approx(-0.05) and back["p_value"] == pytest.approx(c["p_value"])
    same = R.compare({"models": ["a", "b"], "auc": [0.7, 0.7], "cov": [[4e-4, 4e-4], [4e-4, 4e-4]]}, "a", "b")
    assert same["se"] == 0.0 and same["p_value"] == 1.0


def _two_repeats():
    # task cvr: esmm 0.70, base 0.65 (sig: se 0.0224, p 0.025), division 0.69 (not sig); repeat 1: same gaps
    cov = {"cvr": [[5e-4, 2e-4, 2e-4], [2e-4, 4e-4, 2e-4], [2e-4, 2e-4, 4e-4]]}  # order: base, division, esmm
    u0 = _unit(0, 1.0, {"cvr": {"base": 0.65, "division": 0.69, "esmm": 0.70}}, cov)
    u1 = _unit(1, 1.0, {"cvr": {"base": 0.66, "division": 0.66, "esmm": 0.71}}, cov)
    return [u0, u1]


def test_table2_intervals_and_marks():
    units = _two_repeats()
    rows = R.table2(units, ("base", "division", "esmm"), 1.0, None)
    by = {r["model"]: r for r in rows}
    assert by["BASE"]["cvr_auc"] == pytest.approx(65.5) and by["BASE"]["cvr_std"] == pytest.approx(math.sqrt(0.5))
    assert by["ESMM"]["cvr_ci95"] == pytest.approx(100 * 1.959964 * 0.02, rel=1e-5)   # sqrt(4e-4) = 0.02
    assert by["BASE"]["cvr_sig"] == R.SIG_HIGHER            # ESMM significantly higher in both repeats
    assert by["DIVISION"]["cvr_sig"] == ""                  # repeat 0: +1 point, se 0.02 -> not significant
    assert by["ESMM"]["cvr_sig"] == ""
    md = R.table2_markdown(rows)
    assert "| BASE | 65.50 ± 0.71 (±4.38) * |" in md
    one = R.table2([u for u in units if u["repeat"] == 0], ("base", "division", "esmm"), 1.0, None)
    assert "| BASE | 65.00 (±4.38) " in R.table2_markdown(one)   # one repeat: no "± 0.00" spread


def test_significance_summary_over_repeats_uses_a_t_interval():
    comps = R.comparisons(_two_repeats(), {1.0: {"base": "base", "division": "division", "esmm": "esmm"}})
    assert {(c["competitor"], c["repeat"]) for c in comps} == {("BASE", 0), ("BASE", 1), ("DIVISION", 0),
                                                              ("DIVISION", 1)}
    summary = {s["competitor"]: s for s in R.significance_summary(comps, 1.0)}
    base = summary["BASE"]
    assert base["diff"] == pytest.approx(5.0) and base["significant"] == 2 and base["esmm_higher"] == 2
    div = summary["DIVISION"]                               # diffs +1 and +5 points: mean 3, sd 2.828
    h = 12.706205 * math.sqrt(8) / math.sqrt(2)             # t(0.975, 1 df) * sd / sqrt(n)
    assert div["diff"] == pytest.approx(3.0) and (div["ci_low"], div["ci_high"]) == pytest.approx((3 - h, 3 + h))
    assert div["significant"] == 1                          # only repeat 1 (+5 points, p = 0.025)
    assert "| DIVISION | CVR (clicked) | +3.00 |" in R.significance_markdown(list(summary.values()))


def test_paired_intervals_detectable_difference_and_claims_by_hand():
    comps = R.comparisons(_two_repeats(), {1.0: {"base": "base", "division": "division", "esmm": "esmm"}})
    summary = {s["competitor"]: s for s in R.significance_summary(comps, 1.0)}
    base, div = summary["BASE"], summary["DIVISION"]
    # BASE: +5 points in both repeats, DeLong se sqrt(5e-4) = 2.236 points, sd over repeats 0
    assert base["sd"] == 0 and (base["ci_total_low"], base["ci_total_high"]) == pytest.approx(
        (5 - 1.959964 * math.sqrt(5), 5 + 1.959964 * math.sqrt(5)), rel=1e-5)
    assert base["mde"] == pytest.approx((1.959964 + 0.841621) * math.sqrt(5), rel=1e-5)   # the test-set term
    assert base["verdict"] == "higher" and base["higher"] == 2
    # DIVISION: +1 and +5 points (sd 2.828), DeLong se 2 points each: the seeds dominate
    total = math.hypot(12.706205 * math.sqrt(8) / math.sqrt(2), 1.959964 * 2)   # seeds' and test rows' half-widths
    assert (div["ci_total_low"], div["ci_total_high"]) == pytest.approx((3 - total, 3 + total), rel=1e-5)
    assert div["mde"] == pytest.approx((12.706205 + 1.376382) * math.sqrt(8) / math.sqrt(2), rel=1e-5)
    assert div["verdict"] == "unresolved" and div["p_values"][0] == pytest.approx(math.erfc(0.5 / math.sqrt(2)))
    text = R.claims([base, div])
    assert text[0] == ("ESMM vs BASE, CVR (clicked): +5.00 AUC points (95% CI [+0.62, +9.38]; higher in 2 of 2 "
                       "repeats, DeLong p < 0.05 in 2 of 2): ESMM is higher.")
    assert text[1].startswith("ESMM vs DIVISION, CVR (clicked): +3.00 AUC points (95% CI [-22.71, +28.71]; higher in "
                              "2 of 2 repeats, DeLong p < 0.05 in 1 of 2): not resolved")
    assert text[1].endswith("detects differences of about 28.17 points or more.")
    one = R.paired([-1.0], [0.4], [0.012])                               # one repeat: the DeLong interval
    assert (one["ci_low"], one["ci_high"], one["verdict"]) == pytest.approx((-1.784, -0.216, "lower"), abs=1e-3)
    assert "| BASE | CVR (clicked) | +5.00 | [+5.00, +5.00] | [+0.62, +9.38] |" in R.significance_markdown([base])


def test_figure3_points_and_plot(tmp_path):
    cov = {"cvr": [[4e-4, 1e-4], [1e-4, 4e-4]], "ctcvr": [[1e-4, 0.0], [0.0, 1e-4]]}
    units = [_unit(0, r, {"cvr": {"base": 0.6 + r / 10, "esmm": 0.62 + r / 10},
                          "ctcvr": {"base": 0.7, "esmm": 0.72}}, cov) for r in (0.1, 1.0)]
    pts = R.figure3_points(units, ("base", "esmm"), [0.1, 1.0], {0.1: 1000, 1.0: 10000})
    esmm_cvr = [p for p in pts if p["series"] == "ESMM" and p["task"] == "cvr"]
    assert [(p["train_impressions"], round(p["auc"], 6)) for p in esmm_cvr] == [(1000, 63.0), (10000, 72.0)]
    assert esmm_cvr[0]["ci95"] == pytest.approx(100 * 1.959964 * 0.02, rel=1e-5)   # one repeat: DeLong
    gain = [p for p in pts if p["series"] == "ESMM - BASE" and p["task"] == "cvr"]
    # diff 2 points, var = 4e-4 + 4e-4 - 2e-4 = 6e-4 -> half-width 1.96 * 0.0245 = 4.80 points
    assert [round(p["auc"], 6) for p in gain] == [2.0, 2.0]
    assert gain[0]["ci95"] == pytest.approx(100 * 1.959964 * math.sqrt(6e-4), rel=1e-5)
    png, csv_path = str(tmp_path / "f.png"), str(tmp_path / "f.csv")
    R.plot_figure3(pts, png, csv_path, title="t")
    assert os.path.getsize(png) > 10_000
    assert open(csv_path).readline().startswith("series,variant,rate,train_impressions,task,auc,ci95,repeats")


def test_table2_gauc_columns_and_note():
    units = _two_repeats()
    gaucs = {0: {"base": 0.60, "division": 0.61, "esmm": 0.64}, 1: {"base": 0.62, "division": 0.61, "esmm": 0.66}}
    for u in units:
        for r in u["metrics"]:
            r.update(gauc=gaucs[u["repeat"]][r["run_id"]], gauc_users=1234, gauc_impressions=56789)
    oracle = [{"task": "cvr", "auc": 0.8, "auc_se": 0.01, "gauc": 0.75, "gauc_users": 1234}]
    rows = R.table2(units, ("base", "division", "esmm"), 1.0, oracle)
    by = {r["model"]: r for r in rows}
    assert by["ESMM"]["cvr_gauc"] == pytest.approx(65.0) and by["ESMM"]["cvr_gauc_std"] == pytest.approx(math.sqrt(2))
    assert math.isnan(by["ESMM"]["ctr_gauc"])              # no CTR rows in these units
    md = R.table2_markdown(rows)
    assert md.splitlines()[0] == ("| model | CVR AUC % | CTCVR AUC % | CTR AUC % | entire-space CVR AUC % | "
                                  "CVR GAUC % | CTCVR GAUC % | CTR GAUC % | chosen |")
    assert "| ESMM | 70.50 ± 0.71 (±3.92) | nan ± nan | nan ± nan | nan ± nan | 65.00 ± 1.41 | – | – |  |" in md
    assert "| ORACLE (true probabilities) | 80.00 (±1.96) |" in md and "| 75.00 | – | – |" in md
    assert "CVR (clicked): 1,234 users" in md.splitlines()[-1]
    # units without GAUC (a dataset written before user keys): no GAUC columns, one line says why
    md = R.table2_markdown(R.table2(_two_repeats(), ("base", "division", "esmm"), 1.0, None))
    assert "GAUC %" not in md.splitlines()[0] and md.splitlines()[-1].startswith("GAUC omitted: ")
