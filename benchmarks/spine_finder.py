"""Accuracy of `preprocess.find_spine` (where the view grid goes) on known anatomy, as real DICOM.

    PYTHONPATH=. .venv/bin/python benchmarks/spine_finder.py [--studies 20] [--only realistic]

Two sources of anatomy with known label points:
  * ``drawn``: `tests.dicom_factory.Spine` (bodies, discs, canal, spinous processes, a tilted sacrum)
    at random placements: L5/S1 from 20 mm above to 140 mm below the field centre, 260-340 mm fields,
    0.6-0.9 mm pixels, non-square matrices, the stack off the midline by up to 8 mm, T1 or T2;
  * ``phantom``: the anatomy of `lumbar_tf.synthetic.phantom` rendered on such fields (its sacrum is
    barely tilted, so the sacral bend is seldom seen there), and the phantom studies as synthesised;
  * ``realistic``: `synthesize_dataset(acquisition="realistic")` studies as written (T7-S3 drawn, 220-340 mm
    fields, the lumbar spine from centred to the lower half), scored on the reference sagittal series
    the pipeline uses and split by where the spine sits: "low" when the canal's L1/L2-L5/S1 middle lies
    more than 22.5% of the field's half height below its centre (the phantom draws 0-45%).
For each: the L5/S1 error, the share of studies with all five canal points inside the central 90%
of the view, against the field-centred grid used before, the midline error and `find_spine`'s time
per study (wall clock on whatever else the machine runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumbar_tf import preprocess  # noqa: E402
from lumbar_tf.core.config import PreprocessConfig  # noqa: E402
from lumbar_tf.dicom.reader import read_study  # noqa: E402
from tests import dicom_factory as factory  # noqa: E402

CFG = PreprocessConfig()


def _inside(grid, yz) -> bool:
    xy = grid.to_normalized(grid.patient_yz_to_view_px(yz))
    return bool(np.all((xy > 0.05) & (xy < 0.95)))


def _score(series, canal_xyz, x_mid):
    start = time.perf_counter()
    found = preprocess.find_spine(series, CFG)
    seconds = time.perf_counter() - start
    grid = preprocess._grid_from_spine(found, CFG)
    field = preprocess.ViewGrid(
        np.array([s.center for s in series.slices])[:, 1:3].mean(axis=0), CFG.spine_crop_mm, CFG.view_size
    )
    l5 = np.nan if found.l5s1_yz is None else float(np.linalg.norm(found.l5s1_yz - canal_xyz[4, 1:]))
    k = preprocess.choose_slices(series, [0.0], found.midline_xyz)[0]
    mid_err = abs(float((series.slices[k].position - np.array([x_mid, 0, 0])) @ series.normal))
    best = float(
        np.min(np.abs([(s.position - np.array([x_mid, 0, 0])) @ series.normal for s in series.slices]))
    )
    inside = _inside(grid, canal_xyz[:, 1:]), _inside(field, canal_xyz[:, 1:])
    return found.found, l5, *inside, mid_err - best, seconds, found.l5s1_from


def drawn(n: int, seed: int, tmp: Path, low: bool):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        fov = rng.uniform(260, 340)
        ps = rng.uniform(0.6, 0.9)
        rows = int(fov / ps)
        cols = rows if rng.random() < 0.6 else int(rows * rng.uniform(0.7, 0.9))
        below = rng.uniform(60, 140) if low else rng.uniform(40, 80)  # L5/S1 below the field centre
        x_mid = rng.uniform(-8, 8)
        contrast = "T2" if rng.random() < 0.7 else "T1"
        spine = factory.Spine(l5s1=(rng.uniform(-20, 20), -below), x_mid=x_mid, contrast=contrast)
        n_slices = int(rng.integers(13, 22))
        spec = factory.spine_series(
            spine,
            rows=rows,
            cols=cols,
            pixel_spacing=(ps, ps),
            n_slices=n_slices,
            slice_spacing=rng.uniform(3.0, 4.5),
            center=(0.0, 0.0, 0.0),
            iop=factory.oblique_sagittal_iop(rng.uniform(-5, 5), rng.uniform(-3, 3)),
            seed=i,
        )
        study = read_study(factory.write_study(tmp / f"drawn{int(low)}", str(i), {"1": spec}))
        out.append(_score(study.series["Sagittal T2/STIR"], spine.canal_points(), x_mid))
    return out


def phantom_fields(n: int, seed: int, tmp: Path, low: bool):
    from lumbar_tf.core.labels import N_LEVELS
    from lumbar_tf.synthetic import phantom as P

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        draw = P.sample_grades(rng)
        ph, _ = P._place(P._sample_phantom(rng, draw), rng)
        pts = np.array([ph.to_patient(ph.canal_point(k)) for k in range(N_LEVELS)])
        mid = 0.5 * (pts.min(axis=0) + pts.max(axis=0))
        fov, ps = rng.uniform(260, 340), rng.uniform(0.6, 0.9)
        size = int(fov / ps / 2) * 2
        shift = rng.uniform(0.05, 0.3) * fov if low else rng.uniform(-15, 15)
        x_off = rng.uniform(-8, 8)
        ns = int(rng.integers(13, 22))
        spacing = rng.uniform(3.0, 4.5)
        x = mid[0] + x_off + (np.arange(ns) - (ns - 1) / 2) * spacing
        ipp = np.stack(
            [x, np.full(ns, mid[1] - (size - 1) / 2 * ps), np.full(ns, mid[2] + shift + (size - 1) / 2 * ps)],
            1,
        )
        geometry = P.SeriesGeometry(
            ipp, np.tile(P._SAGITTAL_IOP, (ns, 1)), (ps, ps), size, size, spacing, spacing
        )
        pixels = P._render_series(rng, ph, geometry, "T2", False)[0].astype(np.float64)
        pixels = np.clip(pixels / pixels.max() * 4000, 0, 4095).astype(np.uint16)
        centre = ipp.mean(axis=0) + np.array([0, (size - 1) / 2 * ps, -(size - 1) / 2 * ps])
        spec = factory.SeriesSpec(
            n_slices=ns,
            rows=size,
            cols=size,
            pixel_spacing=(ps, ps),
            slice_spacing=spacing,
            center=tuple(centre),
            pixels=pixels[::-1],  # the factory writes slices along -x (its IOP normal)
            slope=None,
        )
        study = read_study(factory.write_study(tmp / f"phantom{int(low)}", str(i), {"1": spec}))
        out.append(_score(study.series["Sagittal T2/STIR"], pts, ph.x_mid))
    return out


def synthesised(n: int, tmp: Path):
    """The phantom studies exactly as `synth` writes them (the test fixtures' distribution)."""
    from lumbar_tf.core.labels import LEVELS
    from lumbar_tf.synthetic.phantom import iter_studies, synthesize_dataset

    root = synthesize_dataset(tmp / "synth", n, seed=11, acquisition="centred")
    out, foramen = [], {"midline": [], "stack centre": []}
    offsets = CFG.views[1].offsets_mm  # sag_t1: (left foramen, midline, right foramen)
    for study, _ in iter_studies(n, seed=11, acquisition="centred"):
        pts = np.array([study.phantom.landmark("spinal_canal_stenosis", lv) for lv in LEVELS])
        read = read_study(root / "train_images" / str(study.study_id))
        out.append(_score(read.series["Sagittal T2/STIR"], pts, study.phantom.x_mid))
        # Foramen channels against the instances the labels name (the slice showing each foramen).
        grid = preprocess.view_grid_for_study(read, CFG)
        t1 = read.series["Sagittal T1"]
        for name, midline in (("midline", grid.midline_xyz), ("stack centre", None)):
            left, _, right = (
                t1.slices[i].instance_number for i in preprocess.choose_slices(t1, offsets, midline)
            )
            for row in study.coordinates:
                if "Foraminal" in row[3]:
                    chosen = left if row[3].startswith("Left") else right
                    labelled = t1.index_of_instance(row[2])
                    foramen[name].append(abs(t1.index_of_instance(chosen) - labelled))
    for name, off in foramen.items():
        off = np.array(off)
        print(
            f"  foramen channel ({name} +-{offsets[0]:.0f} mm) = labelled slice {np.mean(off == 0):.2f},"
            f" within one slice {np.mean(off <= 1):.2f} (n={off.size})"
        )
    return out


def realistic(n: int, seed: int, tmp: Path):
    """Realistic phantom studies as `synth` writes them -> (low rows, centred rows)."""
    from lumbar_tf.core.labels import LEVELS
    from lumbar_tf.synthetic.phantom import iter_studies, synthesize_dataset

    root = synthesize_dataset(tmp / "realistic", n, seed=seed, acquisition="realistic")
    low, centred = [], []
    for study, _ in iter_studies(n, seed=seed, acquisition="realistic"):
        pts = np.array([study.phantom.landmark("spinal_canal_stenosis", lv) for lv in LEVELS])
        read = read_study(root / "train_images" / str(study.study_id))
        series = preprocess._reference_sagittal(read)
        field_z = np.array([s.center for s in series.slices])[:, 2].mean()
        half_height = series.slices[0].rows * series.slices[0].pixel_spacing[0] / 2
        below = (field_z - 0.5 * (pts[:, 2].min() + pts[:, 2].max())) / half_height
        (low if below > 0.225 else centred).append(_score(series, pts, study.phantom.x_mid))
    return low, centred


def report(name: str, rows) -> str:
    how = [row[-1] for row in rows]
    r = np.array([row[:-1] for row in rows], dtype=float)
    l5 = f"L5/S1 error median {np.nanmedian(r[:, 1]):5.1f} mm, p90 {np.nanpercentile(r[:, 1], 90):5.1f} mm"
    inside = f"all levels in view: spine grid {r[:, 2].mean():.2f}, field grid {r[:, 3].mean():.2f}"
    midline = f"midline slice off by > 0: {np.mean(r[:, 4] > 0.5):.2f}"
    speed = f"find_spine {1000 * np.median(r[:, 5]):.0f} ms/study (median)"
    placed = ", ".join(f"{k} {how.count(k)}" for k in preprocess.L5S1_FROM if how.count(k))
    line = (
        f"{name:<32} n={len(r):3d}  found {r[:, 0].mean():.2f}  {l5}  |  {inside}  |  {midline}  |  {speed}"
        f"  |  L5/S1 from: {placed}"
    )
    print(line, flush=True)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--only", choices=["realistic"], help="only the realistic phantom studies")
    parser.add_argument("--seed", type=int, default=31, help="seed of the realistic phantom studies")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        low, centred = realistic(args.studies, args.seed, tmp)
        report("realistic, spine low", low)
        report("realistic, spine centred", centred)
        if args.only:
            return
        report("drawn, L5/S1 60-140 mm low", drawn(args.studies, 1, tmp, True))
        report("drawn, L5/S1 40-80 mm low", drawn(args.studies, 2, tmp, False))
        report("phantom anatomy, spine low", phantom_fields(args.studies, 3, tmp, True))
        report("phantom anatomy, spine centred", phantom_fields(args.studies, 4, tmp, False))
        report("phantom as synthesised", synthesised(args.studies, tmp))


if __name__ == "__main__":
    main()
