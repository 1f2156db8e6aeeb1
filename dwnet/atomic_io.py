"""Files that are either wholly there or not there at all, even across a kill or a power loss.

Everything a run or a conversion hands to the user (checkpoint markers, exported weights, the
per-epoch CSV, labels.json, skip reports) goes through `atomic_open`: written under a temporary
name, fsynced, renamed over the final name, and the directory fsynced so the rename itself is
durable. A reader never sees half a file, and a crash leaves the previous version in place.
"""
from __future__ import annotations

import contextlib
import os
from typing import IO
from collections.abc import Iterator


def fsync_path(path: str) -> None:
    """fsync of a file, or of a directory (its list of entries, e.g. after a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str) -> None:
    """Flushes every file under `path`, and the directories themselves, to stable storage."""
    for folder, _, files in os.walk(path):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)


def install(tmp: str, final: str) -> None:
    """Makes a finished, not yet synced temporary file visible as `final`, durably."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(os.path.dirname(os.path.abspath(final)))


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """`with atomic_open(path) as fh:` writes `path` all at once when the block ends without an
    error; on an error the temporary file is removed and `path` is left as it was."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open writes whole files; mode={mode!r} must start with 'w'")
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
        install(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
