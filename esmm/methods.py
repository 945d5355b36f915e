"""Every method in one place: the registry (the paper's competitors, ESMM, and ESMM's successors).

A ``Method`` record carries everything that is method-specific; nothing else in the code branches on a method's name:

- ``network``: the architecture, a kind of ``esmm.model.build_network`` (the model module is plain networks);
- ``rows``: which rows of a raw batch it trains on, with which weights (vectorized selection/repetition/weighting);
- ``loss``: its training loss on the network's output (``esmm.losses``), with the named parts that are logged;
- ``head``: how the network's output becomes its own probabilities (``outputs``): one logit predicting ``task``,
  ESMM's two towers (p_ctcvr = p_ctr * p_cvr), or two steps (pCTR and pCTCVR, pCVR = pCTCVR / pCTR);
- ``ctr_from`` / ``cvr_from``: how scoring (evaluation, prediction) turns those into p_ctr, p_cvr and p_ctcvr: pCTR
  from the method itself or from the reference CTR network (the paper's protocol for single-task CVR models),
  pCVR from its own output or as the clipped ratio pCTCVR / pCTR; p_ctcvr is always p_ctr * p_cvr;
- ``grid``: the hyperparameter the experiment searches (its train-config key and the experiment's list of values);
- ``needs_ctr_probs``: training needs the reference CTR network's pCTR (UNBIAS's weights);
- ``title`` (Table 2) and ``source`` (where its definition and hyperparameters come from).

Adding a method is a network in esmm/model.py if it is new, one ``Method`` entry below, and one test.

Shape legend: B = rows of the raw batch, B' = rows after ``prepare``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from esmm.batch import Batch
from esmm.losses import aitm_loss, bce_logits, escm2_loss, esmm_loss
from esmm.model import (AITM_NET, ESMM_IMPUTED, ESMM_NS, ESMM_SHARED, HEAD_KIND_PRODUCT, HEAD_KIND_SINGLE,
                        HEAD_KIND_STEPS, MMOE, PCTR_FLOOR, SINGLE, build_network, head)
from schemas.dataset import P_CTCVR, P_CTR, P_CVR

# What a single-logit network is trained to predict (``Method.task``); two-tower heads have TASK_MULTI.
TASK_CTR = "ctr"        # label click, all impressions
TASK_CVR = "cvr"        # label conversion, (mostly) clicked impressions
TASK_CTCVR = "ctcvr"    # label click & conversion, all impressions
TASK_MULTI = "multi"    # several labels (ESMM and its successors)
_PREDICTION_KEY = {TASK_CTR: P_CTR, TASK_CVR: P_CVR, TASK_CTCVR: P_CTCVR}

# How a network's output becomes its own probabilities (``Method.head``).
HEAD_SINGLE = "single"    # one logit: sigmoid -> the probability of ``task``
HEAD_PRODUCT = "product"  # (ctr, cvr, ...) logits: p_ctr, p_cvr, p_ctcvr = p_ctr * p_cvr (paper Eq. 1)
HEAD_STEPS = "steps"      # (ctr, ctcvr) logits: p_ctr, p_ctcvr, p_cvr = clip(p_ctcvr / p_ctr, 0, 1)
REFERENCE_CTR = "ctr"      # the reference CTR network: the pCTR of the methods with ``ctr_from == REFERENCE``
# Where scoring takes pCTR and pCVR from (``Method.ctr_from`` / ``Method.cvr_from``).
OWN, REFERENCE, RATIO, NONE = "own", "reference", "ratio", "none"

Prepare = Callable[[Batch, object, Optional[torch.Generator], Optional[torch.Tensor]], Batch]
Loss = Callable[["Method", object, Batch, object], tuple]  # (method, network output, prepared batch, train config)


@dataclass(frozen=True)
class Grid:
    """A searched hyperparameter: ``train.<key>`` takes each value of ``experiment.<values>``; runs are named
    ``<label>=<value>`` (``rate=0.2``)."""
    key: str
    values: str
    label: str


@dataclass(frozen=True)
class Method:
    """One method; see the module docstring for each field."""
    name: str
    title: str
    network: str
    head: str
    task: str
    loss: Loss = None     # type: ignore[assignment]  (single_objective, set in __post_init__)
    rows: Prepare = None  # type: ignore[assignment]  (all_rows, set in __post_init__)
    ctr_from: str = OWN
    cvr_from: str = OWN
    grid: Optional[Grid] = None
    needs_ctr_probs: bool = False
    source: str = ""

    def __post_init__(self):  # defaults that are functions defined further down
        if self.rows is None:
            object.__setattr__(self, "rows", all_rows)
        if self.loss is None:
            object.__setattr__(self, "loss", single_objective)

    @property
    def selects_rows(self) -> bool:
        """Trains on a selection of the impressions (not the entire space)."""
        return self.rows is not all_rows

    @property
    def uses_reference_ctr(self) -> bool:
        """Its scores need the reference CTR network (pCTR for the paper's single-task CVR models)."""
        return self.ctr_from == REFERENCE

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
        raise ValueError(f"method {self.name!r} has several labels (task {self.task!r})")

    def build(self, layout, model_cfg) -> nn.Module:
        return build_network(self.network, layout, model_cfg)

    @property
    def head_kind(self) -> int:
        return {HEAD_SINGLE: HEAD_KIND_SINGLE, HEAD_PRODUCT: HEAD_KIND_PRODUCT, HEAD_STEPS: HEAD_KIND_STEPS}[self.head]

    @property
    def head_slot(self) -> int:
        """A single-logit network's position in (p_ctr, p_cvr, p_ctcvr); -1 for two-output heads."""
        return {TASK_CTR: 0, TASK_CVR: 1, TASK_CTCVR: 2}.get(self.task, -1)

    def outputs(self, out) -> dict[str, torch.Tensor]:
        """The network's own probabilities from its forward output (``esmm.model.head``), keyed by prediction
        column: all three for a two-output head, the one it predicts for a single logit."""
        keys = (P_CTR, P_CVR, P_CTCVR)
        if self.head == HEAD_SINGLE:
            slot = self.head_slot
            return {keys[slot]: head(out, None, HEAD_KIND_SINGLE, slot)[slot]}
        return dict(zip(keys, head(out[0], out[1], self.head_kind, -1)))


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


# ------------------------------------------------------------------------------------------ losses

def single_objective(m: "Method", out, batch: Batch, train_cfg):
    """One logit: cross-entropy against the method's label (``task``) on its prepared rows."""
    value = bce_logits(out, m.label(batch), batch.weight)
    return value, {"loss": value.item(), m.task: value.item()}


def esmm_objective(m: "Method", out, batch: Batch, train_cfg):
    """ESMM's two losses over all impressions (paper Eq. 3): CTR and CTCVR = CTR x CVR."""
    total, ctr, ctcvr = esmm_loss(out[0], out[1], batch.click, batch.conversion, batch.weight)
    return total, {"loss": total.item(), "ctr": ctr.item(), "ctcvr": ctcvr.item()}


def escm2_objective(m: "Method", out, batch: Batch, train_cfg):
    """ESMM's losses plus the counterfactual CVR risk (IPS; DR when the network has an imputation tower)."""
    t = train_cfg
    imputation = out.imputation if hasattr(out, "imputation") else None
    r = escm2_loss(out[0], out[1], batch.click, batch.conversion, t.escm2_cf_weight, t.escm2_ctcvr_weight,
                   t.escm2_max_weight, imputation, batch.weight)
    parts = {"loss": r.total.item(), "ctr": r.ctr.item(), "ctcvr": r.ctcvr.item(), "cf": r.cf.item()}
    if imputation is not None:
        parts["imputation"] = r.imputation.item()
    return r.total, parts


def aitm_objective(m: "Method", out, batch: Batch, train_cfg):
    """Each step's cross-entropy over all impressions plus the behavioural calibrator."""
    r = aitm_loss(out.ctr, out.ctcvr, batch.click, batch.conversion, train_cfg.aitm_alpha, batch.weight)
    return r.total, {"loss": r.total.item(), "ctr": r.ctr.item(), "ctcvr": r.ctcvr.item(),
                     "calibration": r.calibration.item()}


# ------------------------------------------------------------------------------------------ the registry

def _single(name: str, title: str, task: str, rows: Prepare, source: str, **kw) -> Method:
    """A single-task network of the paper's protocol: its pCTR is the reference CTR network's (the reference itself
    excepted), its pCVR its own (or, for a CTCVR network, the ratio to the reference pCTR)."""
    return Method(name, title, SINGLE, HEAD_SINGLE, task, rows=rows, source=source,
                  ctr_from=OWN if task == TASK_CTR else REFERENCE,
                  cvr_from={TASK_CTR: NONE, TASK_CVR: OWN, TASK_CTCVR: RATIO}[task], **kw)


PAPER = "Ma et al. 2018, Section 3.1"
METHODS: dict[str, Method] = {m.name: m for m in (
    # the reference CTR network (BASE structure): pCTR of the single-task CVR models at scoring time
    _single("ctr", "CTR (reference)", TASK_CTR, all_rows, PAPER),
    _single("base", "BASE", TASK_CVR, clicked_rows, PAPER),
    _single("aman", "AMAN", TASK_CVR, clicked_plus_sampled_unclicked, PAPER,
            grid=Grid("aman_rate", "aman_rates", "rate")),
    _single("oversampling", "OVERSAMPLING", TASK_CVR, clicked_with_positives_repeated, PAPER,
            grid=Grid("oversampling_k", "oversampling_ks", "k")),
    _single("unbias", "UNBIAS", TASK_CVR, clicked_inverse_ctr_weighted, PAPER, needs_ctr_probs=True),
    _single("division", "DIVISION", TASK_CTCVR, all_rows, PAPER),  # pCVR = pCTCVR / reference pCTR
    Method("esmm_ns", "ESMM-NS", ESMM_NS, HEAD_PRODUCT, TASK_MULTI, esmm_objective, source=PAPER),
    Method("esmm", "ESMM", ESMM_SHARED, HEAD_PRODUCT, TASK_MULTI, esmm_objective, source="Ma et al. 2018, Eq. 3"),
    # successors (README, "Beyond the paper")
    Method("escm2_ips", "ESCM2-IPS", ESMM_SHARED, HEAD_PRODUCT, TASK_MULTI, escm2_objective,
           source="Wang et al. 2022 (ESCM2), Section 4; weights from PaddleRec escm2 config_bigdata.yaml"),
    Method("escm2_dr", "ESCM2-DR", ESMM_IMPUTED, HEAD_PRODUCT, TASK_MULTI, escm2_objective,
           source="Wang et al. 2022 (ESCM2), Section 4; weights from PaddleRec escm2 config_bigdata.yaml"),
    Method("aitm", "AITM", AITM_NET, HEAD_STEPS, TASK_MULTI, aitm_objective, cvr_from=RATIO,
           source="Xi et al. 2021 (AITM), Section 3; alpha = 0.6 from the authors' code (xidongbo/AITM)"),
    Method("mmoe", "MMoE", MMOE, HEAD_PRODUCT, TASK_MULTI, esmm_objective,
           source="Ma et al. 2018 (MMoE, KDD), Section 4, with ESMM's entire-space product and losses"),
)}
PAPER_METHODS = ("base", "aman", "oversampling", "unbias", "division", "esmm_ns", "esmm")
SUCCESSORS = ("escm2_ips", "escm2_dr", "aitm", "mmoe")


def get_method(method: str | Method) -> Method:
    """The registered Method of a name (a Method is returned as is)."""
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
    return METHODS[method]


def build_model(method: str | Method, layout, model_cfg) -> nn.Module:
    """The network ``method`` trains."""
    return get_method(method).build(layout, model_cfg)


# ------------------------------------------------------------------------------------------ loss and scoring

def loss_for(method: str | Method, model_out, batch: Batch, train_cfg=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Training loss of a prepared batch: (scalar loss, {"loss": .., plus the named parts}).

    model_out: the network's forward output on ``batch``. Row weights ``batch.weight`` apply to every method (ones
    unless ``prepare`` set them). ``train_cfg``: the method's hyperparameters (ESCM2's weights, AITM's alpha)."""
    m = get_method(method)
    return m.loss(m, model_out, batch, train_cfg)


@torch.no_grad()
def predict(method: str | Method, model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """What the network predicts by itself, as (B,) probabilities keyed by the prediction column names
    (``Method.outputs``); scoring combines them with the reference CTR network where ``ctr_from`` says so."""
    return get_method(method).outputs(model(batch.ids, batch.wts))


def ratio_cvr(p_ctcvr: torch.Tensor, p_ctr: torch.Tensor) -> tuple[torch.Tensor, int]:
    """pCVR = pCTCVR / pCTR, clipped to [0, 1]; also how many ratios exceeded 1 (were clipped).

    The ratio of two separately trained networks (DIVISION) is not bounded (the paper's point); pCTR = 0 gives 1
    when pCTCVR > 0 and 0 when pCTCVR = 0.
    """
    ratio = p_ctcvr / p_ctr.clamp(min=PCTR_FLOOR)
    return ratio.clamp(0.0, 1.0), int((ratio > 1).sum())


division_cvr = ratio_cvr  # DIVISION's name for it


def scores(method: str | Method, own: dict, ref_ctr: Optional[torch.Tensor]) -> tuple:
    """(p_ctr, p_cvr, p_ctcvr, clipped) of a method at scoring time from its own probabilities (``outputs``) and the
    reference CTR network's pCTR (None unless ``uses_reference_ctr``). p_ctcvr = p_ctr * p_cvr; a quantity the
    method does not predict (the reference network's pCVR) is NaN; ``clipped`` counts ratios > 1."""
    m = get_method(method)
    if m.head != HEAD_SINGLE:  # the network gives all three through the head (AITM's ratio included)
        return own[P_CTR], own[P_CVR], own[P_CTCVR], 0
    p_ctr = ref_ctr if m.ctr_from == REFERENCE else own[P_CTR]
    if p_ctr is None:
        raise ValueError(f"method {m.name!r} needs the reference CTR network's pCTR")
    clipped = 0
    if m.cvr_from == OWN:
        p_cvr = own[P_CVR]
    elif m.cvr_from == RATIO:
        p_cvr, clipped = ratio_cvr(own[P_CTCVR], p_ctr)
    else:
        p_cvr = torch.full_like(p_ctr, float("nan"))
    return p_ctr, p_cvr, p_ctr * p_cvr, clipped
