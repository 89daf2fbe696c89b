"""`python -m benchmarks.system`: see benchmarks/system/__init__.py."""

import sys

from benchmarks.system.run import main

sys.exit(main())
