"""Resumable downloads and the DAVIS-2017 installer, against a local HTTP server with Range support."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
import time
import urllib.error
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from backbones.download import download_file, is_offline_error
from harness.data import open_dataset
from harness.data.download import DAVIS_ARCHIVES, download_davis2017
from harness.errors import ConfigError, DataError, HarnessError

BLOB = np.random.default_rng(7).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()


@dataclass
class FileServer:
    """What the test server serves, how it misbehaves, and which requests it saw."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    truncate_after: int | None = None  # send this many body bytes, then hang up
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler_for(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass  # keep test output clean

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            state.requests.append((self.path, range_header))
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404, "not here")
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and not state.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if state.truncate_after is not None:
                body = body[: state.truncate_after]
                self.close_connection = True
            self.wfile.write(body)

    return Handler


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    """A proxy set in the environment must not intercept requests to the local test server."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # A short poll interval makes shutdown() quick; the default 0.5 s would add up over the tests.
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------------------- download_file


def test_full_download_verified(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = BLOB
    dest = tmp_path / "sub" / "blob.bin"
    result = download_file(
        f"{server.url}/blob.bin",
        dest,
        size=len(BLOB),
        sha256=hashlib.sha256(BLOB).hexdigest(),
        md5=hashlib.md5(BLOB).hexdigest(),
        progress=False,
    )
    assert result == dest
    assert dest.read_bytes() == BLOB
    assert _files_under(tmp_path) == ["sub", "sub/blob.bin"]  # no .part left
    assert server.requests == [("/blob.bin", None)]


def test_existing_verified_file_needs_no_request(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(BLOB)
    download_file(f"{server.url}/blob.bin", dest, sha256=hashlib.sha256(BLOB).hexdigest(), progress=False)
    assert server.requests == []


def test_existing_file_that_fails_verification_is_replaced(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = BLOB
    dest = tmp_path / "blob.bin"
    dest.write_bytes(BLOB[:-1] + b"x")
    download_file(f"{server.url}/blob.bin", dest, sha256=hashlib.sha256(BLOB).hexdigest(), progress=False)
    assert dest.read_bytes() == BLOB


def test_resume_uses_a_range_request(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = BLOB
    dest = tmp_path / "blob.bin"
    prefix = 123_457
    (tmp_path / "blob.bin.part").write_bytes(BLOB[:prefix])
    download_file(f"{server.url}/blob.bin", dest, sha256=hashlib.sha256(BLOB).hexdigest(), progress=False)
    assert server.requests == [("/blob.bin", f"bytes={prefix}-")]
    assert dest.read_bytes() == BLOB
    assert not (tmp_path / "blob.bin.part").exists()


def test_server_ignoring_range_gives_a_full_download(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = BLOB
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(b"\0" * 5000)  # a wrong prefix: must not survive
    download_file(f"{server.url}/blob.bin", dest, size=len(BLOB), progress=False)
    assert server.requests == [("/blob.bin", "bytes=5000-")]
    assert dest.read_bytes() == BLOB


def test_interrupted_transfer_keeps_the_part_and_resumes(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = BLOB
    server.truncate_after = 100_000
    dest = tmp_path / "blob.bin"
    part = tmp_path / "blob.bin.part"
    with pytest.raises(HarnessError, match="resume"):
        download_file(f"{server.url}/blob.bin", dest, progress=False, offline_hint="HINT")
    assert not dest.exists()
    assert part.read_bytes() == BLOB[:100_000]
    server.truncate_after = None
    download_file(f"{server.url}/blob.bin", dest, md5=hashlib.md5(BLOB).hexdigest(), progress=False)
    assert server.requests[-1] == ("/blob.bin", "bytes=100000-")
    assert dest.read_bytes() == BLOB and not part.exists()


def test_unsatisfiable_range_restarts(server: FileServer, tmp_path: Path) -> None:
    """A part file as long as the whole file (size unknown) gets a 416; the download starts over."""
    server.files["/blob.bin"] = BLOB[:1000]
    (tmp_path / "b.bin.part").write_bytes(b"y" * 1000)
    download_file(f"{server.url}/blob.bin", tmp_path / "b.bin", progress=False)
    assert [r[1] for r in server.requests] == ["bytes=1000-", None]
    assert (tmp_path / "b.bin").read_bytes() == BLOB[:1000]


def test_part_longer_than_the_file_is_discarded(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = BLOB[:1000]
    (tmp_path / "b.bin.part").write_bytes(b"z" * 2000)
    download_file(f"{server.url}/blob.bin", tmp_path / "b.bin", size=1000, progress=False)
    assert server.requests == [("/blob.bin", None)]
    assert (tmp_path / "b.bin").read_bytes() == BLOB[:1000]


@pytest.mark.parametrize(
    "expectation",
    [
        {"sha256": hashlib.sha256(b"something else").hexdigest()},
        {"md5": hashlib.md5(b"something else").hexdigest()},
        {"size": len(BLOB) + 1},
    ],
    ids=["sha256", "md5", "size"],
)
def test_mismatch_is_rejected_and_nothing_is_left(
    server: FileServer, tmp_path: Path, expectation: dict[str, object]
) -> None:
    server.files["/blob.bin"] = BLOB
    dest = tmp_path / "blob.bin"
    with pytest.raises(HarnessError, match="corrupt"):
        download_file(f"{server.url}/blob.bin", dest, progress=False, **expectation)  # type: ignore[arg-type]
    assert _files_under(tmp_path) == []


def test_http_error_names_the_url_and_is_not_offline(server: FileServer, tmp_path: Path) -> None:
    url = f"{server.url}/missing.bin"
    with pytest.raises(HarnessError, match="404") as caught:
        download_file(url, tmp_path / "missing.bin", progress=False)
    assert url in str(caught.value)
    assert not is_offline_error(caught.value)
    assert _files_under(tmp_path) == []


def test_offline_fails_at_once_with_the_hint(closed_port_url: str, tmp_path: Path) -> None:
    url = f"{closed_port_url}/weights.pt"
    started = time.monotonic()
    with pytest.raises(HarnessError) as caught:
        download_file(url, tmp_path / "weights.pt", offline_hint="put weights.pt in ~/models", progress=False)
    assert time.monotonic() - started < 5.0
    assert url in str(caught.value)
    assert "put weights.pt in ~/models" in str(caught.value)
    assert is_offline_error(caught.value)
    assert not (tmp_path / "weights.pt").exists()


def test_malformed_url_is_a_harness_error(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="no-scheme.example/x"):
        download_file("no-scheme.example/x", tmp_path / "x", progress=False)


def test_is_offline_error_classification() -> None:
    assert is_offline_error(urllib.error.URLError(ConnectionRefusedError(111, "refused")))
    assert is_offline_error(urllib.error.URLError(socket.gaierror(-2, "Name or service not known")))
    assert not is_offline_error(urllib.error.URLError("unknown url type: htp"))  # a typo, not the network
    assert is_offline_error(TimeoutError("timed out"))
    assert is_offline_error(ConnectionResetError(104, "reset"))
    assert not is_offline_error(urllib.error.HTTPError("http://x", 500, "boom", {}, None))  # type: ignore[arg-type]
    assert not is_offline_error(ValueError("unrelated"))
    assert not is_offline_error(FileNotFoundError(2, "no such file"))
    wrapped = HarnessError("cannot download")
    wrapped.__cause__ = urllib.error.URLError(ConnectionRefusedError(111, "refused"))
    assert is_offline_error(wrapped)


# ----------------------------------------------------------------------------------------- DAVIS-2017


def _davis_zip(synth_root: Path, split: str, extra: dict[str, bytes] | None = None) -> bytes:
    """An archive shaped like the official ones: everything under a top-level DAVIS/ folder."""
    if split == "trainval":
        sequences = [s.name for s in open_dataset(synth_root, "val").sequences]
        split_files = {"train.txt": sequences[:1], "val.txt": sequences}
    else:
        sequences = [s.name for s in open_dataset(synth_root, "test-dev").sequences]
        split_files = {"test-dev.txt": sequences}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("DAVIS/", b"")
        for kind in ("JPEGImages", "Annotations"):
            for sequence in sequences:
                for path in sorted((synth_root / kind / "480p" / sequence).iterdir()):
                    bundle.write(path, f"DAVIS/{kind}/480p/{sequence}/{path.name}")
        for name, names in split_files.items():
            bundle.writestr(f"DAVIS/ImageSets/2017/{name}", "".join(f"{n}\n" for n in names))
        for name, data in (extra or {}).items():
            bundle.writestr(name, data)
    return buffer.getvalue()


def _serve_davis(server: FileServer, synth_root: Path) -> None:
    for split, archive in DAVIS_ARCHIVES.items():
        server.files[f"/davis/{archive}"] = _davis_zip(synth_root, split)


def test_davis_download_and_unpack(server: FileServer, synth_root: Path, tmp_path: Path) -> None:
    _serve_davis(server, synth_root)
    root = download_davis2017(tmp_path / "DAVIS2017", base_url=f"{server.url}/davis/", progress=False)
    assert root == (tmp_path / "DAVIS2017").absolute()
    val, test_dev = open_dataset(root, "val"), open_dataset(root, "test-dev")
    assert [s.name for s in val.sequences] == [s.name for s in open_dataset(synth_root, "val").sequences]
    assert len(test_dev) == len(open_dataset(synth_root, "test-dev"))
    frame = "JPEGImages/480p/synth-reenter/00005.jpg"
    assert (root / frame).read_bytes() == (synth_root / frame).read_bytes()
    assert not (root / "DAVIS").exists()  # the top-level folder was stripped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DAVIS2017"]  # archives and temp folders gone
    # A second call finds both splits in place and does nothing.
    before = len(server.requests)
    download_davis2017(root, base_url=f"{server.url}/davis/", progress=False)
    assert len(server.requests) == before


def test_davis_second_split_merges_into_existing_root(
    server: FileServer, synth_root: Path, tmp_path: Path
) -> None:
    _serve_davis(server, synth_root)
    root = tmp_path / "davis"
    download_davis2017(root, splits=["trainval"], base_url=server.url + "/davis", progress=False)
    with pytest.raises(DataError, match="test-dev"):
        open_dataset(root, "test-dev")
    download_davis2017(root, splits=["trainval", "test-dev"], base_url=server.url + "/davis", progress=False)
    assert len(open_dataset(root, "val")) > 0 and len(open_dataset(root, "test-dev")) > 0
    assert [path for path, _ in server.requests] == [f"/davis/{a}" for a in DAVIS_ARCHIVES.values()]


def test_davis_keep_archives(server: FileServer, synth_root: Path, tmp_path: Path) -> None:
    _serve_davis(server, synth_root)
    download_davis2017(
        tmp_path / "d",
        splits=["test-dev"],
        base_url=f"{server.url}/davis",
        progress=False,
        keep_archives=True,
    )
    kept = [p.name for p in tmp_path.rglob("*.zip")]
    assert kept == [DAVIS_ARCHIVES["test-dev"]]


def test_davis_offline_says_where_to_put_the_data(closed_port_url: str, tmp_path: Path) -> None:
    root = tmp_path / "davis"
    started = time.monotonic()
    with pytest.raises(HarnessError) as caught:
        download_davis2017(root, base_url=closed_port_url, progress=False)
    assert time.monotonic() - started < 5.0
    message = str(caught.value)
    assert f"{root.absolute()}/JPEGImages/480p/<sequence>" in message
    assert f"{root.absolute()}/Annotations/480p/<sequence>" in message
    assert "ImageSets/2017/val.txt" in message
    for archive in DAVIS_ARCHIVES.values():
        assert f"{closed_port_url}/{archive}" in message
    assert not root.exists()


def test_davis_uses_an_archive_placed_by_hand(closed_port_url: str, synth_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "davis"
    archive_dir = tmp_path / ".davis-archives"
    archive_dir.mkdir()
    (archive_dir / DAVIS_ARCHIVES["test-dev"]).write_bytes(_davis_zip(synth_root, "test-dev"))
    download_davis2017(root, splits=["test-dev"], base_url=closed_port_url, progress=False)
    assert len(open_dataset(root, "test-dev")) > 0


@pytest.mark.parametrize("member", ["DAVIS/../escaped.txt", "/tmp/absolute-escape.txt", "DAVIS\\..\\win.txt"])
def test_davis_rejects_members_outside_the_archive(
    server: FileServer, synth_root: Path, tmp_path: Path, member: str
) -> None:
    server.files[f"/davis/{DAVIS_ARCHIVES['test-dev']}"] = _davis_zip(synth_root, "test-dev", {member: b"x"})
    root = tmp_path / "work" / "davis"
    with pytest.raises(DataError, match="refusing member"):
        download_davis2017(root, splits=["test-dev"], base_url=f"{server.url}/davis", progress=False)
    assert not root.exists()
    assert not any(p.name.endswith("escape.txt") or p.name.endswith("win.txt") for p in tmp_path.rglob("*"))
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_davis_corrupt_archive_is_rejected_and_deleted(
    server: FileServer, synth_root: Path, tmp_path: Path
) -> None:
    good = _davis_zip(synth_root, "test-dev")
    middle = len(good) // 2
    # Flip bytes inside the compressed data: the central directory is intact, a member's CRC is not.
    server.files[f"/davis/{DAVIS_ARCHIVES['test-dev']}"] = (
        good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 64]) + good[middle + 64 :]
    )
    root = tmp_path / "davis"
    with pytest.raises(DataError, match="corrupt|not a valid zip"):
        download_davis2017(root, splits=["test-dev"], base_url=f"{server.url}/davis", progress=False)
    assert not root.exists()
    assert not list(tmp_path.rglob("*.zip"))


def test_davis_not_a_zip(server: FileServer, tmp_path: Path) -> None:
    server.files[f"/d/{DAVIS_ARCHIVES['test-dev']}"] = b"<html>maintenance</html>"
    with pytest.raises(DataError, match="not a valid zip"):
        download_davis2017(tmp_path / "d", splits=["test-dev"], base_url=f"{server.url}/d", progress=False)
    assert not (tmp_path / "d").exists()


def test_davis_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'train-val'"):
        download_davis2017(tmp_path / "d", splits=["train-val"], progress=False)
