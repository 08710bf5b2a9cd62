"""A short, bounded fuzz run in the fast suite (the long runs: `make fuzz SECONDS=...`,
tests/fuzz/README.md), and the crashes fuzzing found, as regression tests."""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lumbar_tf.core.errors import DicomError
from lumbar_tf.dicom.reader import decode_instance, read_instance_header
from tests.fuzz.fuzz_inputs import Target, run_mutations, write_seeds
from tests.hostile_files import valid_file
from tests.reliability.table import record

ROOT = Path(__file__).resolve().parents[2]


def test_seeded_mutations_raise_only_one_line_bad_input_errors(tmp_path):
    seeds = write_seeds(tmp_path / "seeds")
    assert len(seeds) >= 8
    runs = run_mutations(Target(tmp_path / "scratch"), seeds, runs=300, seconds=None, seed=1)
    assert runs == 300
    record(
        "fuzz",
        f"{runs} inputs from {len(seeds)} seeds, each read or refused with a one-line bad-input error; "
        "longer runs (`make fuzz`, atheris) in `tests/fuzz/README.md`",
    )


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_harness_runs_clean(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.fuzz_inputs", "-runs=150", "-seed=1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done 150 runs" in proc.stderr


def test_regression_rle_header_with_absurd_segment_count_is_one_line(tmp_path):
    """Found by the fuzzer: pydicom's plugin error ran over two lines."""
    path = valid_file(tmp_path / "rle.dcm", transfer_syntax="rle")
    data = bytearray(path.read_bytes())
    # Pixel Data (undefined length), the offset table item, then the fragment: its first four
    # bytes are the RLE segment count.
    table = data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    (table_length,) = struct.unpack_from("<L", data, table + 4)
    fragment = table + 8 + table_length
    assert data[fragment : fragment + 4] == b"\xfe\xff\x00\xe0"
    data[fragment + 8 : fragment + 12] = struct.pack("<L", 3222786)
    path.write_bytes(bytes(data))
    header, _ = read_instance_header(path)
    with pytest.raises(DicomError) as err:
        decode_instance(header)
    line = str(err.value)
    assert line.startswith(f"{path}: cannot decode pixel data (RLE Lossless)") and "\n" not in line
