"""Could a mirror-symmetry check tell coronal or axial pixels under a sagittal header from a
sagittal spine? Measures, on the 192 px localiser view's midline channel, `vertical_periodicity`
(the shipped check) and a left-right mirror symmetry (tried, not shipped) of:

- phantom studies (an RSNA-layout folder, e.g. `lumbar-tf synth --out DIR --studies 40 --seed 913`),
- the foreign anatomy of `tests.runtime.foreign_anatomy` (10 of each kind),
- drawn spines of `tests.dicom_factory.Spine`: coronal pixels behind a sagittal header, and sagittal.

    PYTHONPATH=. .venv/bin/python benchmarks/qc_symmetry.py --phantoms DIR [--phantoms DIR2 ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lumbar_tf.core.config import load_config  # noqa: E402
from lumbar_tf.dicom.reader import read_study  # noqa: E402
from lumbar_tf.preprocess import build_views  # noqa: E402
from lumbar_tf.runtime import quality  # noqa: E402
from lumbar_tf.runtime.predictor import descriptions_for_study  # noqa: E402
from tests.dicom_factory import CORONAL_IOP, SAGITTAL_IOP, Spine, spine_series, write_study  # noqa: E402
from tests.runtime.foreign_anatomy import KINDS, write_foreign_study  # noqa: E402

HALF_MM = 40.0  # width of each mirrored half
HIGHPASS_MM = 20.0


def mirror_symmetry(image, crop_mm: float, work_mm: float = 2.0) -> float:
    """Best correlation between the view's two halves about a vertical axis (high-passed)."""
    n = max(8, round(crop_mm / work_mm))
    x = quality._resample(np.asarray(image, float), n)
    mm = crop_mm / n
    k = round(HIGHPASS_MM / mm)
    x = x - quality._moving_mean(quality._moving_mean(x, k, 0), k, 1)
    w = round(HALF_MM / mm)
    best = -1.0
    for axis in range(w, n - w):
        left, right = x[:, axis - w : axis][:, ::-1], x[:, axis : axis + w]
        left, right = left - left.mean(), right - right.mean()
        den = np.sqrt((left * left).sum() * (right * right).sum())
        if den > 1e-9:
            best = max(best, float((left * right).sum() / den))
    return best


def drawn_studies(root: Path) -> dict[str, list[Path]]:
    geometry = dict(n_slices=9, rows=96, cols=96, pixel_spacing=(2.5, 2.5))
    t1 = spine_series(
        Spine(contrast="T1"), "Sagittal T1", series_number=12, center=(0.0, 0.0, 30.0), **geometry
    )
    out: dict[str, list[Path]] = {"drawn coronal as sagittal": [], "drawn sagittal": []}
    for k, (y, x) in enumerate([(-26.0, 0.0), (-20.0, 0.0), (-10.0, 3.0)]):
        coronal = spine_series(
            Spine(),
            "Sagittal T2",
            series_number=11,
            iop=CORONAL_IOP,
            center=(x, y, 30.0),
            slice_spacing=3.0,
            **geometry,
        )
        lying = spine_series(
            Spine(), "Sagittal T2", series_number=11, iop=SAGITTAL_IOP, center=(0.0, 0.0, 30.0), **geometry
        )
        lying.pixels = coronal.pixels
        out["drawn coronal as sagittal"].append(write_study(root, f"coronal_{k}", {"11": lying, "12": t1}))
        sagittal = spine_series(
            Spine(l5s1=(y + 26, -60.0)), "Sagittal T2", series_number=11, center=(0.0, 0.0, 30.0), **geometry
        )
        out["drawn sagittal"].append(write_study(root, f"sagittal_{k}", {"11": sagittal, "12": t1}))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=Path, action="append", required=True)
    args = parser.parse_args(argv)
    cfg = load_config(None, []).preprocess
    root = Path(tempfile.mkdtemp())
    groups = {"phantoms": [d for p in args.phantoms for d in sorted((p / "train_images").iterdir())]}
    for kind in KINDS:
        groups[kind] = [
            write_foreign_study(root / "foreign", kind, s, phantom_dir=args.phantoms[0]) for s in range(10)
        ]
    groups.update(drawn_studies(root / "drawn"))
    print(
        "| studies | n | vertical_periodicity min-max | mirror symmetry min-max |\n| --- | ---: | --- | --- |"
    )
    for name, dirs in groups.items():
        period, mirror = [], []
        for d in dirs:
            views, grid, _, _ = build_views(read_study(d, descriptions_for_study(d)), cfg)
            image = quality.midline_channel(views, cfg)
            period.append(quality.vertical_periodicity(image, grid.spine_crop_mm))
            mirror.append(mirror_symmetry(image, grid.spine_crop_mm))
        ranges = [f"{min(v):.2f}-{max(v):.2f}" for v in (period, mirror)]
        print(f"| {name} | {len(dirs)} | {ranges[0]} | {ranges[1]} |")


if __name__ == "__main__":
    main()
