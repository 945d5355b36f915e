"""Train one method (or several) with Horovod workers.

    ./spark-submit.sh jobs/train.py --conf conf/demo.yaml --set train.method=esmm --set train.workers=2
    horovodrun -np 2 python -m jobs.train --conf conf/demo.yaml --set train.method=esmm
    python -m jobs.train --conf conf/demo.yaml --set train.method=esmm            # one process

Output: <paths.runs>/<method>/ (checkpoint-<step>.pt/.json, model.pt, train_summary.json), or --out DIR.
A run directory of the same dataset and config resumes (or, when finished, is reused); one of other inputs is
refused with what differs: choose another --out, or pass --overwrite to delete that run and start over.
"""
import sys

from esmm import cli


def main(argv=None) -> list:
    p = cli.parser(__doc__)
    p.add_argument("--dataset", default=None, help="ETL output (default: paths.dataset)")
    p.add_argument("--out", default=None, help="run directory (default: <paths.runs>/<method>)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run directory first (only a training run this project created) and start over")
    args, cfg = cli.parse(p, argv)
    from esmm import distributed, storage
    from esmm.train import launch
    dataset = args.dataset or cfg.paths.dataset
    out = args.out or storage.join(cfg.paths.runs, cfg.train.method)
    spark = None
    if cfg.train.workers > 1 and not distributed.under_horovodrun():
        from esmm.spark import get_spark
        spark = get_spark(cfg.spark, "esmm-train")
    summaries = launch([(cfg, dataset, out)], cfg.train.workers, spark, overwrite=args.overwrite)
    for s in summaries:
        print(f"{s['method']}: {s['steps']} steps, {s['samples_per_s']:,.0f} samples/s, last loss {s['last'].get('loss', float('nan')):.4f}")
    return summaries


def cli_main() -> int:
    """The console script (``esmm-train``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
