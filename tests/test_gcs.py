"""Catalog, images and outputs on gs://, against a local gcp-storage-emulator behind a fault-injecting proxy."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest
from conftest import LOCAL_RUNNER, jpeg_bytes, write_catalog

from pipelines.index_catalog import run
from pipelines.lifecycle import LockedError
from retrieval_core import io as rio
from retrieval_core.index.publish import read_current
from retrieval_core.search import Searcher

EMULATOR = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STALL_S = 3.0
"""How long a stalled download hangs; the test's read timeout is shorter."""

STALLED_IMAGES = ("good000.jpg", "good002.jpg")


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards to the emulator. Per image, the first media download answers 503 and the second is cut short;
    the fourth download of ``STALLED_IMAGES`` (the --rehash run's hashing read) hangs past the client's timeout."""

    request_queue_size = 128  # the hashing step reads 16 images at a time; the default backlog is 5

    def __init__(self, upstream: int) -> None:
        self.upstream, self.seen, self.injected = upstream, {}, {"503": 0, "cut": 0, "timeout": 0}
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.address = f"127.0.0.1:{self.server_address[1]}"


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    server: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _generation_now(self, bucket: str, name: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        conn.request("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")
        resp = conn.getresponse()
        data = resp.read()
        return int(json.loads(data)["generation"]) if resp.status == 200 else 0

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if self.command == "POST" and "ifGenerationMatch" in query and url.path.startswith("/upload/"):
            # The emulator ignores preconditions; real GCS does not, so enforce them here as GCS would.
            bucket = url.path.split("/b/")[1].split("/")[0]
            # Multipart uploads carry the object name in the JSON part of the body, simple ones in the query.
            named = re.search(rb'"name":\s*"([^"]+)"', body)
            name = query["name"][0] if "name" in query else named.group(1).decode()
            if self._generation_now(bucket, name) != int(query["ifGenerationMatch"][0]):
                payload = b'{"error": {"code": 412, "message": "conditionNotMet"}}'
                self.send_response(412)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
        fault = None
        if self.command == "GET" and "alt=media" in url.query and ".jpg" in urllib.parse.unquote(url.path):
            with self.server.lock:
                n = self.server.seen[url.path] = self.server.seen.get(url.path, 0) + 1
            fault = {1: "503", 2: "cut"}.get(n)
            if n == 4 and urllib.parse.unquote(url.path).endswith(STALLED_IMAGES):
                fault = "stall"
        if fault == "stall":
            self.server.injected["timeout"] += 1
            time.sleep(STALL_S)  # the client gave up long ago; answer nothing
            self.close_connection = True
            return
        if fault == "503":
            self.server.injected["503"] += 1
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        # The emulator's metadata carries download links to itself: point them at the proxy too.
        data = resp.read().replace(f"127.0.0.1:{self.server.upstream}".encode(), self.server.address.encode())
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if fault == "cut":
            self.server.injected["cut"] += 1
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward  # noqa: N815


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    if not os.path.exists(EMULATOR):
        pytest.skip("gcp-storage-emulator is not installed (make setup installs it with the dev extra)")
    port = free_port()
    proc = subprocess.Popen(
        [EMULATOR, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    proxy = FaultProxy(port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{proxy.server_address[1]}"
    # No credentials lookup: Beam would otherwise spend ~25 s searching for them before going anonymous.
    from apache_beam.internal.gcp import auth

    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    from google.cloud import storage

    storage.Client.create_anonymous_client().create_bucket("bkt")
    yield proxy
    proxy.shutdown()
    proc.terminate()
    proc.wait()
    if old is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = old


def upload_tree(local: str, uri: str) -> None:
    for dirpath, _, names in os.walk(local):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local).replace(os.sep, "/")
            with open(path, "rb") as f:
                rio.write_bytes_atomic(f"{uri}/{rel}", f.read())


def test_pipeline_on_gcs_with_injected_faults(gcs, tmp_path, tiny_bundle, monkeypatch):
    monkeypatch.setattr(rio, "DEFAULT_RETRY", rio.RetryPolicy(attempts=5, initial_s=0.01, max_s=0.05, timeout_s=1.0))
    catalog, expect = write_catalog(str(tmp_path / "c"), 8, duplicate=False)
    shutil.rmtree(tmp_path / "c" / "images" / "missing.jpg", ignore_errors=True)
    upload_tree(str(tmp_path / "c"), "gs://bkt/cat")
    upload_tree(tiny_bundle[0], "gs://bkt/bundle")
    out = "gs://bkt/out"
    argv = [
        "--catalog=gs://bkt/cat/catalog.csv",
        f"--output={out}",
        "--bundle=gs://bkt/bundle",
        f"--runner={LOCAL_RUNNER}",
        "--num_shards=2",
    ]
    report = run([*argv, "--run_id=g1"])
    assert gcs.injected["503"] > 0 and gcs.injected["cut"] > 0  # faults really happened
    assert report["counts"]["indexed"] == len(expect["good"])  # retried: nothing lost
    assert report["counts"]["dead_letter"] == len(expect["bad"])
    assert read_current(out) == "g1"
    assert rio.list_files(f"{out}/indices/g1/**") and not rio.list_files(f"{out}/indices/g1/_parts/**")
    s = Searcher.open(out)  # verifies every sha256 over GCS
    assert s.ntotal == len(expect["good"])
    assert sorted(s.item_ids.to_pylist()) == sorted(expect["good"])  # nothing duplicated
    assert s.search_items(["item003"], k=1).item_ids == [["item003"]]

    # Second run: incremental over GCS; CURRENT is swapped under a generation-match precondition.
    downloads = dict(gcs.seen)
    report = run([*argv, "--run_id=g2"])
    c = report["counts"]
    assert c["unchanged"] == c["stamp_hits"] == len(expect["good"])  # same object generation: not downloaded
    assert {p: n for p, n in gcs.seen.items() if "good" in p} == {p: n for p, n in downloads.items() if "good" in p}
    # Failed items have no feature row, so they are tried again (and fail again); the missing one fails to read.
    assert c["new"] == len(expect["bad"]) - 1 and c["changed"] == 0
    assert read_current(out) == "g2"
    for path in rio.list_files(f"{out}/features/run=g2/*.parquet"):
        table = rio.read_parquet(path, columns=["image_uri", "source_stamp"])
        for uri, stamp in zip(*(table[c].to_pylist() for c in table.column_names), strict=True):
            assert stamp.startswith(uri + "#") and stamp.rsplit("#", 1)[1].isdigit()  # the versioned object URL

    # --rehash downloads every image again; the downloads that hang are timed out and retried.
    report = run([*argv, "--run_id=g3", "--rehash"])
    assert gcs.injected["timeout"] == len(STALLED_IMAGES)
    assert report["counts"]["unchanged"] == len(expect["good"]) and report["counts"]["stamp_hits"] == 0
    assert read_current(out) == "g3"

    # An overwritten object has a new generation: hashed again, and re-embedded as its bytes changed.
    rio.write_bytes_atomic("gs://bkt/cat/images/good001.jpg", jpeg_bytes(777))
    report = run([*argv, "--run_id=g4"])
    assert report["counts"]["changed"] == 1 and report["counts"]["stamp_hits"] == len(expect["good"]) - 1
    assert read_current(out) == "g4"
    stale = 1  # any generation other than the live one
    with pytest.raises(rio.PreconditionFailed):
        rio.write_bytes_if_generation(f"{out}/CURRENT", b"g1\n", stale)
    assert read_current(out) == "g4"

    # A lock object held by another run stops a second writer.
    rio.write_bytes_if_generation(f"{out}/LOCK", b'{"run_id": "other"}', 0)
    with pytest.raises(LockedError, match="held by run other"):
        run([*argv, "--run_id=g5"])
    assert read_current(out) == "g4"
