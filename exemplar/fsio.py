"""Durable file writes: one helper for every file Exemplar writes that a crash must not leave half-written.

A file is written to a temporary sibling, flushed and fsynced, renamed over the target (atomic on
POSIX), and the folder fsynced so the rename itself survives a power cut. Readers therefore see
either the old complete file or the new complete file, never a prefix of one. Checkpoints, caches,
exports, summaries and curation outputs all go through these functions.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from exemplar.errors import ExemplarError

# The process umask, read once at import (reading it means setting it, which would race with
# other threads if done per write).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably; returns the path."""
    with _atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | Path, data: Any, *, sort_keys: bool = False, allow_nan: bool = True
) -> Path:
    """JSON (indented, UTF-8, trailing newline) written atomically."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


@contextmanager
def atomic_text_writer(path: str | Path) -> Iterator[IO[str]]:
    """A UTF-8 text file written as a stream, with the guarantees of `atomic_write_bytes`.

    For outputs too large to build in memory first (a converted dataset): the caller writes to
    the yielded file, which is a temporary sibling renamed over `path` when the block ends
    without an exception (and removed when it raises)."""
    with _atomic_file(path, "w", encoding="utf-8", newline="\n") as f:
        yield f


@contextmanager
def _atomic_file(path: str | Path, mode: str, **open_args: Any) -> Iterator[IO[Any]]:
    """The one write path: a temporary sibling, flushed and fsynced, given the ordinary mode,
    renamed over `path`, the folder fsynced; removed instead when the block raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a written file gets the ordinary umask-derived mode instead.
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temp_dir_beside(final: str | Path, tag: str = "tmp") -> Path:
    """A new empty hidden folder next to `final`, with the mode a plain mkdir gives. (mkdtemp makes
    it 0700: a model folder renamed from it would be unreadable by other users and services.)"""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    return tmp


@contextmanager
def disk_full_guard(
    what: str, folder: Path, needed: Callable[[], int], cleanup: Path | None = None, hint: str = ""
) -> Iterator[None]:
    """Run a write; a full disk becomes an ExemplarError naming `what`, the space needed and the
    space free, after `cleanup` (the partial output) is removed. Other errors pass unchanged."""
    try:
        yield
    except BaseException as e:
        full = is_disk_full(e, folder, needed)
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        if full:
            free = shutil.disk_usage(folder).free
            raise ExemplarError(
                f"no space left on device while writing {what}: it needs about {_mib(needed())} and "
                f"{_mib(free)} is free; nothing partial was left behind" + (f". {hint}" if hint else "")
            ) from None
        raise


def is_disk_full(e: BaseException, folder: Path, needed: Callable[[], int]) -> bool:
    """Whether `e`, raised while writing under `folder`, means the disk is full."""
    # safetensors and json report ENOSPC as an OSError with its errno; torch.save's C++ writer
    # raises a RuntimeError with no errno and a message about stream positions
    # ("inline_container.cc ... unexpected pos"), safetensors its own error type. So: the errno
    # where there is one, the words where they are given, else whether the disk has, at the moment
    # of the failure, less room than the output needs.
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit
        return False
    if "no space left on device" in str(e).lower():  # e.g. safetensors' own error type
        return True
    try:
        return shutil.disk_usage(folder).free < needed()
    except OSError:
        return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
