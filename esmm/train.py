"""The training loop: one code path for 1 process, ``horovodrun -np N`` and ``horovod.spark.run`` workers.

Optimizers: the embedding table has sparse gradients and goes to ``SparseAdam`` (a *lazy* Adam: only the rows
touched by a batch get their moments and values updated; dense Adam would decay every row's moments every step and
is over 10x slower on the table, see STACK.md); the towers go to ``Adam``. Both use the paper's betas/eps.
With ``train.scale_lr`` the learning rate is multiplied by the number of workers (the linear scaling rule: each step
averages gradients over workers x batch_size samples); off by default, so runs at different world sizes take the same
per-step update size.

Run directory (``out_dir``): ``checkpoint.pt`` (rank 0, every ``checkpoint_every`` steps and at the end, atomic),
``model.pt`` (the export scoring needs: weights, resolved config, feature layout, method; loadable with
``torch.load(weights_only=True)``), ``train_summary.json``.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from esmm import distributed as D
from esmm.config import Config, from_dict, to_dict
from esmm.data import steps_per_epoch, subset_rows, train_stream
from esmm.features import FeatureLayout
from esmm.methods import all_rows, get_method, loss_for, predict
from esmm.model import build_model, sparse_parameters
from schemas.dataset import MANIFEST, P_CTR, TRAIN

log = logging.getLogger(__name__)
EXPORT = "model.pt"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "train_summary.json"
EXPORT_FORMAT = 1


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says what is missing."""


# ------------------------------------------------------------------------------------------------ files

def read_manifest(dataset: str) -> dict:
    """The ETL manifest of a local path or a URL pyarrow can open (hdfs://, s3://, file://)."""
    path = f"{dataset.rstrip('/')}/{MANIFEST}"
    if "://" in dataset:
        import pyarrow.fs as pafs
        fs, inner = pafs.FileSystem.from_uri(path)
        if fs.get_file_info(inner).type == pafs.FileType.NotFound:
            raise TrainError(f"no dataset manifest at {path}: run jobs/etl.py first")
        with fs.open_input_stream(inner) as f:
            return json.loads(f.read())
    if not os.path.exists(path):
        raise TrainError(f"no dataset manifest at {path}: run jobs/etl.py first")
    with open(path) as f:
        return json.load(f)


def layout_from_manifest(manifest: dict) -> FeatureLayout:
    lay = manifest["layout"]
    return FeatureLayout(tuple(lay["fields"]), tuple(lay["buckets"]), tuple(lay["max_len"]))


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, then rename: readers never see a partial file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def export_model(model: torch.nn.Module, method: str, cfg: Config, layout: FeatureLayout, path: str) -> None:
    atomic_save({"format": EXPORT_FORMAT, "method": method, "state_dict": model.state_dict(),
                 "config": to_dict(cfg), "layout": layout.to_dict()}, path)


def load_export(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, export dict) from a ``model.pt``; safe to load (``weights_only=True``)."""
    if not os.path.exists(path):
        raise TrainError(f"no model export at {path}")
    blob = torch.load(path, map_location=device, weights_only=True)
    return load_export_blob(blob).to(device), blob


def load_export_blob(blob: dict) -> torch.nn.Module:
    """The model (eval mode) of an already loaded export dict."""
    if blob.get("format") != EXPORT_FORMAT:
        raise TrainError(f"unsupported model export format {blob.get('format')!r} (expected {EXPORT_FORMAT})")
    lay = blob["layout"]
    layout = FeatureLayout(tuple(lay["fields"]), tuple(lay["buckets"]), tuple(lay["max_len"]))
    model = build_model(blob["method"], layout, from_dict(blob["config"]).model)
    model.load_state_dict(blob["state_dict"])
    return model.eval()


# ------------------------------------------------------------------------------------------------ state

@dataclass
class TrainState:
    model: torch.nn.Module
    opt_sparse: torch.optim.Optimizer
    opt_dense: torch.optim.Optimizer
    step: int = 0
    history: list = field(default_factory=list)

    def checkpoint(self, cfg: Config) -> dict:
        return {"model": self.model.state_dict(), "opt_sparse": self.opt_sparse.state_dict(),
                "opt_dense": self.opt_dense.state_dict(), "step": self.step, "history": self.history,
                "rng": {"torch": torch.get_rng_state()}, "config": to_dict(cfg)}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.opt_sparse.load_state_dict(ckpt["opt_sparse"])
        self.opt_dense.load_state_dict(ckpt["opt_dense"])
        self.step, self.history = int(ckpt["step"]), list(ckpt["history"])
        torch.set_rng_state(ckpt["rng"]["torch"])


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
    return TrainState(model, opt_s, opt_d)


def resume_or_broadcast(state: TrainState, ckpt_path: str, cfg: Config, dist: D.Dist) -> None:
    """Rank 0 reads the last checkpoint (if any) and every rank gets it; otherwise rank 0's weights go to all."""
    ckpt = None
    if dist.is_main and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["config"]["train"] != to_dict(cfg)["train"]:
            raise TrainError(f"{ckpt_path} was written with another train config; delete it or use another run dir")
    ckpt = D.broadcast_object(ckpt, "resume")
    if ckpt is not None:
        state.restore(ckpt)
        log.info("rank %d resumed from step %d", dist.rank, state.step)
    else:
        D.broadcast_parameters(state.model)


# ------------------------------------------------------------------------------------------------ loop

def load_ctr_net(cfg: Config, device) -> torch.nn.Module:
    path = cfg.train.ctr_model or os.path.join(cfg.paths.runs, "ctr", EXPORT)
    if not os.path.exists(path):
        raise TrainError(f"method {cfg.train.method!r} needs the reference CTR network at {path}: "
                         f"train it first (train.method=ctr) or set train.ctr_model")
    model, _ = load_export(path, device)
    return model


def world_size() -> int:
    import horovod.torch as hvd
    return hvd.size()


def train_step(state: TrainState, method, raw, cfg: Config, gen: torch.Generator, ctr_net) -> dict:
    ctr_probs = predict("ctr", ctr_net, raw)[P_CTR] if ctr_net is not None else None
    batch = method.prepare(raw, cfg.train, gen, ctr_probs)
    out = state.model(batch.ids, batch.wts)
    loss, parts = loss_for(method, out, batch)
    if world_size() > 1 and method.rows is not all_rows:
        # Horovod averages per-rank gradients; when ranks select different numbers of rows (BASE keeps clicks only)
        # (methods that train on every row with unit weights skip this extra allreduce: the shares are equal)
        # the average of per-rank means is not the mean over the global batch. Rescale each rank's mean by its
        # share of the global weight so the update equals the 1-process update on the same global batch.
        local = float(batch.weight.sum())
        total = D.allreduce_sum([local], "selected_weight")[0]
        loss = loss * (local * world_size() / total if total > 0 else 0.0)
    state.opt_sparse.zero_grad()
    state.opt_dense.zero_grad()
    loss.backward()
    state.opt_sparse.step()
    state.opt_dense.step()
    parts["rows"] = len(batch)
    return parts


def train(cfg: Config, dataset: str, out_dir: str, dist: D.Dist | None = None, stop_at_step: int | None = None) -> dict:
    """Train ``cfg.train.method`` on the train split of ``dataset``; write checkpoints/export under ``out_dir``.

    A run directory that already holds a checkpoint resumes from it. ``stop_at_step`` stops after that global step
    as a preempted job would (no final checkpoint, no export), for time-boxed runs and resume tests.
    Returns the summary (steps, samples, seconds, samples/s, last losses) on every rank.
    """
    dist = dist or D.init(cfg.train.threads)
    t = cfg.train
    os.makedirs(out_dir, exist_ok=True)
    manifest = read_manifest(dataset)
    layout = layout_from_manifest(manifest)
    method = get_method(t.method)
    rows = subset_rows(manifest, TRAIN, t.sampling_rate)
    per_epoch = steps_per_epoch(rows, t.batch_size, dist.size)
    total = per_epoch * t.epochs
    state = build_state(cfg, layout, dist)
    resume_or_broadcast(state, os.path.join(out_dir, CHECKPOINT), cfg, dist)
    ctr_net = load_ctr_net(cfg, dist.device) if method.needs_ctr_probs else None
    stream = train_stream(os.path.join(dataset, TRAIN), manifest, t.sampling_rate, dist.rank, dist.size,
                          t.batch_size, t.shuffle_buffer, t.seed, t.reader_workers)
    if dist.is_main:
        log.info("training %s on %d rows (rate %s) x %d epochs: %d steps/epoch of %d x %d workers, from step %d",
                 t.method, rows, t.sampling_rate, t.epochs, per_epoch, t.batch_size, dist.size, state.step)
    try:
        for _ in range(state.step):  # exact resume: replay the deterministic stream up to the checkpoint
            next(stream)
        summary = _loop(state, method, stream, cfg, dist, total, out_dir, ctr_net, stop_at_step)
    finally:
        stream.close()
    summary.update({"rows": rows, "steps_per_epoch": per_epoch, "world_size": dist.size})
    if dist.is_main and state.step == total:
        export_model(state.model, t.method, cfg, layout, os.path.join(out_dir, EXPORT))
        with open(os.path.join(out_dir, SUMMARY), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _loop(state: TrainState, method, stream, cfg: Config, dist: D.Dist, total: int, out_dir: str, ctr_net,
          stop_at_step: int | None = None) -> dict:
    t = cfg.train
    gen = torch.Generator(device=dist.device)
    progress = _progress(dist, total, state.step)
    start, start_step, samples, parts = time.time(), state.step, 0, {}
    state.model.train()
    while state.step < total:
        raw = next(stream).to(dist.device)
        gen.manual_seed(t.seed * 1_000_003 + dist.rank * 7919 + state.step)  # per-step seed: resumable exactly
        parts = train_step(state, method, raw, cfg, gen, ctr_net)
        state.step += 1
        samples += len(raw)
        if state.step % t.log_every == 0 or state.step == total:
            rate = samples * dist.size / max(time.time() - start, 1e-9)
            state.history.append({"step": state.step, "samples_per_s": round(rate, 1),
                                  **{k: round(v, 6) for k, v in parts.items()}})
            progress(state.step, rate, parts)
        if state.step == stop_at_step:
            break
        if dist.is_main and (state.step % t.checkpoint_every == 0 or state.step == total):
            atomic_save(state.checkpoint(cfg), os.path.join(out_dir, CHECKPOINT))
    seconds = time.time() - start
    return {"method": t.method, "steps": state.step, "steps_this_run": state.step - start_step,
            "samples_this_run": samples * dist.size, "seconds": round(seconds, 3),
            "samples_per_s": round(samples * dist.size / max(seconds, 1e-9), 1),
            "last": {k: float(v) for k, v in parts.items()}, "history": state.history}


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

def _worker(jobs: list) -> list:
    """Entry point of a Horovod worker (executor or horovodrun process): train each (config dict, out_dir) in turn."""
    from esmm.cli import setup_logging
    setup_logging()
    dist = None
    results = []
    for cfg_dict, dataset, out_dir in jobs:
        cfg = from_dict(cfg_dict)
        done = finished_summary(out_dir, cfg)
        if done is not None:
            results.append(done)
            continue
        dist = dist or D.init(cfg.train.threads)
        results.append(train(cfg, dataset, out_dir, dist))
    return results


def finished_summary(out_dir: str, cfg: Config) -> dict | None:
    """The summary of a run directory that already holds a finished export of the same train config, else None."""
    export, summary = os.path.join(out_dir, EXPORT), os.path.join(out_dir, SUMMARY)
    if not (os.path.exists(export) and os.path.exists(summary)):
        return None
    blob = torch.load(export, map_location="cpu", weights_only=True)
    if blob["config"]["train"] != to_dict(cfg)["train"] or blob["config"]["model"] != to_dict(cfg)["model"]:
        return None
    with open(summary) as f:
        return {**json.load(f), "skipped": True}


def launch(jobs: list[tuple[Config, str, str]], workers: int, spark=None) -> list[dict]:
    """Train several (config, dataset, out_dir) jobs with ``workers`` Horovod processes.

    Under ``horovodrun`` (or with one worker) this process is a worker itself; otherwise ``horovod.spark.run`` starts
    ``workers`` processes in Spark tasks of the given session. Returns rank 0's summaries.
    """
    local = lambda p: p if "://" in p else os.path.abspath(p)  # noqa: E731  (executors run elsewhere)
    payload = [(to_dict(c), local(d), local(o)) for c, d, o in jobs]
    if workers == 1 or D.under_horovodrun():
        return _worker(payload)
    import horovod.spark
    if spark is None:
        raise TrainError("train.workers > 1 needs a Spark session (or run under horovodrun)")
    if spark.sparkContext.defaultParallelism < workers:
        raise TrainError(f"train.workers={workers} but Spark has {spark.sparkContext.defaultParallelism} task "
                         f"slots; use --master local[{workers}] or more executors")
    env, executable = _worker_env(spark.sparkContext)
    results = horovod.spark.run(_worker, args=(payload,), num_proc=workers, use_gloo=True, verbose=1,
                                env=env, executable=executable)
    return results[0]


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
