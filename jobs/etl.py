"""ETL: raw Ali-CCP log -> hashed, split, tier-partitioned Parquet (see esmm/etl.py).

    ./spark-submit.sh jobs/etl.py --conf conf/demo.yaml [--raw DIR] [--out DIR] [--overwrite]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from esmm import cli  # noqa: E402


def main(argv=None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--raw", default=None, help="input directory (default: paths.raw)")
    p.add_argument("--out", default=None, help="output dataset directory (default: paths.dataset)")
    p.add_argument("--overwrite", action="store_true", help="replace an output built from other inputs/config")
    args, cfg = cli.parse(p, argv)
    from esmm.etl import run_etl
    from esmm.spark import get_spark
    spark = get_spark(cfg.spark, "esmm-etl")
    manifest = run_etl(spark, cfg, args.raw, args.out, overwrite=args.overwrite)
    print(summary(manifest))
    return manifest


def summary(m: dict) -> str:
    r = m["rows"]
    lines = [f"rows read {r['skeleton_read']:,} = written {r['written']:,} + quarantined {r['skeleton_quarantined']:,}"
             f" | common lines {r['common_read']:,} (quarantined {r['common_quarantined']:,})"]
    for split, s in m["splits"].items():
        ctr = s["clicks"] / max(s["rows"], 1)
        cvr = s["conversions"] / max(s["clicks"], 1)
        lines.append(f"{split:5s}: {s['rows']:>10,} rows  CTR {ctr:6.2%}  CVR|click {cvr:6.2%}  subsets "
                     + " ".join(f"{k}:{v['rows']:,}" for k, v in s.get("subsets", {}).items()))
    lines.append(f"slots per row {m['layout']['num_slots']}, embedding rows {m['layout']['num_embeddings']:,}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(cli.run(main))
