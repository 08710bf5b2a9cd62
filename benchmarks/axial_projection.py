"""Projection accuracy on phantoms: labelled sagittal canal points -> the axial series (`lumbar_tf.axial`).

    .venv/bin/python benchmarks/axial_projection.py [--studies 20] [--seed 0] [--jitter-mm 0 2 4]

For every labelled Spinal Canal Stenosis point (Sagittal T2/STIR, train_label_coordinates.csv) the
point is taken to patient mm through its slice's DICOM geometry and projected onto the study's Axial
T2 series. It is compared with the labelled subarticular points of the same level (Axial T2), which
is what the competition labels give; no phantom internals are used for that comparison:

* slice: the chosen instance against the labelled subarticular instance (same slice / slices apart
  within its stack / another stack or series), and in mm: the distance of the labelled subarticular
  3-D point from the chosen plane;
* in-plane: the projected point against the labelled subarticular (x, y), in px and mm. The recess
  lies ~11.5 mm (x body scale) lateral of the canal, so the raw distance is mostly that offset. With
  both sides labelled on one slice, the midpoint of the left and right points removes it; what is
  left is split into lateral (patient x) and antero-posterior components. The AP part holds a real
  anatomical difference (canal centre vs lateral-recess depth), not a projection error.

``--jitter-mm`` repeats the slice choice (``--draws`` times per level) with the sagittal point moved
by Gaussian noise of that standard deviation (mm, along each in-plane axis of the sagittal slice),
a stand-in for localiser error: the fraction of levels that still land on the labelled slice says
how large the training slice shifts must be.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lumbar_tf import axial
from lumbar_tf.dicom.reader import read_series_descriptions, read_study
from lumbar_tf.synthetic.phantom import synthesize_dataset


def _series(study, series_id: str):
    for s in [*study.series.values(), *study.extra]:
        if s.series_id == series_id:
            return s
    raise KeyError(series_id)


def _stack_of(series, index: int):
    return next(st for st in axial.find_stacks(series) if index in st.indices)


def _q(values) -> str:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return "n/a"
    return f"{np.median(v):.2f} / {np.percentile(v, 90):.2f}"


def measure(data: Path, jitters: list[float], seed: int, draws: int) -> dict:
    descriptions = read_series_descriptions(data / "train_series_descriptions.csv")
    with open(data / "train_label_coordinates.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_study = defaultdict(list)
    for r in rows:
        by_study[r["study_id"]].append(r)
    rng = np.random.default_rng(seed)
    out = defaultdict(list)
    for study_id, study_rows in sorted(by_study.items()):
        out["studies"].append(study_id)
        study = read_study(data / "train_images" / study_id, descriptions.get(study_id, {}))
        candidates = axial.axial_series(study)
        canal = {r["level"]: r for r in study_rows if r["condition"] == "Spinal Canal Stenosis"}
        for level, r in sorted(canal.items()):
            sag = _series(study, r["series_id"])
            point = axial.source_px_to_patient(sag, int(r["instance_number"]), (float(r["x"]), float(r["y"])))
            p = axial.project_point(level, point, candidates)
            out["levels"].append(1)
            out["covered"].append(int(p.covered))
            subs = [q for q in study_rows if q["level"] == level and "Subarticular" in q["condition"]]
            if not subs or not p.covered:
                continue
            chosen_series = _series(study, p.series_id)
            chosen = chosen_series.slices[p.slice_index]
            row_mm, col_mm = chosen.pixel_spacing
            labelled = []
            for q in subs:
                ax = _series(study, q["series_id"])
                index = ax.index_of_instance(int(q["instance_number"]))
                xyz = axial.source_px_to_patient(
                    ax, int(q["instance_number"]), (float(q["x"]), float(q["y"]))
                )
                labelled.append((q, ax, index, xyz))
                if ax.series_id != chosen_series.series_id:
                    out["slice_other"].append(1)
                    continue
                stack = _stack_of(ax, index)
                if p.slice_index in stack.indices:
                    k = abs(stack.indices.index(p.slice_index) - stack.indices.index(index))
                    out["slice_apart"].append(k)
                else:
                    out["slice_other"].append(1)
                normal = chosen.normal if chosen.normal @ ax.normal > 0 else -chosen.normal
                out["plane_mm"].append(abs(float((xyz - chosen.position) @ normal)))
                # In-plane: the labelled point seen on the chosen slice (the labelled slice when equal).
                lx, ly = chosen.patient_to_pixel(xyz)
                dx, dy = p.x_px - lx, p.y_px - ly
                out["raw_px"].append(float(np.hypot(dx, dy)))
                out["raw_mm"].append(float(np.hypot(dx * col_mm, dy * row_mm)))
            if len(labelled) == 2 and all(ax.series_id == p.series_id for _, ax, _, _ in labelled):
                mid = 0.5 * (labelled[0][3] + labelled[1][3])
                mx, my = chosen.patient_to_pixel(mid)
                dx, dy = p.x_px - mx, p.y_px - my
                out["mid_px"].append(float(np.hypot(dx, dy)))
                out["mid_mm"].append(float(np.hypot(dx * col_mm, dy * row_mm)))
                error = chosen.pixel_to_patient((p.x_px, p.y_px)) - chosen.pixel_to_patient((mx, my))
                out["mid_lateral_mm"].append(abs(float(error[0])))
                out["mid_ap_mm"].append(float(np.hypot(error[1], error[2])))
                lab_instance = labelled[0][0]["instance_number"]
                in_plane = sag.slices[0].row_dir, sag.slices[0].col_dir
                for sigma in jitters:
                    for _ in range(draws if sigma else 1):
                        shifted = point + sigma * (rng.normal() * in_plane[0] + rng.normal() * in_plane[1])
                        j = axial.project_point(level, shifted, candidates)
                        out[f"jitter_{sigma}_covered"].append(int(j.covered))
                        out[f"jitter_{sigma}_same"].append(
                            int(j.covered and str(j.instance_number) == lab_instance)
                        )
                        if j.covered and j.series_id == p.series_id:
                            stack = _stack_of(chosen_series, labelled[0][2])
                            if j.slice_index in stack.indices:
                                out[f"jitter_{sigma}_apart"].append(
                                    abs(
                                        stack.indices.index(j.slice_index)
                                        - stack.indices.index(labelled[0][2])
                                    )
                                )
    return out


def report(out: dict, jitters: list[float]) -> str:
    n_sub = len(out["slice_apart"]) + len(out["slice_other"])
    same = sum(1 for k in out["slice_apart"] if k == 0)
    lines = [
        f"{len(out['studies'])} studies, {len(out['levels'])} labelled canal levels, "
        f"{sum(out['covered'])} covered by an axial stack; {n_sub} labelled subarticular points compared.",
        "",
        "| measure | median / 90th percentile |",
        "| --- | ---: |",
        f"| chosen slice = labelled subarticular instance | {same} of {n_sub} |",
        f"| slices apart (same stack) | {_q(out['slice_apart'])} |",
        f"| labelled point in another stack or series | {len(out['slice_other'])} |",
        f"| labelled subarticular point from the chosen plane, mm | {_q(out['plane_mm'])} |",
        f"| projected point from labelled (x, y), px (with the recess offset) | {_q(out['raw_px'])} |",
        f"| the same, mm | {_q(out['raw_mm'])} |",
        f"| projected point from the midpoint of left + right labels, px | {_q(out['mid_px'])} |",
        f"| the same, mm | {_q(out['mid_mm'])} |",
        f"| of which lateral (x), mm: sagittal label slice off the midline | {_q(out['mid_lateral_mm'])} |",
        f"| of which antero-posterior, mm: canal centre vs recess depth (anatomy) | {_q(out['mid_ap_mm'])} |",
    ]
    if jitters:
        lines += [
            "",
            "| jitter sd, mm | covered | on the labelled slice | slices apart (median / p90) |",
            "| ---: | ---: | ---: | ---: |",
        ]
        for sigma in jitters:
            hits = out[f"jitter_{sigma}_same"]
            frac = f"{100 * np.mean(hits):.0f} % of {len(hits)}" if hits else "n/a"
            covered = f"{100 * np.mean(out[f'jitter_{sigma}_covered']):.0f} %" if hits else "n/a"
            lines.append(f"| {sigma:g} | {covered} | {frac} | {_q(out[f'jitter_{sigma}_apart'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jitter-mm", type=float, nargs="*", default=[0.0, 2.0, 4.0])
    parser.add_argument("--draws", type=int, default=20, help="jittered draws per level")
    parser.add_argument("--data", type=Path, help="an existing RSNA-layout folder (else phantoms are made)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synthesize_dataset(Path(tmp) / "phantom", args.studies, seed=args.seed)
        made = time.perf_counter()
        out = measure(Path(data), args.jitter_mm, args.seed, args.draws)
    done = time.perf_counter()
    print(report(out, args.jitter_mm))
    print(f"\n(data {made - start:.0f} s, projection {done - made:.1f} s)")


if __name__ == "__main__":
    main()
