"""Score any data with a trained model: an ETL'd dataset (any split, any sampling-rate subset) or a raw Ali-CCP log.

    ./spark-submit.sh jobs/predict.py --conf conf/demo.yaml --model data/demo/runs/esmm --out data/demo/predict/esmm
    ./spark-submit.sh jobs/predict.py --model RUN_DIR --ctr CTR_RUN_DIR --dataset DIR --split all --out DIR
    ./spark-submit.sh jobs/predict.py --model RUN_DIR --raw DIR_OF_ALI_CCP_FILES --out DIR

Writes <out>/predictions (Parquet: sample_id, split, p_ctr, p_cvr, p_ctcvr), <out>/predict.json and, for a raw log,
<out>/quarantine (rows read = scored + quarantined). Single-task CVR methods take pCTR from the reference CTR network
(--ctr), as in evaluation. A finished output of the same model and inputs is kept; one of others needs --overwrite.
See esmm/predict.py.
"""
import sys

from esmm import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="run directory holding model.pt (or the model.pt file)")
    p.add_argument("--ctr", default=None, help="run directory of the reference CTR network (single-task CVR methods)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help="ETL output to score (default: paths.dataset)")
    src.add_argument("--raw", default=None, help="raw Ali-CCP log directory to parse and score instead of a dataset")
    p.add_argument("--split", default=None, choices=("train", "test", "all"), help="dataset split (default test)")
    p.add_argument("--rate", type=float, default=None, help="only the dataset's nested subset of this sampling rate")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an output of another model or other inputs (only predictions this project wrote)")
    args, cfg = cli.parse(p, argv)
    if args.raw and (args.split or args.rate is not None):
        p.error("--split and --rate select rows of a dataset; a raw log (--raw) is scored whole")
    from esmm.predict import predict, summary_text
    from esmm.spark import get_spark
    spark = get_spark(cfg.spark, "esmm-predict")
    dataset = None if args.raw else (args.dataset or cfg.paths.dataset)
    summary = predict(spark, cfg, args.model, args.out, ctr=args.ctr, dataset=dataset, split=args.split or "test",
                      rate=args.rate, raw=args.raw, overwrite=args.overwrite)
    print(summary_text(summary))
    return summary


def cli_main() -> int:
    """The console script (``esmm-predict``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
