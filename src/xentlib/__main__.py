"""`python -m xentlib ...` is the `xentlib` console script."""

import sys

from xentlib.cli import main

sys.exit(main())
