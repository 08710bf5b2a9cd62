"""Does a speed change leave the prepared records as they were? Compares two versions of the code.

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_equivalence.py --before REV [--data DIR] [--studies 20]
        [--cpu-pairs K]

Runs `data.dataset.prepare_study` on the same studies with the package as of git revision ``REV``
(extracted with ``git archive``) and with this working tree, each in its own process, and compares
every field of every record: the views byte for byte, level points, presence, grades, warnings.
Without ``--data`` it synthesises ``--studies`` realistic phantoms (seed 123, as `pipeline.py`).
Prints one line per difference and exits 1 if there is any.

With ``--cpu-pairs K`` it also times both versions: K alternating (before, after) child runs, each
one warm-up pass then one timed pass with one OpenCV thread, quoting the medians of the CPU ms a study
and of the bare pydicom decode of the sagittal series of every study in the folder
(`pipeline.bare_baseline`; give ``--studies`` the folder's size to compare like with like), so a
change of machine load hits both versions alike.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Run in a child process with PYTHONPATH set to one version of the package.
_CHILD = """
import pickle, sys, time
from pathlib import Path
import cv2
from lumbar_tf.core.config import PreprocessConfig
from lumbar_tf.data.dataset import prepare_study, read_index
data, n, out, timed = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
index = read_index(data, "train")
ids = sorted(index.studies)[:n]
def prepare_all():
    records = {}
    for sid in ids:
        try:
            records[sid] = prepare_study(index.images_dir, index.studies.get(sid), sid, index.descriptions,
                                         PreprocessConfig())
        except Exception as exc:
            records[sid] = {"error": f"{type(exc).__name__}: {exc}"}
    return records
cv2.setNumThreads(1)
records = prepare_all()
cpu_ms = None
if timed:
    start = time.process_time()
    prepare_all()
    cpu_ms = (time.process_time() - start) / max(len(ids), 1) * 1e3
pickle.dump({"records": records, "cpu_ms": cpu_ms}, open(out, "wb"))
"""


def records_of(package_root: Path, data: Path, n: int, out: Path, timed: bool = False) -> dict:
    """{"records": study id -> record, "cpu_ms": CPU ms a study of a second pass, or None}."""
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    command = [sys.executable, "-c", _CHILD, str(data), str(n), str(out), "1" if timed else "0"]
    subprocess.run(command, check=True, env=env)
    with open(out, "rb") as handle:
        return pickle.load(handle)


def bare_decode_cpu_ms(data: Path) -> float:
    """CPU ms a study of `pipeline.bare_baseline` (every slice of both sagittal series, pydicom)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pipeline import bare_baseline

    studies = sum(1 for p in (data / "train_images").iterdir() if p.is_dir())
    start = time.process_time()
    bare_baseline(data)
    return (time.process_time() - start) / max(studies, 1) * 1e3


def differences(before: dict, after: dict) -> list[str]:
    out = []
    for sid in sorted(set(before) | set(after)):
        a, b = before.get(sid), after.get(sid)
        if a is None or b is None or a.keys() != b.keys():
            out.append(f"{sid}: fields {sorted(a or {})} != {sorted(b or {})}")
            continue
        for key in a:
            x, y = a[key], b[key]
            if isinstance(x, dict):  # the views
                for name in sorted(set(x) | set(y)):
                    if not np.array_equal(x.get(name), y.get(name)):
                        d = np.abs(np.asarray(x[name], int) - np.asarray(y[name], int))
                        out.append(f"{sid}: view {name}: {int((d > 0).sum())} pixels differ, max {d.max()}")
            elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if not np.array_equal(x, y):
                    out.append(f"{sid}: {key}: {x} != {y}")
            elif x != y:
                out.append(f"{sid}: {key}: {x!r} != {y!r}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="git revision of the code to compare against")
    parser.add_argument("--data", type=Path, help="an RSNA-layout folder (default: new phantoms)")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--cpu-pairs", type=int, default=0, help="also time K alternating pairs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lumbar_equiv_") as tmp:
        work = Path(tmp)
        old = work / "before"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before, "lumbar_tf"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        data = args.data
        if data is None:
            from lumbar_tf.synthetic.phantom import synthesize_dataset

            data = synthesize_dataset(work / "data", args.studies, seed=123)
        before = records_of(old, data, args.studies, work / "before.pkl")["records"]
        after = records_of(ROOT, data, args.studies, work / "after.pkl")["records"]
        cpu = {"before": [], "after": [], "bare decode": []}
        for _ in range(args.cpu_pairs):
            cpu["before"].append(records_of(old, data, args.studies, work / "t.pkl", timed=True)["cpu_ms"])
            cpu["after"].append(records_of(ROOT, data, args.studies, work / "t.pkl", timed=True)["cpu_ms"])
            cpu["bare decode"].append(bare_decode_cpu_ms(data))
    if args.cpu_pairs:
        ratios = [a / b for a, b in zip(cpu["after"], cpu["before"], strict=True)]
        line = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in cpu.items())
        print(
            f"CPU ms a study (medians of {args.cpu_pairs}): {line}; after/before pair ratios "
            f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"
        )
    found = differences(before, after)
    for line in found:
        print(line)
    errors = sum("error" in r for r in after.values())
    print(f"{len(after)} studies ({errors} failed in both or either): {len(found)} differences")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
