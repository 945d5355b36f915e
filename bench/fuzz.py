"""Fuzz the raw-line parsers for longer than the test suite does: the properties of tests/test_fuzz.py, random seed.

    .venv/bin/python bench/fuzz.py                                  # 2000 cases per property
    .venv/bin/python bench/fuzz.py --examples 20000 --seed 7        # longer, reproducible
    .venv/bin/python bench/fuzz.py --properties numbers             # some of: skeleton, common, numbers

Per property (``skeleton`` / ``common``: fuzzed raw files of that kind; ``numbers``: one number of a valid line
spelled at random, parsed alone and among bad numbers) it prints the cases run, seconds and cases/s, then how many
cases exercised each mutation kind. A failing property prints hypothesis's minimal failing case and a
``@reproduce_failure`` blob, and the script exits with status 1. No Spark: the Spark checks stay in the test suite
(``HYPOTHESIS_PROFILE=long pytest tests/test_fuzz.py`` runs them on more cases too).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from hypothesis import given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import test_fuzz as T  # noqa: E402  (the properties and strategies, shared with the test suite)

PROPERTIES = {
    "skeleton": lambda: given(T.raw_file("skeleton"))(T.check_case),
    "common": lambda: given(T.raw_file("common"))(T.check_case),
    "numbers": lambda: given(st.sampled_from(["skeleton", "common"]), st.data())(T.check_number_spelling),
}


def run(name: str, examples: int, rng_seed: int) -> dict:
    """One property for ``examples`` cases; returns {cases, seconds, ok}."""
    calls = [0]
    prop = PROPERTIES[name]()
    inner = prop.hypothesis.inner_test

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    prop.hypothesis.inner_test = counted
    test = seed(rng_seed)(settings(T.PROFILE, max_examples=examples, derandomize=False, database=None,
                                   print_blob=True)(prop))
    t0 = time.perf_counter()
    try:
        test()
        ok = True
    except Exception:
        traceback.print_exc()
        ok = False
    return {"cases": calls[0], "seconds": time.perf_counter() - t0, "ok": ok}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=2000, help="cases per property (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: a random one, printed)")
    p.add_argument("--properties", default=",".join(PROPERTIES), help=f"comma-separated, of {', '.join(PROPERTIES)}")
    a = p.parse_args(argv)
    rng_seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    names = [x for x in a.properties.split(",") if x]
    unknown = sorted(set(names) - set(PROPERTIES))
    if unknown:
        p.error(f"unknown properties {unknown}; choose from {list(PROPERTIES)}")
    print(f"seed {rng_seed}, {a.examples} cases per property, max_line_bytes={T.MAX_LINE}")
    results = {}
    for name in names:
        results[name] = r = run(name, a.examples, rng_seed)
        print(f"  {name:9s} {r['cases']:7d} cases {r['seconds']:8.1f} s {r['cases'] / r['seconds']:8.1f} cases/s"
              f"  {'ok' if r['ok'] else 'FAILED'}", flush=True)
    print("cases that exercised each mutation kind (a case can have several):")
    for kind, n in T.STATS.most_common():
        print(f"  {kind:18s} {n:8d}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
