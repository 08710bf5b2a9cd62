"""Peak memory and wall time of `lumbar-tf prepare` as the dataset grows: does memory stay flat?

    PYTHONPATH=. .venv/bin/python benchmarks/prepare_memory.py [--sizes 250 500 1000] [--base 50]
        [--runners pool direct] [--workers 2] [--repeats 1] [--out benchmarks/prepare_memory_results.md]

Synthesising 1,000 phantoms takes too long here, so ``--base`` studies are synthesised once and the
larger datasets are built from them by hard-linking their DICOM files under new study and series ids
(a hard link is a plain file; the reader refuses symlinks), with matching rows in every CSV. Each
run is the real command line (``python -m lumbar_tf.cli.main prepare --runner pool|direct``) in a
fresh process; this script samples the whole process tree (the command, its forkserver and pool
workers, or Beam's local worker processes) every 0.1 s from /proc and records the peak of the summed
RSS and of the summed PSS (shared pages counted once, split between the processes that map them).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CSVS = (
    "train.csv",
    "train_grades.csv",
    "train_label_coordinates.csv",
    "train_series_descriptions.csv",
    "train_latent.csv",
)


# === Datasets ===


def build_dataset(base: Path, out: Path, n: int) -> Path:
    """``n`` studies in the RSNA layout under ``out``, hard links to the ``base`` studies' files under
    new ids: study ``i`` is base study ``i % len(base)`` with study id ``9{i:07d}`` and series ids
    ``{series}{i:04d}``."""
    if (out / "train.csv").is_file():
        return out
    base_ids = sorted(p.name for p in (base / "train_images").iterdir())
    images = out / "train_images"
    images.mkdir(parents=True)
    mapping: dict[str, list[tuple[str, dict[str, str]]]] = {}  # base study -> [(new id, series map)]
    for i in range(n):
        src = base / "train_images" / base_ids[i % len(base_ids)]
        new_id = f"9{i:07d}"
        series_map = {}
        for series in sorted(p for p in src.iterdir() if p.is_dir()):
            new_series = f"{series.name}{i:04d}"
            series_map[series.name] = new_series
            target = images / new_id / new_series
            target.mkdir(parents=True)
            for f in series.iterdir():
                os.link(f, target / f.name)
        mapping.setdefault(src.name, []).append((new_id, series_map))
    for name in CSVS:
        src = base / name
        if not src.is_file():
            continue
        with src.open(newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames, list(reader)
        with (out / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                for new_id, series_map in mapping.get(row["study_id"], []):
                    copy = dict(row, study_id=new_id)
                    if "series_id" in copy:
                        copy["series_id"] = series_map[copy["series_id"]]
                    writer.writerow(copy)
    return out


# === Measuring a process tree ===


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of one process (0, 0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0])
    return values.get("Rss", 0), values.get("Pss", 0)


def tree_memory_kb(root: int) -> tuple[int, int, int]:
    """Summed RSS, summed PSS (kB) and the number of processes of ``root`` and its descendants."""
    tree = _children()
    todo, pids = [root], []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(tree.get(pid, []))
    rss = pss = 0
    for pid in pids:
        r, p = _memory_kb(pid)
        rss, pss = rss + r, pss + p
    return rss, pss, len(pids)


def measure(command: list[str], interval_s: float = 0.1) -> dict:
    """Run ``command``; its wall time and the peaks of its process tree's memory."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss_kb": 0, "pss_kb": 0, "processes": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            rss, pss, n = tree_memory_kb(proc.pid)
            peak["rss_kb"] = max(peak["rss_kb"], rss)
            peak["pss_kb"] = max(peak["pss_kb"], pss)
            peak["processes"] = max(peak["processes"], n)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    last = [line for line in output.splitlines() if line.startswith("cached ")]
    return {**peak, "wall_s": wall, "summary": last[-1] if last else ""}


def prepare_command(runner: str, data: Path, cache: Path, workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lumbar_tf.cli.main",
        "prepare",
        "--data",
        str(data),
        "--out",
        str(cache),
        "--runner",
        runner,
        "--workers",
        str(workers),
    ]


# === Main ===


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000])
    parser.add_argument("--base", type=int, default=50, help="phantom studies synthesised once")
    parser.add_argument("--runners", nargs="+", default=["pool", "direct"], choices=["pool", "direct"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="runs per (runner, size); medians kept")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "prepare_memory_results.md")
    args = parser.parse_args(argv)

    from lumbar_tf.synthetic.phantom import synthesize_dataset

    work = args.work or Path(tempfile.mkdtemp(prefix="prepare_memory_"))
    base = work / "base"
    if not (base / "train.csv").is_file():
        print(f"synthesising {args.base} phantom studies in {base}", flush=True)
        synthesize_dataset(base, args.base, seed=12, acquisition="centred")
    rows = []
    for size in args.sizes:
        data = build_dataset(base, work / f"data_{size}", size)
        for runner in args.runners:
            runs = []
            for k in range(args.repeats):
                cache = work / f"cache_{runner}_{size}_{k}"
                result = measure(prepare_command(runner, data, cache, args.workers))
                print(
                    f"{runner:>6} {size:>5} studies: {result['wall_s']:7.1f} s, peak RSS "
                    f"{result['rss_kb'] / 1024:7.0f} MiB, PSS {result['pss_kb'] / 1024:7.0f} MiB, "
                    f"{result['processes']} processes; {result['summary']}",
                    flush=True,
                )
                runs.append(result)
            rows.append(
                {
                    "runner": runner,
                    "size": size,
                    "wall_s": statistics.median(r["wall_s"] for r in runs),
                    "rss_mib": statistics.median(r["rss_kb"] for r in runs) / 1024,
                    "pss_mib": statistics.median(r["pss_kb"] for r in runs) / 1024,
                    "processes": max(r["processes"] for r in runs),
                    "summary": runs[-1]["summary"],
                }
            )
    write_results(args, rows)


def write_results(args, rows: list[dict]) -> None:
    lines = [
        "# Peak memory of `lumbar-tf prepare` as the dataset grows",
        "",
        "Command: `PYTHONPATH=. .venv/bin/python benchmarks/prepare_memory.py "
        + " ".join(
            [f"--sizes {' '.join(map(str, args.sizes))}", f"--base {args.base}", f"--workers {args.workers}"]
            + [f"--repeats {args.repeats}"]
        )
        + "`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, Linux, Python {sys.version.split()[0]}. Data: {args.base} "
        "'centred' phantom studies (default preprocessing: 192 px views), hard-linked under new ids "
        "to each size. Runs: the real command line in a fresh process, `--workers "
        f"{args.workers}`; pool = the process pool, direct = Beam's local runner (multi_processing). "
        f"Memory is the peak over the whole process tree, sampled every 0.1 s; median of {args.repeats} "
        "run(s) per row. PSS counts shared pages once; RSS sums each process's resident pages.",
        "",
        "| runner | studies | wall (s) | studies/s | peak PSS (MiB) | peak RSS sum (MiB) | processes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['runner']} | {r['size']} | {r['wall_s']:.1f} | {r['size'] / r['wall_s']:.1f} | "
            f"{r['pss_mib']:.0f} | {r['rss_mib']:.0f} | {r['processes']} |"
        )
    for runner in args.runners:
        mine = [r for r in rows if r["runner"] == runner]
        if len(mine) >= 2:
            first, last = mine[0], mine[-1]
            growth = (last["pss_mib"] - first["pss_mib"]) / (last["size"] - first["size"]) * 1024
            lines.append(
                f"\n{runner}: {first['size']} -> {last['size']} studies changes peak PSS by "
                f"{last['pss_mib'] - first['pss_mib']:+.0f} MiB ({growth:+.0f} kB per study)."
            )
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
