"""Files written so that nothing is ever half-written: a temporary file beside the target, then a rename.

``os.replace`` within one directory is atomic, so a reader (or a run killed at any moment) sees either the
old file or the new one, never a part of it. Every writer in sdzoo goes through ``staged_file``. Hand-written:
the standard library has no atomic write, and torch, safetensors and timm write their files in place.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Any, Callable, Iterable, Iterator, List, Union

PathLike = Union[str, os.PathLike]
TEMP_SUFFIX = ".tmp"
# staged_file's temporaries: ".NAME." + mkstemp's random letters, digits and '_' + TEMP_SUFFIX.
_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]+" + re.escape(TEMP_SUFFIX))


@contextlib.contextmanager
def staged_file(path: PathLike) -> Iterator[str]:
    """A temporary file next to ``path`` that replaces it when the block succeeds and is removed otherwise."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"output directory does not exist: {directory!r}")
    fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
    os.close(fd)
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


def remove_stale_temps(folder: PathLike, names: Iterable[str]) -> List[str]:
    """Remove the temporaries that ``staged_file`` left for the files ``names`` of ``folder`` (a writer killed
    mid-write); those of any other file, which another process may be writing now, are left alone. Returns the
    names removed."""
    names, removed = set(names), []
    for entry in os.scandir(folder):
        match = _TEMP_NAME.fullmatch(entry.name)
        if match and match.group("name") in names and entry.is_file(follow_symlinks=False):
            os.remove(entry.path)
            removed.append(entry.name)
    return removed


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)``, then move the finished file onto ``path`` in one step."""
    with staged_file(path) as temp:
        write(temp)


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
