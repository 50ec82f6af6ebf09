"""Fault injection: SIGKILL the indexing job at several points, re-run, compare with an uninterrupted run."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import pipeline_flags, write_catalog

from pipelines.index_catalog import run
from retrieval_core.index.publish import read_current
from retrieval_core.search import Searcher

# Kill as soon as this path pattern exists under the output root (or when the job ends, whichever is first).
KILL_POINTS = {
    "writing-features": "features/run=victim/**",
    "building-shards": "indices/victim/vectors/*",
    "after-manifest": "indices/victim/manifest.json",
}


def args(catalog: str, out: str, bundle: str, run_id: str) -> list[str]:
    return pipeline_flags(catalog, out, bundle, "--num_shards=3", f"--run_id={run_id}")


def served(out: str) -> dict[str, np.ndarray]:
    """What serving sees: item -> embedding of the published generation, verified."""
    s = Searcher.open(out)
    items = s.item_ids.to_pylist()
    emb, _ = s.features_of(items)
    return dict(zip(items, emb))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("crash")
    catalog, _ = write_catalog(str(root / "c"), 30, broken=False, duplicate=False)
    clean = str(root / "clean")
    run(args(catalog, clean, tiny_bundle[0], "clean"))
    return root, catalog, served(clean)


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_kill_and_rerun_equals_clean_run(setup, tiny_bundle, point):
    root, catalog, expected = setup
    out = str(root / point)
    run(args(catalog, out, tiny_bundle[0], "before"))  # a published generation that serving is reading
    before = served(out)
    victim = args(catalog, out, tiny_bundle[0], "victim")
    code = f"import sys; from pipelines.index_catalog import main; sys.exit(main({victim!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if glob.glob(os.path.join(out, KILL_POINTS[point]), recursive=True):
            break
        time.sleep(0.01)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if point != "after-manifest":  # the last window is microseconds wide; the others must be hit mid-run
        assert alive, f"the job finished before reaching {point}"
    # Whatever point it died at, serving still opens a complete, verified generation.
    assert read_current(out) in ("before", "victim")
    assert set(served(out)) == set(before)

    report = run(args(catalog, out, tiny_bundle[0], "rerun"))
    assert report["status"] == "published" and read_current(out) == "rerun"
    after = served(out)
    assert sorted(after) == sorted(expected)
    for item, vec in expected.items():
        np.testing.assert_allclose(after[item], vec, atol=1e-5)
    rows = pq.read_table(glob.glob(f"{out}/features/run=rerun/*.parquet")).column("item_id").to_pylist()
    assert sorted(rows) == sorted(expected)  # no duplicates, nothing lost
    # A killed run that never wrote its manifest left only leftovers; the re-run's publish deleted them.
    if not os.path.exists(os.path.join(out, "indices", "victim", "manifest.json")):
        assert not os.path.exists(os.path.join(out, "indices", "victim"))
        assert not os.path.exists(os.path.join(out, "features", "run=victim"))
