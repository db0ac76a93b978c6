"""Optuna studies of the pipeline, described in YAML files (``studies/*.yaml``).

:func:`run_sweep` creates or resumes a study and runs its trials (one or several workers, one or several
machines); :func:`load_study_spec` validates a study file (format: :mod:`harness.study.spec`).
"""

from harness.study.cli import add_sweep_arguments, main, sweep_from_args
from harness.study.spec import ParamSpec, StudySpec, load_study_spec, parse_study_spec
from harness.study.storage import HeartbeatSettings, StorageLocation, resolve_storage
from harness.study.sweep import SweepSummary, run_sweep

__all__ = [
    "HeartbeatSettings",
    "ParamSpec",
    "StorageLocation",
    "StudySpec",
    "SweepSummary",
    "add_sweep_arguments",
    "load_study_spec",
    "main",
    "parse_study_spec",
    "resolve_storage",
    "run_sweep",
    "sweep_from_args",
]
