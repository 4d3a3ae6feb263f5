"""Atomic writes: a file is either the old one or the whole new one, never half of either.

Write to a temporary file in the same folder, flush and fsync it, then
`os.replace` it over the target (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import PretuneError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    make_dir(path.parent, f"the folder of {path.name}", "check the path and the permissions")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PretuneError(f"cannot write {path.name}: {e.strerror}", str(path.parent),
                           "check free space and permissions") from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PretuneError(f"cannot write {path.name}: {e.strerror}", str(path),
                           "check free space and permissions") from e


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # missing, or not even a valid name (too long): nothing there
        return None


def _blocker(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` (or `path` itself) that is not a folder."""
    for p in (path, *path.parents):
        st = _stat(p)
        if st is not None:
            return None if stat.S_ISDIR(st.st_mode) else p
    return None


OUT_FIX = "choose another --out (a folder you can write)"


def _cannot_create(path: Path, what: str, reason: str, fix: str = OUT_FIX) -> PretuneError:
    return PretuneError(f"cannot create {what}: {reason}", str(path), fix)


def check_creatable(path: str | Path, what: str = "the output", folder: bool = True) -> None:
    """Refuse now, before any work, an output that could not be created later: a path under
    an existing file (or a file itself, for a folder output), or under a folder this process
    may not write. Creates nothing."""
    path = Path(path)
    first = (path if folder else path.parent).absolute()  # the folder that will be made or written in
    block = _blocker(first)
    if block is not None:
        raise _cannot_create(path, what, f"{block} is a file, not a folder")
    anc = next(p for p in (first, *first.parents) if _stat(p) is not None)
    if not os.access(anc, os.W_OK | os.X_OK):
        raise _cannot_create(path, what, f"{anc} is not writable")


def make_dir(path: str | Path, what: str = "the output folder", fix: str = OUT_FIX,
             where: str | Path | None = None) -> Path:
    """mkdir -p, with an OS failure (a file in the way, no permission, a read-only or full
    disk) turned into one line of bad input instead of a traceback. `where`: the path the
    message names (default `path`; e.g. the output a temporary sibling is made for)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        block = _blocker(path)
        reason = f"{block} is a file, not a folder" if block is not None else e.strerror or str(e)
        raise _cannot_create(Path(where or path), what, reason, fix) from e
    return path
