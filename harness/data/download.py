"""Download and unpack the official DAVIS-2017 480p archives into a DAVIS root.

The archives hold everything under a top-level ``DAVIS/`` folder; that folder is stripped so that
``root`` itself becomes the dataset root (``root/JPEGImages/480p/<sequence>``, ...). Archives are
checked (zip CRCs, member names) before anything is written under ``root``, and are unpacked into a
temporary folder next to ``root`` first, so an interrupted run never leaves a half-unpacked split behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from backbones.download import download_file
from harness.errors import ConfigError, DataError

DAVIS_BASE_URL = "https://data.vision.ee.ethz.ch/csergi/share/davis/"
DAVIS_ARCHIVES: dict[str, str] = {
    "trainval": "DAVIS-2017-trainval-480p.zip",
    "test-dev": "DAVIS-2017-test-dev-480p.zip",
}
# The split files each archive provides; when they are all present the archive counts as unpacked.
DAVIS_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "trainval": ("train.txt", "val.txt"),
    "test-dev": ("test-dev.txt",),
}
# Sizes and MD5 sums of the archives are not pinned here: we do not have figures we could vouch for,
# and a wrong pin would reject good downloads. Integrity is checked instead with the CRC-32 of every
# zip member (ZipFile.testzip), which catches truncated and corrupted downloads.
ARCHIVE_PREFIX = "DAVIS"


def archive_urls(base_url: str = DAVIS_BASE_URL, splits: Iterable[str] = tuple(DAVIS_ARCHIVES)) -> list[str]:
    return [base_url.rstrip("/") + "/" + DAVIS_ARCHIVES[split] for split in splits]


def manual_instructions(root: Path, splits: Iterable[str], base_url: str = DAVIS_BASE_URL) -> str:
    """How to put DAVIS-2017 in place by hand, for machines without network."""
    splits = tuple(splits)
    urls = "\n".join(f"  {url}" for url in archive_urls(base_url, splits))
    return (
        f"To install DAVIS-2017 by hand, download\n{urls}\n"
        f"and either put the .zip files in {_archive_dir(root)} and run this again, or unzip them and move "
        f"the contents of their top-level DAVIS/ folder into {root}, so that these exist:\n"
        f"  {root}/JPEGImages/480p/<sequence>/00000.jpg\n"
        f"  {root}/Annotations/480p/<sequence>/00000.png\n"
        f"  {root}/ImageSets/2017/val.txt (and test-dev.txt for test-dev)"
    )


def _archive_dir(root: Path) -> Path:
    return root.parent / f".{root.name}-archives"


def _is_unpacked(root: Path, split: str) -> bool:
    imagesets = root / "ImageSets" / "2017"
    return all((imagesets / name).is_file() for name in DAVIS_SPLIT_FILES[split])


def _safe_member_path(archive: Path, name: str) -> PurePosixPath:
    """The member's path relative to the dataset root; refuses names that could escape it."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: refusing member {name!r} with an absolute or non-POSIX path")
    path = PurePosixPath(name)
    if any(part == ".." for part in path.parts):
        raise DataError(f"{archive}: refusing member {name!r} that points outside the archive ('..')")
    return path


def _check_archive(archive: Path) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Open and test the zip; return (member, path under the dataset root) for every file member."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            broken = bundle.testzip()
            members = bundle.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        archive.unlink(missing_ok=True)
        raise DataError(f"{archive} is not a valid zip archive ({error}); deleted it, run again") from error
    if broken is not None:
        archive.unlink(missing_ok=True)
        raise DataError(f"{archive} is corrupt (bad CRC in member {broken!r}); deleted it, run again")
    paths = [(member, _safe_member_path(archive, member.filename)) for member in members]
    # Strip the top-level DAVIS/ folder; tolerate archives (e.g. from mirrors) that do not have it.
    strip = all(path.parts[:1] == (ARCHIVE_PREFIX,) for _, path in paths)
    files = []
    for member, path in paths:
        relative = PurePosixPath(*path.parts[1:]) if strip else path
        if member.is_dir() or not relative.parts:
            continue
        files.append((member, relative))
    if not files:
        raise DataError(f"{archive} contains no files")
    return files


def _extract(
    archive: Path, files: list[tuple[zipfile.ZipInfo, PurePosixPath]], into: Path, progress: bool
) -> None:
    with zipfile.ZipFile(archive) as bundle:
        for member, relative in tqdm(
            files, desc=f"unpacking {archive.name}", unit="file", disable=not progress, leave=False
        ):
            target = into.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with bundle.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 20)


def _merge(staging: Path, root: Path) -> None:
    """Move the unpacked tree into ``root``.

    When ``root`` does not exist this is one rename. Otherwise files are moved one by one, split files
    (ImageSets) last, so a split file never lists sequences whose files are not there yet.
    """
    if not root.exists():
        os.replace(staging, root)
        return
    relative_files = sorted(p.relative_to(staging) for p in staging.rglob("*") if p.is_file())
    relative_files.sort(key=lambda relative: relative.parts[0] == "ImageSets")  # stable: keeps the order
    for relative in relative_files:
        source, target = staging / relative, root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    shutil.rmtree(staging, ignore_errors=True)


def download_davis2017(
    root: Path,
    *,
    splits: Iterable[str] = ("trainval", "test-dev"),
    base_url: str = DAVIS_BASE_URL,
    progress: bool = True,
    keep_archives: bool = False,
    timeout: float = 30.0,
) -> Path:
    """Make ``root`` a DAVIS-2017 480p root with the given splits ("trainval", "test-dev"); return it.

    Splits already unpacked are skipped. Archives are downloaded (resumably) to a hidden folder next to
    ``root``; a .zip placed there by hand is used as is. Offline, fails at once with instructions.
    """
    root = Path(root).expanduser().absolute()
    splits = tuple(splits)
    unknown = [split for split in splits if split not in DAVIS_ARCHIVES]
    if unknown or not splits:
        raise ConfigError(
            f"unknown DAVIS-2017 split(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"choose from {', '.join(DAVIS_ARCHIVES)}"
        )
    if root.exists() and not root.is_dir():
        raise DataError(f"DAVIS root {root} exists and is not a folder")
    hint = manual_instructions(root, splits, base_url)
    archive_dir = _archive_dir(root)
    for split in splits:
        if _is_unpacked(root, split):
            continue
        (url,) = archive_urls(base_url, [split])
        try:
            archive = download_file(
                url,
                archive_dir / DAVIS_ARCHIVES[split],
                progress=progress,
                timeout=timeout,
                offline_hint=hint,
            )
        except BaseException:
            _remove_if_empty(archive_dir)  # offline: leave no empty archive folder behind (a part file stays)
            raise
        files = _check_archive(archive)
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.unpack-"))
        try:
            _extract(archive, files, staging, progress)
            if not (staging / "JPEGImages" / "480p").is_dir():
                raise DataError(f"{archive} does not hold a DAVIS layout (no JPEGImages/480p inside)")
            if not _is_unpacked(staging, split):
                wanted = " and ".join(DAVIS_SPLIT_FILES[split])
                raise DataError(f"{archive} does not provide ImageSets/2017/{wanted}")
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; it may become root itself
            _merge(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if not keep_archives:
            archive.unlink(missing_ok=True)
    _remove_if_empty(archive_dir)
    return root


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty
    except OSError:
        pass
