"""The index manifest: everything a serving system needs to load and query a generation.

``manifest.json`` is the last file written into ``indices/<generation>/``; a
generation without one was never published. All paths in it are relative to
the output root, so a whole output tree can be copied or mounted elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from schemas.tables import SCHEMA_VERSION

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
METRICS = ("inner_product", "l2")


def _version(text: str) -> tuple[int, ...] | None:
    parts = text.split(".")
    return tuple(int(p) for p in parts) if len(parts) == 3 and all(p.isdigit() for p in parts) else None


def _is_newer_minor(version: str) -> bool:
    """Same major version as this code, higher minor (or patch): written by a newer release."""
    theirs, ours = _version(version), _version(SCHEMA_VERSION)
    return theirs is not None and theirs[0] == ours[0] and theirs > ours


class ManifestError(ValueError):
    """The manifest is malformed, inconsistent, or does not match the files it lists."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a generation: where it is, what it hashes to, and how many rows it holds."""

    path: str
    sha256: str
    bytes: int
    rows: int = 0
    offset: int = 0  # first faiss id of an index shard; 0 for other files


@dataclass(frozen=True)
class Manifest:
    """A published index generation."""

    generation: str
    run_id: str
    created_at: str
    model_id: str
    model_name: str
    embedding_dim: int
    hash_bits: int
    metric: str
    vector_factory: str
    binary_factory: str
    nprobe: int
    vector_shards: tuple[FileEntry, ...]
    hamming_shards: tuple[FileEntry, ...]
    id_files: tuple[FileEntry, ...]
    feature_files: tuple[FileEntry, ...] = ()
    dead_letter_files: tuple[FileEntry, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)
    index_selection: dict[str, Any] = field(default_factory=dict)
    """How the vector index type was chosen: ``max_index_memory`` (bytes, null: no budget) and
    ``estimated_bytes`` (memory of all vector shards when searched; null when faiss' type is not known)."""
    schema_version: str = SCHEMA_VERSION

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors over all shards."""
        return sum(s.rows for s in self.vector_shards)

    def all_files(self) -> tuple[FileEntry, ...]:
        """Every file the manifest vouches for."""
        return self.vector_shards + self.hamming_shards + self.id_files + self.feature_files + self.dead_letter_files

    def validate(self) -> Manifest:
        """Check internal consistency; return self or raise ``ManifestError``."""
        if self.schema_version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ManifestError(f"manifest schema {self.schema_version} is incompatible with {SCHEMA_VERSION}")
        if not self.model_id:
            raise ManifestError("manifest has no model_id")
        if self.embedding_dim <= 0 or self.hash_bits <= 0 or self.hash_bits % 8:
            raise ManifestError(f"bad dimensions: dim={self.embedding_dim} bits={self.hash_bits}")
        if self.metric not in METRICS:
            raise ManifestError(f"metric {self.metric!r} is not one of {METRICS}")
        n = len(self.vector_shards)
        if n == 0 or len(self.hamming_shards) != n or len(self.id_files) != n:
            raise ManifestError(
                f"shard lists disagree: {n} vector, {len(self.hamming_shards)} hamming, {len(self.id_files)} id files"
            )
        offset = 0
        for vec, ham, ids in zip(self.vector_shards, self.hamming_shards, self.id_files):
            if not (vec.rows == ham.rows == ids.rows):
                raise ManifestError(f"shard {vec.path}: row counts differ ({vec.rows}, {ham.rows}, {ids.rows})")
            if vec.offset != offset or ham.offset != offset or ids.offset != offset:
                raise ManifestError(f"shard {vec.path}: offset {vec.offset} should be {offset}")
            offset += vec.rows
        if "indexed" in self.counts and self.counts["indexed"] != offset:
            raise ManifestError(f"counts.indexed={self.counts['indexed']} but the shards hold {offset}")
        for entry in self.all_files():
            if not _SHA256.match(entry.sha256):
                raise ManifestError(f"{entry.path}: sha256 {entry.sha256!r} is not 64 hex digits")
            if entry.path.startswith("/") or ".." in entry.path.split("/") or "://" in entry.path:
                raise ManifestError(f"{entry.path}: paths must be relative to the output root")
        return self

    def to_json(self) -> str:
        """Serialise to indented JSON (stable key order)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate. Unknown keys are an error so typos do not pass silently, except in a manifest of a
        newer minor version of the same major one: its additions are ignored (forward compatible)."""
        try:
            raw: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ManifestError("manifest must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        version = str(raw.get("schema_version", SCHEMA_VERSION))
        if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
            raise ManifestError(f"manifest schema {version} is incompatible with {SCHEMA_VERSION}")
        if unknown and _is_newer_minor(version):
            raw = {k: v for k, v in raw.items() if k in names}
        elif unknown:
            raise ManifestError(f"unknown manifest keys: {sorted(unknown)}")
        try:
            for key in ("vector_shards", "hamming_shards", "id_files", "feature_files", "dead_letter_files"):
                raw[key] = tuple(FileEntry(**e) for e in raw.get(key, ()))
            return cls(**raw).validate()
        except TypeError as e:
            raise ManifestError(f"malformed manifest: {e}") from e
