"""Checkpoint files shared by the file-based backbones (ADM, DINO): where they live, download on first use,
a remembered sha256 for cache identities, and reading a state dict safely (``weights_only``)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from backbones.errors import ConfigError, HarnessError, WeightsNotFoundError

WEIGHTS_DIR_ENV = "DIFFVOS_WEIGHTS_DIR"
_HASH_CHUNK = 1 << 22


def weights_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Where downloaded checkpoints live: ``override``, else ``$DIFFVOS_WEIGHTS_DIR``, else the user cache."""
    if override:
        return Path(override).expanduser()
    from_env = os.environ.get(WEIGHTS_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "diffvos" / "weights"


def weights_location(
    label: str,
    weights: str | os.PathLike[str] | None,
    folder: str | os.PathLike[str] | None,
    published: tuple[str, str] | None,
) -> tuple[Path | None, str | None]:
    """(checkpoint path or None for random init, URL to download it from or None).

    An explicit ``weights`` file is used as it is (a folder means the published file name inside it) and
    never downloaded; otherwise a model with published weights (``published`` = (file name, URL)) looks in
    :func:`weights_dir`, and one without (tiny models) is initialised at random.
    """
    if weights is not None and str(weights) != "":
        path = Path(weights).expanduser()
        if path.is_dir():
            if published is None:
                raise ConfigError(f"{path} is a folder; pass the checkpoint file for {label}")
            path = path / published[0]
        return path, None
    if published is None:
        return None, None
    filename, url = published
    return weights_dir(folder) / filename, url


def file_sha256(path: Path) -> str:
    """sha256 of a (large) file, remembered in a ``<file>.sha256`` sidecar so it is computed once.

    The sidecar records the size and mtime it was computed for; if the file is replaced the hash is
    computed again. A read-only folder just means the hash is not remembered.
    """
    stat = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    try:
        record = json.loads(sidecar.read_text())
        if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_HASH_CHUNK):
            digest.update(chunk)
    hex_digest = digest.hexdigest()
    record = {"sha256": hex_digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    temporary = sidecar.with_name(sidecar.name + ".tmp")
    try:
        temporary.write_text(json.dumps(record) + "\n")
        os.replace(temporary, sidecar)
    except OSError:
        temporary.unlink(missing_ok=True)
    return hex_digest


def download(url: str, dest: Path, hint: str) -> None:
    """Fetch ``url`` to ``dest`` with the resumable, atomic downloader (looked up at call time)."""
    downloader = importlib.import_module("backbones.download")
    downloader.download_file(url, dest, size=None, sha256=None, progress=True, offline_hint=hint)


def ensure_weights_file(
    label: str, path: Path, url: str | None, fetch: Callable[[str, Path, str], None] = download
) -> Path:
    """``path``, downloading ``url`` there first when the file is missing; one clear error when it cannot.

    ``label`` names the model in messages (e.g. "ADM"); ``fetch`` is the download function.
    """
    if path.is_file():
        return path
    if url is None:
        raise WeightsNotFoundError(f"{label} checkpoint {path} does not exist")
    hint = (
        f"Download {url} on a machine with network access and put it at {path} "
        f"(or pass its location as the weights, or set ${WEIGHTS_DIR_ENV} to its folder)."
    )
    try:
        fetch(url, path, hint)
    except (HarnessError, ImportError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WeightsNotFoundError(
            f"{label} weights are not at {path} and the download failed ({reason}). {hint}"
        ) from error
    if not path.is_file():
        raise WeightsNotFoundError(f"downloading {url} did not produce {path}. {hint}")
    return path


def read_state_dict(label: str, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, loaded with ``weights_only`` (no pickled code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise HarnessError(
            f"cannot read {label} checkpoint {path}: {error}. "
            "If it is a partial download, delete it and retry."
        ) from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise HarnessError(f"{label} checkpoint {path} is not a state dict of tensors")
    return state
