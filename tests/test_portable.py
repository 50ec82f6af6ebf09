"""The indexing job on Beam's PortableRunner, by flags alone, as Dataflow, Flink and Spark run it.

A local job service (``local_job_service_main``) and an external SDK worker pool (``worker_pool_main``)
run as processes of their own; the pool starts the SDK harness as yet another process. So every DoFn,
side input, CombineFn and the RunInference model handler is pickled by the submitting process, shipped
through the Fn API and unpickled on a worker that shares no memory with it: what a runner on a
cluster does, minus the network. The result must equal a run of the same catalog on the in-process
FnApiRunner.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, pipeline_flags, write_catalog

from pipelines.index_catalog import run
from retrieval_core.index.publish import load_manifest, read_current
from retrieval_core.search.searcher import Searcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60
RUN_TIMEOUT_S = 240
COMMON_FLAGS = ("--num_shards=3", "--batch_size=8")
N_GOOD = 12


@dataclass(frozen=True)
class PortableServices:
    """Endpoints of a running job service and worker pool, and the pool's log."""

    job_endpoint: str
    worker_pool: str
    pool_log: str

    def flags(self) -> list[str]:
        """The Beam flags that send a pipeline to these services."""
        return [
            "--runner=PortableRunner",
            f"--job_endpoint={self.job_endpoint}",
            "--environment_type=EXTERNAL",
            f"--environment_config={self.worker_pool}",
        ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: str, chars: int = 2000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def _wait_until(ready, proc: subprocess.Popen, what: str, log: str) -> None:
    """Poll ``ready()`` until it is true; skip the module if ``proc`` exits or the timeout passes first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.skip(f"{what} exited with code {proc.returncode} at start-up:\n{_tail(log)}")
        if time.monotonic() > deadline:
            pytest.skip(f"{what} not ready after {START_TIMEOUT_S} s:\n{_tail(log)}")
        time.sleep(0.1)


def _accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("localhost", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop a service started in its own session, with the SDK harness processes it started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):  # SDK harnesses still running after their pool exited
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """A Beam job service and an SDK worker pool, each a separate process, stopped at teardown."""
    root = tmp_path_factory.mktemp("portable_services")
    started: list[subprocess.Popen] = []

    def start(args: list[str], name: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
        log = str(root / f"{name}.log")
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=root,  # nothing is importable from the working directory: the workers use the installed code
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, so teardown also reaches the SDK harnesses
            )
        started.append(proc)
        return proc, log

    try:
        port_file = str(root / "job.port")
        job, job_log = start(
            [
                "apache_beam.runners.portability.local_job_service_main",
                "--port=0",
                f"--port_file={port_file}",
                f"--staging_dir={root / 'staging'}",
            ],
            "job_service",
        )
        _wait_until(lambda: os.path.exists(port_file), job, "the Beam job service", job_log)
        with open(port_file) as f:
            job_port = int(f.read())

        # The pool starts each SDK harness as a bare `python`: make that this interpreter.
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        pool_port = _free_port()
        pool, pool_log = start(
            ["apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"], "worker_pool", env
        )
        _wait_until(lambda: _accepts_connections(pool_port), pool, "the SDK worker pool", pool_log)
        yield PortableServices(f"localhost:{job_port}", f"localhost:{pool_port}", pool_log)
    finally:
        for proc in reversed(started):
            _stop(proc)


def index_portably(services: PortableServices, catalog: str, out: str, bundle: str, run_id: str) -> dict:
    """Run ``python -m pipelines.index_catalog`` on the portable runner; assert exit 0; return its run report."""
    local = pipeline_flags(catalog, out, bundle, *COMMON_FLAGS, f"--run_id={run_id}")
    flags = [f for f in local if not f.startswith("--runner=")]
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.index_catalog", *flags, *services.flags()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    assert f"published {out}/indices/{run_id}/manifest.json" in proc.stdout
    with open(os.path.join(out, "runs", f"{run_id}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def indexed(services, tmp_path_factory, tiny_bundle):
    """The same catalog indexed on the portable runner and on the in-process FnApiRunner."""
    root = tmp_path_factory.mktemp("portable")
    catalog, expect = write_catalog(str(root / "catalog"), N_GOOD)
    portable_out, local_out = str(root / "portable"), str(root / "local")
    report = index_portably(services, catalog, portable_out, tiny_bundle[0], "p1")
    local_report = run(pipeline_flags(catalog, local_out, tiny_bundle[0], *COMMON_FLAGS, "--run_id=p1"))
    return catalog, expect, (portable_out, report), (local_out, local_report)


def test_sdk_harness_runs_in_a_process_of_the_worker_pool(indexed, services):
    """EXTERNAL environment: the SDK harness that ran the graph was started by the pool, as a process of its own."""
    assert "Starting worker with command" in _tail(services.pool_log, 100_000)


def test_every_good_row_indexed_and_every_bad_one_dead_lettered(indexed):
    _, expect, (out, report), _ = indexed
    assert report["status"] == "published" and read_current(out) == "p1"
    features = pq.read_table(glob.glob(f"{out}/features/run=p1/*.parquet"))
    assert sorted(features.column("item_id").to_pylist()) == sorted(expect["good"])
    dead = pq.read_table(glob.glob(f"{out}/dead_letter/run=p1/*.parquet")).to_pylist()
    assert sorted(r["item_id"] for r in dead if (r["item_id"] or "").startswith("bad-")) == sorted(expect["bad"])
    assert len(dead) == len(expect["bad"]) + expect["catalog_errors"]
    stages = {(r["item_id"], r["stage"], r["error_type"]) for r in dead}
    assert {("bad-missing", "read", "not_found"), ("bad-truncated", "decode", "truncated")} <= stages
    assert report["counts"]["indexed"] == N_GOOD and report["counts"]["dead_letter"] == len(dead)
    # Metrics come back from the workers through the job service.
    assert report["counters"]["read_catalog.rows"] == N_GOOD + len(expect["bad"]) + 1  # + the repeated item id
    assert report["timings"]["build_index.fill_and_write_shard"]["count"] == 3


def test_published_index_finds_each_image_itself_first(indexed, tiny_bundle):
    catalog, _, (out, _), _ = indexed
    searcher = Searcher.open(out, bundle=tiny_bundle[0])
    assert searcher.ntotal == N_GOOD
    images = [os.path.join(os.path.dirname(catalog), "images", f"good{i:03d}.jpg") for i in (2, 7, 11)]
    result = searcher.search_images(images, k=3)
    assert [r[0] for r in result.item_ids] == ["item002", "item007", "item011"]
    assert np.allclose(result.scores[:, 0], 1.0, atol=1e-4)
    by_code = searcher.search_items(["item005"], k=N_GOOD, mode="hamming")
    exact = [item for item, distance in zip(by_code.item_ids[0], by_code.scores[0]) if distance == 0]
    assert "item005" in exact  # other items may share a 16-bit code


def _shards(out: str) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """(item ids, vectors, codes) of each shard of the published generation, in faiss id order."""
    manifest = load_manifest(out)
    shards = []
    for ids, vec, ham in zip(manifest.id_files, manifest.vector_shards, manifest.hamming_shards, strict=True):
        item_ids = pq.read_table(os.path.join(out, ids.path)).sort_by("faiss_id").column("item_id").to_pylist()
        vectors = faiss.read_index(os.path.join(out, vec.path))
        codes = faiss.read_index_binary(os.path.join(out, ham.path))
        shards.append((item_ids, vectors.reconstruct_n(0, vectors.ntotal), codes.reconstruct_n(0, codes.ntotal)))
    return shards


def test_portable_result_equals_fnapi_result(indexed):
    _, _, (out, report), (local_out, local_report) = indexed
    portable, local = _shards(out), _shards(local_out)
    assert len(portable) == len(local) == 3
    for (ids, vectors, codes), (local_ids, local_vectors, local_codes) in zip(portable, local, strict=True):
        assert ids == local_ids
        np.testing.assert_array_equal(codes, local_codes)
        # The two runners cut RunInference batches differently, so float sums may differ in the last bits.
        np.testing.assert_allclose(vectors, local_vectors, atol=1e-5)
    assert report["counts"] == local_report["counts"]
    assert report["counters"] == local_report["counters"]
    assert report["index"] == local_report["index"]
    assert set(report["timings"]) == set(local_report["timings"])


def test_incremental_run_on_the_portable_runner(indexed, services, tiny_bundle, tmp_path):
    """SkipUnchanged's join and carried files also cross the process boundary: one changed image is re-embedded."""
    catalog, expect, (out, _), _ = indexed
    catalog_dir, day2_out = str(tmp_path / "catalog"), str(tmp_path / "out")
    shutil.copytree(os.path.dirname(catalog), catalog_dir)
    shutil.copytree(out, day2_out)
    changed = os.path.join(catalog_dir, "images", "good004.jpg")
    with open(changed, "wb") as f:
        f.write(jpeg_bytes(1004))
    report = index_portably(
        services, os.path.join(catalog_dir, os.path.basename(catalog)), day2_out, tiny_bundle[0], "p2"
    )
    counts = report["counts"]
    assert report["mode"] == "incremental" and read_current(day2_out) == "p2"
    assert (counts["changed"], counts["unchanged"], counts["indexed"]) == (1, N_GOOD - 1, N_GOOD)
    day2 = Searcher.open(day2_out, bundle=tiny_bundle[0])
    result = day2.search_images([changed], k=1)
    assert result.item_ids[0][0] == "item004" and result.scores[0][0] == pytest.approx(1.0, abs=1e-4)
    # Unchanged rows were carried as they were; only the changed image has a new embedding.
    before, after = Searcher.open(out).features_of(expect["good"])[0], day2.features_of(expect["good"])[0]
    assert [item for item, a, b in zip(expect["good"], before, after) if not np.array_equal(a, b)] == ["item004"]
