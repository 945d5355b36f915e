"""Reproduce the paper's Table 2 and Figure 3 on a dataset: every method x repeats x training sampling rates.

    ./spark-submit.sh jobs/experiment.py --conf conf/demo.yaml [--exp DIR] [--table-rate 1.0]

With --train RUN..., only those runs of every unit are trained (e.g. --train ctr, then --train esmm base): one
scheduler task per method (examples/airflow/esmm_pipeline.py); the experiment without --train then scores them.

Resumable: finished units (<exp>/metrics/*.json) and finished trainings are skipped on a re-run, when they were built
from the same dataset build and config (else an error; --overwrite starts over).
Writes <exp>/table2.{md,csv,json} (with the DeLong intervals and ESMM-vs-competitor tests), significance.csv (one
paired test per unit, task and competitor) and <exp>/figure3.{png,csv} (AUC and ESMM's gain over BASE against
training impressions). A scaling study is this job over several rates, e.g. (bench/RESULTS.md, "Figure 3"):

    ./spark-submit.sh jobs/experiment.py --conf conf/demo.yaml --exp data/scaling \
        --set "experiment.methods=[base, division, esmm_ns, esmm]" --set experiment.repeats=3 \
        --set "experiment.figure_methods=[]"
"""
import sys

from esmm import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--dataset", default=None, help="ETL output (default: paths.dataset)")
    p.add_argument("--exp", default=None, help="experiment directory (default: <paths.runs>/experiment)")
    p.add_argument("--truth", default=None, help="generator ground truth (default: <paths.raw>/ground_truth)")
    p.add_argument("--table-rate", type=float, default=None, help="sampling rate of Table 2 (default: largest)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: remove the experiment directory (only one this project created) first")
    p.add_argument("--train", nargs="+", default=None, metavar="RUN",
                   help="only train these runs of every unit (ctr, a method, or a variant such as aman[rate=0.2]) "
                        "and stop: a scheduler's per-method task; the experiment without --train then scores them")
    args, cfg = cli.parse(p, argv)
    from esmm import storage
    from esmm.experiment import run_experiment, train_runs
    from esmm.spark import get_spark
    exp = storage.resolve(args.exp or storage.join(cfg.paths.runs, "experiment"))
    if args.train is not None:
        if args.overwrite:
            p.error("--train reuses or resumes the experiment's runs; --overwrite applies to the whole experiment")
        from esmm import distributed
        alone = (cfg.train.workers == 1 and cfg.experiment.parallel_runs == 1) or distributed.under_horovodrun()
        spark = None if alone else get_spark(cfg.spark, "esmm-experiment-train")
        summaries = train_runs(spark, cfg, args.dataset or cfg.paths.dataset, exp, args.train, args.table_rate)
        for s in summaries:
            print(f"{s['method']}: {s['steps']} steps, exported step {s.get('exported_step')}")
        return {"train": summaries}
    spark = get_spark(cfg.spark, "esmm-experiment")
    truth = args.truth or storage.join(cfg.paths.raw, "ground_truth")
    report = run_experiment(spark, cfg, args.dataset or cfg.paths.dataset, exp,
                            truth if storage.exists(truth) else None, args.table_rate, args.overwrite)
    print(report["text"])
    print("\nreports: " + ", ".join(report["paths"].values()))
    from esmm.tracking import log_experiment
    log_experiment(cfg, report, exp)
    return report


def cli_main() -> int:
    """The console script (``esmm-experiment``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
