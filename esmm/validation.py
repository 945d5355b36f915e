"""The validation part of the train split, its AUC during training, and early stopping on it.

The split: the train split's ``sample_id`` increases in time, so the latest ``train.validation_share`` of its rows
(by ``sample_id``, over every sampling tier) are the validation part and the rest is trained on. The cut is found
from the data at read time, not at ETL: ``find_split`` keeps the k = round(share x rows) largest ids in one streaming
pass over the ``sample_id`` column (memory O(k)), the cut is the smallest of them, and a second pass, pruned to the
row groups whose statistics reach the cut, counts the validation rows per tier. Validation = ``sample_id >= cut``;
training reads every tier of its rate with those rows dropped (``esmm.data``). The same cut holds at every sampling
rate, so no subset ever trains on a validation row.

Which validation rows: the whole validation part at every training rate, not the rate's tier of it. It is a later
period held out for model selection, not training data: shrinking it with Figure 3's rates would make the selection
noisier exactly where the training data is scarce, while the training subsets stay the nested tiers of the rows
before the cut.

The metric (one number per evaluation, ``target_for``): the AUC of the CVR on the clicked validation impressions for
every method that predicts CVR by itself (BASE, AMAN, OVERSAMPLING, UNBIAS, ESMM-NS, ESMM): Table 2's first column,
and the criterion the paper chose AMAN's rate and OVERSAMPLING's k by, here on validation rows. DIVISION's network
predicts pCTCVR only (its pCVR needs another run's pCTR), so it is validated on its own CTCVR AUC over all validation
impressions; the reference CTR network on its CTR AUC. Model selection compares variants of one method, so each
comparison is like with like. The AUC is exact (average ranks for ties), computed on rank 0 with numpy; for CVR methods
only the clicked validation rows are read and scored (pushed down to the Parquet scan).

Early stopping (``Tracker``): an evaluation improves when its AUC is strictly above the best so far; after
``train.patience`` evaluations in a row without improvement training stops, and the export holds the best weights.
When the validation target has one class only (e.g. no conversion among the clicked validation rows) the AUC is
undefined: training runs to the end, nothing is selected, and the summary says so.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

import schemas as S
from esmm import storage
from esmm.batch import Batch

log = logging.getLogger(__name__)
SCAN_ROWS = 1 << 20          # sample_id values per batch of the cut's scan
SCORE_ROWS = 8192            # validation rows scored per forward pass

_cache: dict = {}


class ValidationError(RuntimeError):
    """The validation split cannot be made as configured (too few rows, data and manifest disagree)."""


@dataclass(frozen=True)
class Target:
    """What a method is validated on: the prediction column, which rows (all / clicked), and the label."""
    prediction: str
    rows: str          # "all" | "clicked"
    label: str         # "click" | "conversion" | "click_and_conversion"
    name: str          # e.g. "cvr_auc_clicked"


CVR_CLICKED = Target(S.P_CVR, "clicked", "conversion", "cvr_auc_clicked")
CTR_ALL = Target(S.P_CTR, "all", "click", "ctr_auc")
CTCVR_ALL = Target(S.P_CTCVR, "all", "click_and_conversion", "ctcvr_auc")


def target_for(method: str) -> Target:
    """CVR AUC on the clicked rows for every method that predicts pCVR by itself (Table 2's first column, the
    paper's selection criterion); a CTCVR network (DIVISION: its pCVR needs another run's pCTR) on CTCVR AUC over all
    rows; the reference CTR network on CTR AUC."""
    from esmm.methods import HEAD_SINGLE, TASK_CTCVR, TASK_CTR, get_method
    m = get_method(method)
    if m.head == HEAD_SINGLE and m.task == TASK_CTR:
        return CTR_ALL
    if m.head == HEAD_SINGLE and m.task == TASK_CTCVR:
        return CTCVR_ALL
    return CVR_CLICKED


# ------------------------------------------------------------------------------------------------ the split

def _dataset(path: str):
    import pyarrow.dataset as pads
    return pads.dataset(storage.arrow_uri(path), format="parquet", partitioning="hive")


def find_split(train_path: str, manifest: dict, share: float) -> dict | None:
    """The validation part of the train split at ``train_path``: None when ``share`` is 0, else a dict with
    ``share``, ``cut_sample_id`` (validation = sample_id >= cut), ``rows``, ``clicks``, ``conversions`` and
    ``rows_by_tier`` (validation rows per sampling tier, to count each rate's training rows). Cached per process
    (a worker training several runs of one dataset scans it once)."""
    if share <= 0:
        return None
    from esmm.outputs import dataset_fingerprint
    key = (storage.resolve(train_path), dataset_fingerprint(manifest),
           float(share))
    if key not in _cache:
        _cache[key] = _find_split(train_path, manifest, share)
    return dict(_cache[key])


def _find_split(train_path: str, manifest: dict, share: float) -> dict:
    import pyarrow.compute as pc
    total = int(manifest["splits"][S.TRAIN]["rows"])
    k = max(1, int(round(total * share)))
    if total < 2 or k >= total:
        raise ValidationError(f"train.validation_share={share} of {total} training rows leaves no rows to train on; "
                              f"lower it (0 = no validation)")
    dset = _dataset(train_path)
    top = np.empty(0, np.int64)
    seen = 0
    for b in dset.to_batches(columns=[S.SAMPLE_ID], batch_size=SCAN_ROWS):
        ids = b.column(0).to_numpy()
        seen += len(ids)
        top = np.concatenate([top, ids])
        if len(top) > k:
            top = np.partition(top, len(top) - k)[len(top) - k:]
    if seen != total:  # the manifest's counts steer training too; say so, and cut the rows that are there
        log.warning("%s holds %d rows but its manifest says %d: the dataset was changed after its ETL", train_path,
                    seen, total)
    cut = int(top.min())
    t = dset.to_table(columns=[S.SAMPLE_TIER, S.CLICK, S.CONVERSION], filter=pc.field(S.SAMPLE_ID) >= cut)
    tiers = t.column(S.SAMPLE_TIER).to_numpy()
    click = t.column(S.CLICK).to_numpy()
    conv = t.column(S.CONVERSION).to_numpy()
    n_tiers = len(manifest["sampling_rates"])
    return {"share": float(share), "cut_sample_id": cut, "rows": int(len(tiers)), "clicks": int(click.sum()),
            "conversions": int((click * conv).sum()),
            "rows_by_tier": [int(x) for x in np.bincount(tiers, minlength=n_tiers)[:n_tiers]]}


def train_rows(manifest: dict, split: dict, rate: float) -> int:
    """Training rows at ``rate`` once the validation rows are dropped: the subset's rows minus the validation rows of
    its tiers (``sample_tier <= t``)."""
    from esmm.data import subset_rows, tier_for_rate
    t = tier_for_rate(manifest, rate)
    return subset_rows(manifest, S.TRAIN, rate) - sum(split["rows_by_tier"][:t + 1])


def metric_defined(split: dict, method: str) -> bool:
    """Whether the validation target of ``method`` has both classes (else its AUC is undefined)."""
    tg = target_for(method)
    if tg.label == "click":
        return 0 < split["clicks"] < split["rows"]
    if tg.label == "conversion":
        return 0 < split["conversions"] < split["clicks"]
    return 0 < split["conversions"] < split["rows"]


# ------------------------------------------------------------------------------------------------ scoring

def _fixed_lists(col, width: int, dtype) -> np.ndarray:
    import pyarrow as pa
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=dtype).reshape(len(arr), width)


def batches(train_path: str, cut: int, rows: str, width: int, batch_size: int = SCORE_ROWS) -> Iterator[Batch]:
    """The validation rows (``sample_id >= cut``; only the clicked ones when ``rows == "clicked"``) as Batches of at
    most ``batch_size`` rows, read with the filter pushed down to Parquet (row groups before the cut are skipped)."""
    import pyarrow.compute as pc
    flt = pc.field(S.SAMPLE_ID) >= cut
    if rows == "clicked":
        flt = flt & (pc.field(S.CLICK) > 0)
    cols = [S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS]
    for b in _dataset(train_path).to_batches(columns=cols, filter=flt, batch_size=batch_size):
        if b.num_rows == 0:
            continue
        yield Batch.from_numpy(_fixed_lists(b.column(S.FEAT_IDS), width, np.int64),
                               _fixed_lists(b.column(S.FEAT_WTS), width, np.float32),
                               b.column(S.CLICK).to_numpy(), b.column(S.CONVERSION).to_numpy(),
                               sample_id=b.column(S.SAMPLE_ID).to_numpy())


def _label(batch: Batch, label: str) -> np.ndarray:
    if label == "click":
        y = batch.click
    elif label == "conversion":
        y = batch.conversion
    else:
        y = batch.click * batch.conversion
    return y.numpy() > 0


@torch.no_grad()
def evaluate(model: torch.nn.Module, method: str, train_path: str, cut: int, width: int,
             device: torch.device | str = "cpu") -> float:
    """The validation AUC of ``model`` (``target_for(method)``); leaves the model in the mode it found it in."""
    from esmm.methods import predict
    tg = target_for(method)
    was_training = model.training
    model.eval()
    scores, labels = [], []
    try:
        for b in batches(train_path, cut, tg.rows, width):
            scores.append(predict(method, model, b.to(device))[tg.prediction].double().cpu().numpy())
            labels.append(_label(b, tg.label))
    finally:
        model.train(was_training)
    if not scores:
        return math.nan
    return exact_auc(np.concatenate(scores), np.concatenate(labels))


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney, average ranks for tied scores); NaN with one class or a non-finite score."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    pos = int(labels.sum())
    neg = len(labels) - pos
    if pos == 0 or neg == 0 or not np.isfinite(scores).all():
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    _, first, counts = np.unique(s, return_index=True, return_counts=True)
    ranks = np.repeat(first + (counts + 1) / 2.0, counts)        # 1-based average rank of each tie group
    r_pos = float(ranks[labels[order]].sum())
    return (r_pos - pos * (pos + 1) / 2.0) / (pos * neg)


# ------------------------------------------------------------------------------------------------ early stopping

@dataclass
class Tracker:
    """Best validation AUC so far, at which step, and evaluations since; part of every checkpoint (exact resume)."""
    patience: int
    best_auc: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    evals: list = field(default_factory=list)

    def update(self, step: int, auc: float) -> bool:
        """Record one evaluation; True when it is the best so far (strictly above the previous best)."""
        improved = math.isfinite(auc) and (self.best_auc is None or auc > self.best_auc)
        if improved:
            self.best_auc, self.best_step, self.bad_evals = float(auc), int(step), 0
        else:
            self.bad_evals += 1
        self.evals.append({"step": int(step), "auc": None if math.isnan(auc) else float(auc)})
        return improved

    @property
    def stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best_auc": self.best_auc, "best_step": self.best_step, "bad_evals": self.bad_evals,
                "evals": list(self.evals)}

    def load(self, state: dict) -> None:
        self.best_auc, self.best_step = state["best_auc"], state["best_step"]
        self.bad_evals, self.evals = int(state["bad_evals"]), list(state["evals"])
