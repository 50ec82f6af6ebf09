"""http(s) image URIs: timeouts, retries with backoff, cut-off bodies, against a local HTTP server."""

from __future__ import annotations

import glob
import http.server
import threading
import time

import pyarrow.parquet as pq
import pytest
from conftest import LOCAL_RUNNER, jpeg_bytes

from pipelines.index_catalog import run
from retrieval_core import io as rio

FAST = rio.RetryPolicy(attempts=4, initial_s=0.01, max_s=0.05, timeout_s=0.5)


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves ``files``; each path in ``faults`` fails its first requests in the given way."""

    def __init__(self, files: dict[str, bytes], faults: dict[str, list[str]]) -> None:
        self.files, self.faults, self.hits = files, {k: list(v) for k, v in faults.items()}, {}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    server: FlakyServer

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        with self.server.lock:
            self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
            pending = self.server.faults.get(self.path, [])
            fault = pending.pop(0) if pending else None
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        if fault == "503":
            self.send_error(503)
            return
        if fault == "slow":
            time.sleep(1.0)  # past the client's timeout
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if fault == "cut" else body)


@pytest.fixture
def server():
    files = {f"/img{i}.jpg": jpeg_bytes(i) for i in range(6)}
    faults = {"/img1.jpg": ["503", "503"], "/img2.jpg": ["slow"], "/img3.jpg": ["cut"], "/img4.jpg": ["503"] * 10}
    srv = FlakyServer(files, faults)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, files, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_transient_errors_are_retried(server):
    srv, files, base = server
    assert rio.read_bytes(f"{base}/img1.jpg", FAST) == files["/img1.jpg"]  # two 503s, then OK
    assert rio.read_bytes(f"{base}/img2.jpg", FAST) == files["/img2.jpg"]  # one timeout, then OK
    assert rio.read_bytes(f"{base}/img3.jpg", FAST) == files["/img3.jpg"]  # a cut-off body is never returned
    assert srv.hits["/img1.jpg"] == 3 and srv.hits["/img3.jpg"] == 2


def test_permanent_and_exhausted_errors(server):
    srv, _, base = server
    with pytest.raises(FileNotFoundError):
        rio.read_bytes(f"{base}/missing.jpg", FAST)
    assert srv.hits["/missing.jpg"] == 1  # a 404 is not retried
    with pytest.raises(rio.TransientError, match="gave up after 4 attempts"):
        rio.read_bytes(f"{base}/img4.jpg", FAST)
    assert srv.hits["/img4.jpg"] == 4


def test_pipeline_over_http(server, tmp_path, tiny_bundle, monkeypatch):
    srv, files, base = server
    monkeypatch.setattr(rio, "DEFAULT_RETRY", FAST)
    srv.faults["/img4.jpg"] = []  # this run: only recoverable faults, plus one missing image
    lines = ["item_id,image_uri"] + [f"item{i},{base}/img{i}.jpg" for i in range(6)] + [f"gone,{base}/nope.jpg"]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    report = run([f"--catalog={catalog}", f"--output={out}", f"--bundle={tiny_bundle[0]}", f"--runner={LOCAL_RUNNER}"])
    assert report["counts"]["indexed"] == 6 and report["counts"]["dead_letter"] == 1
    rows = pq.read_table(glob.glob(f"{out}/features/*/*.parquet")).to_pylist()
    assert sorted(r["item_id"] for r in rows) == [f"item{i}" for i in range(6)]  # each exactly once
    dead = pq.read_table(glob.glob(f"{out}/dead_letter/*/*.parquet")).to_pylist()
    assert [(d["item_id"], d["stage"], d["error_type"]) for d in dead] == [("gone", "read", "not_found")]
