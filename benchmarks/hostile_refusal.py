"""How fast and how cheaply the reader refuses hostile files (issue 14: "refused in under a second").

    PYTHONPATH=. .venv/bin/python benchmarks/hostile_refusal.py [--repeats 7]
        [--out benchmarks/hostile_refusal_results.md]

Each hostile file (built by `tests.hostile_files`, as the tests build them) is refused by
`read_instance_header`, and read as one file of an otherwise valid 12-slice series by `read_study`
(which drops it with a warning). The baseline, in the same run: the same calls on a valid file of
that series. Each case runs in a fresh process (so one case's allocations do not hide another's), and
records the median wall time over ``--repeats`` calls after a warm-up, and the process's peak RSS
(``ru_maxrss``) over the same process importing the reader and reading the valid file only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = {
    "valid (baseline)": None,
    "deflate bomb, 1 GiB inflated": "deflate",
    "65535 x 65535 sparse header": "giant",
    "2 GiB file (sparse padding)": "padded",
    "NumberOfFrames 'abc'": "frames",
    "PixelSpacing 1e-6 mm": "spacing",
    "truncated pixel data": "truncated",
}

_ONE_CASE = r"""
import json, resource, shutil, statistics, sys, time
from pathlib import Path
from lumbar_tf.core.errors import DicomError
from lumbar_tf.dicom.reader import read_instance_header, read_study
study, victim, repeats = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def timed(call):
    out, times = None, []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        try:
            call()
            out = "read"
        except DicomError as exc:
            out = str(exc)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times[1:])

header, header_s = timed(lambda: read_instance_header(victim))
warnings = []
def whole_study():
    warnings[:] = read_study(study).warnings
study_out, study_s = timed(whole_study)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(header=header, header_s=header_s, study=study_out, study_s=study_s,
                      warnings=warnings, base_kib=base, peak_kib=peak)))
"""


def _build(kind: str | None, study: Path) -> Path:
    """A 12-slice Sagittal T2 series in ``study``; ``kind`` replaces one of its files (or none)."""
    from tests import hostile_files as H
    from tests.dicom_factory import SeriesSpec, write_series

    paths, _ = write_series(study / "11", SeriesSpec(n_slices=12, rows=384, cols=384))
    victim = paths[5]
    if kind == "deflate":
        H.deflate_bomb(victim, 2**30)
    elif kind == "giant":
        H.sparse_giant(victim, 65535, 65535)
    elif kind == "padded":
        H.padded(victim, 2**31)
    elif kind == "frames":
        H.with_raw_value(victim, 0x00280008, "IS", b"abc ")
    elif kind == "spacing":
        H.valid_file(victim, SeriesSpec(n_slices=1, pixel_spacing=(1e-6, 1e-6)))
    elif kind == "truncated":
        victim.write_bytes(victim.read_bytes()[:-1000])
    return victim


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("hostile_refusal_results.md"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in CASES.items():
            study = Path(tmp) / (kind or "valid") / "1001"
            victim = _build(kind, study)
            proc = subprocess.run(
                [sys.executable, "-c", _ONE_CASE, str(study), str(victim), str(args.repeats)],
                capture_output=True,
                text=True,
                env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                timeout=600,
                check=True,
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["header"] = result["header"].replace(str(victim), "<file>")
            rows.append((name, result))
            print(name, json.dumps(result), flush=True)
    base = rows[0][1]
    lines = [
        "# Hostile files: time and memory to refuse them",
        "",
        f"`benchmarks/hostile_refusal.py --repeats {args.repeats}`: one fresh process per case, median of "
        f"{args.repeats} calls after a warm-up; peak RSS of the process (`ru_maxrss`) against the valid "
        "file's process. Study: a 12-slice 384 x 384 Sagittal T2 series with the hostile file as slice 6.",
        "",
        "| file | `read_instance_header` | its answer | `read_study` (12 files) | peak RSS "
        "| RSS over the valid file's |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        answer = r["header"] if r["header"] != "read" else "read"
        lines.append(
            f"| {name} | {r['header_s'] * 1e3:.2f} ms | `{answer}` | {r['study_s'] * 1e3:.1f} ms | "
            f"{r['peak_kib'] / 1024:.0f} MiB | {(r['peak_kib'] - base['peak_kib']) / 1024:+.0f} MiB |"
        )
    slowest = max(r["header_s"] for _, r in rows[1:])
    slowest_study = max(r["study_s"] for _, r in rows[1:])
    lines += [
        "",
        f"Slowest refusal {slowest * 1e3:.1f} ms, slowest study read holding a hostile file "
        f"{slowest_study * 1e3:.1f} ms against {base['study_s'] * 1e3:.1f} ms for the valid study: "
        f"the 1 s bound holds with a {1.0 / max(slowest, slowest_study):.0f}x margin. Each study read "
        "drops the file with a warning, e.g. "
        f"`{next((w for _, r in rows[1:] for w in r['warnings'] if 'unreadable' in w), '')}`.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
