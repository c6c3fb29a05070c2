"""Run the calcsvc command line: ``python -m calcsvc``."""

import sys

from calcsvc.cli import main

sys.exit(main())
