"""Source stamps: what lets an incremental run trust a stored content hash without reading the image."""

from __future__ import annotations

import os
import time

from retrieval_core import io as rio


def test_a_file_modified_just_before_it_was_read_gets_no_stamp(tmp_path, monkeypatch):
    path = str(tmp_path / "a.jpg")
    with open(path, "wb") as f:
        f.write(b"abc")
    data, stamp = rio.read_bytes_stamped(path)
    assert data == b"abc" and stamp is None  # racy: a write in the same timestamp tick would go unseen
    real = time.time_ns
    monkeypatch.setattr(rio.time, "time_ns", lambda: real() + rio.RACY_NS + 1)  # read 2 s after the write
    data, stamp = rio.read_bytes_stamped(path)
    assert data == b"abc" and stamp == rio.source_stamp(path) and stamp.startswith("file:3:")


def test_every_kind_of_edit_changes_the_stamp(tmp_path):
    path = str(tmp_path / "a.jpg")
    with open(path, "wb") as f:
        f.write(b"abc")
    seen = {rio.source_stamp(path)}
    st = os.stat(path)
    time.sleep(0.05)  # past the filesystem's timestamp tick (racy otherwise, which stamps are guarded against)
    with open(path, "r+b") as f:  # same size, mtime set back: ctime moves
        f.write(b"xyz")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    seen.add(rio.source_stamp(path))
    replacement = str(tmp_path / "b.jpg")  # replaced atomically by a file of the same size and times: new inode
    with open(replacement, "wb") as f:
        f.write(b"qrs")
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(replacement, path)
    seen.add(rio.source_stamp(path))
    assert len(seen) == 3


def test_no_stamp_where_nothing_identifies_a_version(tmp_path):
    assert rio.source_stamp("http://127.0.0.1:1/a.jpg") is None
