"""The GPU path on a real GPU, against the CPU path as the oracle.

Every test here needs a GPU and is skipped, saying so, where torch or faiss sees none (as on the development
machine and in CI). On a machine with one, ``make test-gpu`` runs them: CUDA inference with mixed precision
against the CPU, the whole pipeline with ``--device cuda``, the throughput benchmark on the GPU, and faiss's
k-means on the GPUs against the CPU's.
"""

from __future__ import annotations

import glob
import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import pipeline_flags, write_catalog

from retrieval_core.encoder import Encoder

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU that torch can use (torch.cuda.is_available() is False)"
)
needs_faiss_gpu = pytest.mark.skipif(
    faiss.get_num_gpus() == 0, reason="needs a GPU that faiss can use (faiss.get_num_gpus() is 0)"
)


def _bits(codes: np.ndarray) -> np.ndarray:
    return np.unpackbits(codes, axis=1)


@needs_cuda
def test_cuda_encoder_agrees_with_the_cpu(tiny_bundle):
    """float16 on the GPU changes the features a little, never a lot: cosine >= 0.99 per image, and at least 90%
    of the hash bits the same."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(32)]
    cpu = Encoder.from_bundle(tiny_bundle[0], "cpu").encode(pixels)
    gpu = Encoder.from_bundle(tiny_bundle[0], "cuda").encode(pixels)
    assert gpu.embeddings.dtype == np.float32 and gpu.embeddings.shape == cpu.embeddings.shape
    np.testing.assert_allclose(np.linalg.norm(gpu.embeddings, axis=1), 1.0, atol=1e-3)
    assert (cpu.embeddings * gpu.embeddings).sum(axis=1).min() >= 0.99
    assert (_bits(cpu.codes) == _bits(gpu.codes)).mean() >= 0.9
    assert gpu.codes.shape == cpu.codes.shape and gpu.codes.dtype == np.uint8


def _features(out: str) -> dict[str, np.ndarray]:
    table = pq.read_table(glob.glob(f"{out}/features/*/*.parquet"), columns=["item_id", "embedding"])
    return dict(
        zip(table.column("item_id").to_pylist(), np.stack(table.column("embedding").to_numpy(zero_copy_only=False)))
    )


@needs_cuda
def test_pipeline_with_device_cuda_publishes_what_the_cpu_run_does(tmp_path, tiny_bundle):
    from pipelines.index_catalog import run

    catalog, expect = write_catalog(str(tmp_path / "c"), 12, broken=False, duplicate=False)
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = str(tmp_path / device)
        report = run(pipeline_flags(catalog, outs[device], tiny_bundle[0], f"--device={device}", "--batch_size=5"))
        assert report["status"] == "published" and report["counts"]["indexed"] == len(expect["good"])
    cpu, gpu = _features(outs["cpu"]), _features(outs["cuda"])
    assert sorted(cpu) == sorted(gpu) == sorted(expect["good"])
    assert min(float(cpu[i] @ gpu[i]) for i in cpu) >= 0.99


@needs_cuda
def test_throughput_bench_runs_on_the_gpu(tmp_path):
    from conftest import make_tiny_bundle

    from bench import throughput

    bundle = str(tmp_path / "bundle")
    make_tiny_bundle(bundle)
    out = tmp_path / "throughput.json"
    argv = ["--artifacts", str(tmp_path / "art"), "--bundle", bundle, "--images", "24", "--repeats", "1"]
    assert throughput.main([*argv, "--device", "cuda", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text()) if r["protocol"] == "read-decode-embed-write"]
    assert rows and all(r["device"] == "cuda" and "GPU" in r["machine"] for r in rows)


@needs_faiss_gpu
def test_ivf_trained_with_gpu_kmeans_searches_as_well_as_one_trained_on_the_cpu():
    from retrieval_core.index.build import gpu_clustering_index, train_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 32)).astype(np.float32)
    data = (centres[rng.integers(0, 64, 20_000)] + 0.3 * rng.normal(size=(20_000, 32))).astype(np.float32)
    queries = data[:200] + 0.05 * rng.normal(size=(200, 32)).astype(np.float32)
    exact = faiss.IndexFlatL2(32)
    exact.add(data)
    _, truth = exact.search(queries, 10)
    assert gpu_clustering_index(32, faiss.METRIC_L2) is not None
    recalls = {}
    for where, clustering in (("gpu", None), ("cpu", faiss.IndexFlatL2(32))):
        index = faiss.index_factory(32, "IVF128,Flat")
        train_index(index, data[:10_000], clustering)  # None: the default, on the GPUs faiss sees
        index.add(data)
        faiss.extract_index_ivf(index).nprobe = 8
        _, found = index.search(queries, 10)
        recalls[where] = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])
    assert recalls["gpu"] >= 0.9 and abs(recalls["gpu"] - recalls["cpu"]) <= 0.03, recalls
