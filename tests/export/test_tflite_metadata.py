"""The standard TFLite metadata in the exported ``.tflite`` files (what an Android app reads)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lumbar_tf.core import labels as L
from lumbar_tf.core.contract import (
    GRADE,
    INTENDED_USE,
    LEVEL_XY,
    LOCALIZE,
    TFLITE_SIGNATURES,
    THRESHOLD_PROBS,
)
from lumbar_tf.export import tflite_metadata as M


@pytest.fixture(scope="module")
def published(tiny_export):
    files = sorted((tiny_export / "tflite").glob("*.tflite"))
    assert files, "the tiny export published no .tflite file"
    return files


def _strip(content: bytes) -> bytes:
    """The model without the standard metadata and the appended zip (what the converter gave)."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    model.metadata = [m for m in model.metadata if m.name not in (b"TFLITE_METADATA", "TFLITE_METADATA")]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_metadata_reads_back_with_labels_and_normalisation(published):
    for path in published:
        content = path.read_bytes()
        sidecar = json.loads(path.with_suffix(".json").read_text())
        meta = M.read_litert_metadata(content)
        assert meta is not None, path
        assert meta["name"] == sidecar["name"] and meta["version"] == str(sidecar["version"])
        assert INTENDED_USE in meta["description"] and sidecar["variant"] in meta["description"]
        assert meta["min_parser_version"] == "1.0.0"
        subgraphs = {s["name"]: s for s in meta["subgraph_metadata"]}
        assert set(subgraphs) == set(TFLITE_SIGNATURES)
        for key in TFLITE_SIGNATURES:
            declared = sidecar["signatures"][key]
            got_in = [t["name"] for t in subgraphs[key]["input_tensor_metadata"]]
            got_out = [t["name"] for t in subgraphs[key]["output_tensor_metadata"]]
            assert sorted(got_in) == sorted(declared["inputs"]) and got_out == list(declared["outputs"])
        views = [v["name"] for v in sidecar["preprocess"]["views"]]
        images = [
            t for s in meta["subgraph_metadata"] for t in s["input_tensor_metadata"] if t["name"] in views
        ]
        assert len(images) == len(views) + 1  # every grade crop and the localiser view
        for t in images:
            assert t["process_units"] == [
                {"options_type": "NormalizationOptions", "options": {"mean": [0.0], "std": [1.0]}}
            ]
            assert t["stats"] == {"max": [255.0], "min": [0.0]}
            assert "do not normalise" in t["description"]
        (probs,) = subgraphs[GRADE]["output_tensor_metadata"]
        assert probs["name"] == THRESHOLD_PROBS
        assert [f["name"] for f in probs["associated_files"]] == [M.CONDITIONS_FILE, M.THRESHOLDS_FILE]
        (xy,) = subgraphs[LOCALIZE]["output_tensor_metadata"]
        assert xy["name"] == LEVEL_XY and xy["associated_files"][0]["name"] == M.LEVELS_FILE

        files = M.read_associated_files(content)
        assert files[M.CONDITIONS_FILE].splitlines() == list(L.CONDITIONS)
        assert files[M.LEVELS_FILE].splitlines() == list(L.LEVELS)
        cells = files[M.LABELS_FILE].splitlines()
        assert len(cells) == L.N_CONDITIONS * L.N_LEVELS * len(L.SUBMISSION_COLUMNS)
        assert cells[0] == "spinal_canal_stenosis_l1_l2_normal_mild" and cells[-1].endswith("l5_s1_severe")
        assert [f["name"] for f in meta["associated_files"]] == [M.LABELS_FILE]


def test_metadata_changes_no_number(published):
    from ai_edge_litert.interpreter import Interpreter

    path = next(p for p in published if p.stem.endswith("float32"))
    content = path.read_bytes()
    bare = _strip(content)
    assert M.read_litert_metadata(bare) is None and len(bare) < len(content)
    rng = np.random.default_rng(0)
    with_meta, without = Interpreter(model_content=content), Interpreter(model_content=bare)
    for key in TFLITE_SIGNATURES:
        runner = with_meta.get_signature_runner(key)
        feed = {}
        for name, d in runner.get_input_details().items():
            shape = [2 if s < 0 else s for s in d["shape_signature"]]
            if d["dtype"] == np.int32:
                feed[name] = np.arange(shape[0], dtype=np.int32) % L.N_LEVELS
            else:
                feed[name] = rng.uniform(0, 255, shape).astype(np.float32)
        a = runner(**feed)
        b = without.get_signature_runner(key)(**feed)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_edge_model_still_finds_its_metadata(published):
    from lumbar_tf.runtime.tflite_model import EdgeModel, read_embedded_metadata

    path = published[0]
    model = EdgeModel(path)
    assert model.metadata_source == "embedded"
    assert model.metadata == read_embedded_metadata(path.read_bytes())


def test_embedding_twice_keeps_one_standard_entry(published):
    from ai_edge_litert import schema_py_generated as schema

    from lumbar_tf.export.tflite import embed_metadata
    from lumbar_tf.runtime.tflite_model import read_embedded_metadata

    content = published[0].read_bytes()
    sidecar = json.loads(published[0].with_suffix(".json").read_text())
    again = embed_metadata(content, {**sidecar, "version": 99})
    model = schema.Model.GetRootAs(bytearray(again), 0)
    names = [model.Metadata(i).Name() for i in range(model.MetadataLength())]
    assert names.count(b"TFLITE_METADATA") == 1
    assert M.read_litert_metadata(again)["version"] == "99"
    assert read_embedded_metadata(again)["version"] == 99
    assert set(M.read_associated_files(again)) == set(M.associated_files())


def test_the_printer_shows_what_an_app_reads(published, capsys):
    M.main([str(published[0])])
    assert json.loads(capsys.readouterr().out) == M.read_litert_metadata(published[0].read_bytes())
    M.main([str(published[0]), "--file", M.CONDITIONS_FILE])
    assert capsys.readouterr().out.splitlines() == list(L.CONDITIONS)


def test_tensor_metadata_follows_each_subgraphs_tensor_order(published):
    """Android's MetadataExtractor pairs subgraph_metadata[i] with subgraph i and tensor metadata
    with the subgraph's inputs/outputs by position."""
    from ai_edge_litert import schema_py_generated as schema

    content = published[0].read_bytes()
    model = schema.Model.GetRootAs(bytearray(content), 0)
    names = {}
    for i in range(model.SignatureDefsLength()):
        sig = model.SignatureDefs(i)
        for j in range(sig.InputsLength()):
            names[(sig.SubgraphIndex(), sig.Inputs(j).TensorIndex())] = sig.Inputs(j).Name().decode()
        for j in range(sig.OutputsLength()):
            names[(sig.SubgraphIndex(), sig.Outputs(j).TensorIndex())] = sig.Outputs(j).Name().decode()
    meta = M.read_litert_metadata(content)
    assert len(meta["subgraph_metadata"]) == model.SubgraphsLength()
    for k, sub in enumerate(meta["subgraph_metadata"]):
        graph = model.Subgraphs(k)
        ins = [names[(k, int(t))] for t in graph.InputsAsNumpy()]
        outs = [names[(k, int(t))] for t in graph.OutputsAsNumpy()]
        assert [t["name"] for t in sub["input_tensor_metadata"]] == ins
        assert [t["name"] for t in sub["output_tensor_metadata"]] == outs
