"""Run under horovodrun (or alone): train K steps on fixed global batches, each rank taking its slice.

usage: hvd_equivalence.py DATASET CONF OUT_PREFIX GLOBAL_BATCH STEPS METHOD[,METHOD...]
First, OUT_PREFIX.wait.json: the wall and CPU seconds rank 0's thread spent in a collective that rank 1 joins 0.5 s
late (Horovod's own wait spins; ``esmm.distributed`` makes it sleep between polls). Then writes
OUT_PREFIX.<method>.rank<r>.pt with the final parameters of each rank (and OUT_PREFIX.<method>.init.pt), one
method after the other in one process (a horovodrun start costs more than the steps). A method that needs the
reference CTR network's pCTR (UNBIAS) gets a CTR network initialized from a fixed seed, the same in every process.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

import schemas as S  # noqa: E402
from esmm import distributed as D  # noqa: E402
from esmm.batch import Batch  # noqa: E402
from esmm.config import load_config  # noqa: E402
from esmm.methods import REFERENCE_CTR, build_model, get_method  # noqa: E402
from esmm.artifacts import layout_from_manifest, read_manifest  # noqa: E402
from esmm.train import build_state, train_step  # noqa: E402


def main(dataset, conf, out, global_batch, steps, methods):
    dist = D.init(1)
    waited = time_a_late_collective(dist)
    if dist.rank == 0:
        Path(f"{out}.wait.json").write_text(json.dumps(waited))
    for method in methods.split(","):
        run(dataset, conf, f"{out}.{method}", int(global_batch), int(steps), method, dist)


def time_a_late_collective(dist):
    D.allreduce_sum([0.0], "wait.sync")
    if dist.rank == 1:
        time.sleep(0.5)
    wall, cpu = time.perf_counter(), time.thread_time()
    D.allreduce_sum([1.0], "wait.late")
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.thread_time() - cpu, "size": dist.size}


def run(dataset, conf, out, global_batch, steps, method, dist):
    cfg = load_config(conf, [f"train.method={method}"])
    table = pq.read_table(f"{dataset}/train", columns=[S.SAMPLE_ID, S.CLICK, S.CONVERSION, S.FEAT_IDS, S.FEAT_WTS])
    table = table.sort_by(S.SAMPLE_ID)
    ids = np.stack(table[S.FEAT_IDS].to_numpy(zero_copy_only=False))
    wts = np.stack(table[S.FEAT_WTS].to_numpy(zero_copy_only=False))
    click, conv = table[S.CLICK].to_numpy(), table[S.CONVERSION].to_numpy()
    layout = layout_from_manifest(read_manifest(dataset))
    ctr_net = None
    if get_method(method).needs_ctr_probs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            ctr_net = build_model(REFERENCE_CTR, layout, cfg.model).eval()
    state = build_state(cfg, layout, dist)
    D.broadcast_parameters(state.model)
    if dist.rank == 0:
        torch.save({n: p.detach().clone() for n, p in state.model.state_dict().items()}, f"{out}.init.pt")
    gen = torch.Generator()
    local = global_batch // dist.size
    for k in range(steps):
        lo = k * global_batch + dist.rank * local
        sl = slice(lo, lo + local)
        raw = Batch.from_numpy(ids[sl], wts[sl], click[sl], conv[sl])
        gen.manual_seed(k)
        train_step(state, get_method(method), raw, cfg, gen, ctr_net)
    torch.save({n: p.detach().clone() for n, p in state.model.state_dict().items()}, f"{out}.rank{dist.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
