"""An exclusive lock on a working folder, so that two processes never share its files.

Two nodes on one ``data_root`` would delete each other's epoch files and consume each
other's epochs. :class:`FolderLock` takes an ``flock`` on ``<folder>/<name>`` for as long
as the object lives. The kernel drops the lock when the process ends, also after
``kill -9``, so a stale lock file never blocks a restart. The file contains the
holder's process id and command line, which the error of a second process quotes.

Limits: ``flock`` is advisory and works between processes of one machine. On NFS it
depends on the server. Within one process, a second lock on the same file fails too,
because each lock holds a file descriptor of its own.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

class FolderInUseError(RuntimeError):
    """Another process, or another lock in this process, has locked the folder."""

    def __init__(self, folder: Path, holder: str, label: str = "", advice: str = ""):
        self.folder = folder
        self.holder = holder
        message = f"{label + ' ' if label else ''}{folder} is in use by {holder}"
        super().__init__(f"{message}; {advice}" if advice else message)


class FolderLock:
    """An exclusive lock on the file ``name`` in ``folder``, freed by :meth:`release`."""

    def __init__(self, folder: str | Path, name: str):
        self.path = Path(folder) / name
        self._descriptor: int | None = None
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 4096).decode("utf-8", "replace").strip()
            os.close(descriptor)
            raise FolderInUseError(Path(folder), holder or "another process") from None
        except BaseException:
            os.close(descriptor)
            raise
        command = " ".join(Path(sys.argv[0]).name if i == 0 else arg
                           for i, arg in enumerate(sys.argv))
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"process {os.getpid()} ({command}), started {started}\n".encode())
        self._descriptor = descriptor

    def __del__(self) -> None:
        # A node whose construction failed after taking the lock never calls release().
        self.release()

    def release(self) -> None:
        """Free the lock. The file is kept, so the next process locks the same file."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
