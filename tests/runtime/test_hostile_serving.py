"""Clients with real deadlines and size caps (issue 14 item 7).

A REST call ends at its deadline however slowly the server talks (total time, not per socket read);
answers over the size cap are refused without being held; under load, with the server restarted
midway, every gRPC request ends in a result or one clear error, none past its deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lumbar_tf.core.errors import ServingError
from lumbar_tf.runtime.serving.grpc import GrpcClient
from lumbar_tf.runtime.serving.rest import RestClient
from tests.reliability.table import record, shape
from tests.serving_fixtures import (
    ModelRepository,
    build_tiny_saved_model,
    free_port,
    grpc_server,
    random_views,
)

MODEL = "lumbar_spine"
VIEW_SIZE = 32


class _RawServer:
    """A TCP server that answers every connection with ``talk(conn)``: the misbehaving servers."""

    def __init__(self, talk):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self._talk = talk
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            conn.recv(1 << 20)
            self._talk(conn, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def _drip(data: bytes, every_s: float = 0.1):
    def talk(conn, stop):
        for i in range(len(data)):
            if stop.wait(every_s):
                return
            conn.sendall(data[i : i + 1])

    return talk


@pytest.fixture
def raw_server():
    servers = []

    def start(talk):
        servers.append(_RawServer(talk))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    "part, answer",
    [
        ("body", b"HTTP/1.1 200 OK\r\nContent-Length: 600\r\n\r\n" + b" " * 600),  # a byte at a time
        ("headers", b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 600),  # headers that never end
    ],
)
def test_rest_call_ends_at_its_deadline_however_slow_the_server(raw_server, part, answer):
    server = raw_server(_drip(answer))  # 60 s of drip at 0.1 s a byte; each read well within 1 s
    client = RestClient(server.url, timeout_s=1.0, retries=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(ServingError) as err:
        client.predict(random_views(1, VIEW_SIZE))
    assert time.monotonic() - start < 15  # two tries of 1 s, not 2 x 60 s of drip
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert str(err.value) == f"TF Serving at {server.url} did not answer predict within 1 s (2 tries)"
    record(
        "rest-slow",
        f"{part}: ends within its 2 tries of 1 s, `{shape(str(err.value), url=server.url)}`",
        part,
    )


def test_rest_declared_huge_answer_is_refused_unread(raw_server):
    def talk(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n{")
        stop.wait(30)

    server = raw_server(talk)
    client = RestClient(server.url, timeout_s=20.0, retries=1)
    with pytest.raises(ServingError) as err:
        client.metadata()
    assert err.value.code == "CLIENT" and err.value.bad_input is not None
    assert "sent an answer of 2147483648 bytes, over the 67108864-byte limit" in str(err.value)
    record(
        "huge-answers",
        f"REST declared: refused unread, `{shape(str(err.value), url=server.url)}`",
        "declared",
    )


def test_rest_streamed_huge_answer_is_cut_at_the_cap(raw_server):
    def talk(conn, stop):
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        chunk = b"[0," * 20000
        while not stop.is_set():
            conn.sendall(chunk)

    server = raw_server(talk)
    client = RestClient(server.url, timeout_s=20.0, retries=1, max_response_bytes=2**20)
    with pytest.raises(ServingError, match="over the 1048576-byte limit") as err:
        client.metadata()
    assert err.value.code == "CLIENT"
    record(
        "huge-answers",
        f"REST streamed: cut at the cap (1 MiB here), `{shape(str(err.value), url=server.url)}`",
        "streamed",
    )


def test_rest_garbage_answer_is_one_line(raw_server):
    server = raw_server(lambda conn, stop: conn.sendall(b"\x00\x01 not http\r\n\r\n"))
    with pytest.raises(ServingError) as err:
        RestClient(server.url, timeout_s=2.0, retries=1).metadata()
    assert "\n" not in str(err.value) and server.url in str(err.value)


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    build_tiny_saved_model(root, MODEL, version=1, view_size=VIEW_SIZE, seed=1)
    return ModelRepository({MODEL: root / "saved_model" / MODEL})


def test_grpc_answer_over_the_cap_is_refused(repository):
    with grpc_server({}, repository=repository) as server:
        capped = GrpcClient(server.target, timeout_s=10.0, retries=1, max_response_bytes=64)
        with capped, pytest.raises(ServingError) as err:
            capped.predict(random_views(1, VIEW_SIZE))
        with GrpcClient(server.target, timeout_s=10.0, retries=1) as client:
            assert client.predict(random_views(1, VIEW_SIZE))  # the default cap lets answers through
    assert err.value.code == "CLIENT"
    assert f"TF Serving at {server.target} sent an answer to predict over the 64-byte limit" in str(err.value)
    line = shape(str(err.value), target=server.target).split(": Stream removed")[0]  # then gRPC's words
    record(
        "huge-answers",
        f"gRPC: refused (64 bytes here), `{line}`",
        "grpc",
    )


def test_grpc_load_with_a_restart_midway(repository):
    """1,000 requests from 16 threads; the server is stopped and started again on its port after
    the 500th answer. Every request ends in outputs or a one-line ServingError, none later than its
    bound (tries x timeout + back-off)."""
    n, threads, timeout_s, tries, backoff_s = 1000, 16, 3.0, 4, 0.05
    bound = tries * timeout_s + backoff_s * (2**tries) + 2.0
    port = free_port()
    views = random_views(1, VIEW_SIZE)
    done = threading.Semaphore(0)
    results: list = []
    lock = threading.Lock()

    with GrpcClient(f"127.0.0.1:{port}", timeout_s=timeout_s, retries=tries, backoff_s=backoff_s) as client:

        def one(_):
            start = time.monotonic()
            try:
                outcome = "ok" if "threshold_probs" in client.predict(views) else "bad"
            except ServingError as exc:
                assert "\n" not in str(exc)
                outcome = exc.code
            elapsed = time.monotonic() - start
            with lock:
                results.append((outcome, elapsed))
            done.release()

        restarted = threading.Event()

        def serve():
            with grpc_server({}, repository=repository, port=port):
                for _ in range(n // 2):
                    done.acquire()
            with grpc_server({}, repository=repository, port=port):
                restarted.set()
                for _ in range(n - n // 2):
                    done.acquire()

        server = threading.Thread(target=serve)
        server.start()
        time.sleep(0.5)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
        server.join(60)
    assert restarted.is_set() and len(results) == n
    outcomes = [o for o, _ in results]
    assert set(outcomes) <= {"ok", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, set(outcomes)
    assert outcomes.count("ok") >= n * 0.9  # the retries carry requests over the restart
    assert max(e for _, e in results) < bound
    record(
        "grpc-load",
        f"all {len(results)} end in outputs or a one-line UNAVAILABLE / DEADLINE_EXCEEDED, none past its "
        f"bound of {bound:.0f} s; at least 90% answered, the retries carrying them over the restart",
    )
