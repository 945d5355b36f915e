"""The paper's competitors (Section 3.1) as data: which network, which rows, which labels and weights.

Each ``Method`` names its architecture (``model_kind``, see esmm.model), its task (what its single logit
predicts, or ``multi`` for ESMM's two towers) and a vectorized ``prepare`` that turns a raw batch of impressions
into the rows it trains on (selection, repetition, per-row weights) with tensor ops only.

Shape legend: B = rows of the raw batch, B' = rows after ``prepare``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from esmm import config
from esmm.batch import Batch
from esmm.losses import bce_logits, esmm_loss
from esmm.model import ESMM_NS, ESMM_SHARED, SINGLE, probs
from schemas.dataset import P_CTCVR, P_CTR, P_CVR

# What a network's output is trained to predict.
TASK_CTR = "ctr"        # label click, all impressions
TASK_CVR = "cvr"        # label conversion, (mostly) clicked impressions
TASK_CTCVR = "ctcvr"    # label click & conversion, all impressions
TASK_MULTI = "multi"    # ESMM: CTR + CTCVR losses over all impressions (Eq. 3)
_PREDICTION_KEY = {TASK_CTR: P_CTR, TASK_CVR: P_CVR, TASK_CTCVR: P_CTCVR}

Prepare = Callable[[Batch, "config.TrainConfig", Optional[torch.Generator], Optional[torch.Tensor]], Batch]


@dataclass(frozen=True)
class Method:
    """One competitor. ``rows`` does its selection/weighting; call it through ``prepare``."""
    name: str
    model_kind: str            # esmm.model.SINGLE | ESMM_SHARED | ESMM_NS
    task: str                  # TASK_CTR | TASK_CVR | TASK_CTCVR | TASK_MULTI
    rows: Prepare
    needs_ctr_probs: bool = False

    def prepare(self, batch: Batch, train_cfg, generator: Optional[torch.Generator] = None,
                ctr_probs: Optional[torch.Tensor] = None) -> Batch:
        """The rows this method trains on, with their weights: Batch (B) -> Batch (B').

        generator: torch.Generator for AMAN's sampling (None = torch's global RNG). ctr_probs: (B,) pCTR of the
        reference CTR network for the same rows (UNBIAS only; e.g. ``predict("ctr", ctr_net, batch)[P_CTR]``).
        """
        if self.needs_ctr_probs and ctr_probs is None:
            raise ValueError(f"method {self.name!r} needs ctr_probs from the reference CTR network")
        if ctr_probs is not None and ctr_probs.shape != (len(batch),):
            raise ValueError(f"ctr_probs must have shape ({len(batch)},), got {tuple(ctr_probs.shape)}")
        return self.rows(batch, train_cfg, generator, ctr_probs)

    def label(self, batch: Batch) -> torch.Tensor:
        """(B,) float label of a single-task network."""
        if self.task == TASK_CTR:
            return batch.click
        if self.task == TASK_CVR:
            return batch.conversion
        if self.task == TASK_CTCVR:
            return batch.click * batch.conversion
        raise ValueError(f"method {self.name!r} has two labels (task {self.task!r})")


# ------------------------------------------------------------------------------------------ row selection

def all_rows(batch: Batch, train_cfg, generator=None, ctr_probs=None) -> Batch:
    """Every impression (the entire space)."""
    return batch


def clicked_rows(batch: Batch, train_cfg, generator=None, ctr_probs=None) -> Batch:
    """BASE: clicked impressions only, the sample-selection-biased space the paper criticises."""
    return batch.select(batch.click > 0)


def clicked_plus_sampled_unclicked(batch: Batch, train_cfg, generator=None, ctr_probs=None) -> Batch:
    """AMAN: clicked rows plus each un-clicked row with probability ``aman_rate`` (their conversion label is 0).

    One uniform draw per raw row, so the result depends only on the generator state and the batch size.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(len(batch), generator=generator, device=device).to(batch.click.device)
    return batch.select((batch.click > 0) | (u < train_cfg.aman_rate))


def clicked_with_positives_repeated(batch: Batch, train_cfg, generator=None, ctr_probs=None) -> Batch:
    """OVERSAMPLING: clicked rows; each converted row appears ``oversampling_k`` times (adjacent copies)."""
    idx = torch.nonzero(batch.click > 0).squeeze(1)
    copies = torch.where(batch.conversion[idx] > 0, train_cfg.oversampling_k, 1)
    return batch.select(torch.repeat_interleave(idx, copies))


def clicked_inverse_ctr_weighted(batch: Batch, train_cfg, generator=None, ctr_probs=None) -> Batch:
    """UNBIAS: clicked rows importance-weighted by 1 / max(pCTR, unbias_min_ctr), normalized to mean 1.

    Dividing by pCTR reweights the clicked space towards the entire space, but small pCTRs blow the weights up
    (the numerical instability the paper notes); the clip bounds the largest weight at 1 / unbias_min_ctr before
    normalization. Normalizing to mean 1 over the kept rows keeps the loss scale (and Adam's step size) comparable
    with BASE.
    """
    keep = batch.click > 0
    p = ctr_probs.detach().to(batch.weight.device, batch.weight.dtype)[keep]
    w = batch.weight[keep] / p.clamp(min=train_cfg.unbias_min_ctr)
    return batch.select(keep).replace(weight=w / w.mean())


# ------------------------------------------------------------------------------------------ the registry

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ctr", SINGLE, TASK_CTR, all_rows),                       # the reference CTR network (BASE structure)
    Method("base", SINGLE, TASK_CVR, clicked_rows),
    Method("aman", SINGLE, TASK_CVR, clicked_plus_sampled_unclicked),
    Method("oversampling", SINGLE, TASK_CVR, clicked_with_positives_repeated),
    Method("unbias", SINGLE, TASK_CVR, clicked_inverse_ctr_weighted, needs_ctr_probs=True),
    Method("division", SINGLE, TASK_CTCVR, all_rows),                # pCVR = pCTCVR / pCTR at scoring time
    Method("esmm_ns", ESMM_NS, TASK_MULTI, all_rows),
    Method("esmm", ESMM_SHARED, TASK_MULTI, all_rows),
)}
assert tuple(METHODS) == config.METHODS, "esmm.methods.METHODS and esmm.config.METHODS must list the same methods"


def get_method(method: str | Method) -> Method:
    """The registered Method of a name (a Method is returned as is)."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
    return METHODS[method]


# ------------------------------------------------------------------------------------------ loss and scoring

def loss_for(method: str | Method, model_out, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of a prepared batch: (scalar loss, {"loss": .., plus the named parts}) .

    model_out: the network's forward output on ``batch`` (Logits for ESMM kinds, (B',) logits otherwise).
    Row weights ``batch.weight`` apply to every method (ones unless ``prepare`` set them).
    """
    m = get_method(method)
    if m.task == TASK_MULTI:
        total, ctr, ctcvr = esmm_loss(model_out.ctr, model_out.cvr, batch.click, batch.conversion, batch.weight)
        return total, {"loss": total.item(), "ctr": ctr.item(), "ctcvr": ctcvr.item()}
    loss = bce_logits(model_out, m.label(batch), batch.weight)
    return loss, {"loss": loss.item(), m.task: loss.item()}


@torch.no_grad()
def predict(method: str | Method, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """What the network predicts by itself, as (B,) probabilities keyed by the prediction column names.

    ESMM / ESMM-NS: p_ctr, p_cvr and p_ctcvr = p_ctr * p_cvr. ctr: p_ctr. base/aman/oversampling/unbias: p_cvr.
    division: p_ctcvr (combine with the reference pCTR via ``division_cvr``). The evaluation combines the
    single-task outputs with the reference CTR network's pCTR.
    """
    m = get_method(method)
    out = model(batch.ids, batch.wts)
    if m.task == TASK_MULTI:
        p_ctr, p_cvr, p_ctcvr = probs(out)
        return {P_CTR: p_ctr, P_CVR: p_cvr, P_CTCVR: p_ctcvr}
    return {_PREDICTION_KEY[m.task]: torch.sigmoid(out)}


def division_cvr(p_ctcvr: torch.Tensor, p_ctr: torch.Tensor) -> tuple[torch.Tensor, int]:
    """DIVISION's pCVR = pCTCVR / pCTR, clipped to [0, 1]; also how many ratios exceeded 1 (were clipped).

    The ratio of two separately trained networks is not bounded (the paper's point); pCTR = 0 gives 1 when
    pCTCVR > 0 and 0 when pCTCVR = 0.
    """
    ratio = p_ctcvr / p_ctr.clamp(min=torch.finfo(p_ctr.dtype).tiny)
    return ratio.clamp(0.0, 1.0), int((ratio > 1).sum())
