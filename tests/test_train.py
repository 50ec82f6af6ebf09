"""The baseline training job: writes a loadable bundle, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import retrieval_core.train.baseline as baseline
from retrieval_core.bundle import load_bundle
from retrieval_core.train.baseline import TrainConfig


def tiny_config(tmp_path, name: str) -> TrainConfig:
    return TrainConfig(
        out=str(tmp_path / name),
        data=str(tmp_path / "data"),
        products_per_category=2,
        consumer_views=1,
        image_size=32,
        embedding_dim=16,
        hash_bits=16,
        widths=(4, 8, 8, 8),
        epochs=3,
        batch_products=4,
        threads=1,
    )


def test_training_writes_a_bundle_and_resumes_exactly(tmp_path, monkeypatch):
    straight = baseline.main(tiny_config(tmp_path, "straight"))
    config, model = load_bundle(str(tmp_path / "straight"))
    assert config.model_id == straight.model_id
    assert {"recall_at_1", "hamming_recall_at_10", "category_acc"} <= set(config.metrics)
    assert len(config.training["history"]) == 3
    out = model(torch.zeros(2, 3, 32, 32))
    assert out["embedding"].shape == (2, 16) and out["hash"].shape == (2, 16)

    real_epoch = baseline.train_one_epoch

    def crash_at_third_epoch(*args, **kwargs):
        if args[6] == 2:  # epoch index
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    cfg = tiny_config(tmp_path, "resumed")
    monkeypatch.setattr(baseline, "train_one_epoch", crash_at_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        baseline.main(cfg)
    monkeypatch.setattr(baseline, "train_one_epoch", real_epoch)
    resumed = baseline.main(dataclasses.replace(cfg, resume=True))
    # Same seeds, same per-epoch streams, state restored from the checkpoint: bit-identical weights.
    assert resumed.model_id == straight.model_id


def test_resume_compares_paths_as_folders_not_spellings(tmp_path, monkeypatch):
    from retrieval_core.train.common import resume_mismatch, saved_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cat").mkdir()
    saved = saved_config(TrainConfig(data="cat", epochs=3))
    assert saved["data"] == str(tmp_path / "cat")  # recorded absolute
    assert resume_mismatch(saved, TrainConfig(data=str(tmp_path / "cat"), epochs=3)) == ""
    assert resume_mismatch(saved, TrainConfig(data="./cat/", epochs=3)) == ""
    old = {**saved, "data": "cat"}  # a checkpoint written before paths were recorded absolute
    assert resume_mismatch(old, TrainConfig(data=str(tmp_path / "cat"), epochs=3)) == ""
    other = resume_mismatch(saved, TrainConfig(data=str(tmp_path / "elsewhere"), epochs=3))
    assert other == f"data: {str(tmp_path / 'cat')!r} -> {str(tmp_path / 'elsewhere')!r}"
    assert resume_mismatch(saved, TrainConfig(data="cat", epochs=4)) == "epochs: 3 -> 4"
