"""Atomic writes: a file is either the old one or the whole new one, never half of either.

Write to a temporary file in the same folder, flush and fsync it, then
`os.replace` it over the target (atomic on POSIX within one filesystem) and
fsync the folder. `atomic_file` is the one place that does it for a file,
`atomic_dir` for a folder; the `atomic_write_*` helpers are built on them.
`cache_root` is the one cache folder.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import PretuneError


def cache_root() -> Path:
    """The one folder pretune caches in (trained tokenizers, the measured peak): $PRETUNE_CACHE,
    read at each call so a test or a user can point it elsewhere, else ~/.cache/pretune."""
    return Path(os.environ.get("PRETUNE_CACHE") or Path.home() / ".cache" / "pretune")


def _write_error(path: Path, e: OSError, where: Path | None = None) -> PretuneError:
    return PretuneError(f"cannot write {path.name}: {e.strerror or e}", str(where or path),
                        "check free space and permissions")


@contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on a clean exit it is flushed, fsynced
    and renamed over `path` (then the folder is fsynced); on an exception it is removed and
    `path` is untouched. A reader sees the old file or the whole new one, never half of one."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes a whole file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    make_dir(path.parent, f"the folder of {path.name}", "check the path and the permissions")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e, path.parent) from e
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_dir(path: str | Path, tmp_name: str | None = None, old_name: str | None = None,
               replace: bool = True, what: str = "the output folder") -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded) and rename it into place on a clean exit:
    an existing `path` is first moved aside (`old_name`) and removed only once the new one is in
    place, so there is no moment without a whole copy; on an exception the temporary folder is
    removed and `path` is untouched. `tmp_name`/`old_name`: fixed names for the two siblings
    (e.g. checkpoints' `.tmp-step-N`, which a crashed writer's successor recognises), else
    unique ones. replace=False: an existing non-empty `path` is an error, an empty one is taken."""
    path = Path(path)
    make_dir(path.parent, what, where=path)
    try:
        if tmp_name is not None:
            tmp = path.parent / tmp_name
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        else:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except OSError as e:
        raise _write_error(path, e, path.parent) from e
    old = path.parent / (old_name or f".{path.name}.old-{os.getpid()}")
    try:
        yield tmp
        for p in tmp.iterdir():  # the files are durable before the folder that names them appears
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        moved = False
        if path.exists():
            if not replace or (path.is_dir() and not any(path.iterdir())):
                path.rmdir()  # an empty folder is taken; a full one: OSError (ENOTEMPTY)
            else:
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                moved = True
        try:
            os.replace(tmp, path)
        except OSError:
            if moved and not path.exists():
                os.replace(old, path)
            raise
        fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


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
