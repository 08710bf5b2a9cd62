"""CSV safety (issue 14 item 3): BOM and CRLF read, duplicate label rows refused naming both lines,
formula-like cells never written raw. (Ids from CSVs kept to plain integers: the submission test in
tests/runtime/test_predict.py.)"""

from __future__ import annotations

import csv
import shutil

import pytest

from lumbar_tf.core.errors import DatasetError, DicomError
from lumbar_tf.core.io import write_csv_atomic
from lumbar_tf.data.dataset import read_index
from lumbar_tf.dicom.reader import read_series_descriptions
from tests.reliability.table import record, shape


def _excel_copy(src, dst):
    """What Excel's "CSV UTF-8" writes: a BOM and CRLF line ends."""
    dst.write_bytes(b"\xef\xbb\xbf" + src.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


@pytest.fixture
def data(phantom_dir, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for path in phantom_dir.glob("*.csv"):
        shutil.copy(path, root / path.name)
    (root / "train_images").mkdir()
    return root


def test_bom_and_crlf_read_like_the_plain_files(data, phantom_dir):
    plain = read_index(phantom_dir)
    for path in data.glob("*.csv"):
        _excel_copy(phantom_dir / path.name, path)
    excel = read_index(data)
    assert excel.study_ids == plain.study_ids and not excel.problems
    for sid in plain.study_ids:
        assert (excel.studies[sid].grades == plain.studies[sid].grades).all()
        assert excel.studies[sid].coordinates == plain.studies[sid].coordinates
    assert excel.descriptions == plain.descriptions
    assert read_series_descriptions(data / "train_series_descriptions.csv") == plain.descriptions
    record(
        "csv-bom",
        f"read as the plain files: the same {len(excel.study_ids)} studies, grades, coordinates and "
        "descriptions",
    )


@pytest.mark.parametrize("name", ["train.csv", "train_grades.csv"])
def test_a_duplicate_study_row_names_both_lines(data, name, tmp_path, capsys):
    """Through `lumbar-tf prepare`: exit 2 with the one line, before any study is read."""
    from lumbar_tf.cli.main import main

    path = data / name
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4] + [lines[2]] + lines[4:]))
    sid = lines[2].split(",")[0]
    with pytest.raises(DatasetError) as err:
        read_index(data)
    assert str(err.value) == f"{path}: study_id {sid} appears twice (lines 3 and 5)"
    code = main(["prepare", "--data", str(data), "--out", str(tmp_path / "cache")])
    assert (code, capsys.readouterr().err.splitlines()) == (2, [f"error: {err.value}"])
    assert not (tmp_path / "cache" / "manifest.json").exists()
    record(
        "csv-duplicates",
        f"`prepare`: exit {code}, `error: {shape(str(err.value).replace(sid, 'ID'), **{name: path})}`",
        name,
    )


def test_a_binary_descriptions_file_is_one_line(tmp_path):
    path = tmp_path / "test_series_descriptions.csv"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DicomError, match=rf"^{path}: not a valid CSV"):
        read_series_descriptions(path)


@pytest.mark.parametrize("cell", ['=HYPERLINK("http:x")', "+1+2", "-cmd|x", "@SUM(A1)", "\tx", "\rx"])
def test_formula_cells_are_written_as_text(tmp_path, cell):
    path = write_csv_atomic(tmp_path / "x.csv", ["study_id", "reason"], [[cell, cell], ["-0.5", 1.5]])
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    written = "'" + cell.replace("\r", "\n")  # a bare CR would split the row
    assert rows[1] == [written, written] and rows[2] == ["-0.5", "1.5"]
    if cell.startswith("="):
        record(
            "csv-formulas",
            f"written as text with a leading `'` (`{rows[1][0]}`); numbers such as `-0.5` kept",
        )
