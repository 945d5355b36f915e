"""The training loop: one code path for 1 process, ``horovodrun -np N`` and ``horovod.spark.run`` workers.

Optimizers: the embedding table has sparse gradients and goes to ``SparseAdam`` (a *lazy* Adam: only the rows
touched by a batch get their moments and values updated; dense Adam would decay every row's moments every step and
is over 10x slower on the table, see STACK.md); the towers go to ``Adam``. Both use the paper's betas/eps.
With ``train.scale_lr`` the learning rate is multiplied by the number of workers (the linear scaling rule: each step
averages gradients over workers x batch_size samples); off by default, so runs at different world sizes take the same
per-step update size. ``train.lr_schedule: linear`` (the default) keeps ``lr`` and then, over the last
``lr_decay_share`` of the run's steps, lowers both optimizers' rate linearly to ``lr x lr_final`` at the last step (a
cool-down; a function of the step, so resume is exact); ``constant`` is the paper's plain Adam. At a constant rate the last steps' noise sets the output's mean level (pCVR/truth from 0.5 to 1.3
between seeds of one method, bench/RESULTS.md "Calibrated exports"); the decay lets it settle before the export.

Run directory (``out_dir``), written by rank 0 only:

- ``_ESMM_OUTPUT``: the marker (``esmm.outputs``): kind ``train_run``, a unique ``run_id`` and the run's inputs (the
  dataset's fingerprint, its feature layout, the ``model`` and ``train`` config sections). A directory without it is
  never written into; a checkpoint is resumed and a finished run reused only when the inputs are the same, otherwise
  training stops and says what differs (use another run dir, or ``jobs/train.py --overwrite``). Rank 0 holds
  ``<out_dir>.lock`` while it trains, so a second training into the same directory fails fast.
- ``checkpoint-<step>.pt`` + ``checkpoint-<step>.json`` (every ``checkpoint_every`` steps and at the end): the
  checkpoint (written to a temporary file, fsynced, renamed) and its sidecar with the file's size and sha256. The
  last two are kept. Resuming verifies the newest against its sidecar (a missing sidecar, a size or checksum mismatch
  or an unreadable file all mean corrupt), falls back to the previous one with a warning, and stops with an error
  naming each file's problem when neither is valid. A checkpoint is complete on disk before its sidecar is written,
  and the older ones are deleted only after both, so a crash at any point leaves the previous checkpoint intact.
- ``model.pt``: the export scoring needs (weights, resolved config, feature layout, method, run id, dataset
  fingerprint; loadable with ``torch.load(weights_only=True)``); ``model.ts.pt`` + ``model.portable.json``, the same
  model as TorchScript with its contract, usable without this package (``esmm.portable``); ``train_summary.json``
  (written atomically, after them). The export and the summary together mark the run finished.

Validation and early stopping (``esmm.validation``; ``train.validation_share`` > 0): rank 0 finds the cut of the
train split's latest rows once (recorded in the summary), every rank trains on the rows before it, and every
``train.eval_every`` steps and at the end of every epoch rank 0 scores the validation rows (AUC, log-loss,
calibration); the scores are broadcast so every rank takes the same decision and stops at the same step. Rank 0 keeps
a copy of the best weights (``train.best_by``: lowest log-loss by default, or highest AUC; among the evaluations from
the cool-down's start on, ``train.choose_from`` and ``choice_start``); the export (``model.pt``
and the portable one) holds them, broadcast to every rank first, and the summary records the exported step
(``exported_step``) and its validation scores (``validation.best``). The tracker (best evaluation, evaluations since)
and the best weights are part of every checkpoint, so a resumed run takes the same decisions.
With ``validation_share`` 0 none of this runs and training is as without the feature.

TensorBoard: rank 0 writes event files to ``<out_dir>/tensorboard`` (``train/loss`` and the loss parts,
``train/samples_per_s``, ``train/lr`` every ``log_every`` steps; ``validation/auc``, ``validation/logloss``,
``validation/calibration``, ``validation/best_auc`` and ``validation/best_logloss`` per evaluation), so ``tensorboard --logdir <runs>`` shows every run side by side. A resumed run purges the events past
its checkpoint's step; the writer is closed on every exit path.

Faults stop every rank with the same ``TrainError`` instead of leaving some waiting in a collective: rank 0's verdict
on the run directory (lock, ownership, inputs, checkpoint) is broadcast; every rank's first batch is read before
training (a rank without data names itself and the cause); a non-finite loss is flagged every step (the loss is on
the host already; the flag is allreduced with the step's gradients) and the parameters are checked before every
checkpoint and the export, so nothing is written from a diverged state.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from esmm import distributed as D
from esmm import validation as V
from esmm import storage
from esmm.artifacts import ArtifactError, EXPORT, SUMMARY, export_model, layout_from_manifest, load_export
from esmm.config import Config, from_dict, to_dict
from esmm.data import steps_per_epoch, subset_rows, train_stream
from esmm.features import FeatureLayout
from esmm.methods import REFERENCE_CTR, TASK_MULTI, build_model, get_method, loss_for, predict
from esmm.model import sparse_parameters
from esmm.outputs import InputChanged, Output, OutputError, check_pinned, dataset_fingerprint
from esmm.rundir import (RUN_KIND, TrainError, TrainOutputRefused, _differences, ctr_model_path,  # noqa: F401
                         prepare, run_inputs)
from esmm.portable import export_portable
from schemas.dataset import P_CTR, TRAIN

log = logging.getLogger(__name__)
_ERRORS = {c.__name__: c for c in (TrainError, TrainOutputRefused, OutputError, ArtifactError, InputChanged)}
CHECKPOINT_RE = re.compile(r"checkpoint-(\d{9})\.(pt|json)$")
KEEP_CHECKPOINTS = 2
TENSORBOARD = "tensorboard"


# ------------------------------------------------------------------------------------------------ state

@dataclass
class TrainState:
    model: torch.nn.Module
    opt_sparse: torch.optim.Optimizer
    opt_dense: torch.optim.Optimizer
    step: int = 0
    history: list = field(default_factory=list)
    tracker: V.Tracker | None = None     # validation: best evaluation so far (None: no validation split)
    best: dict | None = None             # rank 0: a copy of the weights of the best evaluation
    base_lr: float = 0.0                 # train.lr (x workers with scale_lr); the schedule scales it per step

    def checkpoint(self, cfg: Config) -> dict:
        ckpt = {"model": self.model.state_dict(), "opt_sparse": self.opt_sparse.state_dict(),
                "opt_dense": self.opt_dense.state_dict(), "step": self.step, "history": self.history,
                "rng": {"torch": torch.get_rng_state()}, "config": to_dict(cfg)}
        if self.tracker is not None:
            ckpt["validation"] = self.tracker.state()
            if self.best is not None:
                ckpt["best_model"] = self.best
        return ckpt

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt_sparse.load_state_dict(ckpt["opt_sparse"])
        self.opt_dense.load_state_dict(ckpt["opt_dense"])
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.tracker is not None and "validation" in ckpt:
            self.tracker.load(ckpt["validation"])
            self.best = ckpt.get("best_model")

    def keep_best(self) -> None:
        """Copy the current weights as the best (rank 0; on the host, so the copy never costs device memory)."""
        self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}


def build_state(cfg: Config, layout: FeatureLayout, dist: D.Dist) -> TrainState:
    t = cfg.train
    torch.manual_seed(t.seed)  # identical initial weights on every rank (and broadcast from rank 0 anyway)
    model = build_model(t.method, layout, cfg.model).to(dist.device)
    sparse_ids = {id(p) for p in sparse_parameters(model)}
    named = list(model.named_parameters())
    sparse = [(n, p) for n, p in named if id(p) in sparse_ids]
    dense = [(n, p) for n, p in named if id(p) not in sparse_ids]
    lr = t.lr * (dist.size if t.scale_lr else 1)
    opt_s = torch.optim.SparseAdam([p for _, p in sparse], lr=lr, betas=(t.beta1, t.beta2), eps=t.eps)
    opt_d = torch.optim.Adam([p for _, p in dense], lr=lr, betas=(t.beta1, t.beta2), eps=t.eps)
    # wrap before loading any state: Horovod's wrapper is a new optimizer object over the same param groups
    opt_s = D.distributed_optimizer(opt_s, sparse, "sparse")
    opt_d = D.distributed_optimizer(opt_d, dense, "dense")
    return TrainState(model, opt_s, opt_d, base_lr=lr)


def lr_at(t, base_lr: float, step: int, total: int) -> float:
    """The learning rate of the step after ``step`` steps of ``total``: ``base_lr`` throughout with
    ``lr_schedule: constant``; with ``linear``, ``base_lr`` until the last ``lr_decay_share`` of the steps, then a
    straight line down to ``base_lr x lr_final`` at step ``total`` (a function of the step alone, so a resumed run
    takes the same rates)."""
    if t.lr_schedule == "constant" or total <= 0:
        return base_lr
    start = _cooldown_start(t, total)
    if step <= start:
        return base_lr
    return base_lr * (1.0 - (1.0 - t.lr_final) * min((step - start) / (total - start), 1.0))


def choice_start(t, total: int) -> int:
    """The first step whose evaluation the export may hold (``train.choose_from``): with ``cooldown`` under the linear
    schedule, the cool-down's start (the step count from which ``lr_at`` falls); 0 otherwise (every evaluation). The
    run's last step is never before it, so its final evaluation is always a candidate."""
    if t.choose_from == "any" or t.lr_schedule == "constant" or total <= 0:
        return 0
    return min(math.ceil(_cooldown_start(t, total) - 1e-9), total)


def _cooldown_start(t, total: int) -> float:
    """The step count after which the linear schedule's rate falls (``lr_at`` and ``choice_start`` share it)."""
    return total * (1.0 - t.lr_decay_share)


def set_lr(state: TrainState, lr: float) -> None:
    for opt in (state.opt_sparse, state.opt_dense):
        for g in opt.param_groups:
            g["lr"] = lr


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_path(out_dir: str, step: int) -> str:
    """The checkpoint of ``step`` (a plain path for local run directories, the URL otherwise)."""
    return storage.display(storage.join(out_dir, f"checkpoint-{step:09d}.pt"))


def checkpoint_sidecar(path: str) -> str:
    """``checkpoint-<step>.json`` next to ``checkpoint-<step>.pt``: the file's size and sha256."""
    return path[:-len(".pt")] + ".json"


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """(step, checkpoint path) of every step with a checkpoint file or sidecar in ``out_dir``, newest first."""
    steps = {int(m.group(1)) for m in map(CHECKPOINT_RE.fullmatch, storage.listdir(out_dir)) if m}
    return [(st, checkpoint_path(out_dir, st)) for st in sorted(steps, reverse=True)]


def save_checkpoint(ckpt: dict, out_dir: str) -> str:
    """Write ``checkpoint-<step>.pt`` (atomic on local files), then its sidecar; keep it and the newest older one,
    drop the rest. The checksum is of the bytes stored, read back. Steps above this one (left by an attempt whose
    newest checkpoint was corrupt) are dropped too."""
    step = int(ckpt["step"])
    path = checkpoint_path(out_dir, step)
    storage.save_torch(ckpt, path)
    size, digest = storage.file_digest(path)
    storage.write_json(checkpoint_sidecar(path), {"step": step, "bytes": size, "sha256": digest})
    older = [st for st, _ in list_checkpoints(out_dir) if st < step]  # newest first
    keep = {step, *older[:KEEP_CHECKPOINTS - 1]}
    for st, p in list_checkpoints(out_dir):
        if st not in keep:
            for f in (p, checkpoint_sidecar(p)):
                storage.delete(f)
    return path


def checkpoint_problem(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (missing, no sidecar, size or checksum mismatch), or None."""
    side = checkpoint_sidecar(path)
    if not storage.isfile(path):
        return "the checkpoint file is missing"
    if not storage.isfile(side):
        return f"no {storage.basename(side)} with its checksum (its write was interrupted)"
    try:
        meta = storage.read_json(side)
        want_size, want_digest = int(meta["bytes"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{storage.basename(side)} is unreadable ({e})"
    size, digest = storage.file_digest(path)
    if size != want_size:
        return f"{size} bytes where {want_size} were written (truncated or overwritten)"
    if digest != want_digest:
        return "sha256 mismatch (corrupt)"
    return None


def load_checkpoint(out_dir: str) -> dict | None:
    """The newest valid checkpoint of ``out_dir``, falling back to older ones with a warning; None when there is no
    checkpoint at all; ``TrainError`` naming every file's problem when there are checkpoints but none is valid."""
    problems = []
    for step, path in list_checkpoints(out_dir):
        problem = checkpoint_problem(path)
        ckpt = None
        if problem is None:
            try:
                ckpt = storage.load_torch(path)
                if int(ckpt["step"]) != step:
                    problem = f"holds step {ckpt['step']}, not {step}"
            except Exception as e:  # noqa: BLE001  (whatever torch raises on a bad archive)
                problem = f"unreadable ({type(e).__name__}: {e})"
        if problem is None:
            if problems:
                log.warning("resuming from the previous checkpoint %s (step %d): %s", storage.display(path), step,
                            "; ".join(problems))
            return ckpt
        problems.append(f"{storage.basename(path)}: {problem}")
    if problems:
        raise TrainError(f"no valid checkpoint in {storage.display(out_dir)} ({'; '.join(problems)}): start the run "
                         f"over with jobs/train.py --overwrite or use another run dir")
    return None


def _rank0_verdict(dist: D.Dist, decide, name: str):
    """``decide()`` on rank 0, its result (or the error it raised) on every rank: every rank raises the same error
    instead of some of them waiting in a collective for a rank that has stopped."""
    verdict, error = None, None
    if dist.is_main:
        try:
            verdict = decide()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            error, verdict = e, {"error": (type(e).__name__, str(e))}
    verdict = D.broadcast_object(verdict, name)
    if "error" in verdict:
        kind, msg = verdict["error"]
        cls = _ERRORS.get(kind)
        raise (cls(msg) if cls else TrainError(f"{kind}: {msg}")) from error
    return verdict


# ------------------------------------------------------------------------------------------------ loop

def load_ctr_net(cfg: Config, device) -> torch.nn.Module:
    model, _ = load_export(ctr_model_path(cfg, check=True), device)
    return model


def world_size() -> int:
    import horovod.torch as hvd
    return hvd.size()


def _raise_if_nonfinite_loss(ranks: list[int], step: int) -> None:
    if ranks:
        raise TrainError(f"non-finite loss at step {step} on rank(s) {ranks} of {world_size()}: a batch holds NaN/inf "
                         f"values or training diverged (check the dataset, lower train.lr); stopped before anything "
                         f"was written from this state")


def train_step(state: TrainState, method, raw, cfg: Config, gen: torch.Generator, ctr_net) -> dict:
    """One optimizer step on this rank's batch; ``TrainError`` on every rank when any rank's loss is not finite.

    The loss is on the host already (``loss_for`` returns it as a float), so the local check is free. With more than
    one rank the flags are summed over ranks: folded into the weight allreduce the row-selecting methods do anyway,
    else started before the backward pass and collected after the optimizer step (Horovod negotiates it with the
    step's gradients instead of spending a round trip of its own). A flagged step may have updated the parameters
    already; they are never written (the error propagates out of ``train``)."""
    ctr_probs = predict(REFERENCE_CTR, ctr_net, raw)[P_CTR] if ctr_net is not None else None
    batch = method.prepare(raw, cfg.train, gen, ctr_probs)
    out = state.model(batch.ids, batch.wts)
    loss, parts = loss_for(method, out, batch, cfg.train)
    step, bad, pending = state.step + 1, not math.isfinite(parts["loss"]), None
    if world_size() == 1:
        _raise_if_nonfinite_loss([0] if bad else [], step)
    elif method.selects_rows:
        # Horovod averages per-rank gradients; when ranks select different numbers of rows (BASE keeps clicks only)
        # (methods that train on every row with unit weights skip this extra allreduce: the shares are equal)
        # the average of per-rank means is not the mean over the global batch. Rescale each rank's mean by its
        # share of the global weight so the update equals the 1-process update on the same global batch.
        local = float(batch.weight.sum())
        summed = D.allreduce_sum([local] + D.one_hot_flag(bad), "selected_weight")
        _raise_if_nonfinite_loss(D.ranks_of(summed[1:]), step)
        total = summed[0]
        loss = loss * (local * world_size() / total if total > 0 else 0.0)
    else:
        pending = D.flag_ranks_async(bad, "nonfinite_loss")
    state.opt_sparse.zero_grad()
    state.opt_dense.zero_grad()
    loss.backward()
    state.opt_sparse.step()
    state.opt_dense.step()
    if pending is not None:
        _raise_if_nonfinite_loss(D.flag_ranks_wait(pending), step)
    parts["rows"] = len(batch)
    return parts


def check_finite_parameters(state: TrainState, dist: D.Dist, before: str) -> None:
    """Collective: ``TrainError`` on every rank when any rank's parameters hold NaN/inf (before a checkpoint or the
    export, so a diverged state is never written)."""
    bad = [n for n, p in state.model.named_parameters() if not bool(torch.isfinite(p).all())]
    ranks = D.flag_ranks(bool(bad), "nonfinite_parameters")
    if ranks:
        raise TrainError(f"non-finite parameters at step {state.step} on rank(s) {ranks} of {dist.size} (before the "
                         f"{before}{': ' + ', '.join(bad[:4]) if bad else ''}): training diverged (lower train.lr, "
                         f"check the dataset); nothing was written from this state")


def _first_batch(stream, dist: D.Dist):
    """Collective: every rank's first batch, or ``TrainError`` on every rank naming each rank without data and why."""
    first, problem = None, None
    try:
        first = next(stream)
    except StopIteration:
        problem = "its stream ended before the first batch"
    except Exception as e:  # noqa: BLE001  (reported on every rank below)
        problem = f"{type(e).__name__}: {e}"
    problems = D.allgather_object(problem, "first_batch")
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        raise TrainError(f"no training data on rank(s) {[r for r, _ in bad]} of {dist.size}, nothing was trained: "
                         + "; ".join(f"rank {r}: {p}" for r, p in bad))
    return first


def train(cfg: Config, dataset: str, out_dir: str, dist: D.Dist | None = None, stop_at_step: int | None = None,
          overwrite: bool = False) -> dict:
    """Train ``cfg.train.method`` on the train split of ``dataset``; write checkpoints/export under ``out_dir``.

    A run directory of the same inputs resumes from its newest valid checkpoint, or, when finished, returns its
    summary (``"skipped": True``) without training; one of other inputs is refused (``overwrite`` deletes it first).
    ``stop_at_step`` stops after that global step as a preempted job would (no final checkpoint, no export), for
    time-boxed runs and resume tests. Returns the summary (steps, samples, seconds, samples/s, last losses, run id;
    with a validation split its cut, evaluations and best AUC and step, and whether it stopped early) on every rank.
    """
    dist = dist or D.init(cfg.train.threads)
    dataset, out_dir = storage.resolve(dataset), storage.resolve(out_dir)
    out = Output(out_dir, RUN_KIND, job=f"train {cfg.train.method}", overwrite=overwrite,
                 refused=TrainOutputRefused, describe=_differences) if dist.is_main else None
    try:
        verdict = _rank0_verdict(dist, lambda: prepare(cfg, dataset, out, list_checkpoints, load_checkpoint),
                                 "train_verdict")
        if "finished" in verdict:
            return verdict["finished"]
        return _train(cfg, dataset, out_dir, dist, stop_at_step, verdict, out)
    finally:
        if out is not None:
            out.__exit__(None, None, None)


def _train(cfg: Config, dataset: str, out_dir: str, dist: D.Dist, stop_at_step: int | None, verdict: dict,
           out: Output | None) -> dict:
    t = cfg.train
    manifest, marker = verdict["manifest"], verdict["marker"]
    layout = layout_from_manifest(manifest)
    method = get_method(t.method)
    split = verdict.get("validation")  # None: no validation split (train.validation_share = 0)
    rows = subset_rows(manifest, TRAIN, t.sampling_rate) if split is None else V.train_rows(manifest, split,
                                                                                             t.sampling_rate)
    if rows <= 0:
        raise TrainError(f"no training rows at sampling rate {t.sampling_rate} before the validation cut "
                         f"(sample_id {split['cut_sample_id']}): lower train.validation_share or use a higher rate")
    per_epoch = steps_per_epoch(rows, t.batch_size, dist.size)
    total = per_epoch * t.epochs
    state = build_state(cfg, layout, dist)
    if split is not None:
        split["metric"] = V.target_for(t.method).name
        split["metric_defined"] = V.metric_defined(split, t.method)
        if split["metric_defined"]:
            state.tracker = V.Tracker(t.patience, t.best_by, choice_start(t, total))
        elif dist.is_main:
            log.warning("the validation rows of %s have one class only (%d rows, %d clicks, %d conversions): its "
                        "AUC is undefined, so %s trains to the end without early stopping or best-model selection",
                        t.method, split["rows"], split["clicks"], split["conversions"], t.method)
    if verdict["checkpoint"] is not None:  # rank 0 read it; every rank got it with the verdict
        state.restore(verdict["checkpoint"])
        log.info("rank %d resumed from step %d", dist.rank, state.step)
    else:
        D.broadcast_parameters(state.model)
    del verdict["checkpoint"]
    if not dist.is_main:
        state.best = None  # only rank 0 keeps (and checkpoints) the best weights
    ctr_net = load_ctr_net(cfg, dist.device) if method.needs_ctr_probs else None
    stream = train_stream(storage.join(dataset, TRAIN), manifest, t.sampling_rate, dist.rank, dist.size,
                          t.batch_size, t.shuffle_buffer, t.seed, t.reader_workers,
                          cut=split["cut_sample_id"] if split is not None else None,
                          pin=(dataset, manifest["run_id"]), prefetch=t.prefetch)
    if dist.is_main:
        log.info("training %s on %d rows (rate %s) x %d epochs: %d steps/epoch of %d x %d workers, from step %d%s",
                 t.method, rows, t.sampling_rate, t.epochs, per_epoch, t.batch_size, dist.size, state.step,
                 "" if split is None else f"; validation: the {split['rows']} rows from sample_id "
                 f"{split['cut_sample_id']} on, {split['metric']} every {t.eval_every} steps, patience {t.patience}")
    identity = {"run_id": marker["run_id"], "dataset_fingerprint": dataset_fingerprint(manifest),
                "dataset_run_id": manifest["run_id"]}
    validator = None
    if state.tracker is not None:
        width = int(manifest["layout"]["num_slots"])
        path = storage.join(dataset, TRAIN)
        cut = split["cut_sample_id"]
        validator = lambda model: V.evaluate(model, t.method, path, cut, width, dist.device)  # noqa: E731
    writer = _EventLog(out_dir, state.step) if dist.is_main else None
    try:
        batches = itertools.chain([_first_batch(stream, dist)], stream)
        for _ in range(state.step if state.step < total else 0):  # exact resume: replay the deterministic stream
            next(batches)                                              # up to the checkpoint (none left: export only)
        summary = _loop(state, method, batches, cfg, dist, total, out_dir, ctr_net, stop_at_step, per_epoch,
                        validator, writer)
    finally:
        stream.close()
        if writer is not None:
            writer.close()
    summary.update({"rows": rows, "steps_per_epoch": per_epoch, "world_size": dist.size, **identity})
    if split is not None:
        summary["validation"] = _validation_summary(split, state, t)
    if state.step == total or summary.get("stopped_early"):
        best_step = state.tracker.best_step if state.tracker is not None else None
        summary["exported_step"] = best_step if best_step is not None else state.step
        if best_step is not None and best_step != state.step:
            if dist.is_main:  # the export holds the best evaluation's weights, on every rank before the checks
                state.model.load_state_dict(state.best)
            D.broadcast_parameters(state.model)
        check_finite_parameters(state, dist, "export")
        if dist.is_main:
            check_pinned(dataset, manifest["run_id"], "training")
            export_model(state.model, t.method, cfg, layout, storage.join(out_dir, EXPORT), identity)
            export_portable(state.model, t.method, cfg, layout, out_dir, identity)  # model.ts.pt + model.portable.json
            storage.write_json(storage.join(out_dir, SUMMARY), summary)
            out.commit_in_place({"dataset_run_id": manifest["run_id"]})  # last: _SUCCESS and the commit record
    return summary


def _validation_summary(split: dict, state: TrainState, t) -> dict:
    """What the summary records of the validation split and of the selection made on it: every evaluation's AUC,
    log-loss and calibration, and the best one (``best``: the evaluation the export holds)."""
    out = {k: split[k] for k in ("share", "cut_sample_id", "rows", "clicks", "conversions", "metric",
                                 "metric_defined")}
    out.update({"eval_every": t.eval_every, "patience": t.patience, "best_by": t.best_by,
                "choose_from": t.choose_from, "from_step": None, "best": None, "best_auc": None, "best_step": None,
                "evals": []})
    if state.tracker is not None:
        out.update({"from_step": state.tracker.from_step, "best": state.tracker.best, "best_auc": state.tracker.best_auc,
                    "best_step": state.tracker.best_step, "evals": list(state.tracker.evals)})
    return out


class _EventLog:
    """Rank 0's TensorBoard writer under ``<out_dir>/tensorboard``, opened at the first scalar (a run that fails
    before logging anything leaves no event file behind). A resumed run (``step`` > 0) purges the events a lost
    attempt wrote past its checkpoint, so every step's scalars appear once."""

    def __init__(self, out_dir: str, step: int):
        self.url, self.step, self.writer, self._dir = storage.join(out_dir, TENSORBOARD), step, None, None

    def scalars(self, step: int, prefix: str, values: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._dir = storage.local_dir(self.url)  # the directory itself, or a local one uploaded at close
            self.writer = SummaryWriter(log_dir=self._dir.__enter__(), purge_step=self.step or None)
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self._dir.__exit__(None, None, None)
            self.writer = None


def _scalars(writer: _EventLog | None, step: int, prefix: str, values: dict) -> None:
    if writer is not None:
        writer.scalars(step, prefix, values)


def _evaluate(state: TrainState, dist: D.Dist, validator, writer) -> bool:
    """Collective: rank 0 scores the validation rows, every rank records the same scores; returns whether to stop.
    Rank 0 copies the weights when they are the best so far (``train.best_by``)."""
    scores, error = None, None
    if dist.is_main:
        try:
            scores = validator(state.model)
        except Exception as e:  # noqa: BLE001  (raised on every rank below, none is left waiting)
            error = f"{type(e).__name__}: {e}"
    scores, error = D.broadcast_object((scores, error), "validation_scores")
    if error:
        raise TrainError(f"the validation at step {state.step} failed on rank 0 ({error}); nothing was written from "
                         f"this state")
    improved = state.tracker.update(state.step, scores)
    if dist.is_main:
        if improved:
            state.keep_best()
        tr = state.tracker
        best = tr.best or {}
        log.info("validation at step %d: AUC %.5f, log-loss %.5f, calibration %.3f (best by %s: step %s, AUC %s, "
                 "log-loss %s; %d/%d evaluations without improvement%s)", state.step, scores["auc"], scores["logloss"],
                 scores["calibration"], tr.best_by, tr.best_step, _fmt(best.get("auc")), _fmt(best.get("logloss")),
                 tr.bad_evals, tr.patience, "" if state.step >= tr.from_step else
                 f"; before the cool-down: recorded, not a candidate until step {tr.from_step}")
        _scalars(writer, state.step, "validation", {**{k: scores[k] for k in ("auc", "logloss", "calibration")},
                                                    "best_auc": tr.best_auc, "best_logloss": best.get("logloss")})
    return state.tracker.stop


def _fmt(x) -> str:
    return "none" if x is None else f"{x:.5f}"


def _loop(state: TrainState, method, stream, cfg: Config, dist: D.Dist, total: int, out_dir: str, ctr_net,
          stop_at_step: int | None = None, per_epoch: int | None = None, validator=None, writer=None) -> dict:
    t = cfg.train
    per_epoch = per_epoch or total
    gen = torch.Generator(device=dist.device)
    progress = _progress(dist, total, state.step)
    start, start_step, samples, parts = time.time(), state.step, 0, {}
    eval_seconds, stopped_early = 0.0, False
    state.model.train()
    while state.step < total:
        raw = next(stream).to(dist.device)
        set_lr(state, lr_at(t, state.base_lr, state.step, total))
        gen.manual_seed(t.seed * 1_000_003 + dist.rank * 7919 + state.step)  # per-step seed: resumable exactly
        parts = train_step(state, method, raw, cfg, gen, ctr_net)
        state.step += 1
        samples += len(raw)
        if state.step % t.log_every == 0 or state.step == total:
            rate = samples * dist.size / max(time.time() - start - eval_seconds, 1e-9)
            state.history.append({"step": state.step, "samples_per_s": round(rate, 1),
                                  **{k: round(v, 6) for k, v in parts.items()}})
            progress(state.step, rate, parts)
            _scalars(writer, state.step, "train", {**{k: v for k, v in parts.items() if k != "rows"},
                                                   "samples_per_s": rate,
                                                   "lr": state.opt_dense.param_groups[0]["lr"]})
        if validator is not None and (state.step % t.eval_every == 0 or state.step % per_epoch == 0
                                      or state.step == total):
            t0 = time.time()
            stopped_early = _evaluate(state, dist, validator, writer) and state.step < total
            eval_seconds += time.time() - t0
        if state.step == stop_at_step:
            break
        if stopped_early:
            if dist.is_main:
                log.info("early stop at step %d of %d: %d evaluations without a better validation %s (best at "
                         "step %s)", state.step, total, state.tracker.bad_evals, state.tracker.best_by,
                         state.tracker.best_step)
            break
        if state.step % t.checkpoint_every == 0 or state.step == total:
            check_finite_parameters(state, dist, "checkpoint")
            if dist.is_main:
                save_checkpoint(state.checkpoint(cfg), out_dir)
    seconds = time.time() - start
    train_seconds = max(seconds - eval_seconds, 1e-9)
    out = {"method": t.method, "steps": state.step, "steps_this_run": state.step - start_step,
           "samples_this_run": samples * dist.size, "seconds": round(seconds, 3),
           "samples_per_s": round(samples * dist.size / train_seconds, 1),
           "last": {k: float(v) for k, v in parts.items()}, "history": state.history}
    if validator is not None:
        out.update({"stopped_early": stopped_early and state.step != stop_at_step,
                    "validation_seconds": round(eval_seconds, 3)})
    return out


def _progress(dist: D.Dist, total: int, initial: int):
    """Rank 0 reports: a tqdm bar on a terminal, periodic log lines otherwise; other ranks stay quiet."""
    if not dist.is_main:
        return lambda *a: None
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

        def update(step, rate, parts):
            bar.update(step - bar.n)
            bar.set_postfix(sps=f"{rate:,.0f}", **{k: f"{v:.4f}" for k, v in parts.items() if k != "rows"})
            if step >= total:
                bar.close()
        return update

    def log_line(step, rate, parts):
        log.info("step %d/%d  %s samples/s  %s", step, total, f"{rate:,.0f}",
                 "  ".join(f"{k}={v:.4f}" for k, v in parts.items() if k != "rows"))
    return log_line


# ------------------------------------------------------------------------------------------------ launchers

def _worker(jobs: list, overwrite: bool = False) -> list:
    """Entry point of a Horovod worker (executor or horovodrun process): train each (config dict, out_dir) in turn
    (a finished run of the same inputs is skipped inside ``train``, on rank 0's verdict)."""
    from esmm.cli import setup_logging
    setup_logging()
    if not jobs:
        return []
    dist = D.init(from_dict(jobs[0][0]).train.threads)
    return [train(from_dict(cfg_dict), dataset, out_dir, dist, overwrite=overwrite)
            for cfg_dict, dataset, out_dir in jobs]


def launch(jobs: list[tuple[Config, str, str]], workers: int, spark=None, overwrite: bool = False,
           parallel: int = 1) -> list[dict]:
    """Train several (config, dataset, out_dir) jobs with ``workers`` Horovod processes.

    Under ``horovodrun`` (or with one worker) this process is a worker itself; otherwise ``horovod.spark.run`` starts
    ``workers`` processes in Spark tasks of the given session. With one worker and ``parallel`` > 1 the jobs train
    side by side instead, each in its own Spark task (``_launch_parallel``). ``overwrite`` deletes each (owned) run
    directory before its training. Returns rank 0's summaries, in the jobs' order.
    """
    payload = [(to_dict(c), storage.resolve(d), storage.resolve(o)) for c, d, o in jobs]  # one spelling everywhere
    if parallel > 1 and len(payload) > 1 and not D.under_horovodrun():
        if workers != 1:
            raise TrainError(f"{parallel} runs at once train each run with one worker; train.workers={workers} asks "
                             f"for data-parallel runs: set experiment.parallel_runs=1 or train.workers=1")
        if spark is None:
            raise TrainError("runs side by side (experiment.parallel_runs > 1) need a Spark session")
        return _launch_parallel(spark, payload, parallel, overwrite)
    if workers == 1 or D.under_horovodrun():
        return _worker(payload, overwrite)
    import horovod.spark
    if spark is None:
        raise TrainError("train.workers > 1 needs a Spark session (or run under horovodrun)")
    if spark.sparkContext.defaultParallelism < workers:
        raise TrainError(f"train.workers={workers} but Spark has {spark.sparkContext.defaultParallelism} task "
                         f"slots; use --master local[{workers}] or more executors")
    for where in dict.fromkeys(p for _, d, o in payload for p in (d, storage.parent(o))):
        storage.check_shared(spark, where)  # a local path on a cluster must be one every executor sees
    env, executable = _worker_env(spark.sparkContext)
    results = horovod.spark.run(_worker, args=(payload, overwrite), num_proc=workers, use_gloo=True, verbose=1,
                                env=env, executable=executable)
    return results[0]


def _launch_parallel(spark, payload: list, parallel: int, overwrite: bool) -> list[dict]:
    """Train the jobs side by side, each in a one-task Spark job (its own Python worker, Horovod size 1), at most
    ``parallel`` at once: runs of different methods share nothing while they train, so on a machine whose cores one
    training cannot keep busy (the demo's small towers: 2 torch threads train no faster than 1) they add up, where
    two data-parallel workers of one run spend most of their step exchanging the embedding gradients
    (bench/RESULTS.md "Training"). A job that reads the reference CTR network's export (UNBIAS) starts after every job
    writing it has finished. Every job runs to its end even when another fails; the first failure in the jobs' order
    is then raised, as the class it had in the task, naming the run."""
    import concurrent.futures as cf
    sc = spark.sparkContext
    for where in dict.fromkeys(p for _, d, o in payload for p in (d, storage.parent(o))):
        storage.check_shared(spark, where)
    cfgs = [from_dict(c) for c, _, _ in payload]
    after = dependencies(payload)
    # the longest first (fewer idle slots at the end), the waiting jobs last (no slot idles on them)
    order = sorted(range(len(payload)), key=lambda i: (i in after, -_expected_cost(cfgs[i]), i))
    log.info("training %d runs, %d at a time, each in its own Spark task", len(payload), parallel)

    def run(i: int, futures: dict):
        for j in after.get(i, ()):
            if "error" in futures[j].result():
                return {"error": ("TrainError", f"{storage.display(payload[i][2])}: not trained: the reference CTR "
                                                f"network it needs ({storage.display(payload[j][2])}) failed")}
        sc.setJobDescription(f"train {storage.display(payload[i][2])}")
        return sc.parallelize([(i, payload[i])], 1).map(lambda job: _task(job, overwrite)).collect()[0]

    results: dict = {}
    with cf.ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="esmm-train") as pool:
        futures: dict = {}
        for i in order:
            futures[i] = pool.submit(run, i, futures)
        for i in order:
            try:
                results[i] = futures[i].result()
            except Exception as e:  # noqa: BLE001  (a waiting job whose dependency failed; Spark's own errors)
                results[i] = {"error": (type(e).__name__, f"{storage.display(payload[i][2])}: {e}")}
    for i in range(len(payload)):
        if "error" in results[i]:
            kind, msg = results[i]["error"]
            raise _ERRORS.get(kind, TrainError)(msg if kind in _ERRORS else f"{kind}: {msg}")
    return [results[i] for i in range(len(payload))]


def dependencies(payload: list) -> dict[int, list[int]]:
    """{job index: [indices of the jobs it waits for]} of (config dict, dataset, out_dir) jobs: a method that trains
    on the reference CTR network's pCTR (UNBIAS) waits for the job writing that network's export, when it is one of
    them (otherwise the export must exist already, and the run says so if it does not)."""
    cfgs = [from_dict(c) for c, _, _ in payload]
    writes = {storage.join(storage.resolve(o), EXPORT): i for i, (c, (_, _, o)) in enumerate(zip(cfgs, payload))
              if c.train.method == REFERENCE_CTR}
    return {i: [writes[p]] for i, c in enumerate(cfgs) if get_method(c.train.method).needs_ctr_probs
            and (p := ctr_model_path(c)) in writes and writes[p] != i}


def _expected_cost(cfg: Config) -> float:
    """A run's relative training time, for ordering only: its rows (sampling rate x epochs), less for methods that
    compute on a selection of them (the clicked rows: BASE, OVERSAMPLING, AMAN's share), more for two towers."""
    m = get_method(cfg.train.method)
    return cfg.train.sampling_rate * cfg.train.epochs * (0.4 if m.selects_rows else 1.0) * \
        (2.0 if m.task == TASK_MULTI else 1.0)


def _task(job: tuple, overwrite: bool) -> dict:
    """One job of ``_launch_parallel``, in a Spark task's Python worker: its summary, or its error as data (a Spark
    task's exception would reach the driver as a Java stack trace, and be retried)."""
    from esmm.cli import setup_logging
    setup_logging()
    _, (cfg_dict, dataset, out_dir) = job
    prefix = _RunPrefix("/".join(out_dir.rstrip("/").split("/")[-2:]))   # runs side by side: whose line is it
    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(prefix)
    try:
        return _worker([(cfg_dict, dataset, out_dir)], overwrite)[0]
    except Exception as e:  # noqa: BLE001  (sent back, raised on the driver)
        log.error("%s failed: %s: %s", storage.display(out_dir), type(e).__name__, e)
        return {"error": (type(e).__name__, f"{storage.display(out_dir)}: {e}")}
    finally:
        for h in handlers:
            h.removeFilter(prefix)


class _RunPrefix(logging.Filter):
    """Prefixes every log line of a side-by-side training with its run (``<unit>/<run>``)."""

    def __init__(self, run: str):
        super().__init__()
        self.run = run

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_esmm_run", None):
            record.msg, record._esmm_run = f"[{self.run}] {record.msg}", True
        return True


def _worker_env(sc) -> tuple[dict, str | None]:
    """Environment (added to the executor's own) and Python of the Horovod worker processes a Spark task starts.

    On a local master the executors are this machine's processes: this environment, this checkout on PYTHONPATH and
    this interpreter. On a cluster master they run in the executors' work dirs, where nothing of the driver's
    machine exists: the executors' Python (``spark.pyspark.python``, e.g. the packed venv ``./environment/bin/python``)
    with the job's ``--py-files`` (shipped into the work dir) on PYTHONPATH, relative to the work dir (the workers'
    cwd), and only the driver's ``HOROVOD_*``/``NCCL_*``/thread settings on top of the executor's environment.
    """
    if sc.master.startswith("local"):
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env, None
    py_files = [os.path.basename(f) for f in (sc.getConf().get("spark.submit.pyFiles") or "").split(",") if f]
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("HOROVOD_", "NCCL_")) or k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(py_files + ["."])  # as a Spark task's Python: the zips, the files' dir
    return env, sc.pythonExec
