"""Studies of other anatomy, written as real DICOM typed as lumbar sagittal series.

What input quality control must flag (issue 14 item 11): anatomy as smooth as a spine's, so image
statistics alone pass it, but no lumbar vertebral column. Each kind is drawn in patient mm on a
sagittal geometry (`tests.dicom_factory`), with smooth tissue texture, a bias field and noise:

- ``head``: a skull ring around brain (grey/white texture, ventricles, cerebellum, brainstem).
- ``knee``: femur and tibia (marrow in a cortex) meeting at a joint, patella, muscle and fat.
- ``abdomen``: an axial abdominal cross-section (liver, kidneys, bowel loops, aorta, one
  vertebral body) stored with a sagittal orientation: a wrongly typed series.
- ``mistyped_axial``: a phantom's real Axial T2 slices written as Sagittal T2/STIR and T1.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tests.dicom_factory import SAGITTAL_IOP, SeriesSpec, write_study

KINDS = ("head", "knee", "abdomen", "mistyped_axial")


def _texture(rng, shape, sigma_px: float) -> np.ndarray:
    """Smooth random field, zero mean and unit sd."""
    field = cv2.GaussianBlur(rng.normal(0, 1, shape).astype(np.float32), (0, 0), sigma_px)
    return (field - field.mean()) / (field.std() + 1e-9)


def _inside(u, v, cu, cv, a, b, angle=0.0):
    """Ellipse membership (a along u, b along v, rotated ``angle`` radians)."""
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u - cu, v - cv
    return ((du * c + dv * s) / a) ** 2 + ((-du * s + dv * c) / b) ** 2 < 1.0


def _head(rng, u, v, lat, mm):
    """u: anterior -> posterior mm, v: head -> feet mm, from the field centre."""
    img = np.full(u.shape, 0.05, np.float32)
    a, b = rng.uniform(85, 100), rng.uniform(70, 85)
    cu, cv = rng.uniform(-10, 10), rng.uniform(-25, -5)
    shrink = np.sqrt(max(0.2, 1.0 - (lat / 70.0) ** 2))
    a, b = a * shrink, b * shrink
    img[_inside(u, v, cu, cv, a + 6, b + 6)] = 0.8  # scalp fat
    img[_inside(u, v, cu, cv, a + 2, b + 2)] = 0.1  # skull
    brain = _inside(u, v, cu, cv, a - 2, b - 2)
    gyri = _texture(rng, u.shape, 1.2 / mm)
    img[brain] = (0.5 + 0.12 * np.tanh(2 * gyri))[brain]
    img[_inside(u, v, cu + 5, cv + 5, 25 * shrink, 9 * shrink, 0.2) & brain] = 0.9  # ventricle (CSF)
    img[_inside(u, v, cu + 0.55 * a, cv + 0.55 * b, 28 * shrink, 20 * shrink) & brain] = 0.42  # cerebellum
    stem = _inside(u, v, cu + 0.25 * a, cv + b, 9, 40, -0.25) & (lat < 10)
    img[stem] = 0.55
    return img


def _bone(img, u, v, cu, cv, a, b, angle, marrow, rng, mm):
    outer = _inside(u, v, cu, cv, a, b, angle)
    img[outer] = 0.08  # cortex
    inner = _inside(u, v, cu, cv, a - 3, b - 3, angle)
    img[inner] = (marrow + 0.05 * _texture(rng, u.shape, 1.0 / mm))[inner]


def _knee(rng, u, v, lat, mm):
    img = (0.35 + 0.05 * _texture(rng, u.shape, 1.5 / mm)).astype(np.float32)  # muscle
    width = rng.uniform(55, 70) * np.sqrt(max(0.3, 1.0 - (lat / 60.0) ** 2))
    joint = rng.uniform(-20, 20)
    tilt = rng.uniform(-0.15, 0.15)
    img[np.abs(u - 10) > width + 25] = 0.75  # subcutaneous fat
    img[np.abs(u - 10) > width + 32] = 0.02  # air
    marrow = rng.uniform(0.65, 0.8)
    # Femur: a shaft from the top widening into the condyle above the joint.
    _bone(img, u, v, 5, joint - 140, 16, 120, tilt, marrow, rng, mm)
    _bone(img, u, v, 5, joint - 25, 32, 26, tilt, marrow, rng, mm)
    # Tibia: plateau below the joint and its shaft.
    _bone(img, u, v, 8, joint + 28, 34, 22, tilt, marrow, rng, mm)
    _bone(img, u, v, 12, joint + 140, 15, 120, tilt, marrow, rng, mm)
    img[(np.abs(v - joint) < 2.5) & (np.abs(u - 6) < 30)] = 0.6  # cartilage and fluid
    _bone(img, u, v, -40, joint - 30, 9, 20, 0.2, marrow, rng, mm)  # patella
    return img


def _abdomen(rng, u, v, lat, mm):
    """An axial cross-section: u left -> right, v anterior -> posterior (as if typed sagittal)."""
    img = np.full(u.shape, 0.02, np.float32)
    a, b = rng.uniform(140, 170), rng.uniform(100, 120)
    img[_inside(u, v, 0, 0, a, b)] = 0.8  # subcutaneous fat
    img[_inside(u, v, 0, 0, a - 15, b - 15)] = (0.35 + 0.04 * _texture(rng, u.shape, 1.2 / mm))[
        _inside(u, v, 0, 0, a - 15, b - 15)
    ]
    img[_inside(u, v, -60, -10, 70, 55, 0.3)] = 0.28  # liver
    for side in (-1, 1):
        img[_inside(u, v, side * 60, 55, 22, 32, side * 0.4)] = 0.55  # kidneys
        img[_inside(u, v, side * 35, 70, 18, 25)] = 0.4  # psoas
    img[_inside(u, v, 0, 60, 20, 17)] = 0.45  # a vertebral body
    img[_inside(u, v, 0, 87, 7, 6)] = 0.9  # canal
    img[_inside(u, v, -12, 35, 9, 9)] = 0.85  # aorta
    for _ in range(int(rng.integers(12, 20))):  # bowel loops
        cu, cv = rng.uniform(-a * 0.6, a * 0.8), rng.uniform(-b * 0.7, b * 0.3)
        r = rng.uniform(8, 18)
        img[_inside(u, v, cu, cv, r, r)] = 0.1
        img[_inside(u, v, cu, cv, r - 3, r - 3)] = rng.choice([0.15, 0.9])
    return img


DRAW = {"head": _head, "knee": _knee, "abdomen": _abdomen}


def _drawn_pixels(kind: str, rng, n: int, size: int, mm: float, slice_mm: float) -> np.ndarray:
    c = (np.arange(size) - (size - 1) / 2) * mm
    v, u = np.meshgrid(c, c, indexing="ij")  # rows head -> feet (v), columns anterior -> posterior (u)
    yy, xx = np.mgrid[0:size, 0:size] / size
    bias = 1.0 + 0.25 * np.cos(np.pi * (xx - rng.uniform(0, 1))) * np.cos(np.pi * (yy - rng.uniform(0, 1)))
    anatomy = int(rng.integers(1 << 31))  # one body: the same draws on every slice
    out = []
    for k in range(n):
        lat = (k - (n - 1) / 2) * slice_mm
        img = DRAW[kind](np.random.default_rng(anatomy), u, v, abs(lat), mm)
        img = cv2.GaussianBlur(img, (0, 0), 0.6) * bias + rng.normal(0, 0.02, img.shape)
        out.append(np.clip(img * 3000 + 100, 0, 4095))
    return np.stack(out).astype(np.uint16)


def _axial_pixels(phantom_dir: Path, index: int) -> tuple[np.ndarray, tuple[float, float]]:
    """A phantom study's Axial T2 slices (stored values) and their pixel spacing."""
    from lumbar_tf.dicom.reader import read_study
    from lumbar_tf.runtime.predictor import descriptions_for_study

    studies = sorted(p for p in (Path(phantom_dir) / "train_images").iterdir() if p.is_dir())
    study_dir = studies[index % len(studies)]
    axial = read_study(study_dir, descriptions_for_study(study_dir)).series_by_description("Axial T2")
    pixels = axial.load_pixels(range(len(axial.slices)))
    pixels = np.clip((pixels - pixels.min()) / (np.ptp(pixels) + 1e-9) * 4000, 0, 4095).astype(np.uint16)
    return pixels, tuple(float(v) for v in axial.slices[0].pixel_spacing)


def write_foreign_study(root, kind: str, seed: int = 0, *, size: int = 256, phantom_dir=None) -> Path:
    """A study folder ``root/{kind}_{seed}`` with a Sagittal T2/STIR and a Sagittal T1 series of
    ``kind`` (`KINDS`); ``mistyped_axial`` needs ``phantom_dir`` (the session phantoms)."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    if kind == "mistyped_axial":
        pixels, spacing = _axial_pixels(phantom_dir, seed)
        n = len(pixels)
    else:
        n = int(rng.integers(9, 16))
        mm = float(rng.uniform(0.7, 1.1)) * 256 / size  # a 180-280 mm field
        spacing = (mm, mm)
        pixels = _drawn_pixels(kind, rng, n, size, mm, 4.0)
    spec = dict(
        n_slices=n,
        rows=pixels.shape[1],
        cols=pixels.shape[2],
        pixel_spacing=spacing,
        slice_spacing=4.0,
        iop=SAGITTAL_IOP,
        slope=None,
        intercept=None,
        pixels=pixels,
    )
    return write_study(
        root,
        f"{kind}_{seed}",
        {
            "31": SeriesSpec("Sagittal T2/STIR", series_number=31, seed=seed, **spec),
            "32": SeriesSpec("Sagittal T1", series_number=32, seed=seed + 1, **spec),
        },
    )
