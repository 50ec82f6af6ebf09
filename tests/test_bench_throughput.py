"""The throughput benchmark runs end to end at a tiny size with the tiny untrained bundle (a smoke test: no
timing is asserted, only that every row is produced, well-formed, and that the loop and the pipeline agree)."""

from __future__ import annotations

import json
import math
import resource

import numpy as np
import pytest
from conftest import jpeg_bytes, make_tiny_bundle

from bench import throughput
from retrieval_core.encoder import keep_freed_memory_for_reuse
from retrieval_core.preprocess import Preprocessing, decode_image

COMMON_KEYS = {"method", "dataset", "protocol", "images", "machine", "commit", "items_per_s", "ratio"}


def test_throughput_bench_rows(tmp_path):
    bundle = str(tmp_path / "bundle")
    make_tiny_bundle(bundle)
    out = tmp_path / "results" / "throughput.json"
    argv = ["--artifacts", str(tmp_path / "art"), "--bundle", bundle, "--images", "24", "--repeats", "1"]
    assert throughput.main([*argv, "--threads", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    for r in rows:
        assert COMMON_KEYS <= set(r), r
        if r["protocol"] != "read-decode-embed-write-marginal":
            assert r["items_per_s"] > 0 and r["ratio"] > 0
        assert r["dataset"] == "synthetic" and r["commit"] and r["machine"]
        assert all(k == k.lower() and " " not in k for k in r)
        for k, v in r.items():
            if k.endswith("_s") and not (r["protocol"].endswith("marginal") and v is None):
                assert isinstance(v, float | int) and math.isfinite(v), (k, v)
                assert v >= 0 or k == "fixed_s", (k, v)  # a fitted intercept may come out below zero
    by_protocol = {}
    for r in rows:
        by_protocol.setdefault(r["protocol"], []).append(r)
    assert list(by_protocol) == ["read-decode", "read-decode-embed-write", "read-decode-embed-write-marginal"]

    decode = by_protocol["read-decode"]
    assert [r["method"] for r in decode] == ["pil-full-decode", "pil-draft", "pil-draft-2-threads"]
    assert decode[0]["ratio"] == 1.0 and not decode[0]["draft"] and decode[1]["draft"] and decode[2]["threads"] == 2
    assert all(r["images"] == 24 and r["items_per_s"] > 0 and r["wall_s"] > 0 for r in decode)

    embed = by_protocol["read-decode-embed-write"]
    assert [(r["method"], r["images"]) for r in embed] == [
        ("pytorch-loop", 2),
        ("beam-pipeline", 2),
        ("pytorch-loop", 24),
        ("beam-pipeline", 24),
    ]
    for r in embed:  # every run's wall time is kept; the row is the fastest
        assert len(r["wall_s_runs"]) == 1 and r["wall_s_runs"][0] == r["wall_s"]
    for loop, pipeline in (embed[:2], embed[2:]):
        assert loop["ratio"] == 1.0
        # ratio = loop wall / pipeline wall, from the unrounded times; the rows hold both walls rounded to 1 ms and
        # the ratio to 0.001, so at this tiny size (a loop of ~20 ms) the check is the interval that rounding allows.
        lo = (loop["wall_s"] - 5e-4) / (pipeline["wall_s"] + 5e-4) - 5e-4
        hi = (loop["wall_s"] + 5e-4) / (pipeline["wall_s"] - 5e-4) + 5e-4
        assert lo <= pipeline["ratio"] <= hi, (pipeline["ratio"], loop["wall_s"], pipeline["wall_s"])
        assert loop["batch_size"] == pipeline["batch_size"] == 64 and loop["torch_threads"] >= 1
        assert pipeline["infer_batches"] == loop["infer_batches"] == 1
        # The pipeline's own stage timings come from its run report; the loop times the same stages itself.
        assert {"read_s", "decode_s", "infer_s", "build_index_s", "other_s"} <= set(pipeline)
        assert {"read_s", "decode_s", "infer_s", "write_s", "other_s"} <= set(loop)
    # Both did the same work: same rows, same codes, the same embeddings up to float noise.
    full = embed[3]
    assert full["same_content_hashes"] and full["codes_identical"] == 1.0 and full["embedding_max_abs_diff"] < 1e-3

    marginal = by_protocol["read-decode-embed-write-marginal"]
    assert [(r["method"], r["images"]) for r in marginal] == [("pytorch-loop", 22), ("beam-pipeline", 22)]
    # At this size the marginal rate may be undefined (the bigger run not measurably slower): then it is None.
    assert marginal[0]["ratio"] in (1.0, None) and "fixed_s" in marginal[1]


def test_decode_without_draft_is_opt_in():
    """``draft=False`` decodes every pixel; the default (draft on) is unchanged and the two stay close."""
    data = jpeg_bytes(3, size=(256, 200))
    prep = Preprocessing(image_size=32)
    default, drafted, full = (decode_image(data, prep, **kw) for kw in ({}, {"draft": True}, {"draft": False}))
    assert np.array_equal(default.pixels, drafted.pixels)
    assert full.pixels.shape == default.pixels.shape == (32, 32, 3)
    assert (full.width, full.height) == (default.width, default.height) == (256, 200)
    assert np.abs(full.pixels.astype(int) - default.pixels.astype(int)).mean() < 8


def test_freed_memory_is_reused_not_faulted_back_in():
    """What ``Encoder.from_bundle`` sets on CPU: a large buffer freed and allocated again (as a forward pass
    does with its activations, batch after batch) reuses mapped pages instead of page-faulting fresh ones."""
    if not keep_freed_memory_for_reuse():
        pytest.skip("malloc tuning needs glibc")
    size = 64 << 20  # above glibc's default (and largest dynamic) mmap threshold of 32 MiB
    np.ones(size, np.uint8)  # the first use maps the pages
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        np.ones(size, np.uint8)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Untuned, every round maps fresh memory: thousands of faults (fewer than its 16,384 small pages where
    # numpy's huge-page advice takes); tuned, none.
    assert faults < 64


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA: the GPU run is valid")
def test_throughput_bench_refuses_cuda_without_a_gpu(tmp_path):
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        throughput.main(["--artifacts", str(tmp_path / "art"), "--device", "cuda", "--images", "24"])
    assert not (tmp_path / "art").exists()  # refused before any work
