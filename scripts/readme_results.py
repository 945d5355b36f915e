"""Paste an experiment's report into README.md between markers, and copy its figure next to it (no hand edits).

    .venv/bin/python scripts/readme_results.py demo data/demo/runs/experiment     # after `make demo`

Replaces the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in README.md with ``<exp>/table2.md``
(Table 2, its legend and the ESMM-vs-competitor tests) and copies ``<exp>/figure3.png`` to
``bench/figures/NAME-figure3.png``, which the README shows.
"""
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(name: str, exp: str) -> None:
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        sys.exit(f"README.md has no {start} ... {end} block")
    report = open(os.path.join(exp, "table2.md")).read().strip()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(readme + ".tmp", "w") as f:
        f.write(f"{head}{start}\n{report}\n{end}{tail}")
    os.replace(readme + ".tmp", readme)
    os.makedirs(os.path.join(ROOT, "bench", "figures"), exist_ok=True)
    shutil.copyfile(os.path.join(exp, "figure3.png"), os.path.join(ROOT, "bench", "figures", f"{name}-figure3.png"))
    print(f"README.md: {name} block updated from {exp}; figure -> bench/figures/{name}-figure3.png")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
