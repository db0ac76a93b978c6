"""optuna-dashboard over every local study at once.

optuna-dashboard serves one storage, and each local study has its own journal file
(``studies-storage/<study>.journal``). :func:`gather_studies` copies every study of every journal into one
in-memory storage, which :func:`serve` hands to optuna-dashboard: a snapshot taken when it starts (run
``make dashboard STUDY=name`` for one study's live journal).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.study.storage import JOURNAL_SUFFIX, open_storage, resolve_storage


def journal_files(folder: Path) -> list[Path]:
    return sorted(path for path in Path(folder).glob(f"*{JOURNAL_SUFFIX}") if path.is_file())


def gather_studies(folder: Path) -> tuple[Any, list[str]]:
    """An in-memory Optuna storage holding a copy of every study in the journals under ``folder``."""
    import optuna

    target = optuna.storages.InMemoryStorage()
    names: list[str] = []
    for journal in journal_files(folder):
        storage = open_storage(resolve_storage(str(journal), "dashboard"))
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            name = summary.study_name
            if name in names:
                name = f"{name} ({journal.name})"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.copy_study(
                    from_study_name=summary.study_name,
                    from_storage=storage,
                    to_storage=target,
                    to_study_name=name,
                )
            names.append(name)
    return target, names


def serve(folder: Path, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Start optuna-dashboard on a snapshot of every study under ``folder`` (blocks until stopped)."""
    storage, names = gather_studies(folder)
    if not names:
        raise ConfigError(f"no studies under {folder} yet; run a sweep first (make sweep STUDY=quickstart)")
    try:
        from optuna_dashboard import run_server
    except ImportError as error:
        raise ConfigError("optuna-dashboard is not installed (pip install optuna-dashboard)") from error
    print(
        f"optuna-dashboard on http://{host}:{port}: {len(names)} studies ({', '.join(names)}), "
        "a snapshot taken now; `make dashboard STUDY=name` follows one study live",
        flush=True,
    )
    run_server(storage, host=host, port=port)
