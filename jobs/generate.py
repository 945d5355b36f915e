"""Generate the synthetic Ali-CCP raw logs and their ground truth (see esmm/generator.py).

    python -m jobs.generate --conf conf/demo.yaml [--set generate.impressions=1000000] [--out DIR] [--overwrite]
    ./spark-submit.sh jobs/generate.py --conf conf/demo.yaml
"""
import sys

from esmm import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--out", default=None, help="output directory (default: paths.raw)")
    p.add_argument("--overwrite", action="store_true", help="replace an output generated with another config")
    args, cfg = cli.parse(p, argv)
    from esmm.generator import generate, summary_text
    from esmm.spark import get_spark
    spark = get_spark(cfg.spark, "esmm-generate")
    summary = generate(spark, cfg, args.out, overwrite=args.overwrite)
    print(summary_text(summary))
    return summary


def cli_main() -> int:
    """The console script (``esmm-generate``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
