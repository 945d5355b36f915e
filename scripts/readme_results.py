"""Paste reports written by code into README.md or bench/RESULTS.md between markers (no hand edits).

    .venv/bin/python scripts/readme_results.py demo data/demo/runs/experiment     # after `make demo`
    .venv/bin/python scripts/readme_results.py block NAME FILE [README.md|bench/RESULTS.md]

The first form replaces the text between ``<!-- demo:start -->`` and ``<!-- demo:end -->`` in README.md with
``<exp>/table2.md`` (Table 2, its legend, the paired tests and the sentences ``esmm.report.claims`` writes from them)
and copies ``<exp>/figure3.png`` to ``bench/figures/demo-figure3.png``, which the README shows. The second pastes any
report file (a bench script's ``.md``: ``bench/successors.py``, ``bench/calibration.py``) into the ``NAME`` block of
the target (default README.md).
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paste(name: str, report_path: str, target: str = "README.md") -> None:
    path = os.path.join(ROOT, target)
    text = open(path).read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        sys.exit(f"{target} has no {start} ... {end} block")
    report = open(report_path).read().strip()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path + ".tmp", "w") as f:
        f.write(f"{head}{start}\n{report}\n{end}{tail}")
    os.replace(path + ".tmp", path)
    print(f"{target}: {name} block updated from {report_path}")


def main(name: str, exp: str) -> None:
    paste(name, os.path.join(exp, "table2.md"))
    os.makedirs(os.path.join(ROOT, "bench", "figures"), exist_ok=True)
    shutil.copyfile(os.path.join(exp, "figure3.png"), os.path.join(ROOT, "bench", "figures", f"{name}-figure3.png"))
    print(f"figure -> bench/figures/{name}-figure3.png")


if __name__ == "__main__":
    if len(sys.argv) in (4, 5) and sys.argv[1] == "block":
        paste(*sys.argv[2:])
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
