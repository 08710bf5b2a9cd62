"""TF Serving REST API (``POST /v1/models/<name>[/versions/<v>]:predict``), for back-end teams.

    client = RestClient("http://tf-serving:8501")
    outputs = client.predict({"sag_t2": view_t2, "sag_t1": view_t1})

Standard library only (urllib): no TensorFlow on the client side.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np

from lumbar_tf.core.contract import (
    DEFAULT_MODEL_NAME,
    METADATA_INPUT,
    METADATA_OUTPUT,
    METADATA_SIGNATURE,
    SERVING_SIGNATURE,
)
from lumbar_tf.core.errors import ServingError
from lumbar_tf.runtime.serving.common import (
    MAX_RESPONSE_BYTES,
    no_metadata_signature,
    one_line,
    parse_served_metadata,
    prepare_views,
    retry,
    try_timeout,
)

MODEL_FORMAT = "saved_model"
_CHUNK = 1 << 16


class _Watchdog:
    """Ends one try at its deadline whatever the server does: at the deadline the socket is shut
    down, so a server that sends a byte a second (each read well within any socket timeout) or
    never finishes its headers still ends the call."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.fired = False
        self._sock = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline exceeded")
        return left

    def arm(self, sock) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()


class _WatchedConnection(http.client.HTTPConnection):
    def __init__(self, *args, watchdog: _Watchdog, **kwargs):
        super().__init__(*args, **kwargs)
        self._watchdog = watchdog

    def connect(self):
        super().connect()
        self._watchdog.arm(self.sock)


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    """urllib's HTTP handler, with each request's connection handed to that request's watchdog."""

    def http_open(self, req):
        watchdog = getattr(req, "watchdog", None)
        if watchdog is None:
            return super().http_open(req)
        return self.do_open(functools.partial(_WatchedConnection, watchdog=watchdog), req)


class _RestStatus(Exception):
    """HTTP error status from TF Serving, with its ``{"error": ...}`` text."""

    def __init__(self, status: int, text: str):
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


class RestClient:
    """TF Serving REST API (``POST /v1/models/<name>[/versions/<v>]:predict``, columnar ``inputs``).

    Args:
        base_url: ``http://host:port`` of TF Serving's ``--rest_api_port`` (8501 by default).
        model_name: the served model's name.
        signature_name: signature to call.
        version: pin a model version (default: latest).
        timeout_s: deadline of each try in seconds: connecting, sending and reading the whole answer
            (not a per-read socket timeout, which a server sending a byte at a time never trips).
        retries: tries in all for transient failures (connection refused/reset, timeouts, HTTP 502/503/504,
            i.e. TF Serving's UNAVAILABLE and DEADLINE_EXCEEDED); other errors are raised at once.
        backoff_s: sleep before the second try; doubles before each further try.
        proxies: ``{"http": url}`` to go through a proxy; by default the server is called directly
            (environment proxy variables are ignored, so an in-cluster call never leaves the cluster).
        max_response_bytes: an answer larger than this is refused without being read whole (the
            same cap as the gRPC client's receive limit by default).
    """

    transient_statuses = (502, 503, 504)

    def __init__(
        self,
        base_url: str = "http://localhost:8501",
        model_name: str = DEFAULT_MODEL_NAME,
        signature_name: str = SERVING_SIGNATURE,
        version: int | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        *,
        proxies: dict | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.signature_name = signature_name
        self.version = None if version is None else int(version)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_response_bytes = int(max_response_bytes)
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler(proxies or {}), _WatchedHTTPHandler()
        )

    def __repr__(self) -> str:
        return f"RestClient({self.base_url!r}, model_name={self.model_name!r}, version={self.version!r})"

    @property
    def target(self) -> str:
        return self.base_url

    def _model_url(self) -> str:
        url = f"{self.base_url}/v1/models/{self.model_name}"
        return url if self.version is None else f"{url}/versions/{self.version}"

    def _model_ref(self) -> str:
        if self.version is not None:
            return f"model '{self.model_name}' version {self.version}"
        return f"model '{self.model_name}'"

    def _request_once(self, url: str, body: bytes | None, deadline: float | None = None) -> dict:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
        timeout = try_timeout(self.timeout_s, deadline)
        watchdog = request.watchdog = _Watchdog(time.monotonic() + timeout)
        try:
            try:
                with self._opener.open(request, timeout=timeout) as response:
                    raw = self._read_capped(response, watchdog)
            except urllib.error.HTTPError as exc:
                raw = self._read_capped(exc, watchdog)
                try:
                    text = json.loads(raw).get("error", "")
                except (ValueError, AttributeError):
                    text = raw.decode("utf-8", "replace")
                raise _RestStatus(exc.code, one_line(text or exc.reason)) from None
            except (OSError, http.client.HTTPException) as exc:
                if watchdog.fired:  # the socket was shut down at the deadline
                    raise TimeoutError("deadline exceeded") from None
                if isinstance(exc, http.client.HTTPException) and not isinstance(exc, OSError):
                    raise ConnectionError(
                        f"bad HTTP answer ({one_line(exc) or type(exc).__name__})"
                    ) from None
                raise
        finally:
            watchdog.cancel()
        try:
            return json.loads(raw)
        except ValueError:
            raise ServingError(
                f"TF Serving at {self.base_url} answered with something that is not JSON",
                code="CLIENT",
                target=self.base_url,
            ) from None

    def _read_capped(self, response, watchdog: _Watchdog) -> bytes:
        """The answer's body, refused past `max_response_bytes` and cut off at the deadline."""
        cap = self.max_response_bytes
        declared = response.headers.get("Content-Length") if response.headers else None
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise self._too_large(int(declared))
        parts, total = [], 0
        while True:
            watchdog.remaining()
            chunk = response.read(min(_CHUNK, cap + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
            if total > cap:
                raise self._too_large(None)
        if watchdog.fired:
            raise TimeoutError("deadline exceeded")
        return b"".join(parts)

    def _too_large(self, size: int | None) -> ServingError:
        what = f"{size} bytes" if size is not None else "more bytes"
        return ServingError(
            f"TF Serving at {self.base_url} sent an answer of {what}, over the "
            f"{self.max_response_bytes}-byte limit (max_response_bytes)",
            code="CLIENT",
            target=self.base_url,
        )

    def _transient(self, exc) -> bool:
        if isinstance(exc, _RestStatus):
            return exc.status in self.transient_statuses
        return isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout))

    def _call(
        self, url: str, body: bytes | None, what: str, deadline: float | None = None, signature=None
    ) -> dict:
        try:
            return retry(
                lambda: self._request_once(url, body, deadline),
                tries=self.retries,
                backoff_s=self.backoff_s,
                transient=self._transient,
            )
        except _RestStatus as exc:
            raise self._status_error(exc, what, signature or self.signature_name) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            tries = max(1, self.retries)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                msg = (
                    f"TF Serving at {self.base_url} did not answer {what} "
                    f"within {self.timeout_s:g} s ({tries} tries)"
                )
                code = "DEADLINE_EXCEEDED"
            else:
                msg = f"cannot reach TF Serving at {self.base_url} after {tries} tries ({one_line(reason)})"
                code = "UNAVAILABLE"
            raise ServingError(msg, code=code, target=self.base_url) from None

    def _status_error(self, exc: _RestStatus, what: str, signature: str) -> ServingError:
        at = f"TF Serving at {self.base_url}"
        code = f"HTTP {exc.status}"
        if exc.status == 404:
            msg = f"{self._model_ref()} is not served by {at}: {exc.text}"
        elif exc.status == 400 and "signature key" in exc.text.lower():
            msg = f"{self._model_ref()} at {self.base_url} has no signature '{signature}': {exc.text}"
        elif exc.status == 400:
            msg = (
                f"{at} rejected the {what} request for {self._model_ref()} "
                f"(signature '{signature}'): {exc.text}"
            )
        elif exc.status in self.transient_statuses:
            msg = f"{at} is overloaded or unavailable after {max(1, self.retries)} tries ({code}): {exc.text}"
        else:
            msg = f"{at} failed on {what} ({code}): {exc.text}"
        return ServingError(msg, code=code, target=self.base_url)

    # --- API ---

    def predict(
        self, views: dict, *, signature: str | None = None, deadline: float | None = None, level_inputs=()
    ) -> dict[str, np.ndarray]:
        """Same contract as `GrpcClient.predict`: float32 views in, numpy outputs (with batch axis) out."""
        arrays = prepare_views(views, level_inputs)
        payload = {
            "signature_name": signature or self.signature_name,
            "inputs": {k: v.tolist() for k, v in arrays.items()},
        }
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        answer = self._call(f"{self._model_url()}:predict", body, "predict", deadline, signature)
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if outputs is None:
            raise ServingError(
                f"TF Serving at {self.base_url} answered predict without 'outputs'",
                code="CLIENT",
                target=self.base_url,
            )
        if not isinstance(outputs, dict):  # a signature with a single output is sent unnamed
            outputs = {"output_0": outputs}
        return {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}

    def served_version(self) -> int | None:
        """The version that answers unpinned calls: the newest AVAILABLE one (``GET`` status)."""
        states = (self.status() or {}).get("model_version_status") or []
        available = [int(v["version"]) for v in states if v.get("state") == "AVAILABLE"]
        return max(available) if available else None

    def served_metadata(self) -> tuple[dict, int | None]:
        """The served version's metadata.json (its ``metadata`` signature) and that version: REST
        answers do not name their version, so the newest AVAILABLE one is asked for by number."""
        version = self.version if self.version is not None else self.served_version()
        url = f"{self.base_url}/v1/models/{self.model_name}"
        url = url if version is None else f"{url}/versions/{version}"
        body = json.dumps({"signature_name": METADATA_SIGNATURE, "inputs": {METADATA_INPUT: [0.0]}})
        ref = self._model_ref() if version is None else f"model '{self.model_name}' version {version}"
        try:
            answer = self._call(
                f"{url}:predict", body.encode("utf-8"), "metadata", signature=METADATA_SIGNATURE
            )
        except ServingError as exc:
            if exc.code == "HTTP 400" and "signature key" in str(exc).lower():
                raise no_metadata_signature(self.base_url, ref, str(exc)) from None
            raise
        outputs = answer.get("outputs") if isinstance(answer, dict) else None
        if isinstance(outputs, dict):
            outputs = outputs.get(METADATA_OUTPUT)
        return parse_served_metadata(outputs if outputs is not None else [], self.base_url, ref), version

    def pin(self, version: int) -> None:
        """Call ``version`` from now on (not the latest)."""
        self.version = int(version)

    def status(self) -> dict:
        """``GET /v1/models/<name>[/versions/<v>]``: the versions and their state (AVAILABLE, LOADING...)."""
        return self._call(self._model_url(), None, "status")

    def metadata(self) -> dict:
        """``GET /v1/models/<name>[/versions/<v>]/metadata``: the signature definitions as JSON."""
        return self._call(f"{self._model_url()}/metadata", None, "metadata")

    def model_info(self) -> dict:
        """``{"name", "version", "format"}`` for predictions.json (REST answers do not name the version)."""
        return {"name": self.model_name, "version": self.version, "format": MODEL_FORMAT}
