"""What keeps a run's output folder its own, and lets a scheduler or Ctrl-C stop it without loss.

- `output_dir_lock`: one run per output folder. A second run on the same folder refuses at once
  with a message naming the holder, instead of interleaving checkpoints and metrics. The lock is
  an `flock` on a file in the folder: the kernel drops it when the holding process dies, however
  it dies, so a killed run never leaves it stuck.
- `StopRequests`: SIGINT (Ctrl-C) and SIGTERM (how Slurm, Kubernetes and torchrun preempt jobs)
  ask the loop to stop after the current step; the loop writes a checkpoint and raises
  `TrainingInterrupted`, which says how to resume. A second signal stops at once
  (KeyboardInterrupt): the newest complete checkpoint stays valid, since checkpoints are
  published atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exemplar.errors import ExemplarError

LOCK_NAME = ".exemplar.lock"

# Held locks of this process, by folder: a run may take the lock at several levels (the whole
# job, then the training loop). flock locks belong to an open file, so a second open in the same
# process would block on the first: the count makes the lock re-entrant instead.
_held: dict[Path, tuple[int, int]] = {}
_held_guard = threading.Lock()


class OutputDirBusy(ExemplarError):
    pass


class TrainingInterrupted(ExemplarError):
    """Training stopped on a signal after writing a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def output_dir_lock(output_dir: str | Path) -> Iterator[None]:
    """Hold the output folder for this run; raise OutputDirBusy when another process holds it."""
    folder = Path(output_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with _held_guard:
        if folder in _held:
            fd, count = _held[folder]
            _held[folder] = (fd, count + 1)
        else:
            _held[folder] = (_acquire(folder), 1)
    try:
        yield
    finally:
        with _held_guard:
            fd, count = _held[folder]
            if count > 1:
                _held[folder] = (fd, count - 1)
            else:
                del _held[folder]
                os.close(fd)  # closing the file releases the flock


def _acquire(folder: Path) -> int:
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputDirBusy(
            f"{folder} is in use by another run ({holder}); wait for it to finish, or choose "
            "another output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}\n".encode(), 0)
    return fd


class StopRequests:
    """Within the `with` block, SIGINT and SIGTERM set `signum` instead of stopping the process;
    a second one raises KeyboardInterrupt at once. Outside the main thread (where Python cannot
    install handlers) it does nothing and signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second request: stop now
            raise KeyboardInterrupt
        self.signum = signum
