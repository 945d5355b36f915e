"""Score trained runs on the held-out test split and compute the paper's global AUCs (Spark).

    ./spark-submit.sh jobs/evaluate.py --conf conf/demo.yaml --runs data/demo/runs/esmm data/demo/runs/base \
        --ctr data/demo/runs/ctr [--out DIR]

Writes <out>/predictions (Parquet: sample_id, click, conversion, p_ctr, p_cvr, p_ctcvr, method, run_id) and
<out>/metrics.json; prints CTR / CVR / CTCVR AUC (and entire-space CVR AUC when the generator's ground truth exists).
"""
import sys

from esmm import cli


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--dataset", default=None, help="ETL output (default: paths.dataset)")
    p.add_argument("--runs", nargs="+", required=True, help="run directories holding model.pt")
    p.add_argument("--ctr", default=None, help="run directory of the reference CTR network (paper protocol)")
    p.add_argument("--truth", default=None, help="generator ground truth (default: <paths.raw>/ground_truth)")
    p.add_argument("--out", default=None, help="output directory (default: <paths.runs>/evaluation)")
    args, cfg = cli.parse(p, argv)
    from esmm import storage
    from esmm.evaluate import evaluate_runs
    from esmm.spark import get_spark
    spark = get_spark(cfg.spark, "esmm-evaluate")
    out = storage.resolve(args.out or storage.join(cfg.paths.runs, "evaluation"))
    truth = args.truth or storage.join(cfg.paths.raw, "ground_truth")
    res = evaluate_runs(spark, args.dataset or cfg.paths.dataset, args.runs, args.ctr, out, truth, cfg.evaluate.threads,
                        cfg.evaluate)
    print(f"{'run':24s} {'task':18s} {'AUC':>8s} {'GAUC':>8s} {'logloss':>8s} {'calib':>7s} {'n':>9s}")
    for r in sorted(res["metrics"], key=lambda r: (r["run_id"], r["task"])):
        print(f"{r['run_id']:24s} {r['task']:18s} {r['auc']:8.4f} {r.get('gauc', float('nan')):8.4f} "
              f"{r.get('logloss', float('nan')):8.4f} {r.get('calibration', float('nan')):7.3f} {r.get('n', 0):9d}")
    if res["division_clipped"]:
        print(f"DIVISION: {res['division_clipped']} pCVR values > 1 clipped to 1")
    from esmm.tracking import log_evaluation
    log_evaluation(cfg, res, out)
    return res


def cli_main() -> int:
    """The console script (``esmm-evaluate``): the exit code of :func:`main` (esmm/cli.py)."""
    return cli.run(main)


if __name__ == "__main__":
    sys.exit(cli_main())
