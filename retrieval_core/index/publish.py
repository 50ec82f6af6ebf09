"""Publishing a generation: manifest last, then an atomic swap of ``CURRENT``.

Readers only ever follow ``CURRENT`` -> ``indices/<generation>/manifest.json``,
so files of a generation that is still being written are invisible to them.
"""

from __future__ import annotations

import datetime as dt
import os

from retrieval_core import io as rio
from retrieval_core.index.build import IndexSpec
from schemas import FileEntry, Manifest, ManifestError

CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"


def generation_dir(root: str, generation: str) -> str:
    return rio.join(root, "indices", generation)


def publish(root: str, manifest: Manifest, *, swap_current: bool = True, current_generation: int | None = None) -> str:
    """Write ``manifest.json`` into the generation, then point ``CURRENT`` at it. Returns the manifest path.

    Args:
        root: output root.
        manifest: the generation's manifest (validated here).
        swap_current: False leaves the generation complete and inspectable but not served.
        current_generation: on GCS, the object generation of ``CURRENT`` when the run started (0: absent);
            the swap fails with ``PreconditionFailed`` if anyone replaced it since. None: no precondition.
    """
    manifest.validate()
    path = rio.join(generation_dir(root, manifest.generation), MANIFEST_FILE)
    rio.write_bytes_atomic(path, manifest.to_json().encode())
    if swap_current:
        data = (manifest.generation + "\n").encode()
        rio.write_bytes_if_generation(rio.join(root, CURRENT_FILE), data, current_generation)
    return path


def read_current(root: str) -> str:
    """Name of the published generation under ``root``."""
    path = rio.join(root, CURRENT_FILE)
    if not rio.exists(path):
        raise FileNotFoundError(f"{path} does not exist: nothing has been published under {root}")
    generation = rio.read_bytes(path).decode().strip()
    if not generation or "/" in generation:
        raise ManifestError(f"{path} holds {generation!r}, not a generation name")
    return generation


def load_manifest(root: str, generation: str | None = None) -> Manifest:
    """Read and validate the manifest of ``generation`` (default: the published one)."""
    generation = generation or read_current(root)
    path = rio.join(generation_dir(root, generation), MANIFEST_FILE)
    if not rio.exists(path):
        raise FileNotFoundError(f"{path} does not exist: generation {generation!r} was never published")
    manifest = Manifest.from_json(rio.read_bytes(path))
    if manifest.generation != generation:
        raise ManifestError(f"{path} describes generation {manifest.generation!r}, not {generation!r}")
    return manifest


def verify_files(root: str, manifest: Manifest) -> None:
    """Check every listed file's size and sha256; raise ``ManifestError`` naming each mismatch."""
    bad = []
    for entry in manifest.all_files():
        path = rio.join(root, entry.path)
        if not rio.exists(path):
            bad.append(f"{entry.path}: missing")
            continue
        digest, size = rio.sha256_file(path)
        if size != entry.bytes or digest != entry.sha256:
            bad.append(
                f"{entry.path}: sha256 {digest[:12]}.. ({size} B), manifest says {entry.sha256[:12]}.. "
                f"({entry.bytes} B)"
            )
    if bad:
        raise ManifestError(f"generation {manifest.generation} failed verification: " + "; ".join(bad))


def relative_to(root: str, path: str) -> str:
    """``path`` relative to the output root, with ``/`` separators."""
    if rio.is_local(root):
        return os.path.relpath(rio.local_path(path), os.path.abspath(rio.local_path(root))).replace(os.sep, "/")
    prefix = root.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {root}")
    return path[len(prefix) :]


def file_entry(root: str, path: str, rows: int = 0) -> FileEntry:
    digest, size = rio.sha256_file(path)
    return FileEntry(path=relative_to(root, path), sha256=digest, bytes=size, rows=rows)


def table_entry(root: str, path: str) -> FileEntry:
    """``file_entry`` of a Parquet file, with its row count from the footer."""
    return file_entry(root, path, rio.parquet_rows(path))


def build_manifest(
    *,
    output_root: str,
    generation: str,
    run_id: str,
    model_id: str,
    model_name: str,
    dim: int,
    hash_bits: int,
    spec: IndexSpec,
    shard_results: list[dict],
    feature_files: list[str],
    dead_letter_files: list[str],
    counts: dict[str, int] | None = None,
) -> Manifest:
    """Assemble the manifest: shards in shard order with running offsets; table files hashed and counted here.

    ``counts`` gets ``indexed`` (rows in the shards) and ``dead_letter`` (rows in the dead-letter files).
    When feature files are given, their rows must add up to the indexed rows: a generation whose index
    and feature table disagree is refused here rather than published.
    """
    vec, ham, ids, offset = [], [], [], 0
    for result in sorted(shard_results, key=lambda r: r["shard"]):
        for kind, out in (("vectors", vec), ("hamming", ham), ("ids", ids)):
            out.append(FileEntry(offset=offset, **result[kind]))
        offset += result["vectors"]["rows"]
    features = tuple(table_entry(output_root, p) for p in sorted(feature_files))
    dead_letters = tuple(table_entry(output_root, p) for p in sorted(dead_letter_files))
    feature_rows = sum(f.rows for f in features)
    if features and feature_rows != offset:
        raise ManifestError(
            f"generation {generation}: the feature files hold {feature_rows} rows but the index shards {offset}"
        )
    return Manifest(
        generation=generation,
        run_id=run_id,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        model_id=model_id,
        model_name=model_name,
        embedding_dim=dim,
        hash_bits=hash_bits,
        metric=spec.metric,
        vector_factory=spec.vector_factory,
        binary_factory=spec.binary_factory,
        nprobe=spec.nprobe,
        index_selection=spec.selection(),
        vector_shards=tuple(vec),
        hamming_shards=tuple(ham),
        id_files=tuple(ids),
        feature_files=features,
        dead_letter_files=dead_letters,
        counts={**(counts or {}), "indexed": offset, "dead_letter": sum(f.rows for f in dead_letters)},
    )
