"""``python -m harness.study``: see :mod:`harness.study.cli`."""

import sys

from harness.study.cli import main

sys.exit(main())
