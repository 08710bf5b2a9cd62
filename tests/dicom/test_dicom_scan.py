"""lumbar_tf.dicom.header_scan: the fast header scan agrees with pydicom, or steps aside."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from lumbar_tf.dicom import reader as dicom
from lumbar_tf.dicom.header_scan import scan_header
from lumbar_tf.dicom.reader import decode_instance, decode_stored, read_instance_header

try:  # tests/ as a package (repo root on sys.path) or as a plain folder (pytest prepends it)
    from tests import dicom_factory as factory
except ImportError:
    import dicom_factory as factory

SERIES_TAGS = ("SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "EchoTime", "RepetitionTime")


def _dataset(**changes) -> Dataset:
    spec = factory.SeriesSpec(n_slices=1, echo_time=80.0, repetition_time=3000.0)
    pixels = factory.stored_pixels(spec)[0]
    ds = factory.make_dataset(spec, pixels, np.array([1.5, -20.25, 33.0]), 7, generate_uid(), generate_uid())
    for key, value in changes.items():
        setattr(ds, key, value)
    return ds


def _with_words(ds: Dataset, words: np.ndarray, dtype: str) -> Dataset:
    ds.PixelData = np.ascontiguousarray(words.reshape(ds.Rows, ds.Columns), dtype=dtype).tobytes()
    return ds


def _noisy_high_bits(ds: Dataset, signed: bool) -> Dataset:
    """12 stored bits in 16 allocated, with junk above bit 11 (pydicom masks it; so must we)."""
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**16, ds.Rows * ds.Columns, dtype=np.uint16)
    ds.PixelRepresentation = int(signed)
    return _with_words(ds, words, "<u2")


def _with_sequences_and_private_block(ds: Dataset) -> Dataset:
    """Nested sequences of undefined length and a 40 kB private element before the pixels."""
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = generate_uid()
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    item.ReferencedImageSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, inner])
    for parent in (ds, item):
        parent["ReferencedImageSequence"].is_undefined_length = True
    for each in (item, inner):
        each.is_undefined_length_sequence_item = True
    ds.private_block(0x0029, "LUMBAR TEST", create=True).add_new(0x10, "OB", bytes(40_000))
    return ds


VARIANTS = {
    "explicit_12bit": lambda: _dataset(),
    "implicit_vr": lambda: _dataset(),
    "implicit_vr_sequences": lambda: _with_sequences_and_private_block(_dataset()),
    "high_bits_unsigned": lambda: _noisy_high_bits(_dataset(), signed=False),
    "high_bits_signed": lambda: _noisy_high_bits(_dataset(), signed=True),
    "signed_16bit_no_rescale": lambda: _with_words(
        _without_rescale(_dataset(BitsStored=16, HighBit=15, PixelRepresentation=1)),
        np.random.default_rng(4).integers(-3000, 3000, 40 * 48),
        "<i2",
    ),
    "8bit": lambda: _with_words(
        _dataset(BitsAllocated=8, BitsStored=8, HighBit=7),
        np.random.default_rng(5).integers(0, 256, 40 * 48),
        "u1",
    ),
    "monochrome1": lambda: _dataset(PhotometricInterpretation="MONOCHROME1", RescaleSlope=0.5),
    "sequences_and_big_private_tag": lambda: _with_sequences_and_private_block(_dataset()),
}


def _without_rescale(ds: Dataset) -> Dataset:
    for key in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        delattr(ds, key)
    return ds


def _write(ds: Dataset, path, implicit: bool = False):
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _by_pydicom(path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(dicom, "scan_header", lambda _: None)
        return read_instance_header(path)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_scan_matches_pydicom(tmp_path, monkeypatch, variant):
    path = _write(VARIANTS[variant](), tmp_path / "1.dcm", implicit=variant.startswith("implicit"))
    assert scan_header(path) is not None
    fast, fast_tags = read_instance_header(path)
    slow, slow_tags = _by_pydicom(path, monkeypatch)
    assert fast.native is not None and slow.native is None

    assert (fast.instance_number, fast.rows, fast.cols) == (slow.instance_number, slow.rows, slow.cols)
    assert fast.pixel_spacing == slow.pixel_spacing
    for name in ("position", "row_dir", "col_dir"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name))
    for key in SERIES_TAGS:
        assert str(fast_tags.get(key)) == str(slow_tags.get(key)), key

    reference = pydicom.dcmread(path).pixel_array
    fast_values, fast_map = decode_stored(fast)
    slow_values, slow_map = decode_stored(slow)
    np.testing.assert_array_equal(fast_values, reference)
    np.testing.assert_array_equal(slow_values, reference)
    assert fast_values.dtype == reference.dtype
    assert fast_map == slow_map
    np.testing.assert_array_equal(decode_instance(fast), decode_instance(slow))


@pytest.mark.parametrize("syntax", ["deflated", "rle", "jpeg2000_lossless"])
def test_other_transfer_syntaxes_are_left_to_pydicom(tmp_path, syntax):
    src = _write(_dataset(), tmp_path / "src.dcm")
    factory.rewrite(src, tmp_path / "out.dcm", syntax)
    assert scan_header(tmp_path / "out.dcm") is None
    header, _ = read_instance_header(tmp_path / "out.dcm")
    assert header.native is None
    np.testing.assert_array_equal(decode_instance(header), decode_instance(read_instance_header(src)[0]))


def test_unusual_files_are_left_to_pydicom(tmp_path):
    ds = _dataset(SpecificCharacterSet="ISO_IR 100", SeriesDescription="Sagittal T2 Müller")
    assert scan_header(_write(ds, tmp_path / "latin1.dcm")) is None
    assert read_instance_header(tmp_path / "latin1.dcm")[1].get("SeriesDescription") == "Sagittal T2 Müller"

    no_pixels = _dataset()
    del no_pixels.PixelData
    assert scan_header(_write(no_pixels, tmp_path / "nopixels.dcm")) is None

    corrupt = _write(_dataset(), tmp_path / "corrupt.dcm").read_bytes()
    at = corrupt.index(b"\x20\x00\x32\x00DS")  # ImagePositionPatient: its VR becomes "D?"
    (tmp_path / "corrupt.dcm").write_bytes(corrupt[: at + 5] + b"?" + corrupt[at + 6 :])
    assert scan_header(tmp_path / "corrupt.dcm") is None

    (tmp_path / "text.dcm").write_text("not DICOM at all\n" * 20)
    assert scan_header(tmp_path / "text.dcm") is None
    assert scan_header(tmp_path / "missing.dcm") is None


def test_modality_lut_sequence_is_decoded_by_pydicom(tmp_path):
    ds = _dataset()
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.ModalityLUTType = "US"
    lut.add_new(0x00283006, "US", list(range(4096, 0, -1)))  # LUTData
    ds.ModalityLUTSequence = Sequence([lut])
    path = _write(ds, tmp_path / "lut.dcm")
    header, _ = read_instance_header(path)
    assert header.native is None
    values, modality = decode_stored(header)
    assert modality is None and values.dtype == np.float32
    stored = pydicom.dcmread(path).pixel_array.astype(np.int64)
    np.testing.assert_array_equal(values, (4096 - np.clip(stored, 0, 4095)).astype(np.float32))


def test_every_truncation_is_left_to_pydicom(tmp_path):
    path = _write(_with_sequences_and_private_block(_dataset()), tmp_path / "1.dcm")
    data = path.read_bytes()
    cut_file = tmp_path / "cut.dcm"
    for cut in [*range(0, 2000, 7), *range(2000, len(data), 997), len(data) - 1]:
        cut_file.write_bytes(data[:cut])
        assert scan_header(cut_file) is None, cut


def _outcome(path, monkeypatch, fast: bool):
    """read_instance_header's and decode_instance's results (or the DicomError), with or without
    the fast scan."""
    with monkeypatch.context() as patch:
        if not fast:
            patch.setattr(dicom, "scan_header", lambda _: None)
        try:
            header, tags = read_instance_header(path)
            pixels = decode_instance(header)
        except dicom.DicomError as err:
            return "error", err.reason
    geometry = (header.instance_number, header.rows, header.cols, header.pixel_spacing)
    vectors = tuple(tuple(getattr(header, k)) for k in ("position", "row_dir", "col_dir"))
    return geometry, vectors, tuple(str(tags.get(k)) for k in SERIES_TAGS), pixels.tobytes()


@pytest.mark.parametrize("implicit", [False, True])
def test_a_damaged_header_reads_as_pydicom_reads_it(tmp_path, monkeypatch, implicit):
    """Whatever the scan accepts, it reads as pydicom does; whatever it does not, pydicom gets.
    (FUZZ_N and FUZZ_SEED run more cases: 60,000, explicit and implicit VR, passed when written.)"""
    source = _write(_with_sequences_and_private_block(_dataset()), tmp_path / "src.dcm", implicit=implicit)
    data = source.read_bytes()
    header_end = data.index(b"\xe0\x7f\x10\x00")  # the Pixel Data tag
    rng = np.random.default_rng(int(os.environ.get("FUZZ_SEED", 11)))
    path, accepted = tmp_path / "1.dcm", 0
    for _ in range(int(os.environ.get("FUZZ_N", 300))):
        damaged = bytearray(data)
        at = int(rng.integers(132, header_end))
        damaged[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        fast = _outcome(path, monkeypatch, fast=True)
        slow = _outcome(path, monkeypatch, fast=False)
        assert (fast[0] == "error") == (slow[0] == "error"), (at, fast, slow)
        if fast[0] != "error":
            assert fast == slow, at
        accepted += scan_header(path) is not None
    assert accepted > 100  # most single-byte changes hit values, which the scan reads


def _jpeg_file(path, fragments: int = 1, **changes):
    """A JPEG Lossless SV1 file of `_dataset` (the frame split into ``fragments`` fragments)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    ds = _dataset(**changes)
    ds.PixelData = encapsulate([factory.encode_jpeg_lossless_sv1(ds)], fragments_per_frame=fragments)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("fragments", [1, 3])
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_jpeg_lossless_is_decoded_without_pydicom_as_pydicom_decodes_it(
    tmp_path, monkeypatch, fragments, photometric
):
    pytest.importorskip("imagecodecs", reason="imagecodecs encodes JPEG Lossless SV1")
    path = _jpeg_file(tmp_path / "1.dcm", fragments, PhotometricInterpretation=photometric)
    scanned = scan_header(path)
    assert scanned is not None and len(scanned.fragments) == fragments
    fast, fast_tags = read_instance_header(path)
    slow, slow_tags = _by_pydicom(path, monkeypatch)
    assert fast.jpeg is not None and fast.native is None and slow.jpeg is None
    for key in SERIES_TAGS:
        assert str(fast_tags.get(key)) == str(slow_tags.get(key)), key
    with monkeypatch.context() as patch:  # the fast path decodes without pydicom
        patch.setattr(dicom.pydicom, "dcmread", None)
        fast_values, fast_map = decode_stored(fast)
    slow_values, slow_map = decode_stored(slow)
    reference = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(fast_values, reference)
    np.testing.assert_array_equal(slow_values, reference)
    assert fast_values.dtype == slow_values.dtype == reference.dtype and fast_map == slow_map
    np.testing.assert_array_equal(decode_instance(fast), decode_instance(slow))


def test_a_jpeg_frame_pydicom_must_judge_goes_to_pydicom(tmp_path, monkeypatch):
    """Values above BitsStored (pydicom keeps them) and a stream libjpeg-turbo refuses are decoded by
    pydicom, with its result or its error."""
    pytest.importorskip("imagecodecs", reason="imagecodecs encodes JPEG Lossless SV1")
    path = _jpeg_file(tmp_path / "1.dcm")
    ds = pydicom.dcmread(path)
    ds.BitsStored, ds.HighBit = 8, 7  # the 12-bit frame now has values above BitsStored
    ds.save_as(path, enforce_file_format=True)
    header, _ = read_instance_header(path)
    assert header.jpeg is not None and dicom._read_jpeg(header) is None
    np.testing.assert_array_equal(decode_stored(header)[0], pydicom.dcmread(path).pixel_array)

    garbage = _jpeg_file(tmp_path / "2.dcm")
    data = bytearray(garbage.read_bytes())
    soi = data.index(b"\xff\xd8")
    data[soi : soi + 2] = b"\x00\x00"  # no JPEG start of image
    garbage.write_bytes(bytes(data))
    header, _ = read_instance_header(garbage)
    assert header.jpeg is not None and dicom._read_jpeg(header) is None
    with pytest.raises(dicom.DicomError, match="cannot decode pixel data"):
        decode_stored(header)


def test_every_jpeg_truncation_is_left_to_pydicom(tmp_path):
    """A JPEG Lossless file cut anywhere (inside the header, an item header, a fragment, before the
    sequence delimiter) is left to pydicom, which words the error."""
    pytest.importorskip("imagecodecs", reason="imagecodecs encodes JPEG Lossless SV1")
    data = _jpeg_file(tmp_path / "1.dcm", fragments=2).read_bytes()
    pixel = data.index(b"\xe0\x7f\x10\x00")
    cut_file = tmp_path / "cut.dcm"
    for cut in [*range(pixel - 40, pixel + 40, 3), *range(pixel + 40, len(data), 401), len(data) - 1]:
        cut_file.write_bytes(data[:cut])
        assert scan_header(cut_file) is None, cut


def test_a_resampled_jpeg_lossless_slice_keeps_the_fast_decode(tmp_path, monkeypatch):
    """A JPEG Lossless slice of another size over the same field is resampled from libjpeg-turbo's
    values, as pydicom's would be resampled."""
    pytest.importorskip("imagecodecs", reason="imagecodecs encodes JPEG Lossless SV1")
    paths, _ = factory.write_series(tmp_path / "77" / "1", factory.SeriesSpec(n_slices=4))
    factory.halve_matrix(paths[2])
    factory.rewrite(paths[2], paths[2], "jpeg_lossless")
    (series,) = dicom.read_series(tmp_path / "77" / "1")
    slices = series.slices
    (odd,) = [h for h in slices if h.file_shape is not None]
    assert (
        odd.path == paths[2]
        and odd.jpeg is not None
        and (odd.rows, odd.cols) == (slices[0].rows, slices[0].cols)
    )
    with monkeypatch.context() as patch:  # the fast path decodes without pydicom
        patch.setattr(dicom.pydicom, "dcmread", None)
        fast_values, _ = decode_stored(odd)
    slow_values, _ = decode_stored(dataclasses.replace(odd, jpeg=None))
    assert fast_values.shape == (odd.rows, odd.cols)
    np.testing.assert_array_equal(fast_values, slow_values)
