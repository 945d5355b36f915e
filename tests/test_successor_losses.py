"""ESCM2 (IPS, DR) and AITM losses against values computed by hand on a 3-row batch, and their gradient flow."""
import math

import pytest
import torch

from esmm.losses import aitm_loss, escm2_loss

L3 = math.log(3.0)
# pCTR = (0.5, 0.75, 0.25), pCVR = (0.75, 0.5, 0.25); rows: converted click, unconverted click, no click
CTR = [0.0, L3, -L3]
CVR = [L3, 0.0, -L3]
CLICK = [1.0, 1.0, 0.0]
CONV = [1.0, 0.0, 0.0]


def _t(values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# by hand: the CTR loss -ln(.5), -ln(.75), -ln(.75); CTCVR p = (.375, .375, .0625) against (1, 0, 0)
CTR_LOSS = (-math.log(0.5) - 2 * math.log(0.75)) / 3
CTCVR_LOSS = (-math.log(0.375) - math.log(0.625) - math.log(0.9375)) / 3
# e = -ln(.75), -ln(.5), (-ln(.75), unused: no click); inverse propensities 1/.5 = 2, 1/.75 = 4/3, 0
E = [-math.log(0.75), -math.log(0.5), -math.log(0.75)]
W = [2.0, 4.0 / 3.0, 0.0]


def test_escm2_ips_by_hand():
    out = escm2_loss(_t(CTR), _t(CVR), _t(CLICK), _t(CONV), cf_weight=0.5, ctcvr_weight=0.5, min_ctr=0.01)
    cf = (W[0] * E[0] + W[1] * E[1]) / 3                       # mean over the whole batch, unclicked rows 0
    assert out.ctr.item() == pytest.approx(CTR_LOSS, abs=1e-12)
    assert out.ctcvr.item() == pytest.approx(CTCVR_LOSS, abs=1e-12)
    assert out.cf.item() == pytest.approx(cf, abs=1e-12) and cf == pytest.approx(0.4998535, abs=1e-6)
    assert out.total.item() == pytest.approx(CTR_LOSS + 0.5 * cf + 0.5 * CTCVR_LOSS, abs=1e-12)
    assert out.imputation.item() == 0.0


def test_escm2_propensity_floor_bounds_the_weight():
    # pCTR = sigmoid(-20) ~ 2e-9 on a converted click: the weight is 1 / min_ctr = 10, not 5e8
    out = escm2_loss(_t([-20.0]), _t([0.0]), _t([1.0]), _t([1.0]), cf_weight=1.0, ctcvr_weight=1.0, min_ctr=0.1)
    assert out.cf.item() == pytest.approx(10 * math.log(2.0), rel=1e-12)


def test_escm2_dr_by_hand_and_gradient_split():
    ctr, cvr, imp = _t(CTR, True), _t(CVR, True), _t([0.2, 0.4, 0.1], True)
    out = escm2_loss(ctr, cvr, _t(CLICK), _t(CONV), cf_weight=0.5, ctcvr_weight=0.5, min_ctr=0.01, imputation=imp)
    e_hat = [0.2, 0.4, 0.1]
    cf = sum(e_hat[i] + W[i] * (E[i] - e_hat[i]) for i in range(3)) / 3
    imputation = sum(W[i] * (E[i] - e_hat[i]) ** 2 for i in range(3)) / 3
    assert out.cf.item() == pytest.approx(cf, abs=1e-12) and cf == pytest.approx(0.4220757, abs=1e-6)
    assert out.imputation.item() == pytest.approx(imputation, abs=1e-12)
    assert out.total.item() == pytest.approx(CTR_LOSS + 0.5 * cf + 0.5 * CTCVR_LOSS + imputation, abs=1e-12)
    # the imputation tower learns only from the imputation loss: d/dê_i = -2 w_i (e_i - ê_i) / 3
    out.cf.backward(retain_graph=True)
    assert imp.grad is None or torch.all(imp.grad == 0)
    assert ctr.grad is None or torch.all(ctr.grad == 0)      # the propensity is a constant
    assert cvr.grad[2] == 0 and cvr.grad[0] != 0              # the risk reaches the CVR tower through clicked rows
    cvr.grad = None
    out.imputation.backward()
    want = [-2 * W[i] * (E[i] - e_hat[i]) / 3 for i in range(3)]
    assert imp.grad.tolist() == pytest.approx(want, abs=1e-12)
    assert cvr.grad is None or torch.all(cvr.grad == 0)      # ... and does not move the CVR tower


def test_aitm_by_hand():
    ctcvr = [L3, -L3, 0.0]                                   # pCTCVR = (.75, .25, .5) against (1, 0, 0)
    out = aitm_loss(_t(CTR), _t(ctcvr), _t(CLICK), _t(CONV), alpha=0.6)
    ctcvr_loss = (-math.log(0.75) - math.log(0.75) - math.log(0.5)) / 3
    calibration = (0.25 + 0.0 + 0.25) / 3                    # max(pCTCVR - pCTR, 0) = .25, 0, .25
    assert out.ctr.item() == pytest.approx(CTR_LOSS, abs=1e-12)
    assert out.ctcvr.item() == pytest.approx(ctcvr_loss, abs=1e-12)
    assert out.calibration.item() == pytest.approx(calibration, abs=1e-12)
    assert out.total.item() == pytest.approx(CTR_LOSS + ctcvr_loss + 0.6 * calibration, abs=1e-12)


def test_losses_stay_finite_for_saturated_logits():
    big = _t([80.0, -80.0, 80.0], True)
    for out in (escm2_loss(big, -big, _t(CLICK), _t(CONV), 0.5, 0.5, 0.01),
                escm2_loss(big, -big, _t(CLICK), _t(CONV), 0.5, 0.5, 0.01, imputation=big.abs()),
                aitm_loss(big, -big, _t(CLICK), _t(CONV), 0.6)):
        out.total.backward()
        assert math.isfinite(out.total.item()) and torch.isfinite(big.grad).all()
        big.grad = None
