"""Write files so that nothing half-written is ever left on disk: temp file, fsync, rename."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path, data: bytes, sync_dir: bool = True) -> Path:
    """Write `data` to `path` atomically (same-directory temp file, fsync, os.replace, fsync dir).

    sync_dir=False leaves the directory fsync to the caller (bulk writers sync each directory once)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return write_atomic(path, write, sync_dir)


def write_atomic(path, write, sync_dir: bool = True) -> Path:
    """`write(temp_path)` writes the file's content (e.g. a library's own file writer, with no in-memory copy);
    then fsync, os.replace onto `path`, fsync dir. Nothing half-written is left if `write` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return path


def write_text_atomic(path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def fsync_dir(directory) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
