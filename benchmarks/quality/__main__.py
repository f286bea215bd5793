"""`python -m benchmarks.quality` (from the repository root): see `benchmarks/quality/cli.py`."""

import sys

from benchmarks.quality.cli import main

sys.exit(main())
