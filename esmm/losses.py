"""Losses on logits, computed in log space so they stay finite (with finite gradients) for saturated logits.

Shape legend: B = batch. Every loss is a (weighted) mean over the batch; the paper's Eq. 3 writes sums, which
differ only by the constant 1/B (Adam is invariant to it). An empty batch gives a loss of 0 that is still
connected to the graph, so data-parallel workers can step in lockstep when one of them selects no rows.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F


class EsmmLoss(NamedTuple):
    """total = ctr + ctcvr (each a scalar tensor)."""
    total: torch.Tensor
    ctr: torch.Tensor
    ctcvr: torch.Tensor


def weighted_mean(values: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum(w * v) / sum(w) over (B,) values; plain mean when ``weight`` is None; 0 when empty."""
    if weight is None:
        return values.sum() / max(values.numel(), 1)
    total = weight.sum()
    return (weight * values).sum() / torch.where(total > 0, total, torch.ones_like(total))


def log_one_minus_sigmoid_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(1 - sigmoid(a) * sigmoid(b)), exactly and stably, elementwise.

    1 - s(a)s(b) = (e^-a + e^-b + e^-(a+b)) / ((1 + e^-a)(1 + e^-b)), hence
    log(1 - s(a)s(b)) = logsumexp(-a, -b, -a-b) + logsigmoid(a) + logsigmoid(b).
    Unlike log1mexp(logsigmoid(a) + logsigmoid(b)) this never takes the log of a rounded-to-zero difference
    (in float32 logsigmoid(a) + logsigmoid(b) is exactly 0 once a, b >~ 100) and has no branch whose unused side
    can turn the gradient into NaN.
    """
    stacked = torch.stack([-a, -b, -(a + b)], dim=0)
    return torch.logsumexp(stacked, dim=0) + F.logsigmoid(a) + F.logsigmoid(b)


def bce_logits(logit: torch.Tensor, label: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(logit) against 0/1 ``label``, (B,) -> scalar (weighted) mean."""
    per_row = F.binary_cross_entropy_with_logits(logit, label.to(logit.dtype), reduction="none")
    return weighted_mean(per_row, weight)


def esmm_loss(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor,
              weight: Optional[torch.Tensor] = None) -> EsmmLoss:
    """Paper Eq. 3 over all impressions: l(y, pCTR) + l(y & z, pCTR * pCVR), l = cross-entropy.

    ctr_logit, cvr_logit, click, conversion, weight: (B,). There is no CVR-only term: pCVR is learned only through
    pCTCVR. log pCTCVR = logsigmoid(ctr) + logsigmoid(cvr); log(1 - pCTCVR) by ``log_one_minus_sigmoid_product``.
    """
    ctr_part = bce_logits(ctr_logit, click, weight)
    y = (click * conversion).to(ctr_logit.dtype)
    log_p = F.logsigmoid(ctr_logit) + F.logsigmoid(cvr_logit)
    log_not_p = log_one_minus_sigmoid_product(ctr_logit, cvr_logit)
    ctcvr_part = weighted_mean(-(y * log_p + (1 - y) * log_not_p), weight)
    return EsmmLoss(total=ctr_part + ctcvr_part, ctr=ctr_part, ctcvr=ctcvr_part)


class CounterfactualLoss(NamedTuple):
    """ESCM2: total = ctr + cf_weight * (cf + imputation) + ctcvr_weight * ctcvr (imputation 0 for IPS)."""
    total: torch.Tensor
    ctr: torch.Tensor
    ctcvr: torch.Tensor
    cf: torch.Tensor
    imputation: torch.Tensor


def cvr_errors(cvr_logit: torch.Tensor, conversion: torch.Tensor) -> torch.Tensor:
    """e_i = cross-entropy of the conversion label against pCVR, (B,) -> (B,), in log space (finite for saturated
    logits). Only clicked rows' values are used (the callers multiply by the click indicator)."""
    return F.binary_cross_entropy_with_logits(cvr_logit, conversion.to(cvr_logit.dtype), reduction="none")


def inverse_propensity(ctr_logit: torch.Tensor, click: torch.Tensor, max_weight: float) -> torch.Tensor:
    """min(o_i / pCTR_i, max_weight), (B,): the click indicator over the model's own pCTR, clipped, as a constant (no
    gradient flows into the CTR tower through the weight). The clip is the ESCM2 authors' ``clip(IPS, -15, 15)``
    (PaddleRec ``counterfact_dr``): with a CTR of a few percent, most clicked rows' unclipped weights exceed it."""
    p = torch.sigmoid(ctr_logit.detach()).clamp(min=1.0 / max_weight)
    return click.to(p.dtype) / p


def escm2_loss(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor,
               cf_weight: float, ctcvr_weight: float, max_weight: float, imputation: Optional[torch.Tensor] = None,
               weight: Optional[torch.Tensor] = None) -> CounterfactualLoss:
    """ESCM2 (Wang et al., SIGIR 2022): ESMM's CTR and CTCVR losses plus a counterfactual CVR risk over the entire
    space, estimated from the clicked rows. All terms are (weighted) means over the whole batch B (every impression).

    - IPS (``imputation`` None): cf = mean_B(o_i * e_i / p_i), p_i = max(pCTR_i, 1 / max_weight) detached (the inverse
      propensity score estimator of the entire-space mean of e_i, e = ``cvr_errors``).
    - DR (``imputation``: (B,) the imputation tower's estimate of e_i, >= 0), as the authors' released code
      (PaddleRec ``models/multitask/escm2``, ``counterfact_dr``) trains it: the doubly robust risk
      cf = mean_B(ê_i + o_i (e_i - ê_i) / p_i) and the imputation loss imp = mean_B(o_i (e_i - ê_i)^2 / p_i), both
      differentiated through e and ê (nothing detached but the propensity), both weighted by ``cf_weight``. The CVR
      tower's gradient on a clicked row is cf_weight * w_i * (1 + 2 (e_i - ê_i)) * de_i/dz_i: IPS's scaled by how far
      the imputation is from the error, so DR trains the CVR tower differently from IPS whenever ê_i != e_i.

    total = ctr + cf_weight * (cf + imp) + ctcvr_weight * ctcvr (imp = 0 for IPS).
    """
    esmm = esmm_loss(ctr_logit, cvr_logit, click, conversion, weight)
    ctr_part = esmm.ctr
    e = cvr_errors(cvr_logit, conversion)
    w = inverse_propensity(ctr_logit, click, max_weight)
    if imputation is None:
        cf = weighted_mean(w * e, weight)
        imp = torch.zeros_like(cf)
    else:
        resid = e - imputation
        cf = weighted_mean(imputation + w * resid, weight)
        imp = weighted_mean(w * resid ** 2, weight)
    total = ctr_part + cf_weight * (cf + imp) + ctcvr_weight * esmm.ctcvr
    return CounterfactualLoss(total=total, ctr=ctr_part, ctcvr=esmm.ctcvr, cf=cf, imputation=imp)


class StepLoss(NamedTuple):
    """AITM: total = ctr + ctcvr + alpha * calibration (scalar tensors)."""
    total: torch.Tensor
    ctr: torch.Tensor
    ctcvr: torch.Tensor
    calibration: torch.Tensor


def aitm_loss(ctr_logit: torch.Tensor, ctcvr_logit: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor,
              alpha: float, weight: Optional[torch.Tensor] = None) -> StepLoss:
    """AITM (Xi et al., KDD 2021): cross-entropy of each step over all impressions (click; click and convert) plus
    the behavioural expectation calibrator alpha * mean(max(pCTCVR - pCTR, 0)), which penalizes predicting the later
    step likelier than the earlier one."""
    ctr_part = bce_logits(ctr_logit, click, weight)
    ctcvr_part = bce_logits(ctcvr_logit, click * conversion, weight)
    calib = weighted_mean(torch.relu(torch.sigmoid(ctcvr_logit) - torch.sigmoid(ctr_logit)), weight)
    return StepLoss(total=ctr_part + ctcvr_part + alpha * calib, ctr=ctr_part, ctcvr=ctcvr_part, calibration=calib)
