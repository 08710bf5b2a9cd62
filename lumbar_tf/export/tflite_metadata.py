"""Standard TFLite model metadata, so an Android app can read a lumbar-tf ``.tflite`` without our code.

The official writer (``tflite_support.metadata``) does not load on this machine (its pybind module
needs libusb, and the package pins protobuf<4 against TensorFlow's protobuf 6), so this module writes
the same bytes by hand: a ``ModelMetadata`` flatbuffer (metadata_schema.fbs, identifier ``M001``) in
the model's ``TFLITE_METADATA`` entry, and the labels files as a stored (uncompressed) zip appended to
the flatbuffer, as ``MetadataPopulator`` does; Android's ``MetadataExtractor`` reads both. One
``SubGraphMetadata`` per signature (``localize``, ``grade``), in subgraph order, tensors in each
subgraph's input/output order. The ``lumbar_tf_metadata`` JSON entry (`export.tflite.embed_metadata`)
is kept: lumbar-tf's own runner reads that one.
"""

from __future__ import annotations

import io
import zipfile

import flatbuffers
import numpy as np
from flatbuffers.table import Table

from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import GRADE, INTENDED_USE, LEVEL_INDEX, LEVEL_XY, LOCALIZE, THRESHOLD_PROBS

METADATA_BUFFER_NAME = "TFLITE_METADATA"  # the name MetadataExtractor / MetadataDisplayer look for
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"  # every field written here exists since metadata schema 1.0.0
LABELS_FILE, CONDITIONS_FILE, LEVELS_FILE, THRESHOLDS_FILE = (
    "labels.txt",
    "conditions.txt",
    "levels.txt",
    "thresholds.txt",
)

# metadata_schema.fbs enums, by the names MetadataDisplayer prints
FILE_TYPES = ("UNKNOWN", "DESCRIPTIONS", "TENSOR_AXIS_LABELS", "TENSOR_VALUE_LABELS")
CONTENT_TYPES = ("NONE", "FeatureProperties", "ImageProperties")
COLOR_SPACES = ("UNKNOWN", "RGB", "GRAYSCALE")
PROCESS_TYPES = ("NONE", "NormalizationOptions")


def associated_files() -> dict[str, str]:
    """The labels files (name -> text): conditions x levels x grades, and one per tensor axis."""
    cells = [
        f"{L.column_name(c, lv)}_{g}" for c in L.CONDITIONS for lv in L.LEVELS for g in L.SUBMISSION_COLUMNS
    ]
    return {
        LABELS_FILE: "\n".join(cells) + "\n",
        CONDITIONS_FILE: "\n".join(L.CONDITIONS) + "\n",
        LEVELS_FILE: "\n".join(L.LEVELS) + "\n",
        THRESHOLDS_FILE: "\n".join(f"grade{t}" for t in L.THRESHOLDS) + "\n",
    }


# === What the tensors mean (plain data, the same shape as MetadataDisplayer's JSON) ===


def _file(name: str, description: str, kind: str) -> dict:
    return {"name": name, "description": description, "type": kind}


def _image_input(name: str, size: int, what: str) -> dict:
    return {
        "name": name,
        "description": (
            f"{what} of the {name} series, [batch, {size}, {size}, 3] float32, pixel values 0-255: "
            "do not normalise (mean 0, std 1). The 3 channels are slices at fixed offsets from the "
            "series centre (not RGB), resampled and windowed by lumbar_tf.preprocess."
        ),
        "content": {
            "content_properties_type": "ImageProperties",
            "content_properties": {"color_space": "UNKNOWN"},
        },
        "process_units": [{"options_type": "NormalizationOptions", "options": {"mean": [0.0], "std": [1.0]}}],
        "stats": {"max": [255.0], "min": [0.0]},
    }


def _feature(name: str, description: str, lo: float, hi: float, files=()) -> dict:
    out = {
        "name": name,
        "description": description,
        "content": {"content_properties_type": "FeatureProperties", "content_properties": {}},
        "stats": {"max": [float(hi)], "min": [float(lo)]},
    }
    if files:
        out["associated_files"] = list(files)
    return out


def _tensor(name: str, meta: dict, signature: str) -> dict:
    cfg = meta["preprocess"]
    views = [v["name"] for v in cfg["views"]]
    if name == LEVEL_INDEX:
        return _feature(
            name,
            "[N] int32: which disc level each crop is (0-4, in the order of levels.txt).",
            0,
            L.N_LEVELS - 1,
            [_file(LEVELS_FILE, "Value labels of level_index.", "TENSOR_VALUE_LABELS")],
        )
    if name == LEVEL_XY:
        return _feature(
            name,
            f"[batch, {L.N_LEVELS}, 2] float32: (x, y) of each disc level in the localiser view, "
            "normalised to 0-1 (x right, y down); axis 1 in the order of levels.txt. Crop every view "
            f"around each level ({cfg['crop_size']} px, lumbar_tf.preprocess.crop_levels) for grade.",
            0,
            1,
            [_file(LEVELS_FILE, "Labels of axis 1 (levels).", "TENSOR_AXIS_LABELS")],
        )
    if name == THRESHOLD_PROBS:
        return _feature(
            name,
            f"[N, {L.N_CONDITIONS}, {L.N_THRESHOLDS}] float32 probabilities (sigmoid applied) for the "
            "crop's level: axis 1 conditions (conditions.txt), axis 2 P(grade>=1 mild), P(grade>=2 "
            "moderate), P(grade>=3 severe) (thresholds.txt). RSNA triple (predictions.json): normal_mild "
            "= 1 - P(>=2), moderate = P(>=2) - P(>=3), severe = P(>=3); a submission row is that triple "
            "times the metric's weights 1/2/4, renormalised (lumbar_tf.core.labels.rsna_submission_triple); "
            "labels.txt names the 75 study cells.",
            0,
            1,
            [
                _file(CONDITIONS_FILE, "Labels of axis 1 (conditions).", "TENSOR_AXIS_LABELS"),
                _file(THRESHOLDS_FILE, "Labels of axis 2 (ordinal thresholds).", "TENSOR_AXIS_LABELS"),
            ],
        )
    axial = cfg.get("axial") or {}
    if name == axial.get("name"):
        c = cfg["crop_size"]
        series = axial.get("series_description", "Axial T2")
        channels = 2 * int(axial.get("neighbours", 1)) + 1
        return {
            **_image_input(name, c, "One level's axial crop"),
            "description": (
                f"One level's crop of the {series} series, [N, {c}, {c}, {channels}] float32, pixel "
                f"values 0-255, {axial.get('crop_mm')} mm wide: the slice nearest the level's 3-D "
                "point (from localize's level_xy, lumbar_tf.axial.project_levels) and its "
                "neighbours (feet first) as channels, centred on the point, columns to patient "
                "left, rows to posterior. All zeros where no axial stack covers the level. Same "
                "order as level_index."
            ),
        }
    if name in views:
        if signature == LOCALIZE:
            return _image_input(name, cfg["view_size"], "Localiser view")
        return _image_input(name, cfg["crop_size"], "One level crop")
    return {
        "name": name,
        "description": "",
        "content": {"content_properties_type": "FeatureProperties", "content_properties": {}},
    }


SUBGRAPH_DESCRIPTIONS = {
    LOCALIZE: "Finds the five lumbar disc levels in the localiser view.",
    GRADE: "Grades one level crop per view for five conditions (ordinal threshold probabilities).",
}


def describe(meta: dict, subgraphs: list[tuple[str, list[str], list[str]]]) -> dict:
    """The ModelMetadata as a dict.

    ``subgraphs``: (signature, input names, output names) per subgraph, in subgraph order."""
    subs = []
    for key, inputs, outputs in subgraphs:
        subs.append(
            {
                "name": key,
                "description": SUBGRAPH_DESCRIPTIONS.get(key, ""),
                "input_tensor_metadata": [_tensor(n, meta, key) for n in inputs],
                "output_tensor_metadata": [_tensor(n, meta, key) for n in outputs],
            }
        )
    variant = meta.get("variant", "")
    return {
        "name": str(meta.get("name", "lumbar_spine")),
        "description": (
            f"Lumbar spine MRI grading (RSNA 2024 conditions x levels x grades), {variant} "
            f"({meta.get('quantization', '')}). Two signatures: localize, then grade on crops "
            f"around each level. Intended use: {INTENDED_USE}"
        ),
        "version": str(meta.get("version", "")),
        "subgraph_metadata": subs,
        "author": "lumbar-tf",
        "associated_files": [
            _file(
                LABELS_FILE,
                "Conditions x levels x grades: the 75 study cells (condition_level_grade), RSNA order.",
                "TENSOR_AXIS_LABELS",
            )
        ],
        "min_parser_version": MIN_PARSER_VERSION,
    }


# === Flatbuffer writing (metadata_schema.fbs slots) ===


def _strings(b, values) -> int:
    offsets = [b.CreateString(v) for v in values]
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _tables(b, offsets) -> int:
    b.StartVector(4, len(offsets), 4)
    for o in reversed(offsets):
        b.PrependUOffsetTRelative(o)
    return b.EndVector()


def _floats(b, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, np.float32))


def _table(b, n_slots: int, offsets: dict, scalars: dict = ()) -> int:
    b.StartObject(n_slots)
    for slot, value in dict(scalars).items():
        b.PrependInt8Slot(slot, value, 0)
    for slot, value in offsets.items():
        b.PrependUOffsetTRelativeSlot(slot, value, 0)
    return b.EndObject()


def _write_file(b, f: dict) -> int:
    name, desc = b.CreateString(f["name"]), b.CreateString(f["description"])
    return _table(b, 5, {0: name, 1: desc}, {2: FILE_TYPES.index(f["type"])})


def _write_tensor(b, t: dict) -> int:
    slots = {0: b.CreateString(t["name"]), 1: b.CreateString(t["description"])}
    content = t["content"]
    kind = CONTENT_TYPES.index(content["content_properties_type"])
    props = content["content_properties"]
    colour = {0: COLOR_SPACES.index(props["color_space"])} if kind == 2 else {}
    prop = _table(b, 2 if kind == 2 else 0, {}, colour)
    b.StartObject(3)
    b.PrependUint8Slot(0, kind, 0)
    b.PrependUOffsetTRelativeSlot(1, prop, 0)
    slots[3] = b.EndObject()
    if t.get("process_units"):
        units = []
        for u in t["process_units"]:
            mean, std = _floats(b, u["options"]["mean"]), _floats(b, u["options"]["std"])
            norm = _table(b, 2, {0: mean, 1: std})
            b.StartObject(2)
            b.PrependUint8Slot(0, PROCESS_TYPES.index(u["options_type"]), 0)
            b.PrependUOffsetTRelativeSlot(1, norm, 0)
            units.append(b.EndObject())
        slots[4] = _tables(b, units)
    if t.get("stats"):
        hi, lo = _floats(b, t["stats"]["max"]), _floats(b, t["stats"]["min"])
        slots[5] = _table(b, 2, {0: hi, 1: lo})
    if t.get("associated_files"):
        slots[6] = _tables(b, [_write_file(b, f) for f in t["associated_files"]])
    return _table(b, 7, slots)


def metadata_flatbuffer(desc: dict) -> bytes:
    """`describe`'s dict as a ModelMetadata flatbuffer (file identifier M001)."""
    b = flatbuffers.Builder(4096)
    subs = []
    for s in desc["subgraph_metadata"]:
        ins = _tables(b, [_write_tensor(b, t) for t in s["input_tensor_metadata"]])
        outs = _tables(b, [_write_tensor(b, t) for t in s["output_tensor_metadata"]])
        subs.append(
            _table(
                b, 10, {0: b.CreateString(s["name"]), 1: b.CreateString(s["description"]), 2: ins, 3: outs}
            )
        )
    slots = {
        0: b.CreateString(desc["name"]),
        1: b.CreateString(desc["description"]),
        2: b.CreateString(desc["version"]),
        3: _tables(b, subs),
        4: b.CreateString(desc["author"]),
        6: _tables(b, [_write_file(b, f) for f in desc["associated_files"]]),
        7: b.CreateString(desc["min_parser_version"]),
    }
    b.Finish(_table(b, 8, slots), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def _zip(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text.encode("utf-8"))
    return out.getvalue()


def add_litert_metadata(content: bytes, meta: dict) -> bytes:
    """``content`` with the standard TFLite metadata of ``meta`` (`export.metadata.tflite_metadata`'s
    dict) and the labels files appended; an earlier ``TFLITE_METADATA`` entry and zip are replaced."""
    from tensorflow.lite.python import schema_py_generated as schema_fb
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    tensor_names = {}
    for sig in model.signatureDefs or []:
        key = sig.signatureKey.decode() if isinstance(sig.signatureKey, bytes) else sig.signatureKey
        for m in list(sig.inputs or []) + list(sig.outputs or []):
            tensor_names[(sig.subgraphIndex, m.tensorIndex)] = (
                key,
                m.name.decode() if isinstance(m.name, bytes) else m.name,
            )
    subgraphs = []
    for i, g in enumerate(model.subgraphs):
        key = next((k for (s, _), (k, _) in tensor_names.items() if s == i), f"subgraph_{i}")
        ins = [tensor_names.get((i, int(t)), (key, f"input_{t}"))[1] for t in g.inputs]
        outs = [tensor_names.get((i, int(t)), (key, f"output_{t}"))[1] for t in g.outputs]
        subgraphs.append((key, ins, outs))
    model.metadata = [
        m
        for m in (model.metadata or [])
        if m.name not in (METADATA_BUFFER_NAME, METADATA_BUFFER_NAME.encode())
    ]
    buffer = schema_fb.BufferT()
    buffer.data = np.frombuffer(metadata_flatbuffer(describe(meta, subgraphs)), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema_fb.MetadataT()
    entry.name = METADATA_BUFFER_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)) + _zip(associated_files())


# === Reading back (flatbuffers + ai-edge-litert's schema only, what an app's reader sees) ===


def _t(buf, pos) -> Table:
    return Table(buf, pos)


def _field(tab: Table, slot: int) -> int:
    return tab.Offset(4 + 2 * slot)


def _str(tab, slot):
    o = _field(tab, slot)
    return tab.String(o + tab.Pos).decode("utf-8") if o else None


def _sub(tab, slot):
    o = _field(tab, slot)
    return _t(tab.Bytes, tab.Indirect(o + tab.Pos)) if o else None


def _vec_tables(tab, slot):
    o = _field(tab, slot)
    if not o:
        return []
    start, n = tab.Vector(o), tab.VectorLen(o)
    return [_t(tab.Bytes, tab.Indirect(start + 4 * i)) for i in range(n)]


def _vec_floats(tab, slot):
    o = _field(tab, slot)
    if not o:
        return []
    return [float(x) for x in tab.GetVectorAsNumpy(flatbuffers.number_types.Float32Flags, o)]


def _byte(tab, slot) -> int:
    o = _field(tab, slot)
    return int(tab.Get(flatbuffers.number_types.Uint8Flags, o + tab.Pos)) if o else 0


def _read_file(tab) -> dict:
    return {"name": _str(tab, 0), "description": _str(tab, 1), "type": FILE_TYPES[_byte(tab, 2)]}


def _read_tensor(tab) -> dict:
    out = {"name": _str(tab, 0), "description": _str(tab, 1)}
    content = _sub(tab, 3)
    if content is not None:
        kind = _byte(content, 0)
        props = {}
        prop = _sub(content, 1)
        if kind == 2 and prop is not None:
            props["color_space"] = COLOR_SPACES[_byte(prop, 0)]
        out["content"] = {"content_properties_type": CONTENT_TYPES[kind], "content_properties": props}
    units = _vec_tables(tab, 4)
    if units:
        out["process_units"] = []
        for u in units:
            opts = _sub(u, 1)
            out["process_units"].append(
                {
                    "options_type": PROCESS_TYPES[_byte(u, 0)],
                    "options": {"mean": _vec_floats(opts, 0), "std": _vec_floats(opts, 1)},
                }
            )
    stats = _sub(tab, 5)
    if stats is not None:
        out["stats"] = {"max": _vec_floats(stats, 0), "min": _vec_floats(stats, 1)}
    files = _vec_tables(tab, 6)
    if files:
        out["associated_files"] = [_read_file(f) for f in files]
    return out


def read_litert_metadata(content: bytes) -> dict | None:
    """The ``TFLITE_METADATA`` ModelMetadata of a ``.tflite`` as a dict (MetadataDisplayer's JSON
    layout), or None if the file has none."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(bytearray(content), 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != METADATA_BUFFER_NAME.encode():
            continue
        data = bytearray(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
        if data[4:8] != FILE_IDENTIFIER:
            return None
        root = _t(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
        out = {"name": _str(root, 0), "description": _str(root, 1), "version": _str(root, 2)}
        out["subgraph_metadata"] = [
            {
                "name": _str(s, 0),
                "description": _str(s, 1),
                "input_tensor_metadata": [_read_tensor(t) for t in _vec_tables(s, 2)],
                "output_tensor_metadata": [_read_tensor(t) for t in _vec_tables(s, 3)],
            }
            for s in _vec_tables(root, 3)
        ]
        out.update(
            author=_str(root, 4),
            associated_files=[_read_file(f) for f in _vec_tables(root, 6)],
            min_parser_version=_str(root, 7),
        )
        return out
    return None


def read_associated_files(content: bytes) -> dict[str, str]:
    """The files zipped after the flatbuffer (name -> text); empty if there are none."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as z:
            return {n: z.read(n).decode("utf-8") for n in z.namelist()}
    except zipfile.BadZipFile:
        return {}


def main(argv=None) -> int:
    """``python -m lumbar_tf.export.tflite_metadata MODEL.tflite``: print what an app reads."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--file", help="print this associated file instead (e.g. labels.txt)")
    args = parser.parse_args(argv)
    content = Path(args.model).read_bytes()
    if args.file:
        print(read_associated_files(content).get(args.file, ""), end="")
    else:
        print(json.dumps(read_litert_metadata(content), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
