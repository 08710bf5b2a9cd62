"""Hostile DICOM input: bounded memory and time, no path escapes, degenerate geometry named.

Issue 14 items 1, 2 and 6. Every refusal is a one-line DicomError naming the file; memory caps are
measured in a subprocess under RLIMIT_AS, not timed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lumbar_tf.core.errors import DicomError
from lumbar_tf.dicom import reader
from lumbar_tf.dicom.reader import ReadLimits, read_instance_header, read_series, read_study, set_read_limits
from tests import hostile_files as H
from tests.dicom_factory import SeriesSpec, write_series, write_study
from tests.reliability.table import record, shape

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def limits():
    """Set limits for one test; the defaults come back afterwards."""
    previous = reader.read_limits()
    yield lambda **kw: set_read_limits(ReadLimits(**kw))
    set_read_limits(previous)


def _refused(path, match: str) -> str:
    with pytest.raises(DicomError) as err:
        read_instance_header(path)
    line = str(err.value)
    assert line.startswith(f"{path}: ") and "\n" not in line and match in line, line
    return line


# === Resource limits ===


def test_defaults_are_documented_in_one_place():
    limits = ReadLimits()
    assert limits.max_file_bytes == 128 * 2**20 and limits.max_image_bytes == 64 * 2**20
    with pytest.raises(ValueError, match="max_file_bytes"):
        ReadLimits(max_file_bytes=0)


def test_a_deflate_bomb_is_refused_without_inflating_it(tmp_path, limits):
    limits(max_inflated_bytes=4 * 2**20)
    bomb = H.deflate_bomb(tmp_path / "bomb.dcm", 16 * 2**20)
    _refused(bomb, "deflated data set inflates past the 4.0 MiB limit")
    ok = H.valid_file(tmp_path / "ok.dcm", transfer_syntax="deflated")
    assert read_instance_header(ok)[0].rows == 40  # a real deflated file is still read


def test_a_sparse_giant_is_refused_by_its_size(tmp_path):
    giant = H.sparse_giant(tmp_path / "giant.dcm", 65535, 65535)
    _refused(giant, "file is 4.0 GiB, over the 128.0 MiB limit")


def test_an_image_over_the_pixel_limit_is_refused_before_its_pixels(tmp_path, limits):
    limits(max_image_bytes=2**20)
    big = H.sparse_giant(tmp_path / "big.dcm", 1024, 1024, bits=16)
    _refused(big, "image of 1024 x 1024 x 1 frames x 1 x 16 bits is 2.0 MiB, over the 1.0 MiB limit")


def test_a_padded_file_is_refused_by_its_size(tmp_path):
    _refused(H.padded(tmp_path / "padded.dcm", 2**31), "file is 2.0 GiB, over the 128.0 MiB limit")


def test_a_non_integer_frame_count_is_a_dicom_error(tmp_path):
    path = H.with_raw_value(H.valid_file(tmp_path / "nf.dcm"), 0x00280008, "IS", b"abc ")
    _refused(path, "bad NumberOfFrames value 'abc' (expected an integer)")


def test_slices_series_and_files_are_counted_before_reading(tmp_path, limits):
    study = write_study(tmp_path)  # 7 + 9 + 5 files in three series
    lines = []
    for limit, expected in (
        (dict(max_slices_per_series=8), f"{study / '12'}: more than 8 files in one series"),
        (dict(max_series_per_study=2), f"{study}: more than 2 series folders"),
        (dict(max_files_per_study=20), f"{study}: 21 DICOM files, over the limit of 20"),
    ):
        limits(**limit)
        with pytest.raises(DicomError) as err:
            read_study(study)
        assert str(err.value) == expected
        lines.append(f"`{shape(str(err.value), series=study / '12', study=study)}`")
    limits()
    assert len(read_study(study).series) == 3
    record("counts", "refused, one line naming the folder: " + ", ".join(lines))


_UNDER_A_MEMORY_CAP = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))
from lumbar_tf.core.errors import DicomError
from lumbar_tf.dicom.reader import read_instance_header, read_study
for path in sys.argv[1:]:
    try:
        if path.endswith("study"):
            print("read", path, *read_study(path).warnings, sep="\\n")
        else:
            read_instance_header(path)
            print("read", path)
    except DicomError as exc:
        print(exc)
"""


def test_bombs_stay_under_a_memory_cap(tmp_path):
    """Each would want gigabytes (1 GiB inflated, 4 GiB of pixels, 2 GiB of file) without the
    limits; under a 1 GiB address-space cap each is refused with its one line."""
    bombs = [
        H.deflate_bomb(tmp_path / "bomb.dcm", 2**30),
        H.sparse_giant(tmp_path / "giant.dcm", 65535, 65535),
        H.padded(tmp_path / "padded.dcm", 2**31),
    ]
    study = tmp_path / "study"
    write_series(study / "5", SeriesSpec(n_slices=3))
    os.replace(bombs[0], study / "5" / "9.dcm")
    bombs[0] = study / "5" / "9.dcm"
    script = _UNDER_A_MEMORY_CAP.replace("CAP", str(2**30))
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, bombs), str(study)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines == [
        f"{bombs[0]}: deflated data set inflates past the 128.0 MiB limit",
        f"{bombs[1]}: file is 4.0 GiB, over the 128.0 MiB limit",
        f"{bombs[2]}: file is 2.0 GiB, over the 128.0 MiB limit",
        "read",
        str(study),
        "series 5: dropped unreadable file 5/9.dcm (deflated data set inflates past the 128.0 MiB limit)",
    ]
    named = dict(bomb=bombs[0], giant=bombs[1], padded=bombs[2])
    refused = ", ".join(f"`{shape(line, **named)}`" for line in lines[:3])
    record(
        "bombs",
        f"each refused with one line, the process within the cap: {refused}; a study holding the bomb: "
        f"read, the bomb dropped with the warning `{lines[-1]}`",
    )


# === Paths ===


def test_links_leaving_the_study_are_not_followed(tmp_path):
    study = write_study(tmp_path / "data")
    outside = tmp_path / "elsewhere"
    write_series(outside / "77", SeriesSpec("Sagittal T1", series_number=77, n_slices=3))
    (study / "77").symlink_to(outside / "77", target_is_directory=True)
    (study / "11" / "666.dcm").symlink_to(outside / "77" / "1.dcm")
    (study / "11" / "etc").symlink_to("/etc", target_is_directory=True)
    inside = study / "11" / "1.dcm"
    (study / "12" / "100.dcm").symlink_to(inside)  # a link that stays inside is read
    result = read_study(study)
    assert "77" not in {s.series_id for s in [*result.series.values(), *result.extra]}
    assert len(result.series_by_description("Sagittal T2/STIR").slices) == 7
    assert sum("symbolic link(s) leaving the study folder not followed" in w for w in result.warnings) == 2
    assert not any(str(tmp_path) in w for w in result.warnings)  # no paths in predictions.json
    warned = next(w for w in result.warnings if "symbolic link" in w)
    record(
        "links",
        f"not followed, {len(result.series)} series read; a warning per folder, e.g. `{warned}` (no path "
        "in it); a link that stays inside the study is read",
    )


def test_read_series_alone_keeps_to_its_folder(tmp_path):
    write_series(tmp_path / "s", SeriesSpec(n_slices=3))
    H.valid_file(tmp_path / "other" / "x.dcm")
    (tmp_path / "s" / "9.dcm").symlink_to(tmp_path / "other" / "x.dcm")
    with pytest.warns(UserWarning, match="1 symbolic link"):
        (series,) = read_series(tmp_path / "s")
    assert len(series.slices) == 3


# === Degenerate geometry ===


@pytest.mark.parametrize(
    "part, spec, message",
    [
        ("spacing-small", SeriesSpec(n_slices=1, pixel_spacing=(1e-6, 1e-6)), "implausible PixelSpacing"),
        ("spacing-large", SeriesSpec(n_slices=1, pixel_spacing=(1e6, 0.8)), "implausible PixelSpacing"),
        (
            "position-1e300",
            SeriesSpec(n_slices=1, center=(1e300, 0.0, 0.0)),
            "implausible ImagePositionPatient",
        ),
        ("position-20m", SeriesSpec(n_slices=1, center=(0.0, 0.0, -20_000.0)), "(beyond 10 m)"),
        (
            "slope",
            SeriesSpec(n_slices=1, slope=0.0),
            "RescaleSlope 0 (every pixel would have the same value)",
        ),
    ],
)
def test_implausible_header_values_are_refused(tmp_path, part, spec, message):
    path = H.valid_file(tmp_path / "1.dcm", spec)
    line = _refused(path, message)
    record("geometry-refused", f"`{shape(line, file=path)}`", part)


def test_implausible_values_refuse_the_scan_and_the_pydicom_path_alike(tmp_path):
    spec = SeriesSpec(n_slices=1, slope=0.0)
    _refused(H.valid_file(tmp_path / "d.dcm", spec, transfer_syntax="deflated"), "RescaleSlope 0")


def test_phantom_studies_raise_no_geometry_warning(phantom_dir):
    study = next(p for p in sorted((phantom_dir / "train_images").iterdir()) if p.is_dir())
    assert not [w for w in read_study(study).warnings if "slice" in w or "link" in w]
