"""Rewrite the README's Reliability table from what the cases do.

    python -m tests.reliability --write-readme          # the fast cases; slow rows keep their text
    python -m tests.reliability --write-readme --slow   # also the slow ones (minutes)
    python -m tests.reliability --write-readme --slow --only killed-export   # just those rows

Runs the tests named in `table.CASES` with ``LUMBAR_RELIABILITY_ROWS`` set, so each writes the
outcome it observed, then puts the rows between the README's markers. A row not run keeps its README
text; a slow row that has none yet says so (and its slow test fails until it is written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from tests.reliability import table

NOT_RUN = "not run yet: `python -m tests.reliability --write-readme --slow`"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="rewrite README.md (else only print)")
    parser.add_argument("--slow", action="store_true", help="also run the slow cases")
    parser.add_argument("--only", nargs="+", metavar="KEY", help="run only these cases (table.CASES keys)")
    parser.add_argument("--workers", default="0", help="pytest-xdist workers (-n), default 0")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(table.BY_KEY)
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    cases = [c for c in table.CASES if (args.slow or not c.slow) and (not args.only or c.key in args.only)]
    tests = sorted({t for c in cases for t in c.tests})
    with tempfile.TemporaryDirectory() as rows:
        env = {**os.environ, table.ROWS_ENV: rows, "PYTHONPATH": str(table.ROOT)}
        marks = [] if args.slow else ["-m", "not slow"]
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-n",
            args.workers,
            "-p",
            "no:cacheprovider",
            *marks,
            *tests,
        ]
        proc = subprocess.run(cmd, cwd=table.ROOT, env=env)
        if proc.returncode != 0:
            print("error: a reliability case failed; README not changed", file=sys.stderr)
            return 1
        outcomes = table.collected(rows)
    kept = table.readme_outcomes() if table.BEGIN in table.README.read_text() else {}
    for case in table.CASES:
        got = outcomes.get(case.key, {})
        if case not in cases:
            got = kept.get(case.key) or ({p: NOT_RUN for p in case.parts} if case.slow else {})
        missing = [p or "(row)" for p in case.parts if p not in got]
        if missing:
            print(f"error: case {case.key}: no outcome recorded for {', '.join(missing)}", file=sys.stderr)
            return 1
        outcomes[case.key] = got
    rendered = table.render_table(outcomes)
    if args.write_readme:
        table.README.write_text(table.replace_table(table.README.read_text(), rendered))
        print(f"wrote {len(table.CASES)} rows to {table.README}")
    else:
        print(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
