"""ETL: raw Ali-CCP log -> hashed, split, tier-partitioned Parquet (see esmm/etl.py).

    ./spark-submit.sh jobs/etl.py --conf conf/demo.yaml [--raw DIR] [--out DIR] [--overwrite]
"""
import sys

from esmm import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--raw", default=None, help="input directory (default: paths.raw)")
    p.add_argument("--out", default=None, help="output dataset directory (default: paths.dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an output built from other inputs/config")
    args, cfg = cli.parse(p, argv)
    from esmm.etl import run_etl, summary_text
    from esmm.spark import get_spark
    spark = get_spark(cfg.spark, "esmm-etl")
    manifest = run_etl(spark, cfg, args.raw, args.out, overwrite=args.overwrite)
    print(summary_text(manifest))
    return manifest


def cli_main() -> int:
    """The console script (``esmm-etl``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
