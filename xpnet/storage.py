"""Files that are either written whole or not at all, and folders proved writable up front.

Model files, checkpoints, plots and histories are written through ``atomic_write``,
so a crash or a full disk never leaves a half-written file under the final name,
and ``check_writable`` lets a run fail at its start rather than after an hour of
training.  Failures are one ``StorageError`` sentence.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path

from .errors import StorageError

_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def describe_oserror(exc: OSError) -> str:
    """The cause of an OSError in a few words (full disk, permission denied, ...)."""
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (or a read-only file system)"
    return exc.strerror or str(exc)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); harmless where folders cannot be opened (Windows)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(folder: Path, name: str):
    """A new hidden file ``.<name>.<pid>.<random>.tmp`` in ``folder`` (mode 0666 less the umask)."""
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    return os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)


def atomic_write(path, write, what: str = "file") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary temporary file in the same folder.

    The temporary name starts with '.' and ends with '.tmp', so it never matches
    ``*.npz`` and is never taken for a finished file.  On OSError the temporary
    file is removed, ``path`` keeps its previous content, and StorageError is raised.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        if not folder.is_dir():
            raise StorageError(f"cannot write {what} {path}: the folder {folder} does not exist.")
        fd, tmp_name = _create_temp(folder, path.name)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(folder)
    except OSError as exc:
        if isinstance(exc, StorageError):
            raise
        kept = f"the previous {path.name} is intact" if path.exists() else f"nothing was written as {path.name}"
        raise StorageError(
            f"could not write {what} {path}: {describe_oserror(exc)}; {kept} "
            "-- free some space or choose another output folder."
        ) from exc
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return path


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never guess, keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else, or cannot tell: keep the file
        return True
    return True


def remove_stale_temp_files(folder) -> list[Path]:
    """Delete the temporary files of ``atomic_write`` left in ``folder`` by writers that were killed.

    A file ``.<name>.<pid>.<random>.tmp`` is removed only when process ``pid`` no longer exists on
    this machine (a live writer's file is kept).  Returns the paths removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_RE.match(p.name)
        if m is None or int(m.group("pid")) == os.getpid() or _process_alive(int(m.group("pid"))):
            continue
        try:
            if p.is_file():
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


def check_writable(folder, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it is writable (write, fsync, delete a probe file).

    Raises StorageError at once, so a run does not fail after an hour of training.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = _create_temp(folder, "xpnet-write-test")
        try:
            os.write(fd, b"xpnet")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise StorageError(
            f"the {what} {folder} cannot be written: {describe_oserror(exc)} -- choose another folder."
        ) from exc
    return folder


__all__ = ["atomic_write", "check_writable", "remove_stale_temp_files", "describe_oserror"]
