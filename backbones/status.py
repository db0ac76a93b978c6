"""Whether a backbone's weights are on this machine, found without loading them (for pre-flight checks).

:func:`weights_status` looks where :func:`backbones.load_backbone` would look (ADM's checkpoint file, a
diffusers folder, or the Hugging Face cache) and says where to put the files when they are missing. It
reads no weights and opens no network connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: backbones with seeded random weights built in memory
WEIGHT_FREE = frozenset({"random-conv", "adm-tiny", "sd-tiny"})


@dataclass(frozen=True)
class WeightsStatus:
    backbone: str
    present: bool
    #: where the weights are (or would be looked for)
    location: str
    #: how to get them when missing ("" when present)
    fix: str = ""


def weights_status(
    name: str, weights: str | None = None, options: Mapping[str, object] | None = None
) -> WeightsStatus:
    """Whether ``name`` (with the run config's ``weights`` and ``options``) would find its weights here."""
    options = dict(options or {})
    if name in WEIGHT_FREE:
        return WeightsStatus(name, True, "none needed (random weights)")
    if name in ("adm",):
        return _adm_status(name, weights, options)
    if name.startswith("sd"):
        return _sd_status(name, weights, options)
    return _described_status(name, weights)


def weights_summary(name: str) -> str:
    """A short "yes (where)" / "no (where)" / "none needed" for `backbones list` and `reproduce --list`."""
    status = weights_status(name)
    if status.location.startswith(("none", "not checked")):
        return status.location
    return f"yes ({status.location})" if status.present else f"no ({status.location})"


def _adm_status(name: str, weights: str | None, options: Mapping[str, object]) -> WeightsStatus:
    from backbones.adm import OFFICIAL_FILENAME, OFFICIAL_URL
    from backbones.weights import WEIGHTS_DIR_ENV, weights_dir

    if weights:
        path = Path(weights).expanduser()
        if path.is_dir():
            path = path / OFFICIAL_FILENAME
    else:
        folder = options.get("weights_dir")
        path = weights_dir(str(folder) if folder else None) / OFFICIAL_FILENAME
    if path.is_file():
        return WeightsStatus(name, True, str(path))
    fix = (
        f"download {OFFICIAL_URL} and put it at {path} (e.g. `curl -L -o {path} {OFFICIAL_URL}`), or set "
        f"${WEIGHTS_DIR_ENV} to the folder that holds {OFFICIAL_FILENAME}"
    )
    return WeightsStatus(name, False, str(path), fix)


def _sd_status(name: str, weights: str | None, options: Mapping[str, object]) -> WeightsStatus:
    from backbones.sd import KNOWN_MODELS, _download_hint, _looks_local, cached_commit

    if weights:
        return _folder_status(name, Path(weights).expanduser())
    if name in KNOWN_MODELS:
        repo, revision = KNOWN_MODELS[name].repo_id, KNOWN_MODELS[name].revision
    else:
        repo, revision = str(options.get("model") or ""), None
        if not repo:
            return WeightsStatus(
                name,
                False,
                "backbone.options.model not given",
                "give backbone.options.model or backbone.weights",
            )
        if _looks_local(repo):
            return _folder_status(name, Path(repo).expanduser())
    revision = str(options.get("revision") or revision or "") or None
    where = f"Hugging Face cache: {repo}" + (f" @ {revision}" if revision else "")
    if cached_commit(repo, revision) is not None:
        return WeightsStatus(name, True, where)
    return WeightsStatus(name, False, where, _download_hint(repo, revision))


def _folder_status(name: str, folder: Path) -> WeightsStatus:
    if (folder / "unet" / "config.json").is_file():
        return WeightsStatus(name, True, str(folder))
    return WeightsStatus(
        name,
        False,
        str(folder),
        f"put a diffusers model folder (with unet/, vae/, scheduler/ ...) at {folder}",
    )


def _described_status(name: str, weights: str | None) -> WeightsStatus:
    """Other backbones (e.g. DINO): the checkpoint path their description names, when it names one.

    A file-based backbone describes its weights as ``<path>`` or ``<path> (downloaded from URL if
    missing)``; a weight-free one as ``none ...``.
    """
    if weights:
        path = Path(weights).expanduser()
        return WeightsStatus(
            name, path.exists(), str(path), "" if path.exists() else f"put the weights at {path}"
        )
    from backbones import describe_backbone

    try:
        text = str(describe_backbone(name).get("weights") or "")
    except Exception:  # noqa: BLE001 - the trial itself reports what is wrong
        return WeightsStatus(name, True, "not checked (the backbone cannot describe its weights)")
    if not text or text.startswith("none"):
        return WeightsStatus(name, True, "none needed")
    path_text, _, note = text.partition(" (")
    path = Path(path_text)
    if not path.is_absolute():
        return WeightsStatus(name, True, f"not checked ({text})")
    if path.exists():
        return WeightsStatus(name, True, str(path))
    source = f" ({note.rstrip(')')})" if note else ""
    return WeightsStatus(name, False, str(path), f"put the checkpoint at {path}{source}")
