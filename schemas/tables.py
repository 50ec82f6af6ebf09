"""Arrow schemas of every table the project reads or writes.

Writers build their tables from these schemas and readers check files against
them, so a column cannot drift between the pipeline, the searcher and the docs.
The schema version is stored in each Parquet file's key-value metadata under
``schema_version``; a reader refuses a file whose major version differs.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.2.0"
"""Semantic version of the table schemas and the manifest. Bump the major part on breaking changes.

1.1.0: ``source_stamp`` (nullable) added at the end of the feature table; 1.0.0 files read as null stamps.
1.2.0: the manifest gains ``index_selection`` (memory budget and estimated index size); tables unchanged.
"""

METADATA_VERSION_KEY = b"schema_version"
METADATA_TABLE_KEY = b"table"

# Catalog input: two required columns; every other column is kept as a string in
# the feature table's ``catalog`` map, so analysts can join on their own keys.
REQUIRED_CATALOG_COLUMNS = ("item_id", "image_uri")

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
    ],
    metadata={METADATA_TABLE_KEY: b"catalog", METADATA_VERSION_KEY: SCHEMA_VERSION.encode()},
)

STRING_MAP = pa.map_(pa.string(), pa.string())


def feature_schema(embedding_dim: int, hash_bits: int) -> pa.Schema:
    """Schema of the feature table: one row per (item_id, model_id) per run.

    Args:
        embedding_dim: length of the float32 embedding.
        hash_bits: number of bits of the binary code; a multiple of 8.

    Returns:
        The Arrow schema, with ``schema_version``, ``embedding_dim`` and ``hash_bits``
        in its metadata.
    """
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if hash_bits <= 0 or hash_bits % 8:
        raise ValueError(f"hash_bits must be a positive multiple of 8, got {hash_bits}")
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("image_uri", pa.string(), nullable=False),
            pa.field("content_sha256", pa.string(), nullable=False),
            pa.field("model_id", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float32(), embedding_dim), nullable=False),
            pa.field("hash_code", pa.binary(hash_bits // 8), nullable=False),
            pa.field("category", pa.string()),
            pa.field("category_score", pa.float32()),
            pa.field("attributes", STRING_MAP),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("catalog", STRING_MAP),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("indexed_at", pa.timestamp("us", tz="UTC"), nullable=False),
            # Size/mtime/ctime/inode or GCS generation of the image version hashed (retrieval_core.io.source_stamp);
            # null when it could not be trusted. The next run skips reading an image whose stamp is unchanged.
            pa.field("source_stamp", pa.string()),
        ],
        metadata={
            METADATA_TABLE_KEY: b"features",
            METADATA_VERSION_KEY: SCHEMA_VERSION.encode(),
            b"embedding_dim": str(embedding_dim).encode(),
            b"hash_bits": str(hash_bits).encode(),
        },
    )


DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("error_message", pa.string(), nullable=False),
        pa.field("row_json", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={METADATA_TABLE_KEY: b"dead_letter", METADATA_VERSION_KEY: SCHEMA_VERSION.encode()},
)
"""What failed, where and why. ``stage`` is one of ``DEAD_LETTER_STAGES``."""

DEAD_LETTER_STAGES = ("read_catalog", "read", "decode", "inference")

IDS_SCHEMA = pa.schema(
    [
        pa.field("faiss_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
    ],
    metadata={METADATA_TABLE_KEY: b"ids", METADATA_VERSION_KEY: SCHEMA_VERSION.encode()},
)
"""One file per index shard: the row order of the shard, mapping faiss ids to item ids."""


def check_schema_version(metadata: dict[bytes, bytes] | None, *, what: str) -> str:
    """Return the schema version in ``metadata``; raise if absent or of another major version."""
    version = (metadata or {}).get(METADATA_VERSION_KEY)
    if version is None:
        raise ValueError(f"{what}: no {METADATA_VERSION_KEY.decode()} in the Parquet metadata")
    found = version.decode()
    if found.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ValueError(f"{what}: schema version {found} is incompatible with {SCHEMA_VERSION}")
    return found
