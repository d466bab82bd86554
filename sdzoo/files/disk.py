"""Atomic writes: a temporary file beside the target, then ``os.replace``, so a reader (or a run killed at any
moment) sees the old file or the new one. The standard library has none, and torch, safetensors and timm write
in place."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
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
    # Locked (flock, on the temporary itself) while this process lives: one whose lock can be taken was
    # abandoned (remove_abandoned_temporaries). A cleaner may unlink it between mkstemp and flock: then retry.
    while True:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            break
        os.close(fd)
    try:
        yield temp
        with open(temp, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes files private; give them the usual permissions
        os.replace(temp, path)
    except OSError as e:  # disk full, a file-size limit, ...: name the file meant, not the temporary one
        if e.filename in (None, temp) and e.errno is not None:
            raise OSError(e.errno, e.strerror or str(e), path) from e
        raise
    finally:
        if os.path.exists(temp):
            os.remove(temp)
        os.close(fd)  # releases the lock


def is_new_or_empty_folder(path: PathLike) -> bool:
    """Whether ``staged_folder(path)`` may put its folder there: nothing, or an empty folder, is in the way."""
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


@contextlib.contextmanager
def staged_folder(path: PathLike) -> Iterator[str]:
    """A temporary folder next to ``path`` that becomes ``path`` when the block succeeds (onto nothing or an
    empty folder, never onto another's files) and is removed otherwise."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX, dir=parent)
    try:
        yield staging
        if os.path.isdir(path):
            os.rmdir(path)  # an empty folder only: OSError if another process has filled it
        os.rename(staging, path)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise FileExistsError(
            f"{path} was filled by another process while this one prepared its files; nothing of this one was "
            "written there (its files are left as the other process wrote them): choose a new folder") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place


def remove_abandoned_temporaries(path: PathLike) -> List[str]:
    """Remove the temporaries of ``path`` that a killed process left, and only those: one still being written
    is locked by its writer and stays. Returns the names removed."""
    removed: List[str] = []
    path = os.path.abspath(path)
    pattern = glob.escape(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.")) + "*" + TEMP_SUFFIX
    for temp in glob.glob(pattern):
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while its writer is alive
            if os.path.samestat(os.fstat(fd), os.stat(temp, follow_symlinks=False)):
                os.unlink(temp)
                removed.append(os.path.basename(temp))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def remove_stale_temps(folder: PathLike, names: Iterable[str]) -> List[str]:
    """``remove_abandoned_temporaries`` for each of the files ``names`` of ``folder``."""
    return [t for name in names for t in remove_abandoned_temporaries(os.path.join(folder, name))]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)``, then move the finished file onto ``path`` in one step."""
    with staged_file(path) as temp:
        write(temp)


def write_bytes(path: PathLike, data) -> None:
    """``data`` (bytes or a buffer) as the file ``path``, atomically. Written by Python, so a full disk is an
    OSError that names the file."""
    with staged_file(path) as temp, open(temp, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def save_json(path: PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
