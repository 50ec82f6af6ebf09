"""The life cycle of an output root: one writer at a time, and retention of old generations.

``OutputLock`` makes a second run on the same output stop at once with a clear
message instead of interleaving with the first. ``prune`` keeps the newest
generations (always including the one ``CURRENT`` names) and deletes the rest,
together with their feature and dead-letter runs and the leftovers of crashed
runs; it only runs while the lock is held, so nothing it deletes is being written.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import socket

from apache_beam.io.filesystems import FileSystems

from retrieval_core import io as rio
from retrieval_core.index.publish import MANIFEST_FILE, read_current

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"


class LockedError(RuntimeError):
    """Another run holds the output root."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class OutputLock:
    """An exclusive lock on an output root, held for the whole run.

    Locally the lock file is created with ``O_CREAT | O_EXCL`` (atomic). A lock
    left by a process that no longer runs on this host is stale and taken over.
    On GCS the lock is an object created with ``if_generation_match=0``, which
    the server makes atomic; on other remote filesystems it is exists-then-create.
    """

    def __init__(self, root: str, run_id: str) -> None:
        self.root, self.run_id = root, run_id
        self.path = rio.join(root, LOCK_FILE)
        self.held = False

    def _owner(self) -> dict:
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def acquire(self) -> OutputLock:
        body = json.dumps(self._owner()).encode()
        if rio.is_local(self.root):
            path = rio.local_path(self.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            for _ in range(2):
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    if not self._remove_if_stale(path):
                        raise LockedError(self._held_message()) from None
                    continue
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                self.held = True
                return self
            raise LockedError(self._held_message())
        if not self.path.startswith("gs://") and rio.exists(self.path):
            raise LockedError(self._held_message())
        try:  # on GCS: create only if absent (generation 0), atomically on the server
            rio.write_bytes_if_generation(self.path, body, 0)
        except rio.PreconditionFailed:
            raise LockedError(self._held_message()) from None
        self.held = True
        return self

    def _read_owner(self) -> dict:
        try:
            return json.loads(rio.read_bytes(self.path))
        except (OSError, ValueError):
            return {}

    def _remove_if_stale(self, path: str) -> bool:
        owner = self._read_owner()
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            if not _pid_alive(owner["pid"]):
                log.warning("removing stale lock of run %s (pid %s is gone)", owner.get("run_id"), owner["pid"])
                os.unlink(path)
                return True
        return False

    def _held_message(self) -> str:
        owner = self._read_owner()
        return (
            f"another run is writing to {self.root}: {self.path} is held by run {owner.get('run_id', '?')} "
            f"(host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, since {owner.get('started_at', '?')}). "
            f"Wait for it to finish; if it died on another host, delete {self.path} and re-run."
        )

    def release(self) -> None:
        if self.held:
            if rio.is_local(self.root):
                os.unlink(rio.local_path(self.path))
            else:
                FileSystems.delete([self.path])
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _children(path: str) -> list[str]:
    """Names of the sub-folders of ``path`` (local) or of the first path level below it (URI)."""
    if rio.is_local(path):
        local = rio.local_path(path)
        if not os.path.isdir(local):
            return []
        return sorted(d for d in os.listdir(local) if os.path.isdir(os.path.join(local, d)))
    prefix = path.rstrip("/") + "/"
    return sorted({p[len(prefix) :].split("/", 1)[0] for p in rio.list_files(prefix + "**") if "/" in p[len(prefix) :]})


def prune(root: str, keep: int, *, current_run: str | None = None) -> list[str]:
    """Keep the ``keep`` newest generations (and the published one); delete the others and their tables.

    Generation folders without a manifest (a crashed run's leftovers) are deleted too, except the
    folder of ``current_run``. Feature and dead-letter run folders go with their generation.

    Returns:
        The names of the deleted generations / runs.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    try:
        published = read_current(root)
    except FileNotFoundError:
        published = None
    indices = rio.join(root, "indices")
    finished = []
    for name in _children(indices):
        manifest = rio.join(indices, name, MANIFEST_FILE)
        if rio.exists(manifest):
            finished.append((json.loads(rio.read_bytes(manifest)).get("created_at", ""), name))
    kept = {name for _, name in sorted(finished, reverse=True)[:keep]} | {published, current_run} - {None}
    deleted = []
    for table in ("indices", "features", "dead_letter"):
        for child in _children(rio.join(root, table)):
            name = child[len("run=") :] if child.startswith("run=") else child
            if name not in kept:
                rio.delete_tree(rio.join(root, table, child))
                deleted.append(f"{table}/{child}")
    if deleted:
        log.info("pruned %s", ", ".join(deleted))
    return deleted
