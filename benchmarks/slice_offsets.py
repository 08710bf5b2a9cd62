"""Side channels on the labelled slices: fixed offsets against offsets learned from the labels.

    PYTHONPATH=. .venv/bin/python benchmarks/slice_offsets.py [--studies 40] [--learn-seed 41]

Learns the channel offsets (`data.slice_offsets.resolve_offsets`, as `prepare_cache` does) on
realistic phantom studies of one seed and scores them on studies of another seed, against the fixed
offsets (sag_t1 +-22 mm, sag_t2 +-12 mm):
  * foramina (Sagittal T1 labels): the share of labelled points whose side channel is the labelled
    instance, within one slice, and the median |mm| between the channel's slice and the point along
    the slice normal;
  * subarticular recesses (Axial T2 labels, mapped to patient mm): the share whose sag_t2 side
    channel is the T2 slice nearest to the point, and the median (mean) lateral |mm| between them;
  * the canal points (Sagittal T2 labels) against the midline channel, which is not learned: what
    is left of the error there is the spine finder's midline.
Split by acquisition as `benchmarks/spine_finder.py` does: "low" when the canal points' middle lies
more than 22.5% of the Sagittal T2 field's half height below its centre.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumbar_tf import preprocess  # noqa: E402
from lumbar_tf.core.config import load_config  # noqa: E402
from lumbar_tf.data import slice_offsets  # noqa: E402
from lumbar_tf.data.dataset import read_index  # noqa: E402
from lumbar_tf.dicom.reader import read_study  # noqa: E402

CONFIG = load_config("cpu_demo").preprocess  # views with `offsets: labels`, fixed numbers = fallback


def score_study(task):
    """One held-out study -> rows (acquisition, view, config, hit, within one slice, |mm|)."""
    images, labels, sid, descriptions, configs = task
    study = read_study(Path(images) / sid, descriptions, prefer={r["series_id"] for r in labels.coordinates})
    by_id = {s.series_id: s for s in [*study.extra, *study.series.values()]}
    canal = [r for r in labels.coordinates if r["condition"] == "spinal_canal_stenosis"]
    group = "no canal labels"
    if canal and canal[0]["series_id"] in by_id:
        t2 = by_id[canal[0]["series_id"]]
        rows_px = np.array([r["y"] for r in canal])
        half = t2.slices[0].rows / 2
        below = (0.5 * (rows_px.min() + rows_px.max()) - (t2.slices[0].rows - 1) / 2) / half
        group = "spine low" if below > 0.225 else "spine centred"
    out = []
    for name, cfg in configs.items():
        grid = preprocess.view_grid_for_study(study, cfg)
        used = preprocess.view_series(study, cfg)
        for spec in cfg.views:
            series = used[spec.name]
            sides = dict(slice_offsets.SIDE_CONDITIONS.get(spec.series_description, {}))
            if series is None or not sides:
                continue
            if spec.name == cfg.localizer_view:  # the midline channel against the canal labels
                sides["midline"] = "spinal_canal_stenosis"
            chosen = preprocess.choose_slices(series, spec.offsets_mm, grid.midline_xyz)
            channel = slice_offsets.side_channels(spec.offsets_mm)
            positions = series.positions_mm()
            for row in labels.coordinates:
                side = next((s for s, c in sides.items() if c == row["condition"]), None)
                source = by_id.get(row["series_id"])
                if side is None or source is None:
                    continue
                index = source.index_of_instance(row["instance_number"])
                point = source.pixel_to_patient(index, (row["x"], row["y"]))
                along = float(point @ series.normal)
                pick = chosen[channel[side]]
                nearest = int(np.argmin(np.abs(positions - along)))
                if source is series:  # the labelled instance itself (foramina on T1)
                    nearest = index
                steps = abs(pick - nearest)
                view = f"{spec.name} midline" if side == "midline" else spec.name
                out.append((group, view, name, steps == 0, steps <= 1, abs(positions[pick] - along)))
    return out


def table(rows, view: str, groups) -> list[str]:
    lines = [
        "| studies | points | fixed: on slice / within 1 / median / mean mm"
        " | learned: on slice / within 1 / median / mean mm |",
        "|---|---:|---|---|",
    ]
    for group in groups:
        cells = []
        n = 0
        for config in ("fixed", "learned"):
            r = [x for x in rows if x[1] == view and x[2] == config and (group == "all" or x[0] == group)]
            n = len(r)
            if not r:
                cells.append("-")
                continue
            a = np.array([x[3:] for x in r], dtype=float)
            hit, near, mm = a.T
            cells.append(f"{hit.mean():.2f} / {near.mean():.2f} / {np.median(mm):.1f} / {mm.mean():.1f}")
        lines.append(f"| {group} | {n} | {cells[0]} | {cells[1]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=40, help="studies per seed (learn and evaluate)")
    parser.add_argument("--learn-seed", type=int, default=41)
    parser.add_argument("--eval-seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from lumbar_tf.synthetic.phantom import synthesize_dataset

    with tempfile.TemporaryDirectory() as tmp, mp.get_context("forkserver").Pool(args.workers) as pool:
        learn = synthesize_dataset(
            Path(tmp) / "learn", args.studies, seed=args.learn_seed, workers=args.workers
        )
        held = synthesize_dataset(Path(tmp) / "held", args.studies, seed=args.eval_seed, workers=args.workers)
        index = read_index(learn)
        t = time.perf_counter()
        learned, report = slice_offsets.resolve_offsets(
            index.images_dir, index.studies, index.descriptions, index.study_ids, CONFIG, mapper=pool.imap
        )
        seconds = time.perf_counter() - t
        fixed = dataclasses.replace(
            CONFIG, views=[dataclasses.replace(spec, offsets="fixed") for spec in CONFIG.views]
        )
        print(
            f"learned on seed {args.learn_seed} ({len(index.study_ids)} studies, {seconds:.1f} s on "
            f"{args.workers} workers):"
        )
        for spec in learned.views:
            entry = report[spec.name]
            print(
                f"  {spec.name}: {list(spec.offsets_mm)} ({entry['offsets']}); "
                f"left {entry.get('left')}, right {entry.get('right')}"
            )
        held_index = read_index(held)
        tasks = [
            (
                held_index.images_dir,
                held_index.studies[sid],
                sid,
                held_index.descriptions.get(sid, {}),
                {"fixed": fixed, "learned": learned},
            )
            for sid in held_index.study_ids
        ]
        rows = [row for rows in pool.imap(score_study, tasks) for row in rows]
    groups = ["all", "spine low", "spine centred", "no canal labels"]
    print(f"\nheld out: seed {args.eval_seed}, {len(tasks)} studies")
    for view, title in (
        ("sag_t1", "foramina (Sagittal T1 labels) vs sag_t1 side channels"),
        ("sag_t2", "subarticular (Axial T2 labels) vs sag_t2 side channels"),
        ("sag_t2 midline", "spinal canal (Sagittal T2 labels) vs the sag_t2 midline channel (not learned)"),
    ):
        print(f"\n{title}\n")
        print("\n".join(table(rows, view, groups)))


if __name__ == "__main__":
    main()
