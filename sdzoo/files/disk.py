"""Files written so that nothing is ever half-written: a temporary file beside the target, then a rename.

``os.replace`` within one directory is atomic, so a reader (or a run killed at any moment) sees either the
old file or the new one, never a part of it. Every writer in sdzoo goes through ``staged_file``. Hand-written:
the standard library has no atomic write, and torch, safetensors and timm write their files in place.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import tempfile
from typing import Any, Callable, Iterable, Iterator, List, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def staged_file(path: PathLike) -> Iterator[str]:
    """A temporary file next to ``path`` that replaces it when the block succeeds and is removed otherwise."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"output directory does not exist: {directory!r}")
    fd, temp = _locked_temp(directory, os.path.basename(path))
    try:
        yield temp
        with open(temp, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes files private; give them the usual permissions
        os.replace(temp, path)
    except OSError as e:  # disk full, a file-size limit, ...: name the file meant, not the temporary one
        if e.filename in (None, temp) and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    finally:
        if os.path.exists(temp):
            os.remove(temp)
        os.close(fd)  # releases the lock


def _locked_temp(directory: str, name: str):
    """A new temporary file for ``name`` in ``directory``, locked (flock) for as long as this process holds the
    descriptor: the OS drops the lock when the process ends, however it ends, so a temporary whose lock can be
    taken was abandoned (``remove_abandoned_temporaries``). fcntl, not filelock.FileLock: FileLock locks a
    separate lock file, where this lock must live on the temporary itself, so that the two vanish together."""
    while True:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TEMP_SUFFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # not removed by a cleaner between its creation and the lock
            return fd, temp
        os.close(fd)


def remove_abandoned_temporaries(path: PathLike) -> List[str]:
    """Remove the temporaries of ``path`` that a killed process left (``kill -9`` mid-write), and only those: a
    temporary still being written is locked by its writer and stays. Returns the names removed."""
    removed: List[str] = []
    path = os.fspath(path)
    directory, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    for temp in glob.glob(os.path.join(glob.escape(directory), glob.escape(f".{name}.") + "*" + TEMP_SUFFIX)):
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its writer is alive
            continue
        try:
            if os.path.samestat(os.fstat(fd), os.stat(temp, follow_symlinks=False)):
                os.unlink(temp)
                removed.append(os.path.basename(temp))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def remove_stale_temps(folder: PathLike, names: Iterable[str]) -> List[str]:
    """Remove the abandoned temporaries of the files ``names`` of ``folder`` (a writer killed mid-write); those
    of any other file, and any still locked by a live writer, are left alone. Returns the names removed."""
    return [t for name in names for t in remove_abandoned_temporaries(os.path.join(folder, name))]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)``, then move the finished file onto ``path`` in one step."""
    with staged_file(path) as temp:
        write(temp)


def write_bytes(path: PathLike, data) -> None:
    """``data`` (bytes or a buffer) as the file ``path``, atomically. Written by Python, so a full disk is an
    OSError that names the file."""
    def write(temp: str) -> None:
        with open(temp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def write_text(path: PathLike, text: str) -> None:
    def write(temp: str) -> None:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def save_json(path: PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
