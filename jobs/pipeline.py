"""The main job, end to end: generate raw logs -> ETL -> train every method (Horovod) -> evaluate -> Table 2.

    ./spark-submit.sh jobs/pipeline.py --conf conf/demo.yaml          # what `make demo` runs
    ./spark-submit.sh --master yarn jobs/pipeline.py --conf conf/default.yaml --set paths.raw=hdfs:///ali-ccp ...

With --skip-generate the raw log under paths.raw is used as is (e.g. the real Ali-CCP files). Every stage is
idempotent and resumable: a re-run reuses finished outputs.
"""
import sys
import time

from esmm import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--skip-generate", action="store_true", help="use the raw log already under paths.raw")
    args, cfg = cli.parse(p, argv)
    from esmm.etl import run_etl, summary_text as etl_summary
    from esmm import storage
    from esmm.experiment import run_experiment
    from esmm.generator import GROUND_TRUTH_DIR, generate, summary_text
    from esmm.spark import get_spark
    t0 = time.time()
    spark = get_spark(cfg.spark, "esmm-pipeline")
    stage = lambda name: print(f"\n== {name} ({time.time() - t0:.0f}s)", flush=True)  # noqa: E731
    if not args.skip_generate:
        stage("generate raw Ali-CCP logs")
        print(summary_text(generate(spark, cfg)))
    stage("ETL")
    print(etl_summary(run_etl(spark, cfg)))
    stage(f"train {len(cfg.experiment.methods)} methods + reference CTR x {cfg.experiment.repeats} repeats "
          f"with {cfg.train.workers} Horovod workers, evaluate on the test split")
    truth = storage.join(cfg.paths.raw, GROUND_TRUTH_DIR)
    exp = storage.join(cfg.paths.runs, "experiment")
    report = run_experiment(spark, cfg, cfg.paths.dataset, exp, truth if storage.exists(truth) else None)
    stage("done")
    print(storage.read_text(report["paths"]["md"]))
    print("reports: " + ", ".join(report["paths"].values()))
    from esmm.tracking import log_experiment
    log_experiment(cfg, report, exp)
    return report


def cli_main() -> int:
    """The console script (``esmm-pipeline``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
