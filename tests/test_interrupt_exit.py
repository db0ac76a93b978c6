"""Ctrl-C always ends a command with status 130, wherever the KeyboardInterrupt was raised.

CPython marks a KeyboardInterrupt that ends a string ``exec``/``eval`` (dataclass and namedtuple
creation do those, e.g. during a lazy import) as unhandled even when a caller catches it, and under
``python -m`` it then exits by SIGINT instead of with the status the command returned
(Python/pythonrun.c ``run_eval_code_obj``, Modules/main.c ``Py_RunMain``; bpo-1054041). A CI run saw a
Ctrl-C'd ``python -m harness.study`` print "interrupted" and end with -2. Each case runs a tiny module
with ``python -m`` whose command raises KeyboardInterrupt inside a string exec.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]

RAISE_IN_STRING_EXEC = 'def stopped(args):\n    exec("raise KeyboardInterrupt")\n'

ENTRY_POINTS = {
    "harness": (
        "import argparse, sys\nfrom harness import cli\n"
        + RAISE_IN_STRING_EXEC
        + "sys.exit(cli._dispatch(argparse.Namespace(func=stopped)))\n"
    ),
    "harness.study": (
        "import sys\nfrom harness.study import cli\n"
        + RAISE_IN_STRING_EXEC
        + "cli.sweep_from_args = stopped\nsys.exit(cli.main(['any-study.yaml']))\n"
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_ctrl_c_inside_a_string_exec_exits_130_under_python_m(tmp_path: Path, entry: str) -> None:
    (tmp_path / "interrupted_command.py").write_text(ENTRY_POINTS[entry])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_command"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "interrupted"
