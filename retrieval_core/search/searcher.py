"""Serving-side search over a published generation.

``Searcher.open(root)`` follows ``CURRENT``, validates the manifest, verifies
every file's sha256, memory-maps the shards, and answers k-NN queries on
embeddings (inner product) and on binary codes (Hamming), and Hamming radius
queries. Ties are broken by item id: inside a shard rows are in item-id order
and faiss breaks ties by the lower id, and the merge across shards does the
same, so the answer does not depend on the number of shards. Hamming answers
are exact whatever the binary index type (``retrieval_core.index.hamming``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retrieval_core import io as rio
from retrieval_core.encoder import EncodedBatch, Encoder
from retrieval_core.index import hamming
from retrieval_core.index.publish import load_manifest, verify_files
from retrieval_core.preprocess import load_image_file
from schemas import Manifest, check_schema_version


class ModelMismatchError(ValueError):
    """The query model is not the model the index was built with: its vectors would be meaningless here."""


@dataclass(frozen=True)
class SearchResult:
    """k-NN results for a batch of queries. Empty slots have id -1 and item_id None."""

    ids: np.ndarray  # (n, k) int64 faiss ids
    scores: np.ndarray  # (n, k) inner product (higher is better) or Hamming distance (lower is better)
    item_ids: list[list[str | None]]
    metric: str  # "inner_product" or "hamming"

    def rows(self, query: int = 0) -> list[dict]:
        """Results of one query as dicts (rank, item_id, faiss_id, score)."""
        return [
            {"rank": r + 1, "item_id": item, "faiss_id": int(i), "score": float(s)}
            for r, (item, i, s) in enumerate(zip(self.item_ids[query], self.ids[query], self.scores[query]))
            if i >= 0
        ]


MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
"""faiss maps the whole file and its codes (flat, IVF lists, refinement) point into the mapping: they stay page
cache, shared between processes and evictable, instead of private memory (``IO_FLAG_MMAP`` maps only IVF lists).
Multi-hash binary indices still build their hash tables in memory."""


def _read_index(path: str, binary: bool, mmap: bool):
    flags = MMAP_FLAGS if mmap and rio.is_local(path) else 0
    if rio.is_local(path):
        path = rio.local_path(path)
        return faiss.read_index_binary(path, flags) if binary else faiss.read_index(path, flags)
    data = np.frombuffer(rio.read_bytes(path), dtype=np.uint8)
    return faiss.deserialize_index_binary(data) if binary else faiss.deserialize_index(data)


class Searcher:
    """Search one published generation. Build with ``Searcher.open``."""

    def __init__(
        self,
        root: str,
        manifest: Manifest,
        vector_shards: list,
        hamming_shards: list,
        item_ids: pa.Array,
        encoder: Encoder | None = None,
    ) -> None:
        self.root = root
        self.manifest = manifest
        self.vector_shards = vector_shards
        self.hamming_shards = hamming_shards
        self.item_ids = item_ids
        self.offsets = np.array([s.offset for s in manifest.vector_shards], dtype=np.int64)
        self.encoder = encoder
        self._id_of: dict[str, int] | None = None
        # Position of each faiss id's item in item-id order: the tie-breaking key of the merge.
        order = pc.sort_indices(item_ids).to_numpy() if len(item_ids) else np.zeros(0, np.int64)
        self._item_rank = np.empty(len(order), np.int64)
        self._item_rank[order] = np.arange(len(order))

    @classmethod
    def open(
        cls,
        root: str,
        generation: str | None = None,
        *,
        bundle: str | Encoder | None = None,
        verify: bool = True,
        mmap: bool = True,
        device: str = "cpu",
    ) -> Searcher:
        """Open the published generation under ``root`` (or a named one).

        Args:
            root: the pipeline's output root (local path or URI).
            generation: a generation name; default the one ``CURRENT`` names.
            bundle: a bundle directory or loaded ``Encoder`` for image queries; its model id must match.
            verify: check every file's sha256 against the manifest before loading anything.
            mmap: memory-map local shards instead of reading them into memory.
            device: device for the bundle's model.

        Raises:
            ManifestError: malformed manifest or a file that fails verification.
            ModelMismatchError: the bundle is not the model the index was built with.
        """
        manifest = load_manifest(root, generation)
        encoder = Encoder.from_bundle(bundle, device) if isinstance(bundle, str) else bundle
        if encoder is not None and encoder.config.model_id != manifest.model_id:
            raise ModelMismatchError(
                f"index {manifest.generation} was built with model {manifest.model_id}, "
                f"the query bundle is {encoder.config.model_id}"
            )
        if verify:
            verify_files(root, manifest)
        vec = [_read_index(rio.join(root, s.path), False, mmap) for s in manifest.vector_shards]
        ham = [_read_index(rio.join(root, s.path), True, mmap) for s in manifest.hamming_shards]
        for shard, entry in zip(vec, manifest.vector_shards):
            ivf = faiss.try_extract_index_ivf(shard)
            if ivf is not None:
                ivf.nprobe = manifest.nprobe
            if shard.ntotal != entry.rows or shard.d != manifest.embedding_dim:
                raise ValueError(
                    f"{entry.path}: holds {shard.ntotal}x{shard.d}, manifest says {entry.rows}x{manifest.embedding_dim}"
                )
        tables = []
        for entry in manifest.id_files:
            table = rio.read_parquet(rio.join(root, entry.path), columns=["item_id"])
            check_schema_version(table.schema.metadata, what=entry.path)
            tables.append(table.column("item_id").combine_chunks())
        item_ids = pa.concat_arrays(tables) if tables else pa.array([], pa.string())
        return cls(root, manifest, vec, ham, item_ids, encoder)

    @property
    def ntotal(self) -> int:
        return self.manifest.ntotal

    def faiss_id(self, item_id: str) -> int:
        """Faiss id of an item; KeyError if it is not in this generation."""
        if self._id_of is None:
            self._id_of = {s: i for i, s in enumerate(self.item_ids.to_pylist())}
        return self._id_of[item_id]

    # -- queries ------------------------------------------------------------------------------------------

    def search_vectors(
        self, queries: np.ndarray, k: int = 10, *, nprobe: int | None = None, allowed_ids: np.ndarray | None = None
    ) -> SearchResult:
        """k-NN by inner product on L2-normalised embeddings ((n, dim) float32)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.manifest.embedding_dim:
            raise ValueError(f"queries have dim {q.shape[1]}, the index has {self.manifest.embedding_dim}")
        return self._search(self.vector_shards, q, k, higher_is_better=True, nprobe=nprobe, allowed=allowed_ids)

    def search_codes(self, codes: np.ndarray, k: int = 10, *, allowed_ids: np.ndarray | None = None) -> SearchResult:
        """Hamming k-NN on packed binary codes ((n, bits/8) uint8)."""
        c = self._check_codes(codes)
        return self._search(self.hamming_shards, c, k, higher_is_better=False, nprobe=None, allowed=allowed_ids)

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        c = np.ascontiguousarray(np.atleast_2d(codes), dtype=np.uint8)
        if c.shape[1] * 8 != self.manifest.hash_bits:
            raise ValueError(f"codes have {c.shape[1] * 8} bits, the index has {self.manifest.hash_bits}")
        return c

    def search_codes_within(self, codes: np.ndarray, radius: int) -> list[tuple[list[str], np.ndarray]]:
        """Every indexed item within Hamming distance ``radius`` (inclusive) of each code: per query,
        ``(item ids, distances)`` sorted by distance then item id. Exact for any radius; a multi-hash
        index answers up to ``hamming.exact_radius`` from its tables, beyond that by a scan."""
        c = self._check_codes(codes)
        per_shard = [hamming.range_search(shard, c, radius) for shard in self.hamming_shards]
        out = []
        for q in range(len(c)):
            dist = np.concatenate([found[q][0] for found in per_shard]).astype(np.int64)
            ids = np.concatenate([found[q][1] + offset for found, offset in zip(per_shard, self.offsets)])
            order = np.lexsort((self._item_rank[ids], dist))
            out.append((self._names(ids[order][None, :])[0], dist[order]))
        return out

    def features_of(self, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Stored (embeddings, codes) of indexed items, read from this generation's feature files."""
        wanted = pa.array(item_ids, pa.string())
        paths = [rio.join(self.root, f.path) for f in self.manifest.feature_files]
        found: dict[str, tuple[np.ndarray, bytes]] = {}
        for path in paths:
            table = rio.read_parquet(path, columns=["item_id", "embedding", "hash_code"])
            table = table.filter(pc.is_in(table["item_id"], value_set=wanted))
            for row in table.to_pylist():
                found[row["item_id"]] = (np.asarray(row["embedding"], np.float32), row["hash_code"])
        missing = [i for i in item_ids if i not in found]
        if missing:
            raise KeyError(f"not in generation {self.manifest.generation}: {missing[:5]}")
        emb = np.stack([found[i][0] for i in item_ids])
        codes = np.stack([np.frombuffer(found[i][1], np.uint8) for i in item_ids])
        return emb, codes

    def search_items(self, item_ids: list[str], k: int = 10, *, mode: str = "vector") -> SearchResult:
        """k-NN of indexed items, by their stored embedding (``mode='vector'``) or code (``'hamming'``)."""
        emb, codes = self.features_of(item_ids)
        return self.search_vectors(emb, k) if mode == "vector" else self.search_codes(codes, k)

    def encode_images(self, paths: list[str]) -> EncodedBatch:
        """Embeddings and codes of image files, with the bundle (which must be the index's model)."""
        if self.encoder is None:
            raise ValueError("image queries need the model bundle: Searcher.open(root, bundle=...)")
        prep = self.encoder.config.preprocessing
        return self.encoder.encode([load_image_file(p, prep).pixels for p in paths])

    def search_images(self, paths: list[str], k: int = 10, *, mode: str = "vector") -> SearchResult:
        """k-NN of image files, encoded with the bundle (which must be the index's model)."""
        batch = self.encode_images(paths)
        return self.search_vectors(batch.embeddings, k) if mode == "vector" else self.search_codes(batch.codes, k)

    # -- merging --------------------------------------------------------------------------------------------

    def _search(
        self,
        shards: list,
        q: np.ndarray,
        k: int,
        *,
        higher_is_better: bool,
        nprobe: int | None,
        allowed: np.ndarray | None,
    ) -> SearchResult:
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        all_d, all_i = [], []
        for shard, offset in zip(shards, self.offsets):
            if shard.ntotal == 0:
                continue
            params = self._params(shard, nprobe, allowed, offset)
            kk = min(k, shard.ntotal)
            if params is not None:  # a filter: faiss applies selectors in the scan
                scan = hamming.scan_index(shard) if isinstance(shard, faiss.IndexBinary) else shard
                d, i = scan.search(q, kk, params=params)
            elif isinstance(shard, faiss.IndexBinary):
                d, i = hamming.knn(shard, q, kk)
            else:
                d, i = shard.search(q, kk)
            all_d.append(d.astype(np.float64))
            all_i.append(np.where(i >= 0, i + offset, -1))
        n = len(q)
        if not all_d:
            empty = np.full((n, k), -1, np.int64)
            return SearchResult(empty, np.zeros((n, k)), self._names(empty), self._metric(higher_is_better))
        d, i = np.concatenate(all_d, axis=1), np.concatenate(all_i, axis=1)
        worst = -np.inf if higher_is_better else np.inf
        d = np.where(i >= 0, d, worst)
        primary = -d if higher_is_better else d
        # Sort by score, then by item id (empty slots last): deterministic and independent of the shard count.
        tie = np.where(i >= 0, self._item_rank[np.maximum(i, 0)], np.iinfo(np.int64).max)
        order = np.lexsort((tie, primary), axis=1)[:, :k]
        ids, scores = np.take_along_axis(i, order, 1), np.take_along_axis(d, order, 1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=worst)
        return SearchResult(ids, scores, self._names(ids), self._metric(higher_is_better))

    def _names(self, ids: np.ndarray) -> list[list[str | None]]:
        """Item ids of faiss ids (None for -1), looked up only for the ids asked for."""
        flat = ids.ravel()
        valid = flat >= 0
        names = np.full(flat.shape, None, dtype=object)
        if valid.any():
            names[valid] = self.item_ids.take(pa.array(flat[valid])).to_pylist()
        return names.reshape(ids.shape).tolist()

    def _metric(self, higher_is_better: bool) -> str:
        return self.manifest.metric if higher_is_better else "hamming"

    @staticmethod
    def _params(shard, nprobe: int | None, allowed: np.ndarray | None, offset: int):
        sel = None
        if allowed is not None:
            local = np.asarray(allowed, np.int64) - offset
            local = local[(local >= 0) & (local < shard.ntotal)]
            sel = faiss.IDSelectorBatch(np.ascontiguousarray(local))
        ivf = faiss.try_extract_index_ivf(shard) if isinstance(shard, faiss.Index) else None
        if ivf is not None and (nprobe is not None or sel is not None):
            params = faiss.SearchParametersIVF(nprobe=nprobe or ivf.nprobe)
        elif sel is not None:
            params = faiss.SearchParameters()
        else:
            return None
        if sel is not None:
            params.sel = sel
            params._keep_sel = sel  # the SWIG wrapper does not keep the selector alive on its own
        if isinstance(shard, faiss.IndexRefine):  # its parameters wrap those of the base index
            outer = faiss.IndexRefineSearchParameters(k_factor=shard.k_factor, base_index_params=params)
            outer._keep_base = params
            return outer
        return params


def default_output_root() -> str:
    """Where ``make index`` publishes: ``$RETRIEVAL_OUTPUT`` or ``artifacts/output``."""
    return os.environ.get("RETRIEVAL_OUTPUT", os.path.join("artifacts", "output"))
