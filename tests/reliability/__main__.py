"""Rewrite the README's Reliability table from what the cases do.

    python -m tests.reliability --write-readme          # the fast cases; slow rows keep their text
    python -m tests.reliability --write-readme --slow   # also the slow ones (minutes)

Runs the tests named in `table.CASES` with ``LUMBAR_RELIABILITY_ROWS`` set, so each writes the
outcome it observed, then puts the rows between the README's markers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from tests.reliability import table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-readme", action="store_true", help="rewrite README.md (else only print)")
    parser.add_argument("--slow", action="store_true", help="also run the slow cases")
    args = parser.parse_args(argv)
    cases = [c for c in table.CASES if args.slow or not c.slow]
    tests = sorted({t for c in cases for t in c.tests})
    with tempfile.TemporaryDirectory() as rows:
        env = {**os.environ, table.ROWS_ENV: rows, "PYTHONPATH": str(table.ROOT)}
        marks = [] if args.slow else ["-m", "not slow"]
        cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *marks, *tests]
        proc = subprocess.run(cmd, cwd=table.ROOT, env=env)
        if proc.returncode != 0:
            print("error: a reliability case failed; README not changed", file=sys.stderr)
            return 1
        outcomes = table.collected(rows)
    kept = table.readme_outcomes() if table.BEGIN in table.README.read_text() else {}
    for case in table.CASES:
        got = outcomes.get(case.key, {})
        if case.slow and not args.slow:
            got = {**kept.get(case.key, {}), **got}
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
