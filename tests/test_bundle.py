"""Model bundles: round trip, integrity check, safe loading, and the device check."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_bundle

from retrieval_core.bundle import (
    BundleConfig,
    BundleError,
    compute_model_id,
    load_bundle,
    read_bundle_config,
    save_bundle,
    verify_bundle,
)
from retrieval_core.encoder import Encoder, is_device_failure, pack_codes, resolve_device
from retrieval_core.models import create_model, list_models
from retrieval_core.preprocess import Preprocessing


def test_round_trip_and_model_id(tmp_path):
    a = make_tiny_bundle(str(tmp_path / "a"), seed=0)
    b = make_tiny_bundle(str(tmp_path / "b"), seed=0)
    c = make_tiny_bundle(str(tmp_path / "c"), seed=1)
    assert a.model_id == b.model_id != c.model_id  # the id is a digest of weights + config
    config, model = load_bundle(str(tmp_path / "a"))
    assert config == read_bundle_config(str(tmp_path / "a")) and not model.training


def test_encoder_outputs(tmp_path):
    make_tiny_bundle(str(tmp_path / "a"))
    enc = Encoder.from_bundle(str(tmp_path / "a"))
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    out = enc.encode(pixels)
    assert out.embeddings.shape == (5, 16) and out.codes.shape == (5, 2) and out.codes.dtype == np.uint8
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, rtol=1e-5)
    assert set(out.category) <= {"a", "b", "c"} and all(set(a) == {"colour"} for a in out.attributes)
    # Batching does not change results.
    single = np.concatenate([enc.encode(pixels[i : i + 1]).embeddings for i in range(5)])
    np.testing.assert_allclose(single, out.embeddings, atol=1e-5)


def test_pack_codes_bit_order():
    assert pack_codes(np.array([[1, -1, -1, -1, -1, -1, -1, 0.5, -1, -1, -1, -1, -1, -1, -1, -1]])).tolist() == [
        [129, 0]
    ]


def test_tampered_weights_are_refused(tmp_path):
    make_tiny_bundle(str(tmp_path / "a"))
    path = tmp_path / "a" / "weights.pt"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="do not match model_id"):
        load_bundle(str(tmp_path / "a"))


def test_edited_config_is_refused(tmp_path):
    make_tiny_bundle(str(tmp_path / "a"))
    cfg_path = tmp_path / "a" / "bundle.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["preprocessing"]["image_size"] = 48  # would silently change every embedding
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="do not match model_id"):
        load_bundle(str(tmp_path / "a"))


def test_pickled_code_in_weights_is_not_executed(tmp_path):
    """weights_only=True: a weights file carrying a pickled callable is rejected, not run."""
    make_tiny_bundle(str(tmp_path / "a"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "a" / "weights.pt")
    # Re-sign the bundle so the digest check passes and torch.load itself is what must refuse.
    config = read_bundle_config(str(tmp_path / "a"))
    config = dataclasses.replace(
        config, model_id=compute_model_id(config, (tmp_path / "a" / "weights.pt").read_bytes())
    )
    (tmp_path / "a" / "bundle.json").write_text(config.to_json())
    with pytest.raises(BundleError, match="cannot load weights"):
        load_bundle(str(tmp_path / "a"))
    assert not marker.exists()


def test_missing_and_malformed(tmp_path):
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle_config(str(tmp_path))
    (tmp_path / "bundle.json").write_text('{"format_version": 1}')
    with pytest.raises(BundleError, match="malformed"):
        read_bundle_config(str(tmp_path))


def test_registry():
    assert "baseline_cnn" in list_models()
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope")


def test_cuda_request_without_cuda_fails_loudly():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("cudax")


def test_cuda_device_index_is_checked_against_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [resolve_device(d) for d in ("cpu", "cuda", "cuda:0", "cuda:1")] == ["cpu", "cuda", "cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    "exc, device",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), True),
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`"), True),
        (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"), True),
        (MemoryError(), True),
        (RuntimeError("Given groups=1, weight of size [8, 3, 3, 3], expected input to have 3 channels"), False),
        (ValueError("an image with no pixels"), False),
        (KeyError("embedding"), False),
    ],
)
def test_device_failures_are_told_from_batch_failures(exc, device):
    assert is_device_failure(exc) is device
    try:  # raised from inside another error: the cause decides
        raise ValueError("while encoding the batch") from exc
    except ValueError as wrapped:
        assert is_device_failure(wrapped) is device


def test_written_files_and_bundles_get_the_umask_mode(tmp_path, tiny_bundle):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the results must be as readable as a plain open()."""
    from retrieval_core import io as rio

    path = str(tmp_path / "sub" / "f.bin")
    rio.write_bytes_atomic(path, b"x")
    assert os.stat(path).st_mode & 0o777 == rio.FILE_MODE
    assert os.stat(tiny_bundle[0]).st_mode & 0o777 == rio.DIR_MODE
    mask = 0o777 & ~rio.DIR_MODE
    assert rio.FILE_MODE == 0o666 & ~mask
    current = os.umask(mask)  # the value read from /proc is the real one
    os.umask(current)
    assert current == mask


def _config(**changes) -> BundleConfig:
    config = BundleConfig(
        model_name="baseline_cnn",
        model_config={"embedding_dim": 16},
        preprocessing=Preprocessing(image_size=32),
        embedding_dim=16,
        hash_bits=16,
        categories=("a", "b", "c"),
        attributes={"colour": ("red", "blue")},
    )
    return dataclasses.replace(config, **changes)


def test_a_bundle_without_transform_keeps_its_model_id_and_format():
    """Bundles written before embedding transforms existed keep their ids and stay format-1 files."""
    config = _config()
    assert compute_model_id(config, b"weights") == "baseline_cnn-c8c79b2bb2798ba5"  # computed before the field existed
    d = json.loads(config.to_json())
    assert d["format_version"] == 1 and "embedding_transform" not in d
    assert "embedding_transform" not in config.identity()
    assert BundleConfig.from_json(json.dumps(d)) == config


def test_embedding_transform_round_trip_and_model_id(tmp_path, tiny_bundle):
    config, model = load_bundle(tiny_bundle[0])
    a = save_bundle(str(tmp_path / "a"), model, dataclasses.replace(config, embedding_transform="mul(tanh(x), x)"))
    b = save_bundle(str(tmp_path / "b"), model, dataclasses.replace(config, embedding_transform="sign(x)"))
    assert a.format_version == 2 and config.format_version == 1
    assert len({config.model_id, a.model_id, b.model_id}) == 3  # the transform is part of the model id
    assert verify_bundle(str(tmp_path / "a")) == a and a.embedding_transform == "mul(tanh(x), x)"
    # Dropping the transform gives the untransformed model's id back.
    assert save_bundle(str(tmp_path / "c"), model, dataclasses.replace(a, embedding_transform="")) == config
    # Editing the transform in place is caught like any other edit.
    path = tmp_path / "a" / "bundle.json"
    path.write_text(path.read_text().replace("mul(tanh(x), x)", "tanh(x)"))
    with pytest.raises(BundleError, match="do not match model_id"):
        verify_bundle(str(tmp_path / "a"))


@pytest.mark.parametrize(
    "text, why",
    [
        ("tanh(y)", "unknown variable"),
        ("relu(x)", "unknown operator"),
        ("mul(tanh(x),x)", "not canonical: write it as 'mul\\(tanh\\(x\\), x\\)'"),
        ("tanh(2)", "does not use x"),
        ("sub(x, x)", "is constant on \\[-1, 1\\]"),
        ("sign(exp(x))", "is constant on \\[-1, 1\\]"),
        ("cube(cube(cube(cube(exp(exp(x))))))", "not finite on \\[-1, 1\\]"),
        (3, "must be a string"),
    ],
)
def test_a_bad_embedding_transform_is_refused(text, why):
    with pytest.raises(BundleError, match=why):
        _config(embedding_transform=text)
    d = json.loads(_config(embedding_transform="tanh(x)").to_json())
    with pytest.raises(BundleError, match=why):
        BundleConfig.from_json(json.dumps({**d, "embedding_transform": text}))


def test_format_version_must_match_the_contents():
    d = json.loads(_config(embedding_transform="tanh(x)").to_json())
    assert d["format_version"] == 2 and d["embedding_transform"] == "tanh(x)"
    with pytest.raises(BundleError, match="says format 1, but its contents are format 2"):
        BundleConfig.from_json(json.dumps({**d, "format_version": 1}))
    plain = json.loads(_config().to_json())
    with pytest.raises(BundleError, match="says format 2, but its contents are format 1"):
        BundleConfig.from_json(json.dumps({**plain, "format_version": 2}))
    for version in (3, None, "2", True):
        with pytest.raises(BundleError, match="not one this code reads"):
            BundleConfig.from_json(json.dumps({**d, "format_version": version}))
