"""Files the commands write for a user to keep: whole or not at all, with the mode any new file gets.

A file is written under a temporary name beside its destination and renamed over it, so a reader
(or a crash) never meets half of one. Python's temporary files, and safetensors' own writer, are
created with mode 0600, which a rename keeps: a shared artifact or CSV would be readable by its
writer alone. :func:`replacing` gives the file the mode ``open()`` would have (0666 less the umask,
0644 usually) before the rename. A place that cannot be written (a read-only folder, a path under a
regular file) is a one-line :class:`~lthmaml.errors.DataError` naming it. Standard library only.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from lthmaml.errors import DataError


def umask() -> int:
    """The process umask (Linux reports it in /proc without changing it; elsewhere it is set and
    restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def give_default_mode(path: Path) -> None:
    """``path`` gets the mode ``open()`` (a file) or ``mkdir`` (a folder) would have given it."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask())


def write_blocker(folder: Path, error: Optional[OSError] = None) -> Optional[str]:
    """Why nothing can be written into ``folder`` (made first where missing): the nearest place at or
    above it that exists is a file, not a folder, or is a folder this process may not write; None
    if nothing stands in the way. Given the ``error`` a write met, that error, not an access check
    (which root passes anywhere), says whether writing was refused.

    The commands ask it before any work (an option naming a place that cannot be written) and
    :func:`cannot_write` after a write failed, so both give the same reason."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if error is None:
        denied = not os.access(existing, os.W_OK | os.X_OK)
    else:
        denied = error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if not denied:
        return None
    detail = f" ({error.strerror})" if error is not None and error.strerror else ""
    return f"{existing} is not writable{detail}"


def cannot_write(path: Path, error: OSError, what: str) -> DataError:
    """The one-line error for ``what`` (``the artifact``) that could not be written at ``path``."""
    reason = write_blocker(Path(path).parent, error) or error.strerror or str(error)
    return DataError(f"cannot write {what} to {path}: {reason}; choose a writable location")


@contextmanager
def replacing(path: Path, what: str) -> Iterator[Path]:
    """A temporary path beside ``path`` to write ``what`` into; when the block ends it gets the
    default mode and is renamed over ``path`` (its folder is made first). On any failure it is
    removed; an ``OSError`` becomes :func:`cannot_write`'s error."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        give_default_mode(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        raise cannot_write(path, error, what) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def read_bytes(path: Path) -> bytes:
    """The file's bytes, or a one-line DataError naming it (permissions, a folder, a vanished file)."""
    try:
        return Path(path).read_bytes()
    except OSError as error:
        reason = error.strerror or error
        raise DataError(f"{path}: cannot read it ({reason}); check its permissions") from None
