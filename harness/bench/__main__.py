"""``python -m harness.bench propagation|sweep|evaluation|extraction|all``; see harness.bench.runner."""

import sys

from harness.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
