import dataclasses
import math

import pytest
import torch

from esmm import config
from esmm.batch import Batch
from esmm.config import TrainConfig
from esmm.features import FeatureLayout
from esmm.losses import bce_logits, esmm_loss, log_one_minus_sigmoid_product
from esmm.methods import (METHODS, PAPER_METHODS, REFERENCE, SUCCESSORS, build_model, division_cvr, get_method,
                          loss_for, predict, scores)
from esmm.model import AITM, ESMM, MMoE, ESMMImputed, ImputedLogits, Logits, SingleTask, StepLogits
from schemas.dataset import P_CTCVR, P_CTR, P_CVR

CFG = TrainConfig(aman_rate=0.5, oversampling_k=3, unbias_min_ctr=0.01)
#                  row: 0  1  2  3  4  5  6  7
CLICK = torch.tensor([1., 1, 0, 0, 1, 0, 1, 0])
CONV = torch.tensor([1., 0, 0, 0, 1, 0, 0, 0])


def _batch(click=CLICK, conversion=CONV) -> Batch:
    n = len(click)
    return Batch(ids=torch.arange(n)[:, None].repeat(1, 3), wts=torch.ones(n, 3), click=click.clone(),
                 conversion=conversion.clone(), sample_id=torch.arange(n) * 10)


def _rows(b: Batch) -> list[int]:
    return (b.sample_id // 10).tolist()


def _naive_esmm_loss(a, b, y, z):
    a, b, y, z = (t.double() for t in (a, b, y, z))
    p_ctr = torch.sigmoid(a)
    p = p_ctr * torch.sigmoid(b)
    ctr = -(y * torch.log(p_ctr) + (1 - y) * torch.log(1 - p_ctr)).mean()
    yz = y * z
    ctcvr = -(yz * torch.log(p) + (1 - yz) * torch.log(1 - p)).mean()
    return ctr, ctcvr


# ------------------------------------------------------------------------------------------------ losses

def test_esmm_loss_hand_computed():
    # row 0: pCTR = .5, pCVR = .5, pCTCVR = .25, click, no conversion
    # row 1: pCTR = .75, pCVR = .5, pCTCVR = .375, click and conversion
    a = torch.tensor([0.0, math.log(3.0)])
    b = torch.tensor([0.0, 0.0])
    out = esmm_loss(a, b, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert out.ctr.item() == pytest.approx((-math.log(0.5) - math.log(0.75)) / 2, rel=1e-6)    # 0.490415
    assert out.ctcvr.item() == pytest.approx((-math.log(0.75) - math.log(0.375)) / 2, rel=1e-6)  # 0.634256
    assert out.total.item() == pytest.approx(1.124670, rel=1e-5)


def test_esmm_loss_equals_naive_float64_formula_on_moderate_logits():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    y = (torch.rand(64, generator=g) < 0.5).float()
    z = y * (torch.rand(64, generator=g) < 0.5).float()
    out = esmm_loss(a, b, y, z)
    ctr, ctcvr = _naive_esmm_loss(a, b, y, z)
    assert out.ctr.item() == pytest.approx(ctr.item(), rel=1e-5)
    assert out.ctcvr.item() == pytest.approx(ctcvr.item(), rel=1e-5)


@pytest.mark.parametrize("scale", [50.0, 200.0])
def test_esmm_loss_is_finite_with_finite_grads_at_saturated_logits(scale):
    signs = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float32).repeat(4, 1)
    a = (signs[:, 0] * scale).requires_grad_()
    b = (signs[:, 1] * scale).requires_grad_()
    y = torch.tensor([0., 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    z = torch.tensor([0., 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    out = esmm_loss(a, b, y, z)
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # Confidently wrong rows cost about |logit| each: e.g. a=b=+50 with label 0 -> -log(1 - p) ~= 50 - log 2.
    if scale == 50.0:
        expected = log_one_minus_sigmoid_product(torch.tensor(50.0, dtype=torch.float64),
                                                 torch.tensor(50.0, dtype=torch.float64))
        assert expected.item() == pytest.approx(-50 + math.log(2), rel=1e-9)
        assert out.ctcvr.item() > 0 and out.ctr.item() > 0


def test_log_one_minus_sigmoid_product_matches_float64():
    a = torch.linspace(-30, 30, 41)
    b = torch.linspace(20, -20, 41)
    ref = torch.log1p(-torch.sigmoid(a.double()) * torch.sigmoid(b.double()))
    torch.testing.assert_close(log_one_minus_sigmoid_product(a, b).double(), ref, rtol=1e-5, atol=1e-6)


def test_bce_logits_weighted_mean_and_empty():
    logit, label, w = torch.tensor([0.0, math.log(3.0)]), torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0])
    expected = (3 * math.log(2) + 1 * math.log(4)) / 4    # -log .5 weighted 3, -log(1 - .75) weighted 1
    assert bce_logits(logit, label, w).item() == pytest.approx(expected, rel=1e-6)
    assert bce_logits(logit, label).item() == pytest.approx((math.log(2) + math.log(4)) / 2, rel=1e-6)
    empty = torch.zeros(0, requires_grad=True)
    loss = bce_logits(empty, torch.zeros(0), torch.ones(0))
    loss.backward()
    assert loss.item() == 0.0


# ------------------------------------------------------------------------------------------------ methods

def test_the_registry_is_the_one_list_of_methods():
    assert get_method("esmm") is METHODS["esmm"]
    with pytest.raises(ValueError, match="unknown method"):
        get_method("nope")
    # config validation reads the registry: every method is accepted, anything else is refused with the list
    for name in METHODS:
        assert config.load_config(None, [f"train.method={name}"]).train.method == name
    with pytest.raises(config.ConfigError, match=r"train.method: must be one of \('ctr', 'base'"):
        config.load_config(None, ["train.method=nope"])
    with pytest.raises(config.ConfigError, match="unknown method"):
        config.load_config(None, ["experiment.methods=[esmm, nope]"])
    assert set(METHODS) == {"ctr", *PAPER_METHODS, *SUCCESSORS}
    # the model module is plain networks: it imports nothing of methods, losses or training
    import ast

    import esmm.model
    tree = ast.parse(open(esmm.model.__file__).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "typing", "torch", "esmm.features"}, imported


def test_ctr_division_esmm_use_all_rows():
    for name in ("ctr", "division", "esmm_ns", "esmm"):
        p = METHODS[name].prepare(_batch(), CFG)
        assert _rows(p) == list(range(8)) and p.weight.tolist() == [1.0] * 8
    assert METHODS["ctr"].label(_batch()).tolist() == CLICK.tolist()
    assert METHODS["division"].label(_batch()).tolist() == [1., 0, 0, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError):
        METHODS["esmm"].label(_batch())


def test_base_keeps_clicked_rows_with_conversion_labels():
    p = METHODS["base"].prepare(_batch(), CFG)
    assert _rows(p) == [0, 1, 4, 6]
    assert METHODS["base"].label(p).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert p.weight.tolist() == [1.0] * 4


def test_oversampling_repeats_converted_rows_k_times():
    p = METHODS["oversampling"].prepare(_batch(), CFG)
    assert _rows(p) == [0, 0, 0, 1, 4, 4, 4, 6]
    assert METHODS["oversampling"].label(p).tolist() == [1.0, 1, 1, 0, 1, 1, 1, 0]
    p5 = METHODS["oversampling"].prepare(_batch(), dataclasses.replace(CFG, oversampling_k=5))
    assert len(p5) == 2 * 5 + 2


def test_unbias_weights_are_normalized_clipped_inverse_ctr():
    ctr_probs = torch.tensor([0.5, 0.001, 0.9, 0.1, 0.25, 0.3, 0.02, 0.4])
    p = METHODS["unbias"].prepare(_batch(), CFG, ctr_probs=ctr_probs)
    assert _rows(p) == [0, 1, 4, 6]
    # 1/p over clicked rows with p clipped at 0.01: [2, 100, 4, 50], mean 39
    torch.testing.assert_close(p.weight, torch.tensor([2.0, 100.0, 4.0, 50.0]) / 39.0)
    assert p.weight.mean().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ctr_probs"):
        METHODS["unbias"].prepare(_batch(), CFG)
    with pytest.raises(ValueError, match="shape"):
        METHODS["unbias"].prepare(_batch(), CFG, ctr_probs=ctr_probs[:3])


def test_aman_keeps_clicked_rows_and_samples_unclicked_deterministically():
    full = METHODS["aman"].prepare(_batch(), dataclasses.replace(CFG, aman_rate=1.0), torch.Generator().manual_seed(0))
    assert _rows(full) == list(range(8))
    assert METHODS["aman"].label(full).tolist() == CONV.tolist()   # un-clicked rows are negatives
    n = 4000
    click = (torch.arange(n) % 4 == 0).float()                      # 1000 clicked, 3000 un-clicked
    big = _batch(click, torch.zeros(n))
    runs = [METHODS["aman"].prepare(big, CFG, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert _rows(runs[0]) == _rows(runs[1]) and _rows(runs[0]) != _rows(runs[2])
    for r in runs:
        assert set(range(0, n, 4)) <= set(_rows(r))                  # every clicked row is kept
        sampled = len(r) - 1000
        assert 1350 < sampled < 1650                                 # ~ 0.5 * 3000 (sd ~ 27)


def test_loss_for_single_task_and_esmm():
    b = METHODS["unbias"].prepare(_batch(), CFG, ctr_probs=torch.full((8,), 0.5))
    logits = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])          # rows 0, 1, 4, 6; labels 1, 0, 1, 0
    loss, parts = loss_for("unbias", logits, b)
    expected = (math.log(2) + math.log(4) + math.log(2) + math.log(2)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts == {"loss": pytest.approx(expected, rel=1e-6), "cvr": pytest.approx(expected, rel=1e-6)}
    out = Logits(ctr=torch.zeros(8), cvr=torch.zeros(8))
    loss, parts = loss_for("esmm", out, _batch())
    assert set(parts) == {"loss", "ctr", "ctcvr"}
    assert parts["loss"] == pytest.approx(parts["ctr"] + parts["ctcvr"])
    assert parts["ctr"] == pytest.approx(math.log(2), rel=1e-6)
    # ctcvr: p = .25; two positives (-log .25), six negatives (-log .75)
    assert parts["ctcvr"] == pytest.approx((2 * math.log(4) + 6 * -math.log(0.75)) / 8, rel=1e-6)


def test_predict_gives_what_each_network_predicts_itself():
    layout = FeatureLayout(fields=("a", "b", "c"), buckets=(8, 8, 8), max_len=(1, 1, 1))
    mcfg = config.ModelConfig(embedding_dim=2, hidden=(4,))
    b = _batch()
    expect = {"ctr": {P_CTR}, "base": {P_CVR}, "aman": {P_CVR}, "oversampling": {P_CVR}, "unbias": {P_CVR},
              "division": {P_CTCVR}, "esmm_ns": {P_CTR, P_CVR, P_CTCVR}, "esmm": {P_CTR, P_CVR, P_CTCVR}}
    for name, keys in expect.items():
        model = ESMM(layout, mcfg, shared=name == "esmm") if name.startswith("esmm") else SingleTask(layout, mcfg)
        out = predict(name, model, b)
        assert set(out) == keys and all(v.shape == (8,) and not v.requires_grad for v in out.values())
        if name == "esmm":
            torch.testing.assert_close(out[P_CTCVR], out[P_CTR] * out[P_CVR])


def test_division_cvr_clips_and_counts():
    p_cvr, n = division_cvr(torch.tensor([0.1, 0.3, 0.0, 0.2]), torch.tensor([0.5, 0.2, 0.0, 0.0]))
    torch.testing.assert_close(p_cvr, torch.tensor([0.2, 1.0, 0.0, 1.0]))
    assert n == 2


# ------------------------------------------------------------------------------------------------ successors

LAYOUT3 = FeatureLayout(fields=("a", "b", "c"), buckets=(8, 8, 8), max_len=(1, 1, 1))
MCFG = config.ModelConfig(embedding_dim=2, hidden=(4,), experts=3, expert_hidden=(5,), tower_hidden=(4,))
TCFG = TrainConfig(escm2_cf_weight=0.5, escm2_ctcvr_weight=0.5, escm2_max_weight=100.0, aitm_alpha=0.6)


@pytest.mark.parametrize("name,net,out", [("escm2_ips", ESMM, Logits), ("escm2_dr", ESMMImputed, ImputedLogits),
                                          ("aitm", AITM, StepLogits), ("mmoe", MMoE, Logits)])
def test_each_successor_trains_on_the_entire_space_and_scores_by_its_own_rule(name, net, out):
    m = get_method(name)
    torch.manual_seed(0)
    model = build_model(name, LAYOUT3, MCFG)
    assert isinstance(model, net) and not m.selects_rows and not m.uses_reference_ctr
    b = m.prepare(_batch(), TCFG)
    assert _rows(b) == list(range(8))                                 # every impression
    o = model(b.ids % 8, b.wts)
    assert isinstance(o, out)
    loss, parts = loss_for(name, o, b, TCFG)
    loss.backward()
    assert math.isfinite(loss.item()) and parts["loss"] == pytest.approx(loss.item())
    assert all(p.grad is not None for p in model.parameters())       # every parameter is trained by the loss
    expected_parts = {"escm2_ips": {"loss", "ctr", "ctcvr", "cf"}, "escm2_dr": {"loss", "ctr", "ctcvr", "cf", "imputation"},
                      "aitm": {"loss", "ctr", "ctcvr", "calibration"}, "mmoe": {"loss", "ctr", "ctcvr"}}[name]
    assert set(parts) == expected_parts
    with torch.no_grad():
        own = m.outputs(model(b.ids % 8, b.wts))
        p_ctr, p_cvr, p_ctcvr, _ = scores(name, own, None)               # no reference network needed
    assert torch.all((0 <= p_cvr) & (p_cvr <= 1)) and torch.allclose(p_ctcvr, p_ctr * p_cvr)
    if name == "aitm":   # pCVR is the clipped ratio of its two steps
        torch.testing.assert_close(p_cvr, torch.clamp(own[P_CTCVR] / own[P_CTR], 0, 1))
    else:                # ESMM's product of its own towers
        torch.testing.assert_close(p_cvr, own[P_CVR])


def test_scoring_rules_of_the_paper_methods():
    own = {P_CTR: torch.tensor([0.5, 0.2]), P_CVR: torch.tensor([0.1, 0.4]), P_CTCVR: torch.tensor([0.3, 0.1])}
    ref = torch.tensor([0.25, 0.5])
    p_ctr, p_cvr, p_ctcvr, clipped = scores("base", {P_CVR: own[P_CVR]}, ref)     # pCTR from the reference network
    assert p_ctr.tolist() == ref.tolist() and p_cvr.tolist() == pytest.approx([0.1, 0.4])
    p_ctr, p_cvr, _, clipped = scores("division", {P_CTCVR: own[P_CTCVR]}, ref)  # pCVR = pCTCVR / reference pCTR
    assert p_cvr.tolist() == pytest.approx([1.0, 0.2]) and clipped == 1
    p_ctr, p_cvr, _, _ = scores("ctr", {P_CTR: own[P_CTR]}, None)                # the reference itself: no pCVR
    assert torch.isnan(p_cvr).all() and p_ctr.tolist() == pytest.approx([0.5, 0.2])
    with pytest.raises(ValueError, match="reference CTR network"):
        scores("base", {P_CVR: own[P_CVR]}, None)
    assert [n for n, m in METHODS.items() if m.ctr_from == REFERENCE] == ["base", "aman", "oversampling", "unbias",
                                                                           "division"]
    assert {n: m.grid.label for n, m in METHODS.items() if m.grid} == {"aman": "rate", "oversampling": "k"}
