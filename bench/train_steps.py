"""Where a training step's time goes with 1 and 2 workers: the account behind bench/train.py's (c)/(d).

    .venv/bin/python bench/train_steps.py [--dataset DIR] [--rows 400000] [--steps 150] [--batch 1024]

ESMM with the paper's sizes, 1 torch thread per process, batches sliced from numpy arrays in memory (no reader, so
only the step is measured), built with ``esmm.train.build_state`` as the jobs build it (Horovod's
DistributedOptimizer with the coalescing hook on the embedding gradient when there are 2 ranks). Three runs:

  1 process          the step alone;
  2 independent      two 1-process runs at once, no Horovod between them: what sharing the 2 cores alone costs;
  2 Horovod ranks    horovodrun -np 2 (Gloo): the same, plus the gradient exchange.

Each prints ms per step of its phases (rank 0 / the first process): forward+loss, backward (with 2 ranks this includes
Horovod's hooks: coalescing the sparse embedding gradient, starting the dense allreduces), the SparseAdam step (with 2
ranks: waiting for the allgather of the embedding gradient's rows, then the update over both ranks' rows) and the
dense Adam step (waiting for the allreduce, then the update); and the rows the embedding gradient has after
coalescing (distinct ids per batch). Then, under 2 Horovod ranks, an allgather of that many rows x (dim + 2 words of
index) float32 on its own in a tight loop: the floor of the exchange on this machine's loopback.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from train import in_memory_arrays, result_lines  # noqa: E402  (bench/train.py; bench/ is on sys.path as a script)

PHASES = ("forward", "backward", "sparse_step", "dense_step")


def measure(args) -> dict:
    import numpy as np
    import torch

    from esmm import distributed as D
    from esmm.artifacts import layout_from_manifest, read_manifest
    from esmm.batch import Batch
    from esmm.config import load_config
    from esmm.methods import get_method, loss_for
    from esmm.train import build_state
    cfg = load_config(os.path.join(ROOT, "conf", "demo.yaml"), ["train.method=esmm", "train.threads=1",
                                                                f"train.batch_size={args.batch}"])
    dist = D.init(1)
    ids, wts, click, conv = in_memory_arrays(args.dataset, args.rows)
    n = len(click)
    state = build_state(cfg, layout_from_manifest(read_manifest(args.dataset)), dist)
    D.broadcast_parameters(state.model)
    method, gen, b, warm = get_method("esmm"), torch.Generator(), args.batch, 20
    order = np.random.default_rng(dist.rank).permutation(n)
    spent = dict.fromkeys(PHASES, 0.0)
    distinct = []
    for s in range(args.steps + warm):
        if s == warm:
            spent, start, cpu0 = dict.fromkeys(PHASES, 0.0), time.perf_counter(), time.process_time()
            main0 = resource.getrusage(resource.RUSAGE_THREAD)
        idx = order[(s * b) % n:(s * b) % n + b]
        batch = method.prepare(Batch.from_numpy(ids[idx], wts[idx], click[idx], conv[idx]), cfg.train, gen, None)
        if s < warm:
            distinct.append(int(torch.unique(batch.ids).numel()))
        t0 = time.perf_counter()
        out = state.model(batch.ids, batch.wts)
        loss, _ = loss_for(method, out, batch, cfg.train)
        state.opt_sparse.zero_grad()
        state.opt_dense.zero_grad()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        state.opt_sparse.step()
        t3 = time.perf_counter()
        state.opt_dense.step()
        t4 = time.perf_counter()
        for k, v in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[k] += v
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    main1 = resource.getrusage(resource.RUSAGE_THREAD)
    main_user, main_sys = main1.ru_utime - main0.ru_utime, main1.ru_stime - main0.ru_stime
    res = {"rank": dist.rank, "size": dist.size, "ms": {k: 1000 * v / args.steps for k, v in spent.items()},
           "step_ms": 1000 * wall / args.steps, "samples_per_s": b * dist.size * args.steps / wall,
           "cpu_per_wall": cpu / wall, "main_user_ms": 1000 * main_user / args.steps,
           "main_sys_ms": 1000 * main_sys / args.steps,
           "other_threads_ms": 1000 * (cpu - main_user - main_sys) / args.steps,
           "distinct_rows": float(np.mean(distinct)),
           "embedding_dim": int(cfg.model.embedding_dim), "slots": int(ids.shape[1])}
    if dist.size > 1:
        import horovod.torch as hvd
        x = torch.randn(int(res["distinct_rows"]), res["embedding_dim"] + 2)
        for i in range(40):
            if i == 10:
                hvd.allreduce(torch.zeros(1), name="bench.barrier")
                t0 = time.perf_counter()
            hvd.allgather(x, name="bench.allgather")
        res["allgather_alone_ms"] = 1000 * (time.perf_counter() - t0) / 30
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="/tmp/esmm-bench-train/dataset",
                   help="an ETL'd dataset (bench/train.py builds one from conf/demo.yaml into its --workdir)")
    p.add_argument("--rows", type=int, default=400_000)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.measure:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    me = [sys.executable, os.path.abspath(__file__), "--measure", "--dataset", args.dataset, "--rows",
          str(args.rows), "--steps", str(args.steps), "--batch", str(args.batch)]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        res = result_lines(r.stdout)
        if r.returncode != 0 or not res:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return res

    one = run(me)[0]
    procs = [subprocess.Popen(me, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    pair = [result_lines(pr.communicate()[0])[0] for pr in procs]
    ranks = sorted(run([os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np", "2", "--gloo"] + me),
                   key=lambda r: r["rank"])
    rows = [("1 process", one, one["samples_per_s"]), ("2 independent", pair[0], sum(r["samples_per_s"] for r in pair)),
            ("2 Horovod ranks", ranks[0], ranks[0]["samples_per_s"])]
    print(f"\nESMM, batch {args.batch} per process, 1 torch thread, {args.steps} steps after 20 warm-up, "
          f"{args.rows} rows of {args.dataset}; ms per step (the first process / rank 0);\n"
          "main usr/sys: the training thread's CPU per step in user and kernel mode, others: every other thread's "
          "(Horovod's background thread, Gloo's, the allocator's)")
    print(f"{'run':18s} {'forward':>8s} {'backward':>9s} {'sparse':>7s} {'dense':>6s} {'step':>6s} {'cpu/wall':>9s} "
          f"{'samples/s':>10s} {'main usr':>9s} {'main sys':>9s} {'others':>7s}")
    for name, r, rate in rows:
        m = r["ms"]
        print(f"{name:18s} {m['forward']:8.1f} {m['backward']:9.1f} {m['sparse_step']:7.1f} {m['dense_step']:6.1f} "
              f"{r['step_ms']:6.1f} {r['cpu_per_wall']:9.2f} {rate:10.0f} {r['main_user_ms']:9.1f} "
              f"{r['main_sys_ms']:9.1f} {r['other_threads_ms']:7.1f}")
    pr, rk = rows[1][2], rows[2][2]
    print(f"\nembedding gradient rows per step after coalescing: {one['distinct_rows']:.0f} of "
          f"{args.batch * one['slots']} slots; an allgather of that many rows x {one['embedding_dim'] + 2} float32 "
          f"({one['distinct_rows'] * (one['embedding_dim'] + 2) * 4 / 1e6:.1f} MB per rank) alone: "
          f"{ranks[0]['allgather_alone_ms']:.1f} ms")
    print(f"2 independent / 1 process = {pr / one['samples_per_s']:.2f}; 2 Horovod ranks / 1 process = "
          f"{rk / one['samples_per_s']:.2f}; 2 Horovod ranks / 2 independent = {rk / pr:.2f}")
    extra = ranks[0]["step_ms"] - pair[0]["step_ms"]
    print(f"a Horovod rank's step is {extra:.1f} ms longer than an independent process's on the same shared cores: "
          f"the exchange (allgather floor above) and the second coalescing of both ranks' rows in SparseAdam")


if __name__ == "__main__":
    main()
