"""Resumable, verified downloads of large files (datasets, model checkpoints).

Model checkpoints and dataset archives are hundreds of megabytes to gigabytes, so an interrupted
download is resumed from its ``.part`` file with an HTTP Range request instead of started again. A file
only appears under its final name once it is complete and matches the expected size and hashes, so a
file that exists can be trusted. Network failures are reported at once (no retries) with a hint, given
by the caller, that says how to obtain the file by hand on a machine without network.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Protocol

from tqdm import tqdm

from backbones.errors import HarnessError

CHUNK_BYTES = 1 << 20
USER_AGENT = "diffvos-harness/0.1 (+urllib)"

_OFFLINE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ENETUNREACH,
    errno.ENETDOWN,
    errno.EHOSTUNREACH,
    errno.EHOSTDOWN,
    errno.ETIMEDOUT,
}


def is_offline_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the server could not be reached.

    DNS failures, refused or reset connections, unreachable networks and timeouts count; an HTTP error
    status does not (the server answered), nor does anything else.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, urllib.error.HTTPError):
            return False
        if isinstance(current, urllib.error.URLError):
            reason = current.reason
            if isinstance(reason, BaseException):
                current = reason
                continue
            return False  # a text reason ("unknown url type", "no host given") is a bad URL, not a network
        if isinstance(current, (socket.gaierror, socket.herror, TimeoutError, ConnectionError)):
            return True
        if isinstance(current, OSError) and current.errno in _OFFLINE_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class _Expected:
    """What the finished file must match; each check is skipped when its value is None."""

    size: int | None
    sha256: str | None
    md5: str | None

    def new_hashers(self) -> dict[str, _Hasher]:
        hashers: dict[str, _Hasher] = {}
        if self.sha256:
            hashers["sha256"] = hashlib.sha256()
        if self.md5:
            hashers["md5"] = hashlib.md5(usedforsecurity=False)
        return hashers

    def mismatch(self, path: Path, hashers: dict[str, _Hasher]) -> str | None:
        """How ``path`` (whose bytes went through ``hashers``) differs, or None when it matches."""
        actual_size = path.stat().st_size
        if self.size is not None and actual_size != self.size:
            return f"size {actual_size} bytes, expected {self.size}"
        for name, wanted in (("sha256", self.sha256), ("md5", self.md5)):
            if wanted and hashers[name].hexdigest() != wanted.lower():
                return f"{name} {hashers[name].hexdigest()}, expected {wanted.lower()}"
        return None

    def verify(self, path: Path) -> bool:
        if self.size is not None and path.stat().st_size != self.size:
            return False  # cheap check first: no need to hash a file of the wrong size
        hashers = self.new_hashers()
        if hashers:
            with path.open("rb") as stream:
                _hash_stream(stream, hashers)
        return self.mismatch(path, hashers) is None


def _hash_stream(stream: BinaryIO, hashers: dict[str, _Hasher]) -> None:
    while chunk := stream.read(CHUNK_BYTES):
        for hasher in hashers.values():
            hasher.update(chunk)


def _with_hint(message: str, offline_hint: str) -> str:
    return f"{message}\n{offline_hint}" if offline_hint else message


def _network_error(url: str, error: BaseException, offline_hint: str) -> HarnessError:
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return HarnessError(_with_hint(f"cannot download {url}: {reason or type(error).__name__}", offline_hint))


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _resume_start(status: int | None, headers: Message) -> tuple[int, int | None]:
    """(first byte the response carries, total size if known) for a 200 or 206 answer."""
    if status == 206:
        match = _CONTENT_RANGE.fullmatch((headers.get("Content-Range") or "").strip())
        if match is None:
            return -1, None  # a partial answer we cannot place: start over
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    length = headers.get("Content-Length")
    return 0, int(length) if length and length.isdigit() else None


def download_file(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    offline_hint: str = "",
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present, and verify size and hashes.

    Returns at once if ``dest`` already exists and verifies. Raises HarnessError on network failures
    (message with the URL and ``offline_hint``; the part file is kept for a later resume), on HTTP
    errors, and on size/hash mismatches (the part file is deleted: its bytes are wrong).
    """
    dest = Path(dest).expanduser()
    expected = _Expected(size=size, sha256=sha256, md5=md5)
    if dest.is_file() and expected.verify(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    if part.is_file() and size is not None and part.stat().st_size > size:
        part.unlink()  # longer than the whole file: not a prefix of it

    # Two attempts at most: a resume, then a full download if the resume cannot be used.
    for attempt in range(2):
        offset = part.stat().st_size if part.is_file() and attempt == 0 else 0
        if offset and offset == size:
            return _finish_complete_part(url, part, dest, expected)
        try:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            if offset:
                request.add_header("Range", f"bytes={offset}-")
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            error.close()
            if error.code == 416 and offset:
                part.unlink()  # the server cannot serve from there: the part file is not a prefix
                continue
            message = f"cannot download {url}: HTTP {error.code} {error.reason}"
            raise HarnessError(_with_hint(message, offline_hint)) from error
        except (urllib.error.URLError, HTTPException, OSError) as error:
            raise _network_error(url, error, offline_hint) from error
        except ValueError as error:  # urllib's answer to a malformed URL
            raise HarnessError(f"cannot download {url!r}: {error}") from error
        with response:
            start, total = _resume_start(response.status, response.headers)
            if start not in (0, offset):
                part.unlink(missing_ok=True)  # an answer for a range we did not ask for
                continue
            if start == 0:
                offset = 0  # the server ignored Range and sent the whole file
            hashers = _stream_to_part(response, part, offset, total, expected, progress, url, offline_hint)
        problem = expected.mismatch(part, hashers)
        if problem is not None:
            part.unlink(missing_ok=True)
            raise HarnessError(f"download of {url} is corrupt ({problem}); deleted {part}, try again")
        os.replace(part, dest)
        return dest
    raise HarnessError(
        _with_hint(f"cannot download {url}: the server's answers to a resume are unusable", offline_hint)
    )


def _finish_complete_part(url: str, part: Path, dest: Path, expected: _Expected) -> Path:
    """A part file that already has the full size (interrupted just before the rename)."""
    if expected.verify(part):
        os.replace(part, dest)
        return dest
    part.unlink()
    raise HarnessError(f"download of {url} is corrupt (hash mismatch); deleted {part}, try again")


def _stream_to_part(
    response: BinaryIO,
    part: Path,
    offset: int,
    total: int | None,
    expected: _Expected,
    progress: bool,
    url: str,
    offline_hint: str,
) -> dict[str, _Hasher]:
    """Write the response body into ``part`` from ``offset``; return the hashers fed the whole file."""
    hashers = expected.new_hashers()
    with open(part, "r+b" if offset else "wb") as stream:
        if offset:
            if hashers:
                _hash_stream(stream, hashers)
            stream.seek(offset)
            stream.truncate()
        bar = tqdm(
            total=total if total is not None else expected.size,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            leave=False,
        )
        received = offset
        with bar:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, HTTPException) as error:
                    raise _network_error(url, error, offline_hint) from error
                if not chunk:
                    break
                stream.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received < total:
        # The connection ended early: keep the prefix, a second call resumes it.
        message = f"download of {url} stopped after {received} of {total} bytes; run again to resume"
        raise HarnessError(_with_hint(message, offline_hint))
    return hashers
