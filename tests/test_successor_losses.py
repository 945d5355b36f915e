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
    out = escm2_loss(_t(CTR), _t(CVR), _t(CLICK), _t(CONV), cf_weight=0.5, ctcvr_weight=0.5, max_weight=100.0)
    cf = (W[0] * E[0] + W[1] * E[1]) / 3                       # mean over the whole batch, unclicked rows 0
    assert out.ctr.item() == pytest.approx(CTR_LOSS, abs=1e-12)
    assert out.ctcvr.item() == pytest.approx(CTCVR_LOSS, abs=1e-12)
    assert out.cf.item() == pytest.approx(cf, abs=1e-12) and cf == pytest.approx(0.4998535, abs=1e-6)
    assert out.total.item() == pytest.approx(CTR_LOSS + 0.5 * cf + 0.5 * CTCVR_LOSS, abs=1e-12)
    assert out.imputation.item() == 0.0


def test_escm2_propensity_floor_bounds_the_weight():
    # pCTR = sigmoid(-20) ~ 2e-9 on a converted click: the weight is max_weight = 10, not 5e8
    out = escm2_loss(_t([-20.0]), _t([0.0]), _t([1.0]), _t([1.0]), cf_weight=1.0, ctcvr_weight=1.0, max_weight=10.0)
    assert out.cf.item() == pytest.approx(10 * math.log(2.0), rel=1e-12)


def test_escm2_default_clip_is_the_authors_15():
    # a clicked row at pCTR 0.02 (logit ln(0.02/0.98)): 1/pCTR = 50, clipped at the default 15 as PaddleRec's
    # counterfact_dr clips IPS; below the clip the weight is 1/pCTR exactly (pCTR 0.1 -> 10)
    from esmm.config import TrainConfig
    from esmm.losses import inverse_propensity
    logits = _t([math.log(0.02 / 0.98), math.log(0.1 / 0.9), 0.0])
    w = inverse_propensity(logits, _t([1.0, 1.0, 0.0]), TrainConfig().escm2_max_weight)
    assert w.tolist() == pytest.approx([15.0, 10.0, 0.0], rel=1e-12)


def test_escm2_dr_by_hand():
    imp = _t([0.2, 0.4, 0.1])
    out = escm2_loss(_t(CTR), _t(CVR), _t(CLICK), _t(CONV), cf_weight=0.5, ctcvr_weight=0.5, max_weight=100.0,
                     imputation=imp)
    e_hat = [0.2, 0.4, 0.1]
    cf = sum(e_hat[i] + W[i] * (E[i] - e_hat[i]) for i in range(3)) / 3
    imputation = sum(W[i] * (E[i] - e_hat[i]) ** 2 for i in range(3)) / 3
    assert out.cf.item() == pytest.approx(cf, abs=1e-12) and cf == pytest.approx(0.4220757, abs=1e-6)
    assert out.imputation.item() == pytest.approx(imputation, abs=1e-12)
    # the imputation loss carries the counterfactual weight (PaddleRec: inside the weighted cf term), not 1
    assert out.total.item() == pytest.approx(CTR_LOSS + 0.5 * (cf + imputation) + 0.5 * CTCVR_LOSS, abs=1e-12)


def test_escm2_dr_gives_the_cvr_tower_its_own_gradient_not_ips():
    """d total / d z_i (CVR logit) by hand, with ctcvr_weight 0 so that only the counterfactual terms reach the CVR
    tower: IPS gives c w_i (p_i - r_i) / B on a clicked row, DR c w_i (1 + 2 (e_i - ê_i)) (p_i - r_i) / B, and the
    imputation tower gets c (1 - w_i - 2 w_i (e_i - ê_i)) / B (B = 3, c = cf_weight = 0.5, p = pCVR)."""
    e_hat = [0.2, 0.4, 0.1]
    p_cvr, r = [0.75, 0.5, 0.25], CONV
    grads = {}
    for name, imp in (("ips", None), ("dr", _t(e_hat, True))):
        cvr = _t(CVR, True)
        escm2_loss(_t(CTR), cvr, _t(CLICK), _t(CONV), cf_weight=0.5, ctcvr_weight=0.0, max_weight=100.0,
                   imputation=imp).total.backward()
        grads[name] = (cvr.grad.tolist(), None if imp is None else imp.grad.tolist())
    ips = [0.5 * W[i] * (p_cvr[i] - r[i]) / 3 for i in range(3)]
    dr = [0.5 * W[i] * (1 + 2 * (E[i] - e_hat[i])) * (p_cvr[i] - r[i]) / 3 for i in range(3)]
    assert grads["ips"][0] == pytest.approx(ips, abs=1e-12)
    assert grads["dr"][0] == pytest.approx(dr, abs=1e-12)
    assert grads["dr"][0][2] == 0.0                                  # no click: no counterfactual gradient
    assert max(abs(a - b) for a, b in zip(grads["dr"][0], grads["ips"][0])) > 0.05   # DR is not IPS
    imp_grad = [0.5 * (1 - W[i] - 2 * W[i] * (E[i] - e_hat[i])) / 3 for i in range(3)]
    assert grads["dr"][1] == pytest.approx(imp_grad, abs=1e-12)


def test_escm2_propensity_is_a_constant_in_both_variants():
    for imp in (None, _t([0.2, 0.4, 0.1], True)):
        ctr = _t(CTR, True)
        out = escm2_loss(ctr, _t(CVR, True), _t(CLICK), _t(CONV), cf_weight=0.5, ctcvr_weight=0.0, max_weight=100.0,
                         imputation=imp)
        (out.cf + out.imputation).backward()
        assert ctr.grad is None or torch.all(ctr.grad == 0)


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


def _minimize_cvr(imputation: bool) -> tuple[float, float]:
    """One CVR logit (and one imputed error) fitted by the counterfactual loss alone on 100 clicked rows (pCTR ~1, so
    every weight is 1), 6 of them converted."""
    conv = torch.zeros(100, dtype=torch.float64)
    conv[:6] = 1.0
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    e_hat = torch.full((1,), 0.3, dtype=torch.float64, requires_grad=True)
    params = [z, e_hat] if imputation else [z]
    opt = torch.optim.LBFGS(params, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    ones = torch.ones(100, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = escm2_loss(20.0 * ones, z.expand(100), ones, conv, cf_weight=1.0, ctcvr_weight=0.0, max_weight=15.0,
                          imputation=e_hat.expand(100) if imputation else None).total
        loss.backward()
        return loss

    opt.step(closure)
    return torch.sigmoid(z).item(), e_hat.item()


def test_escm2_dr_joint_loss_settles_above_the_conversion_rate():
    """Why ESCM2-DR's pCVR level is high (README, "Beyond the paper"): trained jointly, as the authors' code does, the
    imputation is one value ê per feature vector for converted and unconverted rows alike, and the CVR tower's
    gradient weight (1 + 2 (e - ê)) is large on converted rows (e = -ln p) and ~1 on unconverted ones. With every
    weight 1 the stationary point solves r (1 + 2 (e+ - ê)) (1 - p) = (1 - r) (1 + 2 (e- - ê)) p with ê = the mean
    error r e+ + (1 - r) e-, e+ = -ln p, e- = -ln(1 - p): at r = 0.06 that is p = 0.20967 (by bisection, by hand:
    3.5x the rate), where IPS's is the rate itself."""
    r = 0.06

    def stationarity(p):
        ep, en = -math.log(p), -math.log(1 - p)
        eb = r * ep + (1 - r) * en
        return r * (1 + 2 * (ep - eb)) * (1 - p) - (1 - r) * (1 + 2 * (en - eb)) * p

    lo, hi = 0.01, 0.9
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stationarity(mid) > 0 else (lo, mid)
    assert lo == pytest.approx(0.20967, abs=1e-5)
    p_dr, e_hat = _minimize_cvr(imputation=True)
    assert p_dr == pytest.approx(lo, abs=1e-4)
    assert e_hat == pytest.approx(r * -math.log(p_dr) + (1 - r) * -math.log(1 - p_dr), abs=1e-3)
    p_ips, _ = _minimize_cvr(imputation=False)
    assert p_ips == pytest.approx(r, abs=1e-4)
