"""File access for local paths and remote URIs (``gs://`` and the rest of Beam's filesystems).

Writes are atomic: locally a temp file in the same directory then ``os.replace``;
on object stores an object only becomes visible when its upload completes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator

from apache_beam.io.filesystems import FileSystems

_CHUNK = 1 << 20


def is_local(path: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def join(root: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_local(root):
        return os.path.join(local_path(root), *parts)
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(uri: str, base_dir: str) -> str:
    """Resolve a relative catalog URI against the catalog's directory; absolute paths and URIs pass through."""
    if "://" in uri or os.path.isabs(uri):
        return uri
    return join(base_dir, uri)


def dirname(path: str) -> str:
    if is_local(path):
        return os.path.dirname(os.path.abspath(local_path(path)))
    return path.rstrip("/").rsplit("/", 1)[0]


def exists(path: str) -> bool:
    return os.path.exists(local_path(path)) if is_local(path) else FileSystems.exists(path)


def read_bytes(path: str) -> bytes:
    """Read a whole file."""
    if is_local(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    with FileSystems.open(path) as f:
        return f.read()


def open_read(path: str):
    """A binary file object for reading."""
    return open(local_path(path), "rb") if is_local(path) else FileSystems.open(path)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one."""
    if is_local(path):
        path = local_path(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    with FileSystems.create(path) as f:
        f.write(data)


def makedirs(path: str) -> None:
    if is_local(path):
        os.makedirs(local_path(path), exist_ok=True)


def sha256_file(path: str) -> tuple[str, int]:
    """Return (hex sha256, size in bytes) of a file, streamed."""
    h, size = hashlib.sha256(), 0
    with open_read(path) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def list_files(pattern: str) -> list[str]:
    """Paths matching a glob, sorted."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def iter_lines(path: str) -> Iterator[bytes]:
    with open_read(path) as f:
        yield from f
