import sys

from xentlib.cli import main

sys.exit(main())
