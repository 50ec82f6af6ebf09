"""File access for local paths and remote URIs (``gs://`` and the rest of Beam's filesystems).

Writes are atomic: locally a temp file in the same directory then ``os.replace``;
on object stores an object only becomes visible when its upload completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from apache_beam.io.filesystems import FileSystems

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    """Retries with exponential backoff and jitter for transient remote errors (never for 'not found')."""

    attempts: int = 5
    initial_s: float = 0.2
    max_s: float = 5.0
    timeout_s: float = 30.0


DEFAULT_RETRY = RetryPolicy()


class TransientError(OSError):
    """A remote read that kept failing with errors that are usually temporary (5xx, timeouts, cut-off bodies)."""


_TRANSIENT = (TransientError, TimeoutError, ConnectionError, http.client.IncompleteRead, http.client.RemoteDisconnected)


T = TypeVar("T")


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Call ``fn`` until it succeeds or raises a permanent error; back off between attempts."""
    delay = policy.initial_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except _TRANSIENT as e:
            if attempt == policy.attempts:
                raise TransientError(f"{what}: gave up after {attempt} attempts: {type(e).__name__}: {e}") from e
            log.warning("%s: attempt %d failed (%s: %s); retrying in %.2f s", what, attempt, type(e).__name__, e, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, policy.max_s)
    raise AssertionError("unreachable")


def _read_http_once(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read()
            expected = resp.headers.get("Content-Length")
            if expected is not None and len(data) != int(expected):
                raise http.client.IncompleteRead(data, int(expected) - len(data))
            return data
    except urllib.error.HTTPError as e:
        if e.code in (404, 410):
            raise FileNotFoundError(f"{url}: HTTP {e.code}") from e
        if e.code in (401, 403):
            raise PermissionError(f"{url}: HTTP {e.code}") from e
        if e.code in _RETRYABLE_HTTP:
            raise TransientError(f"{url}: HTTP {e.code}") from e
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, (TimeoutError, ConnectionError)):
            raise TransientError(f"{url}: {e.reason}") from e
        raise


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


def is_http(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def read_bytes(path: str, policy: RetryPolicy | None = None) -> bytes:
    """Read a whole file: local, http(s) and gs:// (timeouts, retries) or any other Beam filesystem URI (retries).

    Raises:
        FileNotFoundError / PermissionError: permanent, never retried.
        TransientError: a remote read that still failed after ``policy.attempts`` tries.
    """
    if is_local(path):
        with open(local_path(path), "rb") as f:
            return f.read()
    policy = policy or DEFAULT_RETRY
    if is_http(path):
        return with_retries(lambda: _read_http_once(path, policy.timeout_s), path, policy)
    if path.startswith("gs://"):
        return with_retries(lambda: _read_gcs_once(path, policy.timeout_s), path, policy)

    def read_remote() -> bytes:
        try:
            with FileSystems.open(path) as f:
                return f.read()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as e:
            if "not found" in str(e).lower() or "404" in str(e):
                raise FileNotFoundError(f"{path}: {e}") from e
            raise TransientError(f"{path}: {e}") from e

    return with_retries(read_remote, path, policy)


def open_read(path: str):
    """A binary file object for reading."""
    return open(local_path(path), "rb") if is_local(path) else FileSystems.open(path)


def _process_umask() -> int:
    """The umask, read without changing it (``os.umask`` sets it, which races with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it the classic way, at import time
    os.umask(mask)
    return mask


_UMASK = _process_umask()
FILE_MODE = 0o666 & ~_UMASK
"""Mode of the files written here: what ``open(path, "w")`` gives under this process's umask."""
DIR_MODE = 0o777 & ~_UMASK


def write_bytes_atomic(path: str, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one.

    Local files get the mode a plain ``open(path, "w")`` would give (``mkstemp`` alone makes them 0600,
    which a serving process running as another user could not read).
    """
    if is_local(path):
        with atomic_local_file(local_path(path), fsync=fsync) as f:
            f.write(data)
        return
    with FileSystems.create(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_local_file(path: str, suffix: str = "", fsync: bool = True) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` complete (fsync, then ``os.replace``) when the block ends.

    It is written under a temporary name beside ``path``, with the mode ``open(path, "w")`` would give;
    an exception in the block removes it and leaves ``path`` as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_parquet(path: str, columns: list[str] | None = None, missing_ok: bool = False):
    """A Parquet file as an Arrow table, from a local path or any remote URI (through our retrying reader).

    ``missing_ok``: columns the file does not have are left out instead of raising (reading files
    written under an older minor schema version).
    """
    import io as _io

    import pyarrow.parquet as pq

    with pq.ParquetFile(local_path(path) if is_local(path) else _io.BytesIO(read_bytes(path))) as source:
        if columns is not None and missing_ok:
            columns = [c for c in columns if c in source.schema_arrow.names]
        return source.read(columns=columns)


class PreconditionFailed(RuntimeError):
    """A conditional write lost a race: the object changed since it was read."""


_gcs_clients = threading.local()


def _gcs_client():
    """One google-cloud-storage client per thread (anonymous against an emulator); creating one per call
    would look up credentials every time."""
    from google.cloud import storage

    key = os.environ.get("STORAGE_EMULATOR_HOST", "")
    cached = getattr(_gcs_clients, "client", None)
    if cached is None or cached[0] != key:
        client = storage.Client.create_anonymous_client() if key else storage.Client()
        _gcs_clients.client = cached = (key, client)
    return cached[1]


def _gcs_bucket_and_name(uri: str):
    """The google-cloud-storage bucket and object name of ``gs://bucket/name``."""
    bucket, _, name = uri[len("gs://") :].partition("/")
    return _gcs_client().bucket(bucket), name


@contextlib.contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Translate google-cloud-storage errors: permanent ones to FileNotFoundError / PermissionError,
    transient ones (5xx, 429, timeouts, refused connections, bodies cut short) to TransientError."""
    import requests
    from google.api_core import exceptions as gexc
    from google.resumable_media import common as media

    try:
        yield
    except gexc.NotFound as e:
        raise FileNotFoundError(f"{uri}: {e.message}") from e
    except (gexc.Forbidden, gexc.Unauthorized) as e:
        raise PermissionError(f"{uri}: {e.message}") from e
    except (gexc.ServerError, gexc.TooManyRequests) as e:
        raise TransientError(f"{uri}: HTTP {e.code} {e.message}") from e
    except (  # timed out, refused, body cut short, bad checksum
        requests.exceptions.Timeout,
        requests.exceptions.ConnectionError,
        requests.exceptions.ChunkedEncodingError,
        media.DataCorruption,
    ) as e:
        raise TransientError(f"{uri}: {type(e).__name__}: {e}") from e


def _read_gcs_once(uri: str, timeout: float) -> bytes:
    """One download with our own timeout (connect and each read); the retrying is ``with_retries``'s."""
    bucket, name = _gcs_bucket_and_name(uri)
    with _gcs_errors(uri):
        return bucket.blob(name).download_as_bytes(timeout=timeout, retry=None)


def _gcs_generation_once(uri: str, timeout: float) -> int:
    """The live generation of an object: one metadata request, no download."""
    bucket, name = _gcs_bucket_and_name(uri)
    with _gcs_errors(uri):
        blob = bucket.get_blob(name, timeout=timeout, retry=None)
    if blob is None:
        raise FileNotFoundError(f"{uri}: no such object")
    return int(blob.generation)


def _read_gcs_stamped_once(uri: str, timeout: float) -> tuple[bytes, str]:
    """The live generation, then a download of exactly that generation: the bytes and the stamp agree even
    when the object is overwritten in between."""
    generation = _gcs_generation_once(uri, timeout)
    bucket, name = _gcs_bucket_and_name(uri)
    with _gcs_errors(uri):
        data = bucket.blob(name, generation=generation).download_as_bytes(timeout=timeout, retry=None)
    return data, f"{uri}#{generation}"


RACY_NS = 2_000_000_000
"""A local file modified less than this long before it was read gets no stamp (see ``read_bytes_stamped``)."""


def _local_stamp(st: os.stat_result) -> str:
    return f"file:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def source_stamp(path: str, policy: RetryPolicy | None = None) -> str | None:
    """What identifies the current version of a file without reading it, or None where nothing does.

    Local files: size, mtime, ctime and inode (``file:...``), from one ``stat``. GCS objects: the object
    versioned URL (``gs://bucket/name#<generation>``; the generation changes on every overwrite, and two
    objects written in the same microsecond may share one), from one metadata request.
    http(s) and other filesystems: None (their images are always re-read and hashed).

    Raises:
        FileNotFoundError / PermissionError / TransientError: as ``read_bytes``.
    """
    if is_local(path):
        return _local_stamp(os.stat(local_path(path)))
    if path.startswith("gs://"):
        policy = policy or DEFAULT_RETRY
        return f"{path}#{with_retries(lambda: _gcs_generation_once(path, policy.timeout_s), path, policy)}"
    return None


def read_bytes_stamped(path: str, policy: RetryPolicy | None = None) -> tuple[bytes, str | None]:
    """``read_bytes``, plus the ``source_stamp`` of exactly the version read, or None when it cannot be trusted.

    A stamp recorded with a content hash lets the next run skip reading a file whose stamp is unchanged,
    as ``git status`` does with its index. Locally the stamp is None (so the next run reads the file again)
    when the file changed while it was read, or when it was modified less than ``RACY_NS`` before the
    read began: a later write within the filesystem's timestamp granularity could leave size and mtime
    as they were ("racy git"). A file modified after a trusted stamp was taken gets a newer mtime or ctime.
    """
    if is_local(path):
        local = local_path(path)
        started = time.time_ns()
        with open(local, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
        stamp = _local_stamp(before)
        if stamp != _local_stamp(os.stat(local)) or started - max(before.st_mtime_ns, before.st_ctime_ns) < RACY_NS:
            stamp = None
        return data, stamp
    if path.startswith("gs://"):
        policy = policy or DEFAULT_RETRY
        return with_retries(lambda: _read_gcs_stamped_once(path, policy.timeout_s), path, policy)
    return read_bytes(path, policy), None


def object_generation(path: str) -> int:
    """GCS generation of an object (0 if absent); for other filesystems 0 (no preconditions there)."""
    if not path.startswith("gs://"):
        return 0
    bucket, name = _gcs_bucket_and_name(path)
    blob = bucket.get_blob(name)
    return int(blob.generation) if blob is not None else 0


def write_bytes_if_generation(path: str, data: bytes, generation: int | None) -> None:
    """Write atomically; on GCS only if the object's generation is still ``generation`` (0: must not exist).

    Raises:
        PreconditionFailed: someone else wrote the object in between.
    """
    if not path.startswith("gs://") or generation is None:
        write_bytes_atomic(path, data)
        return
    from google.api_core import exceptions

    try:
        bucket, name = _gcs_bucket_and_name(path)
        bucket.blob(name).upload_from_string(data, if_generation_match=generation)
    except exceptions.PreconditionFailed as e:
        raise PreconditionFailed(f"{path} changed since generation {generation}: another writer") from e


def sha256_file(path: str) -> tuple[str, int]:
    """Return (hex sha256, size in bytes) of a file, streamed."""
    h, size = hashlib.sha256(), 0
    with open_read(path) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def parquet_rows(path: str) -> int:
    """Number of rows of a Parquet file, from its footer (local or any URI Beam can open)."""
    import pyarrow.parquet as pq

    if is_local(path):
        return pq.read_metadata(local_path(path)).num_rows
    with open_read(path) as f:
        return pq.read_metadata(f).num_rows


def delete_tree(path: str) -> None:
    """Delete a folder (local) or every object under a prefix (URI); nothing there is not an error."""
    if is_local(path):
        shutil.rmtree(local_path(path), ignore_errors=True)
        return
    files = list_files(path.rstrip("/") + "/**")
    if files:
        FileSystems.delete(files)


def list_files(pattern: str) -> list[str]:
    """Paths matching a glob, sorted."""
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)
