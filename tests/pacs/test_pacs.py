"""The PACS node against a real Orthanc (Debian `orthanc` + `orthanc-dicomweb`).

Each module run starts its own Orthanc on free localhost ports with a temporary configuration and
storage, and stops it after. Where Orthanc is missing these tests skip on a developer machine and
FAIL in CI (``CI`` set; `.ci/run` installs Orthanc and sets it), so they never pass silently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lumbar_tf.pacs import sr as sr_module
from lumbar_tf.pacs.node import NodeConfig, PacsNode, PacsUnreachableError

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
NODE_AET = "LUMBARTF"


def _missing(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/run installs orthanc and orthanc-dicomweb)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dicomweb_plugin() -> str | None:
    for folder in PLUGIN_DIRS:
        for path in sorted(Path(folder).glob("libOrthancDicomWeb.so*")) if Path(folder).is_dir() else []:
            return str(path)
    return None


class Orthanc:
    def __init__(self, root: Path, node_port: int):
        self.http_port, self.dicom_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {
            "Name": "lumbar-tf-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [_dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"lumbartf": [NODE_AET, "127.0.0.1", node_port]},
        }
        (root / "orthanc.json").write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            [shutil.which("Orthanc"), str(root / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        for _ in range(300):
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not start; see {root / 'orthanc.log'}")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body) -> dict:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def node_port():
    return _free_port()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, node_port):
    if shutil.which("Orthanc") is None:
        _missing("Orthanc is not installed")
    if _dicomweb_plugin() is None:
        _missing("the Orthanc DICOMweb plugin is not installed")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), node_port)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(orthanc):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(orthanc.dicomweb)


@pytest.fixture(scope="module")
def predictor(tiny_run):
    from lumbar_tf.runtime.artifacts import load_predictor

    return load_predictor(tiny_run)


@pytest.fixture(scope="module")
def studies(phantom_dir):
    return sorted((phantom_dir / "train_images").iterdir())


def _datasets(study_dir: Path, series_filter=None) -> list:
    out = []
    for path in sorted(study_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if series_filter is None or series_filter(ds):
            out.append(ds)
    return out


def _study_uid(study_dir: Path) -> str:
    return str(pydicom.dcmread(next(study_dir.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _series(client, study_uid: str) -> list[tuple[str, str]]:
    found = client.search_for_series(study_instance_uid=study_uid, fields=["0008103E", "00080060"])
    return sorted(
        (s["00080060"]["Value"][0], (s.get("0008103E") or {}).get("Value", [""])[0]) for s in found or []
    )


def _node(predictor, work, orthanc=None, **kwargs) -> PacsNode:
    config = NodeConfig(
        work_dir=work, dicomweb_url=orthanc.dicomweb if orthanc else None, settle_s=0, poll_s=0.01, **kwargs
    )
    return PacsNode(predictor, config)


def _sr_of(client, study_uid: str):
    for series in client.search_for_series(study_instance_uid=study_uid, fields=["00080060"]):
        if series["00080060"]["Value"][0] == "SR":
            uid = series["0020000E"]["Value"][0]
            return client.retrieve_series(study_uid, uid)
    return []


def _assert_sr_matches(sr_ds, expected: dict):
    back = sr_module.read_sr(sr_ds)
    assert back["model"]["version"] == sr_module.model_version(expected["model"])
    for cell in expected["cells"]:
        got = back["cells"][(cell["condition"], cell["level"])]
        assert got["grade"] == cell["grade"]
        np.testing.assert_allclose(got["grade_probs"], cell["grade_probs"], atol=1e-6)
    for entry in expected["levels"]:
        assert back["levels"][entry["level"]]["y"] == pytest.approx(entry["y"], abs=1e-3)


def test_round_trip_idempotent_and_partial_studies_skipped(
    orthanc, client, predictor, studies, tmp_path, caplog
):
    from lumbar_tf.runtime.predictor import predict_study

    full, partial, mixed = studies[0], studies[1], studies[2]
    client.store_instances(_datasets(full))
    # A partial study: only its axial series arrived (no sagittal series to grade).
    client.store_instances(_datasets(partial, lambda ds: ds.SeriesDescription == "Axial T2"))
    caplog.set_level(logging.INFO, logger="lumbar_tf.pacs")

    node = _node(predictor, tmp_path / "work", orthanc)
    done = node.run(once=True)
    assert done == [_study_uid(full)]  # the partial study did not stop the full one
    assert any(_study_uid(partial) in r.message and "no result" in r.message for r in caplog.records)
    assert [m for m, _ in _series(client, _study_uid(partial))] == ["MR"]

    series = _series(client, _study_uid(full))
    assert ("OT", "lumbar-tf disc levels (overlay)") in series
    assert ("SR", f"lumbar-tf {predictor.model_info()['name']} v{sr_module.DEV_VERSION} SR") in series
    expected = predict_study(predictor, full).predictions
    (sr_ds,) = _sr_of(client, _study_uid(full))
    _assert_sr_matches(sr_ds, expected)
    assert sr_ds.StudyInstanceUID == _study_uid(full)
    assert sr_ds.PatientID == pydicom.dcmread(next(full.rglob("*.dcm"))).PatientID

    # Idempotent: again with the same state, and with a fresh state (the SR on the server counts).
    assert node.run(once=True) == []
    assert _node(predictor, tmp_path / "fresh", orthanc).run(once=True) == []
    assert sum(1 for m, _ in _series(client, _study_uid(full)) if m == "SR") == 1

    # The rest of the partial study arrives: its instance count changes, so it is graded now.
    client.store_instances(_datasets(partial, lambda ds: ds.SeriesDescription != "Axial T2"))
    assert node.run(once=True) == [_study_uid(partial)]

    # Another patient's series under the study's UID: refused, nothing written.
    def other_patient(ds):
        if ds.SeriesDescription == "Sagittal T1":
            ds.PatientID = "SOMEONE-ELSE"
        return True

    client.store_instances(_datasets(mixed, other_patient))
    caplog.clear()
    assert _node(predictor, tmp_path / "mixed", orthanc).run(once=True) == []
    assert any("different patients" in r.message and "refused" in r.message for r in caplog.records)
    assert "SR" not in [m for m, _ in _series(client, _study_uid(mixed))]


def test_settle_time_waits_for_a_quiet_study(orthanc, client, predictor, studies, tmp_path):
    study = studies[3]
    client.store_instances(_datasets(study))
    node = PacsNode(predictor, NodeConfig(work_dir=tmp_path, dicomweb_url=orthanc.dicomweb, settle_s=30))
    assert node.poll_dicomweb(now=1000.0) == []  # first seen: not settled
    assert node.poll_dicomweb(now=1010.0) == []
    assert node.poll_dicomweb(now=1031.0) == [_study_uid(study)]


def test_c_store_in_results_c_store_back_non_mr_ignored(
    orthanc, client, predictor, studies, tmp_path, node_port, caplog
):
    study = studies[4]
    caplog.set_level(logging.INFO, logger="lumbar_tf.pacs")
    node = _node(
        predictor,
        tmp_path,
        scp_port=node_port,
        scp_aet=NODE_AET,
        store_to=("ORTHANC", "127.0.0.1", orthanc.dicom_port),
    )
    node.start_scp()
    try:
        ids = []
        for path in sorted(study.rglob("*.dcm")):
            request = urllib.request.Request(orthanc.url + "/instances", data=path.read_bytes())
            with urllib.request.urlopen(request, timeout=30) as answer:
                ids.append(json.loads(answer.read())["ParentStudy"])
        # Orthanc sends the study to the node by C-STORE (a real PACS push).
        orthanc.post("/modalities/lumbartf/store", {"Resources": [ids[0]], "Synchronous": True})
        done = node.poll_inbox()
        assert done == [_study_uid(study)]
        assert "SR" in [m for m, _ in _series(client, _study_uid(study))]  # came back by C-STORE
        # The SR that is now in Orthanc, pushed to the node: not MR, ignored with a log line.
        sr_id = [
            s for s in orthanc.get(f"/studies/{ids[0]}/series") if s["MainDicomTags"].get("Modality") == "SR"
        ][0]["ID"]
        caplog.clear()
        orthanc.post("/modalities/lumbartf/store", {"Resources": [sr_id], "Synchronous": True})
        assert any("ignored a SR object" in r.message for r in caplog.records)
        assert node.poll_inbox() == []
    finally:
        node.stop_scp()


def test_unreachable_pacs_is_a_clear_error_with_back_off(predictor, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lumbar_tf.pacs")
    dead = f"http://127.0.0.1:{_free_port()}/dicom-web"
    node = PacsNode(predictor, NodeConfig(work_dir=tmp_path, dicomweb_url=dead, poll_s=0.01, max_backoff_s=2))
    with pytest.raises(PacsUnreachableError, match="unreachable"):
        node.run(once=True, retries=2)
    waits = [r.message for r in caplog.records if "retrying in" in r.message]
    assert all(dead in w and "unreachable" in w for w in waits)
    assert [w.split("retrying in ")[1] for w in waits] == ["1 s", "2 s"]  # doubling, capped


def test_node_keeps_serving_until_stopped(orthanc, client, predictor, studies, tmp_path):
    study = studies[5]
    node = _node(predictor, tmp_path, orthanc)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        client.store_instances(_datasets(study))
        for _ in range(600):
            if node.state.done(_study_uid(study)):
                break
            time.sleep(0.1)
        assert node.state.done(_study_uid(study))
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()


def test_cli_once(orthanc, tiny_run, tmp_path, capsys):
    from lumbar_tf.cli.main import main

    argv = ["pacs", "--model", str(tiny_run), "--work", str(tmp_path), "--dicomweb", orthanc.dicomweb]
    assert main([*argv, "--once", "--settle", "0"]) == 0
    assert "graded" in capsys.readouterr().out
    assert main(["pacs", "--model", str(tiny_run), "--work", str(tmp_path)]) == 2


def test_partial_c_store_study_waits_in_the_inbox_for_the_rest(predictor, studies, tmp_path):
    study = studies[6]
    uid = _study_uid(study)
    inbox = tmp_path / "inbox" / uid
    series = {
        pydicom.dcmread(next(d.glob("*.dcm")), stop_before_pixels=True).SeriesDescription: d
        for d in study.iterdir()
    }
    shutil.copytree(series["Axial T2"], inbox / series["Axial T2"].name)
    node = _node(predictor, tmp_path, scp_port=_free_port())  # results into WORK/results (no PACS)
    assert node.poll_inbox() == [] and inbox.is_dir()  # no sagittal series yet: kept, not graded
    assert node.poll_inbox() == []  # unchanged: not tried again
    for name, folder in series.items():
        if name != "Axial T2":
            shutil.copytree(folder, inbox / folder.name)
    assert node.poll_inbox() == [uid]
    assert not inbox.exists()
    written = sorted(p.name.split("_")[0] for p in (tmp_path / "results" / uid).iterdir())
    assert written == ["ot", "sr"]
