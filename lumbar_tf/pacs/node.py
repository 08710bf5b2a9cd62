"""A PACS node: studies come in from a PACS, the SR and overlay go back to it.

    node = PacsNode(load_predictor("export"), NodeConfig(work_dir="pacs_work",
                    dicomweb_url="http://pacs:8042/dicom-web", settle_s=120))
    node.run()            # poll (and serve C-STORE) until stopped; node.run(once=True): one pass

Two ways in, one way through:

- **DICOMweb polling**: QIDO-RS lists the MR studies; a study is taken once its instance count has
  not changed for ``settle_s`` seconds; WADO-RS fetches its MR instances into a temporary folder laid
  out ``{study}/{series}/{instance}.dcm``.
- **C-STORE** (pynetdicom storage SCP on ``scp_port``): MR instances land in ``WORK/inbox/`` in the
  same layout; a study is taken ``settle_s`` seconds after its last instance arrived. Other
  modalities are ignored with a log line.

Then `runtime.predictor.predict_study` runs the model, `pacs.results.build_dicom_results` makes the
SR and overlay, and they go back by STOW-RS (to ``dicomweb_url``), else by C-STORE (to
``store_to``), else into ``WORK/results/{study}/``.

Idempotent: a study done by this model name and version is recorded in ``WORK/state.json`` and is
also recognised on the server by its SR series (Series Description names model and version), so a
restarted node or a second one does not do it again. A study that fails (no sagittal series, a
damaged file, another patient's series mixed in) gets one log line and no result; it is tried again
only if its instances change. An unreachable PACS gets a clear log line and a retry with back-off
(doubling up to ``max_backoff_s``), never a crash loop.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from lumbar_tf.core.contract import INTENDED_USE
from lumbar_tf.core.errors import BadInputError, LumbarError, one_line
from lumbar_tf.core.io import write_bytes_atomic, write_json_atomic
from lumbar_tf.pacs.sr import model_label, result_series_description

log = logging.getLogger("lumbar_tf.pacs")

STATE_FILE = "state.json"
INBOX = "inbox"
RESULTS = "results"
_NUMBER_OF_INSTANCES = "00201208"  # NumberOfStudyRelatedInstances
_STUDY_UID = "0020000D"
_SERIES_DESCRIPTION = "0008103E"
_MODALITY = "00080060"
_PATIENT_ID = "00100020"
_MODALITIES_IN_STUDY = "00080061"


class PacsUnreachableError(LumbarError):
    """The PACS did not answer (connection refused, timeout, a 5xx answer)."""


class StudyRefused(BadInputError):
    """A study the node will not grade (mixed patients, no MR instance)."""


@dataclass
class NodeConfig:
    work_dir: Path
    dicomweb_url: str | None = None
    settle_s: float = 60.0
    poll_s: float = 30.0
    max_backoff_s: float = 600.0
    scp_port: int | None = None
    scp_aet: str = "LUMBARTF"
    store_to: tuple[str, str, int] | None = None  # (AE title, host, port) for C-STORE of the results
    timeout_s: float = 60.0


def parse_store_to(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> ``(aet, host, port)``."""
    try:
        aet, address = text.split("@", 1)
        host, port = address.rsplit(":", 1)
        return aet, host, int(port)
    except ValueError:
        raise BadInputError("--store-to", f"expected AET@HOST:PORT, got {text!r}") from None


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


# === State ===


class NodeState:
    """``WORK/state.json``: per model key, the studies done (SR series UID) and failed (reason)."""

    def __init__(self, path: Path, model_key: str):
        self.path = Path(path)
        self.model_key = model_key
        self._data = {}
        if self.path.is_file():
            try:
                self._data = json.loads(self.path.read_text(encoding="utf-8"))
            except ValueError:
                log.warning("%s: not valid JSON; starting a new state", self.path)
        self._mine = self._data.setdefault(model_key, {"done": {}, "failed": {}})

    def done(self, study_uid: str) -> bool:
        return study_uid in self._mine["done"]

    def failed_at(self, study_uid: str):
        return (self._mine["failed"].get(study_uid) or {}).get("instances")

    def mark_done(self, study_uid: str, info: dict) -> None:
        self._mine["done"][study_uid] = info
        self._mine["failed"].pop(study_uid, None)
        self._save()

    def mark_failed(self, study_uid: str, reason: str, instances) -> None:
        self._mine["failed"][study_uid] = {"reason": reason, "instances": instances}
        self._save()

    def _save(self) -> None:
        write_json_atomic(self.path, self._data, indent=1)


# === The node ===


class PacsNode:
    def __init__(self, predictor, config: NodeConfig, *, client=None):
        self.predictor = predictor
        self.config = config
        self.work = Path(config.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = predictor.model_info()
        self.model_key = "@".join(model_label({"model": self.model}))
        self.state = NodeState(self.work / STATE_FILE, self.model_key)
        self.client = client
        if self.client is None and config.dicomweb_url:
            from dicomweb_client.api import DICOMwebClient

            self.client = DICOMwebClient(config.dicomweb_url, timeout=config.timeout_s)
            self.client.set_http_retry_params(retry=False)  # the node's loop backs off, not each request
        self._seen: dict[str, tuple[int, float]] = {}  # study -> (instance count, when it last changed)
        self._inbox_lock = threading.Lock()
        self._inbox_last: dict[str, float] = {}  # study -> when its last C-STORE arrived
        self._scp = None

    # --- DICOMweb ---

    def _call(self, what: str, func, *args, **kwargs):
        import requests

        try:
            return func(*args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsUnreachableError(
                f"{self.config.dicomweb_url}: {what}: unreachable ({one_line(exc)})"
            ) from None
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is None or status >= 500:
                raise PacsUnreachableError(f"{self.config.dicomweb_url}: {what}: HTTP {status}") from None
            raise

    def _server_has_result(self, study_uid: str) -> bool:
        series = self._call(
            "QIDO-RS series",
            self.client.search_for_series,
            study_instance_uid=study_uid,
            fields=[_SERIES_DESCRIPTION, _MODALITY],
        )
        wanted = result_series_description(self.model)
        return any(
            _value(s, _MODALITY) == "SR" and _value(s, _SERIES_DESCRIPTION) == wanted for s in series or []
        )

    def poll_dicomweb(self, now: float | None = None) -> list[str]:
        """One QIDO-RS pass: process every settled MR study not done yet; returns the studies done."""
        now = time.monotonic() if now is None else now
        studies = self._call(
            "QIDO-RS studies",
            self.client.search_for_studies,
            fields=[_NUMBER_OF_INSTANCES, _PATIENT_ID, _MODALITIES_IN_STUDY],
        )
        # MR studies, filtered here: a ModalitiesInStudy query hides a study's second patient on Orthanc.
        studies = [
            item
            for item in studies or []
            if "MR" in ((item.get(_MODALITIES_IN_STUDY) or {}).get("Value") or [])
        ]
        by_uid: dict[str, list[dict]] = {}
        for item in studies:
            by_uid.setdefault(_value(item, _STUDY_UID), []).append(item)
        done = []
        for uid, items in by_uid.items():
            if not uid or self.state.done(uid):
                continue
            count = sum(int(_value(item, _NUMBER_OF_INSTANCES) or 0) for item in items)
            patients = {_value(item, _PATIENT_ID) for item in items}
            if len(patients) > 1:  # a PACS that files studies by patient lists the UID once per patient
                if self.state.failed_at(uid) != count:
                    self._fail(
                        uid,
                        f"series of {len(patients)} different patients under one Study Instance UID; refused",
                        count,
                    )
                continue
            last_count, since = self._seen.get(uid, (None, now))
            if count != last_count:
                since = now
            self._seen[uid] = (count, since)
            if now - since < self.config.settle_s:
                continue
            if self.state.failed_at(uid) == count:
                continue  # failed with these instances already; try again when they change
            if self._server_has_result(uid):
                log.info("study %s: already has the %s SR on the server; skipped", uid, self.model_key)
                self.state.mark_done(uid, {"source": "server"})
                continue
            with tempfile.TemporaryDirectory(dir=self.work, prefix="fetch-") as tmp:
                try:
                    study_dir = self._fetch(uid, Path(tmp))
                except PacsUnreachableError:
                    raise
                except Exception as exc:  # noqa: BLE001  (a bad study must never stop the node)
                    self._fail(uid, f"fetch failed: {one_line(exc)}", count)
                    continue
                if self._process(uid, study_dir, count):
                    done.append(uid)
        return done

    def _fetch(self, study_uid: str, tmp: Path) -> Path:
        """WADO-RS the study's MR instances into ``tmp/{study}/{series}/{instance}.dcm``."""
        datasets = self._call("WADO-RS study", self.client.retrieve_study, study_uid)
        study_dir = tmp / _safe(study_uid)
        for ds in datasets:
            if getattr(ds, "Modality", None) != "MR":
                continue  # our own SR/overlay, or other objects of the study
            _save_instance(ds, study_dir)
        return study_dir

    # --- C-STORE ---

    def start_scp(self) -> None:
        """Serve C-STORE on ``scp_port`` in the background (MR kept, everything else logged and ignored)."""
        from pynetdicom import AE, StoragePresentationContexts, evt

        ae = AE(ae_title=self.config.scp_aet)
        ae.supported_contexts = StoragePresentationContexts
        handlers = [(evt.EVT_C_STORE, self._on_c_store)]
        self._scp = ae.start_server(
            ("0.0.0.0", int(self.config.scp_port)), block=False, evt_handlers=handlers
        )
        log.info("C-STORE SCP %s listening on port %s", self.config.scp_aet, self.config.scp_port)

    def stop_scp(self) -> None:
        if self._scp is not None:
            self._scp.shutdown()
            self._scp = None

    def _on_c_store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        modality = getattr(ds, "Modality", None)
        if modality != "MR":
            log.info(
                "C-STORE from %s: ignored a %s object (SOP class %s); only MR is graded",
                event.assoc.requestor.ae_title,
                modality or "unknown-modality",
                getattr(ds, "SOPClassUID", "?"),
            )
            return 0x0000
        uid = str(ds.StudyInstanceUID)
        with self._inbox_lock:
            _save_instance(ds, self.work / INBOX / _safe(uid))
            self._inbox_last[uid] = time.monotonic()
        return 0x0000

    def poll_inbox(self, now: float | None = None) -> list[str]:
        """Process every received study whose last instance arrived ``settle_s`` ago."""
        now = time.monotonic() if now is None else now
        inbox = self.work / INBOX
        done = []
        with self._inbox_lock:
            folders = sorted(p for p in inbox.iterdir() if p.is_dir()) if inbox.is_dir() else []
            ready = [d for d in folders if now - self._inbox_last.get(d.name, 0.0) >= self.config.settle_s]
        for study_dir in ready:
            uid = _study_uid_of(study_dir) or study_dir.name
            count = _count_files(study_dir)
            if self.state.done(uid):
                log.info("study %s: already done by %s; received instances dropped", uid, self.model_key)
            elif self.state.failed_at(uid) == count:
                continue  # kept: the missing instances may still arrive
            elif self._process(uid, study_dir, count):
                done.append(uid)
            else:
                continue  # failed: kept in the inbox so that later instances complete it
            with self._inbox_lock:
                shutil.rmtree(study_dir, ignore_errors=True)
                self._inbox_last.pop(study_dir.name, None)
        return done

    # --- One study ---

    def _fail(self, uid: str, reason: str, count) -> None:
        log.warning("study %s: %s; no result written", uid, reason)
        self.state.mark_failed(uid, reason, count)

    def _process(self, uid: str, study_dir: Path, count) -> bool:
        from lumbar_tf.pacs.results import build_dicom_results
        from lumbar_tf.runtime.predictor import predict_study

        try:
            check_one_patient(study_dir)
            result = predict_study(self.predictor, study_dir, study_id=uid)
            datasets = build_dicom_results(result)
        except Exception as exc:  # noqa: BLE001  (a bad study must never stop the node)
            self._fail(uid, one_line(exc), count)
            return False
        try:
            where = self._send(uid, list(datasets.values()))
        except PacsUnreachableError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._fail(uid, f"storing the results failed: {one_line(exc)}", count)
            return False
        self.state.mark_done(
            uid, {"sr_series": str(datasets["sr"].SeriesInstanceUID), "stored": where, "at": time.time()}
        )
        grades = sum(1 for c in result.predictions["cells"] if c["grade"] >= 2)
        log.info(
            "study %s: graded by %s (%d cells moderate or worse); SR and overlay stored to %s",
            uid,
            self.model_key,
            grades,
            where,
        )
        for warning in result.predictions["warnings"]:
            log.info("study %s: warning: %s", uid, warning)
        return True

    def _send(self, uid: str, datasets: list[Dataset]) -> str:
        if self.client is not None:
            self._call("STOW-RS", self.client.store_instances, datasets)
            return str(self.config.dicomweb_url)
        if self.config.store_to is not None:
            c_store(datasets, self.config.store_to, self.config.scp_aet)
            aet, host, port = self.config.store_to
            return f"{aet}@{host}:{port}"
        from lumbar_tf.pacs.results import dataset_bytes

        out = self.work / RESULTS / _safe(uid)
        for ds in datasets:
            write_bytes_atomic(out / f"{ds.Modality.lower()}_{ds.SOPInstanceUID}.dcm", dataset_bytes(ds))
        return str(out)

    # --- The loop ---

    def poll_once(self) -> list[str]:
        done = []
        if self.client is not None:
            done += self.poll_dicomweb()
        if self.config.scp_port is not None:
            done += self.poll_inbox()
        return done

    def run(self, *, once: bool = False, retries: int = 3, stop: threading.Event | None = None) -> list[str]:
        """Poll until ``stop`` is set (or one pass with ``once``); an unreachable PACS is retried with
        back-off. ``once`` gives up after ``retries`` failed attempts (PacsUnreachableError)."""
        stop = stop or threading.Event()
        if self.config.scp_port is not None and self._scp is None:
            self.start_scp()
        done: list[str] = []
        backoff = max(1.0, float(self.config.poll_s))
        failures = 0
        try:
            while not stop.is_set():
                try:
                    done += self.poll_once()
                    failures = 0
                    backoff = max(1.0, float(self.config.poll_s))
                    if once:
                        break
                    stop.wait(self.config.poll_s)
                except PacsUnreachableError as exc:
                    failures += 1
                    if once and failures > retries:
                        raise
                    log.error("%s; retrying in %.0f s", exc, backoff)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, float(self.config.max_backoff_s))
        finally:
            if once:
                self.stop_scp()
        return done


# === Helpers ===


def check_one_patient(study_dir) -> None:
    """Refuse a study whose instances name more than one Patient ID (another patient's series mixed
    in under one Study Instance UID)."""
    import pydicom

    ids = {}
    for series_dir in sorted(p for p in Path(study_dir).iterdir() if p.is_dir()):
        first = next(iter(sorted(series_dir.glob("*.dcm"))), None)
        if first is None:
            continue
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"])
        ids.setdefault(str(ds.get("PatientID", "")), []).append(series_dir.name)
    if len(ids) > 1:
        raise StudyRefused(
            Path(study_dir).name,
            f"series of {len(ids)} different patients under one Study Instance UID "
            f"(series {', '.join(s for group in ids.values() for s in group)}); refused",
        )


def c_store(datasets: list[Dataset], store_to: tuple[str, str, int], calling_aet: str) -> None:
    """Send datasets to a C-STORE SCP (``(aet, host, port)``)."""
    from pynetdicom import AE

    aet, host, port = store_to
    ae = AE(ae_title=calling_aet)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        raise PacsUnreachableError(f"{aet}@{host}:{port}: C-STORE association refused or unreachable")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or status.Status != 0x0000:
                raise BadInputError(f"{aet}@{host}:{port}", f"C-STORE failed (status {status!r})")
    finally:
        assoc.release()


def _safe(uid: str) -> str:
    """A UID as a folder name (UIDs are digits and dots; anything else is replaced)."""
    return "".join(c if c.isdigit() or c == "." else "_" for c in str(uid)) or "_"


def _save_instance(ds: Dataset, study_dir: Path) -> Path:
    series = study_dir / _safe(ds.SeriesInstanceUID)
    series.mkdir(parents=True, exist_ok=True)
    number = getattr(ds, "InstanceNumber", None)
    name = f"{int(number)}.dcm" if number not in (None, "") else f"{_safe(ds.SOPInstanceUID)}.dcm"
    path = series / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _count_files(study_dir: Path) -> int:
    return sum(1 for _ in Path(study_dir).rglob("*.dcm"))


def _study_uid_of(study_dir: Path) -> str | None:
    import pydicom

    first = next(iter(sorted(Path(study_dir).rglob("*.dcm"))), None)
    if first is None:
        return None
    return str(pydicom.dcmread(first, stop_before_pixels=True).get("StudyInstanceUID", "")) or None


def run_node(args) -> int:
    """``lumbar-tf pacs`` (options: `lumbar_tf.cli.main.build_parser`)."""
    from lumbar_tf.core.errors import UsageError
    from lumbar_tf.runtime.artifacts import load_predictor

    if not args.dicomweb and args.scp_port is None:
        raise UsageError("pacs: give --dicomweb URL and/or --scp-port PORT")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = NodeConfig(
        work_dir=args.work,
        dicomweb_url=args.dicomweb,
        settle_s=args.settle,
        poll_s=args.poll,
        scp_port=args.scp_port,
        scp_aet=args.aet,
        store_to=parse_store_to(args.store_to) if args.store_to else None,
    )
    node = PacsNode(load_predictor(args.model), config)
    log.info("node %s: model %s; %s", args.aet, node.model_key, INTENDED_USE)
    done = node.run(once=args.once)
    print(f"graded {len(done)} studies")
    return 0
