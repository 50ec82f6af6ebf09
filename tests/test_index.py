"""Index building and search against brute-force oracles, without Beam (the plain functions BuildIndex uses)."""

from __future__ import annotations

import os

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import feature_rows

from retrieval_core.encoder import pack_codes
from retrieval_core.eval.retrieval import hamming_distances
from retrieval_core.index.build import (
    Block,
    IndexSpec,
    bottom_k,
    candidate_factories,
    choose_spec,
    estimate_index_bytes,
    fill_vector_shard,
    gpu_clustering_index,
    parse_bytes,
    read_block,
    read_feature_block,
    serialize_index,
    shard_of,
    train_vector_index,
    write_block,
    write_shard,
)
from retrieval_core.index.publish import build_manifest, publish, read_current
from retrieval_core.search import ModelMismatchError, Searcher
from retrieval_core.search.cli import main as search_cli
from schemas import feature_schema


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build_generation(
    root: str,
    emb: np.ndarray,
    codes: np.ndarray,
    num_shards: int,
    factory: str | None = None,
    generation: str = "g1",
    nprobe: int | None = None,
    model_id: str = "m-1",
    binary_factory: str | None = None,
    max_index_memory: int | None = None,
) -> list[str]:
    """What the Beam graph does, done by hand: train on all vectors, fill shards, publish."""
    item_ids = [f"it{i:06d}" for i in range(len(emb))]
    spec = choose_spec(
        len(emb), factory, nprobe, binary_factory=binary_factory, dim=emb.shape[1], max_index_memory=max_index_memory
    )
    trained = train_vector_index(emb, emb.shape[1], spec)
    dim, bits = emb.shape[1], codes.shape[1] * 8
    everything = Block(np.array(item_ids, object), np.array(["0" * 64] * len(emb), object), emb, codes)
    by_shard = everything.split_by_shard(num_shards)
    rel = f"indices/{generation}"
    results = [
        write_shard(
            os.path.join(root, rel),
            rel,
            s,
            num_shards,
            by_shard.get(s, Block.empty(dim, bits)),
            spec,
            trained,
            dim,
            bits,
        )
        for s in range(num_shards)
    ]
    manifest = build_manifest(
        output_root=root,
        generation=generation,
        run_id=generation,
        model_id=model_id,
        model_name="test",
        dim=emb.shape[1],
        hash_bits=codes.shape[1] * 8,
        spec=spec,
        shard_results=results,
        feature_files=[],
        dead_letter_files=[],
        counts={},
    )
    publish(root, manifest)
    return item_ids


@pytest.fixture(scope="module")
def binary_generation(tmp_path_factory):
    rng = np.random.default_rng(7)
    n = 3000
    emb = clustered(n, 16, 7)
    # Few distinct bits -> many exact Hamming ties, the hard case for deterministic merging.
    codes = pack_codes(rng.normal(size=(n, 16)) * (rng.random((n, 16)) < 0.3))
    root = str(tmp_path_factory.mktemp("bin"))
    item_ids = build_generation(root, emb, codes, num_shards=4)
    return root, emb, codes, item_ids


def test_hamming_knn_equals_popcount_brute_force(binary_generation):
    root, _, codes, item_ids = binary_generation
    searcher = Searcher.open(root)
    queries = codes[:50]
    result = searcher.search_codes(queries, k=20)
    dist = hamming_distances(queries, codes)
    # Oracle: sort by distance, ties by item id (item_ids are generated in sorted order).
    for q in range(len(queries)):
        order = np.lexsort((np.arange(len(item_ids)), dist[q]))[:20]
        assert result.scores[q].astype(int).tolist() == dist[q][order].tolist()
        assert result.item_ids[q] == [item_ids[j] for j in order]


def test_multi_hash_shards_answer_exactly_as_flat_ones(binary_generation, tmp_path):
    root, emb, codes, item_ids = binary_generation
    mh = str(tmp_path / "mh")
    build_generation(mh, emb, codes, num_shards=4, binary_factory="BHash3x5")
    flat, hashed = Searcher.open(root), Searcher.open(mh)
    assert (flat.manifest.binary_factory, hashed.manifest.binary_factory) == ("BFlat", "BHash3x5")
    queries = codes[:50]
    a, b = flat.search_codes(queries, k=20), hashed.search_codes(queries, k=20)
    assert a.item_ids == b.item_ids and np.array_equal(a.scores, b.scores)
    allowed = np.arange(0, len(codes), 3)  # a filter goes through the scan behind the hash tables
    a, b = flat.search_codes(queries, k=5, allowed_ids=allowed), hashed.search_codes(queries, k=5, allowed_ids=allowed)
    assert a.item_ids == b.item_ids
    dist = hamming_distances(queries, codes)
    for radius in (0, 2, 4):  # 2: from the tables; 4: beyond them, by a scan
        got = hashed.search_codes_within(queries, radius)
        assert [(ids, d.tolist()) for ids, d in got] == [
            (ids, d.tolist()) for ids, d in flat.search_codes_within(queries, radius)
        ]
        for q, (ids, d) in enumerate(got):
            expect = [j for j in np.lexsort((np.arange(len(codes)), dist[q])) if dist[q][j] <= radius]
            assert ids == [item_ids[j] for j in expect] and d.tolist() == dist[q][expect].tolist()


def test_sharding_does_not_change_results(binary_generation, tmp_path):
    root, emb, codes, _ = binary_generation
    one = str(tmp_path / "one")
    build_generation(one, emb, codes, num_shards=1)
    a, b = Searcher.open(root), Searcher.open(one)
    ra, rb = a.search_vectors(emb[:20], k=10), b.search_vectors(emb[:20], k=10)
    assert ra.item_ids == rb.item_ids
    ha, hb = a.search_codes(codes[:20], k=10), b.search_codes(codes[:20], k=10)
    assert ha.item_ids == hb.item_ids and np.array_equal(ha.scores, hb.scores)


def test_flat_search_equals_numpy(binary_generation):
    root, emb, _, item_ids = binary_generation
    searcher = Searcher.open(root)
    result = searcher.search_vectors(emb[100:110], k=5)
    sims = emb[100:110] @ emb.T
    for q in range(10):
        expected = np.argsort(-sims[q], kind="stable")[:5]
        np.testing.assert_allclose(result.scores[q], sims[q][expected], rtol=1e-5, atol=1e-5)
        assert result.item_ids[q][0] == item_ids[100 + q]


def test_allowed_ids_restrict_the_gallery(binary_generation):
    root, emb, codes, _ = binary_generation
    searcher = Searcher.open(root)
    allowed = np.arange(0, searcher.ntotal, 7)
    for result in (
        searcher.search_vectors(emb[:10], 5, allowed_ids=allowed),
        searcher.search_codes(codes[:10], 5, allowed_ids=allowed),
    ):
        assert set(result.ids.ravel().tolist()) <= set(allowed.tolist())


def test_ivf_shards_recall_vs_flat(tmp_path):
    n, dim = 20000, 32
    everything = clustered(n + 200, dim, 1, clusters=200)
    emb, queries = (everything[:n], everything[n:])  # held-out queries from the same distribution
    codes = pack_codes(emb[:, :16])
    root = str(tmp_path / "ivf")
    build_generation(root, emb, codes, num_shards=3, factory="IVF64,Flat", nprobe=8)
    searcher = Searcher.open(root)
    assert "IVF64" in searcher.manifest.vector_factory and searcher.manifest.nprobe == 8
    exact = faiss.IndexFlatIP(dim)
    exact.add(emb)
    _, truth = exact.search(queries, 10)
    truth_items = [[f"it{j:06d}" for j in row] for row in truth]
    got = searcher.search_vectors(queries, 10).item_ids
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth_items)])
    assert recall >= 0.9, recall
    # More probes can only help, and probing every list is exact.
    full = searcher.search_vectors(queries, 10, nprobe=64).item_ids
    assert np.mean([len(set(g) & set(t)) / 10 for g, t in zip(full, truth_items)]) == pytest.approx(1.0)


def test_spec_is_chosen_by_size():
    assert choose_spec(1000).vector_factory == "Flat"
    big = choose_spec(1_000_000)
    assert big.vector_factory.startswith("IVF") and big.nprobe >= 1
    assert choose_spec(10, "IVF4,Flat", 2).nprobe == 2


@pytest.mark.parametrize(
    "text, expected",
    [("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("300000000", 300_000_000), ("64kb", 64 << 10)],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12Q", "-5M", "0"])
def test_parse_bytes_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_memory_estimates_match_the_serialised_indices():
    """Oracle: the size of each candidate index actually built (codes, ids, centroids, codebooks)."""
    n, dim = 10000, 16
    emb = clustered(n, dim, 3, clusters=100)
    for factory in [*candidate_factories(n, dim), "HNSW16,Flat"]:
        spec = choose_spec(n, factory, dim=dim)
        built = len(serialize_index(fill_vector_shard(train_vector_index(emb, dim, spec), emb)))
        assert spec.estimated_bytes == estimate_index_bytes(factory, n, dim)
        assert abs(spec.estimated_bytes - built) / built < 0.05, (factory, spec.estimated_bytes, built)


def test_memory_budget_picks_the_most_accurate_index_that_fits():
    n, dim = 1_000_000, 128
    exact, refined, pq, small = candidate_factories(n, dim)[:4]
    assert (exact, refined, pq, small) == ("IVF4096,Flat", "IVF4096,PQ32,Refine(SQ8)", "IVF4096,PQ32", "IVF4096,PQ16")
    sizes = [estimate_index_bytes(f, n, dim) for f in (exact, refined, pq, small)]
    assert sizes == sorted(sizes, reverse=True)
    for budget, factory in [
        (None, exact),
        (sizes[0], exact),
        (sizes[0] - 1, refined),
        (sizes[2], pq),
        (sizes[3], small),
    ]:
        spec = choose_spec(n, dim=dim, max_index_memory=budget)
        assert spec.vector_factory == factory and spec.estimated_bytes <= (budget or sizes[0])
        assert spec.selection() == {"max_index_memory": budget, "estimated_bytes": spec.estimated_bytes}
    with pytest.raises(ValueError, match="no index of 1000000 x 128 vectors fits.*IVF4096,PQ16"):
        choose_spec(n, dim=dim, max_index_memory=sizes[3] - 1)
    # Few vectors: exact flat while it fits; PQ is no candidate below PQ_MIN_ROWS, so a tiny budget is refused.
    assert choose_spec(500, dim=dim, max_index_memory=1 << 20).vector_factory == "Flat"
    with pytest.raises(ValueError, match="no index"):
        choose_spec(500, dim=dim, max_index_memory=1000)


def test_compressed_generation_chosen_by_budget_searches_well(tmp_path):
    """A budget below the exact index gives IVF-PQ re-ranked by SQ8: recall vs brute force, filters, nprobe."""
    n, dim = 20000, 32
    everything = clustered(n + 100, dim, 5, clusters=200)
    emb, queries = everything[:n], everything[n:]
    root = str(tmp_path / "pq")
    budget = estimate_index_bytes(candidate_factories(n, dim)[0], n, dim) // 2
    item_ids = build_generation(root, emb, pack_codes(emb[:, :16]), num_shards=2, max_index_memory=budget)
    searcher = Searcher.open(root)
    m = searcher.manifest
    assert m.vector_factory.endswith("Refine(SQ8)") and m.index_selection["max_index_memory"] == budget
    assert all(isinstance(s, faiss.IndexRefine) for s in searcher.vector_shards)
    assert all(faiss.extract_index_ivf(s).nprobe == m.nprobe for s in searcher.vector_shards)
    exact = faiss.IndexFlatIP(dim)
    exact.add(emb)
    _, truth = exact.search(queries, 10)
    got = searcher.search_vectors(queries, 10, nprobe=64).item_ids
    assert np.mean([len(set(g) & {item_ids[j] for j in t}) / 10 for g, t in zip(got, truth)]) >= 0.9
    # A filter goes into the base index's parameters: only allowed ids, and the best allowed ones.
    allowed_rows = np.arange(0, n, 5)
    allowed = np.array([searcher.faiss_id(item_ids[j]) for j in allowed_rows])
    filtered = searcher.search_vectors(queries, 10, nprobe=64, allowed_ids=allowed)
    assert set(filtered.ids.ravel().tolist()) <= set(allowed.tolist())
    sub = faiss.IndexFlatIP(dim)
    sub.add(emb[allowed_rows])
    _, sub_truth = sub.search(queries, 10)
    recall = np.mean(
        [len(set(g) & {item_ids[allowed_rows[j]] for j in t}) / 10 for g, t in zip(filtered.item_ids, sub_truth)]
    )
    assert recall >= 0.9, recall


def test_model_mismatch_is_refused(binary_generation):
    root, *_ = binary_generation

    class FakeEncoder:
        class config:  # noqa: N801
            model_id = "some-other-model"

    with pytest.raises(ModelMismatchError, match="built with model m-1"):
        Searcher.open(root, bundle=FakeEncoder())


def test_new_generation_replaces_current(binary_generation, tmp_path):
    _, emb, codes, _ = binary_generation
    root = str(tmp_path / "gens")
    build_generation(root, emb[:100], codes[:100], 2, generation="a")
    build_generation(root, emb[:200], codes[:200], 2, generation="b")
    assert read_current(root) == "b"
    assert Searcher.open(root).ntotal == 200
    assert Searcher.open(root, "a").ntotal == 100


def test_cli_prints_json(binary_generation, capsys, tmp_path):
    root, emb, *_ = binary_generation
    np.save(tmp_path / "q.npy", emb[:2])
    assert search_cli(["--index", root, "--vector", str(tmp_path / "q.npy"), "--k", "3", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 2 and out["results"][0]["neighbours"][0]["item_id"] == "it000000"


def test_blocks_split_by_shard_of_and_round_trip_through_parquet_and_part_files(tmp_path):
    """The column-wise path BuildIndex takes: Parquet -> Block -> per-shard parts, checked row by row."""
    rng = np.random.default_rng(3)
    n, dim, bits = 257, 8, 16
    ids = [f"item-{i}" for i in rng.permutation(n)]
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    codes = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
    rows = feature_rows(n, dim, bits)
    for row, item, e, c in zip(rows, ids, emb, codes, strict=True):
        row.update(item_id=item, content_sha256=f"sha-{item}", embedding=e.tolist(), hash_code=c.tobytes())
    table = pa.Table.from_pylist(rows, schema=feature_schema(dim, bits))
    path = str(tmp_path / "f.parquet")
    pq.write_table(table, path, row_group_size=50)  # several chunks: offsets inside the code buffers matter
    block = read_feature_block(path, dim, bits)
    assert block.item_ids.tolist() == ids
    assert block.content_sha256.tolist() == [f"sha-{i}" for i in ids]
    np.testing.assert_array_equal(block.vectors, emb)
    np.testing.assert_array_equal(block.codes, codes)
    parts = block.split_by_shard(5)
    assert sum(len(p) for p in parts.values()) == n
    for s, part in parts.items():
        for j, item in enumerate(part.item_ids):
            assert shard_of(item, 5) == s
            i = ids.index(item)
            np.testing.assert_array_equal(part.vectors[j], emb[i])
            np.testing.assert_array_equal(part.codes[j], codes[i])
    merged = Block.concat(parts.values(), dim, bits).sorted_by_id()
    assert merged.item_ids.tolist() == sorted(ids)
    # Spilled to a part file (as ReadBlocks does) and read back (as FillShards does): unchanged, empty ones too.
    for name, part in (*((str(s), p) for s, p in parts.items()), ("empty", Block.empty(dim, bits))):
        write_block(str(tmp_path / "parts" / f"{name}.arrow"), part)
        back = read_block(str(tmp_path / "parts" / f"{name}.arrow"), dim, bits)
        for field in Block.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(back, field), getattr(part, field))
        assert back.vectors.dtype == np.float32 and back.codes.shape == (len(part), bits // 8)


def test_bottom_k_sample_does_not_depend_on_split_or_order():
    rng = np.random.default_rng(5)
    keys = rng.integers(0, 2**63, size=1000, dtype=np.uint64)
    vectors = rng.normal(size=(1000, 4)).astype(np.float32)
    whole_keys, whole = bottom_k(keys, vectors, 100)
    assert whole_keys.tolist() == sorted(keys.tolist())[:100]
    # Any split, any order, merged pairwise: the same sample.
    perm = rng.permutation(1000)
    parts = [bottom_k(keys[perm[i : i + 137]], vectors[perm[i : i + 137]], 100) for i in range(0, 1000, 137)]
    merged_keys, merged = bottom_k(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), 100)
    np.testing.assert_array_equal(merged_keys, whole_keys)
    np.testing.assert_array_equal(merged, whole)
    # Given as lists of parts (what the combine buffers), including an empty part: the same, without concatenating.
    listed_keys, listed = bottom_k([p[0] for p in parts] + [keys[:0]], [p[1] for p in parts] + [vectors[:0]], 100)
    np.testing.assert_array_equal(listed_keys, whole_keys)
    np.testing.assert_array_equal(listed, whole)


@pytest.mark.parametrize("seed", range(4))
def test_training_sample_combine_equals_bottom_k_of_everything(seed):
    """BuildIndex's CombineFn, fed per-file samples in any bundling and order, with compactions on the way:
    the row count and exactly the bottom-k of all rows."""
    from pipelines.transforms.build_index import _TrainingSample

    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**63, size=1000, dtype=np.uint64)
    vectors = rng.normal(size=(1000, 4)).astype(np.float32)
    _, whole = bottom_k(keys, vectors, 100)
    combine = _TrainingSample(100, 4)
    accumulators = [combine.create_accumulator() for _ in range(3)]
    cuts = np.sort(rng.choice(np.arange(1, 1000), 11, replace=False))
    for rows in np.split(rng.permutation(1000), cuts):  # 12 "files", some larger than the sample, as ReadBlocks sends
        sample = bottom_k(keys[rows], vectors[rows], 100) if len(rows) > 100 else (keys[rows], vectors[rows])
        acc = accumulators[rng.integers(3)]
        combine.add_input(acc, (len(rows), *sample))
    accumulators[0] = combine.compact(accumulators[0])
    count, sample = combine.extract_output(combine.merge_accumulators([accumulators[i] for i in rng.permutation(3)]))
    assert count == 1000
    np.testing.assert_array_equal(sample, whole)
    assert combine.extract_output(combine.create_accumulator())[1].shape == (0, 4)


def test_cli_radius_lists_every_code_within_it(binary_generation, capsys, tmp_path):
    """Oracle: numpy popcount over all codes; sorted by distance, then item id."""
    import json

    root, _, codes, item_ids = binary_generation
    np.save(tmp_path / "c.npy", codes[:3])
    argv = ["--index", root, "--vector", str(tmp_path / "c.npy"), "--radius", "2", "--json", "--no-verify"]
    assert search_cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "hamming"
    dist = hamming_distances(codes[:3], codes)
    for q, result in enumerate(out["results"]):
        within = np.flatnonzero(dist[q] <= 2)
        order = within[np.lexsort((within, dist[q][within]))]
        assert [n["item_id"] for n in result["neighbours"]] == [item_ids[j] for j in order]
        assert [n["score"] for n in result["neighbours"]] == dist[q][order].tolist()
    assert search_cli(argv[:4] + ["--radius", "0"]) == 0
    exact_matches = int((dist[0] == 0).sum())
    assert f"query {tmp_path / 'c.npy'}[0]  (hamming, {exact_matches} results)" in capsys.readouterr().out
    assert search_cli(argv[:4] + ["--radius", "-1"]) == 2


def test_mmap_open_maps_the_codes_instead_of_copying_them(binary_generation):
    root, emb, *_ = binary_generation
    mapped, read = Searcher.open(root, mmap=True), Searcher.open(root, mmap=False)
    assert not any(faiss.downcast_index(s).codes.is_owned for s in mapped.vector_shards)  # views of the file
    assert all(faiss.downcast_index(s).codes.is_owned for s in read.vector_shards)
    a, b = mapped.search_vectors(emb[:20], 5), read.search_vectors(emb[:20], 5)
    assert a.item_ids == b.item_ids and np.array_equal(a.scores, b.scores)


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8,Refine(SQ8)"])
def test_ivf_training_assigns_on_the_clustering_index_it_is_given(factory):
    """The GPU path's plumbing, checked on the CPU: an exact flat index with the quantiser's metric (what
    gpu_clustering_index puts on the GPUs) trains the very same index; one that assigns differently (L1 distance
    instead of the quantiser's inner product) trains another, so it is the one used."""
    rng = np.random.default_rng(3)
    unit = rng.normal(size=(4000, 32)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    spec = IndexSpec(factory, "BFlat", 4)
    default = train_vector_index(unit, 32, spec)
    assert train_vector_index(unit, 32, spec, faiss.IndexFlat(32, faiss.METRIC_INNER_PRODUCT)) == default
    assert train_vector_index(unit, 32, spec, faiss.IndexFlat(32, faiss.METRIC_L1)) != default


@pytest.mark.parametrize("factory", ["IVF16,Flat", "PCA16,IVF16,Flat", "OPQ4_16,IVF16,PQ4"])
def test_the_default_gpu_path_trains_the_same_index(factory, monkeypatch):
    """With faiss "seeing" a GPU whose copy of an index is the index itself, the default path builds the
    clustering index as it would on a GPU machine: in the IVF's own space (after PCA/OPQ), giving the CPU's index."""
    rng = np.random.default_rng(4)
    unit = rng.normal(size=(4000, 32)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    spec = IndexSpec(factory, "BFlat", 4)
    cpu = train_vector_index(unit, 32, spec)
    built = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index: built.append(index) or index)
    assert train_vector_index(unit, 32, spec) == cpu
    assert len(built) == 1 and built[0].d == faiss.try_extract_index_ivf(faiss.index_factory(32, factory)).d


def test_gpu_clustering_index_only_where_faiss_sees_a_gpu():
    index = gpu_clustering_index(32, faiss.METRIC_INNER_PRODUCT)
    if faiss.get_num_gpus() == 0:
        assert index is None
    else:
        assert index.d == 32 and index.metric_type == faiss.METRIC_INNER_PRODUCT
