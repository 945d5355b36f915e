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
