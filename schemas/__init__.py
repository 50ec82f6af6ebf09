"""Table schemas and the index manifest: the single source of truth for every file the project writes."""

from schemas.manifest import FileEntry, Manifest, ManifestError
from schemas.tables import (
    CATALOG_SCHEMA,
    DEAD_LETTER_SCHEMA,
    DEAD_LETTER_STAGES,
    IDS_SCHEMA,
    REQUIRED_CATALOG_COLUMNS,
    SCHEMA_VERSION,
    STRING_MAP,
    check_schema_version,
    feature_schema,
)

__all__ = [
    "CATALOG_SCHEMA",
    "DEAD_LETTER_SCHEMA",
    "DEAD_LETTER_STAGES",
    "IDS_SCHEMA",
    "REQUIRED_CATALOG_COLUMNS",
    "SCHEMA_VERSION",
    "STRING_MAP",
    "FileEntry",
    "Manifest",
    "ManifestError",
    "check_schema_version",
    "feature_schema",
]
