"""ESMM and its competitors' networks as plain ``nn.Module``s (no I/O, no loss, no distributed code).

Every network is the paper's BASE structure: field embeddings (sum-pooled per field with the slot weights,
concatenated) -> MLP tower -> one logit. A 2-way softmax output is the same as one sigmoid logit.
Forward passes take ``(ids, wts)`` and return logits only; losses live in ``esmm.losses``.

Shape legend: B = batch, L = slots per impression, F = fields, D = embedding dim.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from esmm.features import FeatureLayout

EMBEDDING_INIT_STD = 0.01

# Architectures a method can ask for (``Method.network`` in esmm.methods; built by ``build_network``). This module
# knows nothing of methods, losses or training: esmm.methods maps each method to one of these.
SINGLE = "single"      # embedding + one tower -> one logit
ESMM_SHARED = "esmm"   # two towers over one shared embedding table
ESMM_NS = "esmm_ns"    # two towers, each with its own embedding table
MMOE = "mmoe"          # experts + one gate per task under ESMM's two towers
AITM_NET = "aitm"      # click and click-and-convert towers with adaptive information transfer
ESMM_IMPUTED = "esmm_imputed"  # ESMM's towers plus an imputation tower (ESCM2-DR)
MODEL_KINDS = (SINGLE, ESMM_SHARED, ESMM_NS, MMOE, AITM_NET, ESMM_IMPUTED)


class FieldEmbedding(nn.Module):
    """Weighted sum-pooling of each field's slots in one global embedding table.

    Every field owns a fixed slot range, so the bag boundaries are the same for every impression: bag ``b*F + f``
    starts at flat slot ``b*L + slot_starts[f]``. forward(ids (B, L) int64, wts (B, L)) -> (B, F*D).
    The table is ``sparse=True``: its gradient is a sparse tensor over the touched rows (for SparseAdam).
    """

    def __init__(self, layout: FeatureLayout, dim: int):
        super().__init__()
        self.num_fields = layout.num_fields
        self.num_slots = layout.num_slots
        self.dim = dim
        self.bag = nn.EmbeddingBag(layout.num_embeddings, dim, mode="sum", sparse=True)
        nn.init.normal_(self.bag.weight, std=EMBEDDING_INIT_STD)
        # Derived from the layout, so not part of the state dict.
        self.register_buffer("slot_starts", torch.tensor(layout.slot_starts, dtype=torch.long), persistent=False)

    @property
    def out_dim(self) -> int:
        return self.num_fields * self.dim

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        row_starts = torch.arange(b, device=ids.device, dtype=torch.long) * self.num_slots
        offsets = (row_starts[:, None] + self.slot_starts[None, :]).reshape(-1)        # (B*F,)
        pooled = self.bag(ids.reshape(-1), offsets, per_sample_weights=wts.reshape(-1).to(self.bag.weight.dtype))
        return pooled.view(b, self.out_dim)                                              # (B*F, D) -> (B, F*D)


class Tower(nn.Module):
    """MLP: (Linear + ReLU) per hidden width, then Linear -> 1. forward((B, in_dim)) -> (B,) logits."""

    def __init__(self, in_dim: int, hidden: tuple = (200, 80)):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        layers.append(nn.Linear(in_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1)


class Logits(NamedTuple):
    """ESMM outputs: ``ctr`` and ``cvr`` logits, each (B,)."""
    ctr: torch.Tensor
    cvr: torch.Tensor


# How a network's logits become probabilities (``head``'s ``kind``; ``esmm.methods.Method.head`` names them).
HEAD_KIND_SINGLE, HEAD_KIND_PRODUCT, HEAD_KIND_STEPS = 0, 1, 2
PCTR_FLOOR = 1.1754943508222875e-38   # float32's smallest normal: pCTR's floor under a ratio pCTCVR / pCTR
# (``head`` spells these as literals: TorchScript does not read module globals)


def head(first: torch.Tensor, second: Optional[torch.Tensor], kind: int,
         slot: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one head: (p_ctr, p_cvr, p_ctcvr), each (B,), from a network's logits. Training's validation, scoring,
    prediction and the portable (TorchScript) export all call it, so every path gives the same numbers.

    - single (one logit ``first``): its sigmoid at position ``slot`` (0 pCTR, 1 pCVR, 2 pCTCVR), NaN elsewhere;
    - product (ESMM and the methods on its towers): ``first``, ``second`` = CTR, CVR logits; p_ctcvr = p_ctr * p_cvr
      (paper Eq. 1), so it stays in [0, 1];
    - steps (AITM): ``first``, ``second`` = CTR, CTCVR logits; p_cvr = clip(pCTCVR / max(p_ctr, PCTR_FLOOR), 0, 1)
      and p_ctcvr = p_ctr * p_cvr.
    """
    if kind == 0:  # HEAD_KIND_SINGLE (TorchScript compiles literals, not module globals)
        p = torch.sigmoid(first)
        nan = torch.full_like(p, float("nan"))
        if slot == 0:
            return p, nan, nan
        if slot == 1:
            return nan, p, nan
        return nan, nan, p
    assert second is not None, "a two-output head needs its second logit"
    p_ctr = torch.sigmoid(first)
    if kind == 1:  # HEAD_KIND_PRODUCT
        p_cvr = torch.sigmoid(second)
    else:
        p_cvr = torch.clamp(torch.sigmoid(second) / torch.clamp(p_ctr, min=1.1754943508222875e-38), 0.0, 1.0)
    return p_ctr, p_cvr, p_ctr * p_cvr


def probs(logits: Logits) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p_ctr, p_cvr, p_ctcvr) of ESMM's logits (``head``, product)."""
    return head(logits.ctr, logits.cvr, HEAD_KIND_PRODUCT, -1)


class ESMM(nn.Module):
    """Entire Space Multi-task Model: ``ctr_tower`` and ``cvr_tower`` over field embeddings.

    shared=True (ESMM): one embedding table feeds both towers, so the CVR tower's features also learn from the
    far more numerous click labels. shared=False (ESMM-NS): ``cvr_embedding`` is a second, separate table.
    forward(ids (B, L), wts (B, L)) -> Logits(ctr (B,), cvr (B,)).
    """

    def __init__(self, layout: FeatureLayout, model_cfg, shared: bool = True):
        super().__init__()
        self.shared = shared
        self.embedding = FieldEmbedding(layout, model_cfg.embedding_dim)
        self.cvr_embedding = None if shared else FieldEmbedding(layout, model_cfg.embedding_dim)
        self.ctr_tower = Tower(self.embedding.out_dim, tuple(model_cfg.hidden))
        self.cvr_tower = Tower(self.embedding.out_dim, tuple(model_cfg.hidden))

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> Logits:
        x_ctr = self.embedding(ids, wts)                                                 # (B, F*D)
        x_cvr = x_ctr if self.cvr_embedding is None else self.cvr_embedding(ids, wts)
        return Logits(ctr=self.ctr_tower(x_ctr), cvr=self.cvr_tower(x_cvr))


class SingleTask(nn.Module):
    """The BASE structure: field embeddings -> one tower -> one logit.

    Used as the CVR model of BASE/AMAN/OVERSAMPLING/UNBIAS, the reference CTR network and DIVISION's CTCVR network.
    forward(ids (B, L), wts (B, L)) -> (B,) logits.
    """

    def __init__(self, layout: FeatureLayout, model_cfg):
        super().__init__()
        self.embedding = FieldEmbedding(layout, model_cfg.embedding_dim)
        self.tower = Tower(self.embedding.out_dim, tuple(model_cfg.hidden))

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        return self.tower(self.embedding(ids, wts))


class Dense(nn.Module):
    """(Linear + ReLU) per hidden width: forward((B, in_dim)) -> (B, hidden[-1]), a representation (no output layer)."""

    def __init__(self, in_dim: int, hidden: tuple):
        super().__init__()
        if not hidden:
            raise ValueError("Dense needs at least one hidden width")
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(in_dim, width), nn.ReLU()]
            in_dim = width
        self.mlp = nn.Sequential(*layers)
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts (Ma et al., KDD 2018) under ESMM's two towers and entire-space product.

    ESMM's shared bottom (the embedding feeding both towers directly) becomes ``experts`` MLPs over the embedded
    input, each (F*D) -> ``expert_hidden``; each task has a softmax gate (a linear map of the same input) that mixes
    the experts' outputs into its tower's input. The towers are ``tower_hidden`` -> 1. With the defaults
    (4 experts of 360 -> 200, towers 200 -> 80 -> 1) each task still sees the paper's 360 x 200 x 80 widths.
    forward(ids (B, L), wts (B, L)) -> Logits(ctr (B,), cvr (B,)); losses and p_ctcvr = p_ctr * p_cvr as ESMM's.
    """

    def __init__(self, layout: FeatureLayout, model_cfg):
        super().__init__()
        self.embedding = FieldEmbedding(layout, model_cfg.embedding_dim)
        d = self.embedding.out_dim
        self.experts = nn.ModuleList([Dense(d, tuple(model_cfg.expert_hidden)) for _ in range(model_cfg.experts)])
        width = self.experts[0].out_dim
        self.ctr_gate = nn.Linear(d, model_cfg.experts)
        self.cvr_gate = nn.Linear(d, model_cfg.experts)
        self.ctr_tower = Tower(width, tuple(model_cfg.tower_hidden))
        self.cvr_tower = Tower(width, tuple(model_cfg.tower_hidden))

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> Logits:
        x = self.embedding(ids, wts)                                                     # (B, F*D)
        outs: list[torch.Tensor] = []
        for expert in self.experts:
            outs.append(expert(x))
        experts = torch.stack(outs, dim=1)                                               # (B, E, H)
        g_ctr = torch.softmax(self.ctr_gate(x), dim=-1).unsqueeze(-1)                    # (B, E, 1)
        g_cvr = torch.softmax(self.cvr_gate(x), dim=-1).unsqueeze(-1)
        return Logits(ctr=self.ctr_tower((g_ctr * experts).sum(1)), cvr=self.cvr_tower((g_cvr * experts).sum(1)))


class ImputedLogits(NamedTuple):
    """ESCM2-DR outputs: ``ctr`` and ``cvr`` logits and ``imputation``, the estimated CVR error e_i (>= 0), each (B,)."""
    ctr: torch.Tensor
    cvr: torch.Tensor
    imputation: torch.Tensor


class ESMMImputed(nn.Module):
    """ESMM's shared-bottom network plus an imputation tower (ESCM2-DR, Wang et al., SIGIR 2022).

    The third tower, over the same shared embedding, estimates every impression's CVR error e_i (a cross-entropy,
    so unbounded above): softplus of its output keeps the estimate >= 0 (PaddleRec's version squashes it into (0, 1)
    with a softmax, below most errors of a converted click). forward(ids, wts) -> ImputedLogits((B,) x 3).
    """

    def __init__(self, layout: FeatureLayout, model_cfg):
        super().__init__()
        self.embedding = FieldEmbedding(layout, model_cfg.embedding_dim)
        self.ctr_tower = Tower(self.embedding.out_dim, tuple(model_cfg.hidden))
        self.cvr_tower = Tower(self.embedding.out_dim, tuple(model_cfg.hidden))
        self.imputation_tower = Tower(self.embedding.out_dim, tuple(model_cfg.hidden))

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> ImputedLogits:
        x = self.embedding(ids, wts)
        return ImputedLogits(ctr=self.ctr_tower(x), cvr=self.cvr_tower(x),
                             imputation=nn.functional.softplus(self.imputation_tower(x)))


class StepLogits(NamedTuple):
    """AITM outputs: the click step's and the click-and-convert step's logits, each (B,), both over all
    impressions."""
    ctr: torch.Tensor
    ctcvr: torch.Tensor


class AITM(nn.Module):
    """Adaptive Information Transfer Multi-task network (Xi et al., KDD 2021) for the two steps impression -> click
    -> conversion.

    One tower per step over the shared field embedding: an MLP (``hidden``) gives the step's representation q, a
    Linear gives its logit. The conversion step also receives the click step's knowledge: the transferred vector
    p = ReLU(Linear(q_click)), and the AIT module mixes {p, q_conversion} by self-attention,
    w_u = softmax_u(<h2(u), h3(u)> / sqrt(k)), z = sum_u w_u h1(u) (h1, h2, h3: Linear k -> k), before the
    conversion logit. The conversion step predicts click-and-convert over all impressions (pCTCVR), so
    pCVR = pCTCVR / pCTR at scoring time (clipped to [0, 1]; the behavioural calibrator in the loss keeps
    pCTCVR <= pCTR). forward(ids (B, L), wts (B, L)) -> StepLogits(ctr (B,), ctcvr (B,)).

    Against the authors' code (github.com/xidongbo/AITM, ``model.py``): the attention's projections have no bias, as
    theirs; their towers and transfer layer use dropout (0.1, 0.3, 0.3), ours none, like every other network here:
    with dropout the ranks of a Horovod run would draw other masks than one process does, and the N-worker = 1-process
    equivalence that tests/test_train.py checks for every method but AMAN would no longer hold. Tower widths are
    ``model.hidden`` (theirs 128 x 64 x 32).
    """

    def __init__(self, layout: FeatureLayout, model_cfg):
        super().__init__()
        self.embedding = FieldEmbedding(layout, model_cfg.embedding_dim)
        d = self.embedding.out_dim
        self.ctr_mlp = Dense(d, tuple(model_cfg.hidden))
        self.ctcvr_mlp = Dense(d, tuple(model_cfg.hidden))
        k = self.ctr_mlp.out_dim
        self.scale = float(k) ** -0.5
        self.transfer = nn.Sequential(nn.Linear(k, k), nn.ReLU())
        self.h1 = nn.Linear(k, k, bias=False)   # values      (no bias, as the authors' Attention layer)
        self.h2 = nn.Linear(k, k, bias=False)   # queries
        self.h3 = nn.Linear(k, k, bias=False)   # keys
        self.ctr_out = nn.Linear(k, 1)
        self.ctcvr_out = nn.Linear(k, 1)

    def forward(self, ids: torch.Tensor, wts: torch.Tensor) -> StepLogits:
        x = self.embedding(ids, wts)                                                     # (B, F*D)
        q_ctr = self.ctr_mlp(x)                                                          # (B, k)
        u = torch.stack([self.transfer(q_ctr), self.ctcvr_mlp(x)], dim=1)                # (B, 2, k): {p, q}
        w = torch.softmax((self.h2(u) * self.h3(u)).sum(-1) * self.scale, dim=1)         # (B, 2)
        z = (w.unsqueeze(-1) * self.h1(u)).sum(1)                                        # (B, k)
        return StepLogits(ctr=self.ctr_out(q_ctr).squeeze(-1), ctcvr=self.ctcvr_out(z).squeeze(-1))


def build_network(kind: str, layout: FeatureLayout, model_cfg) -> nn.Module:
    """The network of architecture ``kind`` (one of MODEL_KINDS) for ``layout`` and a ``ModelConfig``."""
    if kind == SINGLE:
        return SingleTask(layout, model_cfg)
    if kind in (ESMM_SHARED, ESMM_NS):
        return ESMM(layout, model_cfg, shared=kind == ESMM_SHARED)
    if kind == MMOE:
        return MMoE(layout, model_cfg)
    if kind == AITM_NET:
        return AITM(layout, model_cfg)
    if kind == ESMM_IMPUTED:
        return ESMMImputed(layout, model_cfg)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def _is_sparse(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Weights of the sparse-gradient embedding tables (for ``torch.optim.SparseAdam``)."""
    return [p for m in model.modules() if _is_sparse(m) for p in m.parameters(recurse=False)]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter (towers; for ``torch.optim.Adam``)."""
    sparse = {id(p) for p in sparse_parameters(model)}
    return [p for p in model.parameters() if id(p) not in sparse]
