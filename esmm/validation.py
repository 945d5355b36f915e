"""The validation part of the train split, its AUC during training, and early stopping on it.

The split: the train split's ``sample_id`` increases in time, so the latest ``train.validation_share`` of its rows
(by ``sample_id``, over every sampling tier) are the validation part and the rest is trained on. The cut is found
from the data at read time, not at ETL: ``find_split`` finds the k-th largest id, k = round(share x rows), with a
histogram of the ``sample_id`` column over its range (from the Parquet statistics), and a second pass, pruned to the
row groups that reach the histogram's bucket of the cut, places the cut exactly among that bucket's ids and counts the
validation rows per tier. Memory is fixed (HIST_BUCKETS counts plus one bucket's ids), whatever the rows: at 1B rows
a list of the validation part's ids would be 400 MB on rank 0. Validation = ``sample_id >= cut``;
training reads every tier of its rate with those rows dropped (``esmm.data``). The same cut holds at every sampling
rate, so no subset ever trains on a validation row.

Which validation rows: the whole validation part at every training rate, not the rate's tier of it. It is a later
period held out for model selection, not training data: shrinking it with Figure 3's rates would make the selection
noisier exactly where the training data is scarce, while the training subsets stay the nested tiers of the rows
before the cut.

The target (``target_for``): the AUC of the CVR on the clicked validation impressions for
every method that predicts CVR by itself (BASE, AMAN, OVERSAMPLING, UNBIAS, ESMM-NS, ESMM): Table 2's first column,
and the criterion the paper chose AMAN's rate and OVERSAMPLING's k by, here on validation rows. DIVISION's network
predicts pCTCVR only (its pCVR needs another run's pCTR), so it is validated on its own CTCVR AUC over all validation
impressions; the reference CTR network on its CTR AUC. Model selection compares variants of one method, so each
comparison is like with like. The AUC is exact (average ranks for ties), computed on rank 0 with numpy; for CVR methods
only the clicked validation rows are read and scored (pushed down to the Parquet scan).

Every evaluation records the target's AUC, log-loss and calibration (mean prediction / observed rate).

Which evaluation the export holds (``Tracker``, ``train.best_by``): by default the one with the lowest log-loss. The
AUC ranks and is blind to the output's level; picking the highest-AUC snapshot of a run whose level drifts (Adam's
last steps move the output bias) exported models whose mean pCVR was anywhere from 0.5 to 1.3 times the truth between
seeds. Log-loss is a proper scoring rule: it rewards ranking and level together. ``best_by: auc`` keeps the earlier
rule. An evaluation improves when its score is strictly better than the best so far; after ``train.patience``
evaluations in a row without improvement training stops, and the export holds the best weights.

Which evaluations may be chosen (``train.choose_from``): by default (``cooldown``) only those made once the learning
rate has started to fall (``Tracker.from_step``: the linear schedule's cool-down start; step 0 under a constant rate,
so every evaluation). Earlier ones are recorded and logged but neither chosen nor counted toward the patience, so
early stopping cannot end a run before its cool-down. The reason is the size of the validation split: its CVR
log-loss rests on the conversions among its clicked rows (about 25 at 4M impressions with conf/default.yaml, 118 at
20M), and between two snapshots that is mostly noise. With ``any`` a run at 4M exported step 1000 of 1857, at full
rate, with a level of 0.58; at 20M an ESMM run stopped early at step 9000 of 9283 and exported step 4000.
``choose_from: any`` keeps the earlier rule. When the validation
target has one class only (e.g. no conversion among the clicked validation rows) the AUC is undefined: training runs
to the end, nothing is selected, and the summary says so.
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
HIST_BUCKETS = 1 << 16       # the cut's histogram: memory fixed, whatever the rows
EXACT_ROWS = 1 << 20         # at most this many ids kept to place the cut exactly
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
    total = int(manifest["splits"][S.TRAIN]["rows"])
    k = max(1, int(round(total * share)))
    if total < 2 or k >= total:
        raise ValidationError(f"train.validation_share={share} of {total} training rows leaves no rows to train on; "
                              f"lower it (0 = no validation)")
    dset = _dataset(train_path)
    n_tiers = len(manifest["sampling_rates"])
    cut, seen, counts = _kth_largest(dset, k, n_tiers)
    if seen != total:  # the manifest's counts steer training too; say so, and cut the rows that are there
        log.warning("%s holds %d rows but its manifest says %d: the dataset was changed after its ETL", train_path,
                    seen, total)
    return {"share": float(share), "cut_sample_id": cut, "rows": int(counts[0].sum()), "clicks": int(counts[1].sum()),
            "conversions": int(counts[2].sum()), "rows_by_tier": [int(x) for x in counts[0]]}


def _id_range(dset) -> tuple[int, int] | None:
    """(min, max) of ``sample_id`` from the Parquet row groups' statistics (metadata only), or None where a row
    group has none."""
    lo, hi = None, None
    for frag in dset.get_fragments():
        for rg in frag.row_groups:
            st = (rg.statistics or {}).get(S.SAMPLE_ID)
            if not st or st.get("min") is None or st.get("max") is None:
                if rg.num_rows:
                    return None
                continue
            lo = st["min"] if lo is None else min(lo, st["min"])
            hi = st["max"] if hi is None else max(hi, st["max"])
    return None if lo is None else (int(lo), int(hi))


def _kth_largest(dset, k: int, n_tiers: int) -> tuple[int, int, np.ndarray]:
    """The k-th largest ``sample_id`` (the cut), the rows seen, and the validation rows', clicks' and conversions'
    counts per tier (3 x n_tiers), in memory that does not grow with the rows: a histogram of HIST_BUCKETS buckets
    over the ids' range finds the bucket that holds the cut (pass 1); pass 2, pushed down to ``sample_id >=`` that
    bucket, counts the rows above the bucket per tier and keeps only the bucket's own rows (about rows / HIST_BUCKETS
    of them; a bucket denser than EXACT_ROWS is narrowed by another histogram pass first)."""
    import pyarrow.compute as pc
    rng = _id_range(dset)
    if rng is None:                       # no statistics: one scan for the range
        lo, hi = None, None
        for b in dset.to_batches(columns=[S.SAMPLE_ID], batch_size=SCAN_ROWS):
            if b.num_rows:
                mm = pc.min_max(b.column(0))
                lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
                hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
        if lo is None:
            raise ValidationError("the train split holds no rows")
    else:
        lo, hi = rng
    need, seen = k, None          # the cut is the need-th largest id in [lo, hi]
    while True:
        size = -(-(hi - lo + 1) // HIST_BUCKETS)          # bucket width (ceil)
        flt = (pc.field(S.SAMPLE_ID) >= lo) & (pc.field(S.SAMPLE_ID) <= hi)
        hist, n = np.zeros(HIST_BUCKETS, np.int64), 0
        for b in dset.to_batches(columns=[S.SAMPLE_ID], filter=flt, batch_size=SCAN_ROWS):
            ids = b.column(0).to_numpy()
            n += len(ids)
            hist += np.bincount((ids - lo) // size, minlength=HIST_BUCKETS)
        seen = n if seen is None else seen
        if n < need:
            raise ValidationError(f"the train split holds {n} rows in sample_id [{lo}, {hi}], fewer than the {need} "
                                  f"needed: the dataset changed while it was read")
        above = np.cumsum(hist[::-1])                    # rows in buckets >= each bucket, from the top
        top = int(np.searchsorted(above, need))          # buckets from the top down to the one holding the cut
        bucket = HIST_BUCKETS - 1 - top
        need -= int(above[top - 1]) if top else 0
        lo, hi = lo + bucket * size, min(hi, lo + (bucket + 1) * size - 1)
        if size == 1 or hist[bucket] <= EXACT_ROWS:
            break
    # pass 2: rows above the bucket counted per tier, the bucket's rows kept
    counts = np.zeros((3, n_tiers), np.int64)
    keep = []
    cols = [S.SAMPLE_ID, S.SAMPLE_TIER, S.CLICK, S.CONVERSION]
    for b in dset.to_batches(columns=cols, filter=pc.field(S.SAMPLE_ID) >= lo, batch_size=SCAN_ROWS):
        ids, tier, click, conv = (b.column(i).to_numpy().astype(np.int64) for i in range(4))
        up = ids > hi
        _add(counts, tier[up], click[up], conv[up], n_tiers)
        inb = ~up
        if inb.any():
            keep.append(np.stack([ids[inb], tier[inb], click[inb], conv[inb]]))
    rows = np.concatenate(keep, axis=1) if keep else np.zeros((4, 0), np.int64)
    if rows.shape[1] < need:
        raise ValidationError("the train split changed while it was read (the cut's bucket shrank)")
    cut = int(np.partition(rows[0], rows.shape[1] - need)[rows.shape[1] - need])
    sel = rows[0] >= cut
    _add(counts, rows[1][sel], rows[2][sel], rows[3][sel], n_tiers)
    return cut, int(seen), counts


def _add(counts: np.ndarray, tier, click, conv, n_tiers: int) -> None:
    counts[0] += np.bincount(tier, minlength=n_tiers)[:n_tiers]
    counts[1] += np.bincount(tier, weights=click, minlength=n_tiers)[:n_tiers].astype(np.int64)
    counts[2] += np.bincount(tier, weights=click * conv, minlength=n_tiers)[:n_tiers].astype(np.int64)


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
             device: torch.device | str = "cpu") -> dict:
    """The validation scores of ``model`` on ``target_for(method)``: ``{"auc", "logloss", "calibration"}`` (see
    ``scores``); leaves the model in the mode it found it in."""
    from esmm.methods import predict
    tg = target_for(method)
    was_training = model.training
    model.eval()
    preds, labels = [], []
    try:
        for b in batches(train_path, cut, tg.rows, width):
            preds.append(predict(method, model, b.to(device))[tg.prediction].double().cpu().numpy())
            labels.append(_label(b, tg.label))
    finally:
        model.train(was_training)
    if not preds:
        return {"auc": math.nan, "logloss": math.nan, "calibration": math.nan}
    return scores(np.concatenate(preds), np.concatenate(labels))


LOGLOSS_CLIP = 1e-7          # as esmm.metrics: probabilities clipped to [1e-7, 1 - 1e-7]


def scores(p: np.ndarray, labels: np.ndarray) -> dict:
    """Exact AUC, log-loss (mean cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7], as ``esmm.metrics``) and
    calibration (mean prediction / observed positive rate: 1 is the right level, NaN without positives)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if not len(p) or not np.isfinite(p).all():
        return {"auc": math.nan, "logloss": math.nan, "calibration": math.nan}
    q = np.clip(p, LOGLOSS_CLIP, 1 - LOGLOSS_CLIP)
    logloss = float(-np.mean(np.where(y, np.log(q), np.log1p(-q))))
    rate = float(y.mean())
    return {"auc": exact_auc(p, y), "logloss": logloss, "calibration": float(p.mean()) / rate if rate > 0 else math.nan}


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
    """The best evaluation so far by ``best_by`` ("logloss": lowest validation log-loss; "auc": highest validation
    AUC), its step, and evaluations since; part of every checkpoint (exact resume). An evaluation improves when its
    score is finite and strictly better than the best so far. Evaluations before ``from_step`` (the cool-down start
    with ``train.choose_from: cooldown``) are recorded only: never chosen, never counted toward the patience."""
    patience: int
    best_by: str = "logloss"
    from_step: int = 0
    best: dict | None = None            # the best evaluation: {"step", "auc", "logloss", "calibration"}
    bad_evals: int = 0
    evals: list = field(default_factory=list)

    def update(self, step: int, scores: dict) -> bool:
        """Record one evaluation (``scores`` as ``evaluate`` returns them); True when it is the best so far."""
        rec = {"step": int(step), **{k: _finite_or_none(scores.get(k)) for k in ("auc", "logloss", "calibration")}}
        if step < self.from_step:
            self.evals.append({**rec, "eligible": False})
            return False
        v, b = rec[self.best_by], (self.best or {}).get(self.best_by)
        improved = rec["auc"] is not None and v is not None and (
            b is None or (v < b if self.best_by == "logloss" else v > b))
        if improved:
            self.best, self.bad_evals = rec, 0
        else:
            self.bad_evals += 1
        self.evals.append(rec)
        return improved

    @property
    def best_step(self) -> int | None:
        return None if self.best is None else self.best["step"]

    @property
    def best_auc(self) -> float | None:
        """The validation AUC of the best evaluation (by ``best_by``: with "logloss" not always the highest AUC)."""
        return None if self.best is None else self.best["auc"]

    @property
    def stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state(self) -> dict:
        return {"best_by": self.best_by, "from_step": self.from_step, "best": self.best, "bad_evals": self.bad_evals,
                "evals": list(self.evals)}

    def load(self, state: dict) -> None:
        self.best_by, self.best = state["best_by"], state["best"]
        self.from_step = int(state.get("from_step", 0))  # checkpoints written before choose_from: every evaluation
        self.bad_evals, self.evals = int(state["bad_evals"]), list(state["evals"])


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
