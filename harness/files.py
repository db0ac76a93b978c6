"""Temporary files and folders that end up as results get the permissions of any other new file.

``tempfile.mkstemp`` and ``mkdtemp`` create 0600 files and 0700 folders. Results and caches made from them
(by atomic rename) would then be unreadable by the rest of a group that shares them; these helpers give
them the modes ``open`` and ``mkdir`` would have given under the process umask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def process_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # no other way to read it: set and restore at once
    os.umask(current)
    return current


def file_mode() -> int:
    return 0o666 & ~process_umask()


def folder_mode() -> int:
    return 0o777 & ~process_umask()


def mkstemp_shared(folder: Path, prefix: str, suffix: str) -> tuple[int, str]:
    """``tempfile.mkstemp`` whose file has the umask's mode (0644 under the usual 022), not 0600."""
    descriptor, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(descriptor, file_mode())
    except BaseException:
        os.close(descriptor)
        Path(name).unlink(missing_ok=True)
        raise
    return descriptor, name


def mkdtemp_shared(folder: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` whose folder has the umask's mode (0755 under the usual 022), not 0700."""
    path = Path(tempfile.mkdtemp(dir=folder, prefix=prefix))
    os.chmod(path, folder_mode())
    return path
