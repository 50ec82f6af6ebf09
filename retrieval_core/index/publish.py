"""Publishing a generation: manifest last, then an atomic swap of ``CURRENT``.

Readers only ever follow ``CURRENT`` -> ``indices/<generation>/manifest.json``,
so files of a generation that is still being written are invisible to them.
"""

from __future__ import annotations

from retrieval_core import io as rio
from schemas import Manifest, ManifestError

CURRENT_FILE = "CURRENT"
MANIFEST_FILE = "manifest.json"


def generation_dir(root: str, generation: str) -> str:
    return rio.join(root, "indices", generation)


def publish(root: str, manifest: Manifest) -> str:
    """Write ``manifest.json`` into the generation, then point ``CURRENT`` at it. Returns the manifest path."""
    manifest.validate()
    path = rio.join(generation_dir(root, manifest.generation), MANIFEST_FILE)
    rio.write_bytes_atomic(path, manifest.to_json().encode())
    rio.write_bytes_atomic(rio.join(root, CURRENT_FILE), (manifest.generation + "\n").encode())
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
            bad.append(f"{entry.path}: sha256 {digest[:12]}.. ({size} B), manifest says {entry.sha256[:12]}.. "
                       f"({entry.bytes} B)")
    if bad:
        raise ManifestError(f"generation {manifest.generation} failed verification: " + "; ".join(bad))
