"""``python -m lorazoo``: the same command line as the ``lorazoo`` script."""

import sys

from .cli import main

sys.exit(main())
