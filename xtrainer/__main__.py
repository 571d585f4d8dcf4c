"""`python -m xtrainer ...`: the same as the `xtrainer` console script (see xtrainer/cli.py)."""

import sys

from .cli import main

sys.exit(main())
